"""`python model_def.py CONFIG --check`: a config's errors, found before the cluster spends anything.

On a cluster a config error inside a trial ends that trial as invalid hyperparameters
(launcher.run_on_cluster), which Determined 0.38.1 records as COMPLETED; ASHA does not replace
it, so an error that every trial hits ends the whole search after max_concurrent_trials trials.
The check runs the trial's own parsing (config.parse_experiment_config, over
resources.slots_per_trial slots) at every corner point of the searcher's space (hpspace.py), and
opens the data locations it can reach from here with sources.py's own functions. Nothing is
trained or downloaded: a dataset that is not here, a local folder that may exist only on the
agents and a gs:// location without credentials are notes, not problems.

It prints a note per thing worth knowing ("note: ..."), one line per problem ("error: ...",
each once, with the point where it occurs), and last "ok: N hyperparameter points checked"
(exit 0) or "failed: ..." (exit 1). With --gpu-memory SIZE it also estimates each point's
training step (memory.py) and warns ("warning: ...", exit status unchanged) where one would not
fit a GPU of that size, naming the largest per-GPU batch that fits.
"""

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import checkpoint
import data
import gcs
import hpspace
import pretrained
import shards
import sources
from config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FineTuneConfig,
    load_config,
    parse_experiment_config,
    parse_finetune_config,
    slots_per_trial,
)

# Determined's expconf schemas with their offline checker, where this checkout sits beside the
# project's shared tools. The determined package no longer ships the schemas (the master
# validates configs), so elsewhere the master checks those parts at `det experiment create`.
MASTER_SCHEMA_CHECKER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tools", "expconf", "check.py"
)

# How long one gs:// location may take to answer (retries included) before it is a note.
GCS_CHECK_DEADLINE_S = 10.0


@dataclasses.dataclass
class Report:
    """What the check found: notes in order, and each problem once with the indices of the
    points where it occurs (none for a problem of the config as a whole)."""

    points: List[hpspace.Point] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)
    problems: Dict[str, List[int]] = dataclasses.field(default_factory=dict)

    def problem(self, message: str, point: Optional[int] = None) -> None:
        where = self.problems.setdefault(message, [])
        if point is not None:
            where.append(point)

    def lines(self) -> List[str]:
        out = [f"note: {note}" for note in self.notes]
        out += [f"warning: {warning}" for warning in self.warnings]
        out += [f"error: {message}{self._where(at)}" for message, at in self.problems.items()]
        checked = f"{counted(len(self.points), 'hyperparameter point')} checked"
        if self.problems:
            out.append(f"failed: {counted(len(self.problems), 'problem')}, {checked}")
        else:
            out.append(f"ok: {checked}")
        return out

    def _where(self, at: List[int]) -> str:
        """Where a problem occurs: its first point, and how many more."""
        if not at or not self.points[at[0]]:  # the config as a whole, or nothing searched
            return ""
        if len(at) == len(self.points):
            return f" (at all {len(at)} points)"
        more = f"; and {counted(len(at) - 1, 'more point')}" if len(at) > 1 else ""
        return f" (at {hpspace.describe(self.points[at[0]])}{more})"


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclasses.dataclass
class DataFacts:
    """What the data of one dataset_name is, as far as it can be seen from here: problems that
    do not depend on other hyperparameters, and the training images' count and classes where
    known (for the rules that do)."""

    problems: List[str] = dataclasses.field(default_factory=list)
    training_images: Optional[int] = None
    classes: Optional[List[str]] = None


def run_check(
    config_path: str,
    overrides: List[str],
    gpu_memory: Optional[int] = None,
    parse: Callable[[Dict[str, Any], int], Any] = parse_experiment_config,
    point_problems: Callable[[DataFacts, Any], List[str]] = None,
) -> int:
    """Check the config (with its --set overrides), print the report, return the exit status.
    `gpu_memory`: bytes a GPU has, to check each point's training step against; `parse`: the
    trial's own parsing of a config; `point_problems(facts, typed config)`: the rules that
    depend on the data and the hyperparameters (BYOL's by default)."""
    report = Report()
    experiments = check_config(config_path, overrides, report, parse, point_problems)
    if gpu_memory is not None:
        if parse is parse_experiment_config:
            check_gpu_memory(experiments, gpu_memory, report)
        else:
            report.notes.append("--gpu-memory: only BYOL pretraining steps are estimated")
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


def run_finetune_check(
    config_path: str, overrides: List[str], gpu_memory: Optional[int] = None
) -> int:
    """`python finetune.py CONFIG --check`: the fine-tuning trial's parsing and data rules."""
    return run_check(
        config_path, overrides, gpu_memory, parse_finetune_config, finetune_point_problems
    )


def check_config(
    config_path: str,
    overrides: List[str],
    report: Report,
    parse: Callable[[Dict[str, Any], int], Any] = parse_experiment_config,
    point_problems: Callable[[DataFacts, Any], List[str]] = None,
) -> List[Tuple[int, Any, int]]:
    """Fill `report`; return (point index, typed config, slots) of each point that parsed."""
    point_problems = point_problems or point_data_problems
    parsed: List[Tuple[int, Any, int]] = []
    try:
        raw = load_config(config_path, overrides)
    except ConfigError as e:
        report.problem(str(e))
        return parsed
    refused = master_schema_errors(raw, report)
    for error in refused:
        report.problem(f"the master refuses the config: {error}")
    if refused:  # no experiment, no trial: the rest waits until the master accepts it
        return parsed
    searcher = raw.get("searcher")
    try:
        slots = slots_per_trial(raw)
        space = hpspace.corners(
            raw.get("hyperparameters") or {},
            grid=isinstance(searcher, dict) and searcher.get("name") == "grid",
        )
    except ConfigError as e:
        report.problem(str(e))
        return parsed
    report.points, exhaustive = hpspace.corner_points(space)
    report.notes.append(coverage_note(space, len(report.points), exhaustive))
    surveys: Dict[str, DataFacts] = {}
    for index, point in enumerate(report.points):
        hparams = hpspace.hparams_at(raw.get("hyperparameters") or {}, space, point)
        try:
            # The trial's own parsing (launcher.run_on_cluster), at this point.
            experiment = parse(dict(raw, hyperparameters=hparams), slots)
        except ConfigError as e:
            report.problem(str(e), index)
            continue
        parsed.append((index, experiment, slots))
        name = experiment.hparams.dataset_name
        if name not in surveys:
            surveys[name] = survey_data(name, experiment.data, report.notes)
        for message in surveys[name].problems + point_problems(surveys[name], experiment):
            report.problem(message, index)
    return parsed


def check_gpu_memory(experiments: List[Tuple[int, Any, int]], gpu_bytes: int, report: Report):
    """Warn where a point's training step is expected not to fit one GPU of `gpu_bytes`, once
    per distinct step (backbone, size, per-GPU batch, widths, optimizer)."""
    import torch

    import device
    import memory

    steps: Dict[Tuple, List[Tuple[int, Any, int]]] = {}
    for index, experiment, slots in experiments:
        hp = experiment.hparams
        per_gpu = hp.global_batch_size // slots
        autocast = device.autocast_dtype(hp.precision, torch.device("cuda"))  # as on a GPU
        key = (hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size, per_gpu,
               hp.projector_hidden_dim, hp.projection_dim, hp.optimizer, autocast)  # fmt: skip
        steps.setdefault(key, []).append((index, experiment, slots))
    for (*_, per_gpu, _, _, _, autocast), points in steps.items():
        index, experiment, slots = points[0]
        hp = experiment.hparams
        peak = memory.step_peak_bytes(hp, per_gpu, autocast)
        if memory.fits(peak, gpu_bytes):
            continue
        largest = memory.largest_fitting_batch(hp, per_gpu, peak, autocast, gpu_bytes)
        fitting = (
            f"the largest per-GPU batch that fits is {largest} (global_batch_size "
            f"{largest * slots} over {slots} slot{'s' if slots > 1 else ''})"
            if largest
            else "not even 2 images a GPU fit"
        )
        # Where the step differs between points (a searched backbone or batch), which point.
        where = f" (at {hpspace.describe(report.points[index])})" if len(steps) > 1 else ""
        report.warnings.append(
            f"a training step of {hp.backbone_name} at {hp.augmentation.image_size} px with "
            f"{per_gpu} images a GPU is expected to need {peak / 2**30:.1f} GiB plus about "
            f"{memory.CUDA_RESERVE_BYTES / 2**30:.0f} GiB for CUDA (memory.py, estimated without "
            f"a GPU), more than --gpu-memory {gpu_bytes / 2**30:g} GiB: {fitting}{where}"
        )


def coverage_note(space: hpspace.Space, points: int, exhaustive: bool) -> str:
    names = [hpspace.dotted(path) for path in hpspace.searched(space)]
    if not names:
        return "no hyperparameter is searched: the config's own values are checked"
    if exhaustive:
        return (
            f"{points} points: every combination of the corners of {', '.join(names)} "
            f"(each range at its ends, every categorical value)"
        )
    return (
        f"{points} points: every pair of {len(names)} searched hyperparameters at all their "
        f"corner combinations, the others at a corner (all {hpspace.product_size(space)} "
        f"combinations would be more than {hpspace.PRODUCT_LIMIT})"
    )


def master_schema_errors(raw: Dict[str, Any], report: Report) -> List[str]:
    """The errors of the master's own schema validation (../shared/tools/expconf), where its
    checker is beside this checkout; otherwise a note and none."""
    if not os.path.isfile(MASTER_SCHEMA_CHECKER):
        report.notes.append(
            "the master's own schema check (Determined's expconf schemas) is not here: the "
            "master checks the config's other parts at `det experiment create`"
        )
        return []
    spec = importlib.util.spec_from_file_location("expconf_check", MASTER_SCHEMA_CHECKER)
    checker = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(checker)
    except ImportError as e:  # jsonschema is a test requirement, not a runtime one
        report.notes.append(f"the master's own schema check cannot run here ({e})")
        return []
    errors = checker.validation_errors(raw)
    if not errors:
        report.notes.append("the master's own schemas (Determined's expconf) accept the config")
    return errors


def point_data_problems(facts: DataFacts, experiment: ExperimentConfig) -> List[str]:
    """The data rules that depend on other hyperparameters, where the data is known here."""
    problems = []
    hp = experiment.hparams
    if facts.training_images is not None:
        try:
            data.check_one_batch(facts.training_images, hp.global_batch_size)
        except ConfigError as e:
            problems.append(str(e))
    if facts.classes is not None:
        try:
            data.check_probe_classes(facts.classes, hp.validate_with_classifier)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def finetune_point_problems(facts: DataFacts, config: FineTuneConfig) -> List[str]:
    """The fine-tuning trial's rules on what is known here: a local pretrained backbone must be
    a complete BYOL checkpoint or an export with its description; the classifier needs 2+
    classes. (The label fraction's rule needs the per-class counts: the trial refuses a
    fraction too small for its data at start, before any work.)"""
    problems = []
    source = config.hparams.pretrained
    try:
        if source.kind == "checkpoint":
            checkpoint.check(source.checkpoint)
        elif source.kind == "export":
            pretrained.from_export(source.export)
    except ConfigError as e:
        problems.append(f"hyperparameters.pretrained.{source.kind}: {e}")
    if facts.classes is not None and len(facts.classes) < 2:
        problems.append(
            f"the labeled training images have {len(facts.classes)} class(es); a classifier "
            f"needs at least 2 class folders"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Data locations, as far as they can be reached from here
# --------------------------------------------------------------------------------------------


def survey_data(dataset_name: str, config: DataConfig, notes: List[str]) -> DataFacts:
    if dataset_name in data.TORCHVISION_DATASETS:
        notes.append(download_note(dataset_name, config.download_dir))
        return DataFacts()
    return survey_image_folders(config, notes, GCSCheck())


def download_note(dataset_name: str, download_dir: str) -> str:
    missing = data.missing_download(dataset_name, download_dir)
    where = f"data.download_dir={download_dir!r}"
    if not missing:
        return f"{where} holds {dataset_name} here: a run here opens it without downloading"
    return (
        f"{where} does not hold {dataset_name} here (no {missing[0]}): a trial downloads it "
        f"at start where it is missing"
    )


def survey_image_folders(config: DataConfig, notes: List[str], remote: "GCSCheck") -> DataFacts:
    facts = DataFacts()
    unlabeled = (
        survey_unlabeled(config.unlabeled_dir, config, remote)
        if config.unlabeled_dir
        else Found(images=0)
    )
    if config.train_dir is None:  # no labels (parse_experiment_config checked the folders)
        notes.extend([unlabeled.note] if unlabeled.note else [])
        facts.problems.extend([unlabeled.problem] if unlabeled.problem else [])
        facts.training_images = unlabeled.images
        return facts
    train = survey_folder(
        "data.train_dir", config.train_dir, config.train_blob_list, config, remote
    )
    test = survey_folder("data.test_dir", config.test_dir, config.test_blob_list, config, remote)
    for location in (train, test, unlabeled):
        notes.extend([location.note] if location.note else [])
        facts.problems.extend([location.problem] if location.problem else [])
    if train.classes is not None and test.classes is not None:
        try:
            data.check_same_classes(train.classes, test.classes, config)
        except ConfigError as e:
            facts.problems.append(str(e))
    facts.classes = train.classes
    if train.images is not None and unlabeled.images is not None:
        facts.training_images = train.images + unlabeled.images
    return facts


@dataclasses.dataclass
class Found:
    """One data location as seen from here: its images and classes where it was opened, or a
    note on what could not be checked, or the problem the trial would meet."""

    images: Optional[int] = None
    classes: Optional[List[str]] = None
    note: Optional[str] = None
    problem: Optional[str] = None


def not_here(what: str, path: str) -> Found:
    return Found(note=f"{what}={path!r} is not here: not checked (it may be on the agents)")


def survey_folder(
    what: str, path: str, blob_list: Optional[str], config: DataConfig, remote: "GCSCheck"
) -> Found:
    """A labeled folder or shard set: opened as the trial opens it where it is local (a local
    shard set's index read and its shards' sizes checked, no image read), checked without
    reading where it is on gs://."""
    try:
        sources.check_blob_list(path, blob_list)
        if path.startswith("gs://"):
            gcs.parse_gcs_url(path)  # the bucket name's rule needs no request
            return remote.check(what, path, blob_list)
        if not os.path.exists(path):
            return not_here(what, path)
        source = sources.open_folder(path, blob_list, config, sources.run_here)
    except (ConfigError, shards.MissingShardError) as e:
        return Found(problem=f"{what}: {e}")
    return Found(
        images=len(source),
        classes=source.classes,
        note=f"{what}={path!r}: {len(source)} images in {len(source.classes)} classes",
    )


def survey_unlabeled(path: str, config: DataConfig, remote: "GCSCheck") -> Found:
    """data.unlabeled_dir opened as the trial opens it where it is local (a folder scanned at
    any depth, a shard set's index read), checked without reading where it is on gs://."""
    what = "data.unlabeled_dir"
    try:
        if path.startswith("gs://"):
            gcs.parse_gcs_url(path)
            return remote.check(what, path, None)
        if not os.path.exists(path):
            return not_here(what, path)
        count = len(sources.open_unlabeled(path, config, sources.run_here))
    except (ConfigError, shards.MissingShardError) as e:
        return Found(problem=str(e))
    return Found(images=count, note=f"{what}={path!r}: {count} images, labels not read")


class GCSCheck:
    """gs:// locations checked with this machine's credentials, one request each, nothing
    downloaded: a shard index or blob list exists, a folder holds objects. Not found is a
    problem; anything else (no credentials here, no permission, no answer in time) is a note,
    since the agents read with their own credentials."""

    def __init__(self):
        self.client, self.unusable = None, None

    def _client(self):
        if self.client is None and self.unusable is None:
            try:
                self.client = gcs.gcs_client()
            except gcs.GCSError as e:
                self.unusable = str(e)
        return self.client

    def check(self, what: str, url: str, blob_list: Optional[str]) -> Found:
        client = self._client()
        if client is None:
            return Found(note=f"{what}={url!r} not checked here: {self.unusable}")
        bucket, prefix = gcs.parse_gcs_url(url)
        try:
            if shards.is_shard_index(url):
                kind = "the shard index"
                found = gcs.object_exists(client, bucket, prefix.rstrip("/"), GCS_CHECK_DEADLINE_S)
            elif blob_list is not None:
                list_bucket, list_name = sources.blob_list_object(bucket, blob_list)
                kind = f"its blob list gs://{list_bucket}/{list_name}"
                found = gcs.object_exists(client, list_bucket, list_name, GCS_CHECK_DEADLINE_S)
            else:
                kind = "the folder"
                found = gcs.prefix_holds_objects(client, bucket, prefix, GCS_CHECK_DEADLINE_S)
        except gcs.GCSError as e:
            if e.status == 404:  # no such bucket
                return Found(problem=f"{what}={url!r}: {e}")
            return Found(note=f"{what}={url!r} could not be checked here: {e}")
        if not found:
            missing = "holds no objects" if kind == "the folder" else "does not exist"
            return Found(problem=f"{what}={url!r}: {kind} {missing}")
        return Found(note=f"{what}={url!r}: {kind} exists (checked here, not read)")
