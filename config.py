"""The experiment config: loading, `--set` overrides, and the typed, validated config.

The raw experiment config (a dict) is read in exactly one place: `parse_experiment_config` turns
it into frozen dataclasses (hyperparameters, data, run) and validate every value there, so a bad
config is refused with a message naming the value and what is allowed before any data is read or
any model is built. Nothing else in the package reads the raw dict, except the search space
of a `hyperparameters` section, which no trial sees: hpspace.py turns it into the values a trial
receives, for `model_def.py CONFIG --check` (preflight.py).
"""

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

logger = logging.getLogger("byol.config")


class ConfigError(ValueError):
    """A config value a user wrote is not allowed; the message names the value and the rule."""


# --------------------------------------------------------------------------------------------
# Loading and overriding the experiment config
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last
    one silently, so a pasted second `learning_rate:` would win unnoticed)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping: lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read an experiment config yaml and apply `DOTTED.PATH=VALUE` overrides in order."""
    try:
        with open(path) as f:
            config = yaml.load(f, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"config file {path!r}: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid yaml: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, not {type(config).__name__}")
    for override in overrides:
        apply_override(config, override)
    return config


# Config values a resumed run may change without altering what it computes (how often it
# validates, checkpoints and reports; how it reads data; what validation measures). Everything
# else (the schedules' length, the batch, the data, augmentation, model, optimiser) is refused.
FREE_ON_RESUME = (
    "name",
    "description",
    "labels",
    "resources",
    "max_restarts",
    "checkpoint_storage",
    "checkpoint_policy",
    "searcher",
    "min_validation_period",
    "min_checkpoint_period",
    "scheduling_unit",
    "perform_initial_validation",
    "data.num_workers",
    "data.gcs_concurrency",
    "data.cache_dir",
    "data.strict_images",
    "data.download_dir",
    "hyperparameters.augment_on",
    "hyperparameters.compile",
    "hyperparameters.validate_with_classifier",
    "hyperparameters.classifier_",
    "hyperparameters.knn_",
    "hyperparameters.collapse_std_threshold",
)


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_changes(stored: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """'path: old -> new' for each value that differs between a checkpoint's config and the
    config of a run resuming it, leaving out what FREE_ON_RESUME allows to change."""
    old_values, new_values = _flatten(stored), _flatten(new)
    changes = []
    for path in sorted(set(old_values) | set(new_values)):
        if path.startswith(FREE_ON_RESUME) or path.split(".")[0] in FREE_ON_RESUME:
            continue
        old, value = old_values.get(path, "(unset)"), new_values.get(path, "(unset)")
        if _yaml_number(old) != _yaml_number(value):
            changes.append(f"{path}: {old!r} -> {value!r}")
    return changes


DATA_PATHS = ("train_dir", "test_dir", "unlabeled_dir", "download_dir", "cache_dir")


def absolute_data_paths(config: Dict[str, Any]) -> None:
    """Local data paths as absolute paths, so the config stored with each checkpoint works from
    any directory (evaluate_result.py, --resume); gs:// urls stay as they are."""
    section = config.get("data") or {}
    for key in DATA_PATHS:
        value = section.get(key)
        if isinstance(value, str) and value and not value.startswith("gs://"):
            section[key] = os.path.abspath(os.path.expanduser(value))


def add_set_option(parser: Any, example: str) -> None:
    """The `--set DOTTED.PATH=VALUE` option (repeatable) of the commands that read a config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="DOTTED.PATH=VALUE",
        help=f"override a value of the experiment config (parsed as yaml), e.g. {example}",
    )


def apply_override(config: Dict[str, Any], override: str) -> None:
    """Set one `DOTTED.PATH=VALUE` in place. The path must already exist in the config, so a
    typo is refused instead of silently adding a key nobody reads. VALUE is parsed as yaml
    (`3` is an int, `true` a bool, `[0.1, 1.0]` a list, `null` None)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected DOTTED.PATH=VALUE")
    dotted, raw_value = override.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = config
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[:depth]) or "the top level"
            allowed = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(
                f"--set {dotted}: {key!r} does not exist under {where}; "
                f"existing keys there: {', '.join(map(str, allowed)) or '(none)'}"
            )
        if depth == len(keys) - 1:
            try:
                node[key] = yaml.safe_load(raw_value)
            except yaml.YAMLError as e:
                raise ConfigError(
                    f"--set {dotted}: value {raw_value!r} is not valid yaml: {e}"
                ) from None
        else:
            node = node[key]


# --------------------------------------------------------------------------------------------
# Typed hyperparameters
# --------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "stl10", "image_folder")
AUGMENT_PLACES = ("auto", "device", "loader")
DECODE_PLACES = ("auto", "cpu", "gpu")
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("lars", "adamw")
# Above this base LR (x batch / 256) AdamW diverges: it is a LARS learning rate. DINO's is 5e-4.
ADAMW_MAX_LEARNING_RATE = 0.01


@dataclasses.dataclass(frozen=True)
class ViewAugmentation:
    """Probabilities that differ between BYOL's two views (paper, Table 6)."""

    blur_prob: float
    solarize_prob: float


@dataclasses.dataclass(frozen=True)
class Augmentation:
    image_size: int
    crop_scale: Tuple[float, float]
    crop_ratio: Tuple[float, float]
    flip_prob: float
    jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_prob: float
    blur_sigma: Tuple[float, float]
    view1: ViewAugmentation
    view2: ViewAugmentation


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The linear probe and kNN that validation runs (hyperparameters.classifier_*, knn_*)."""

    lrs: Tuple[float, ...]  # one head per learning rate; the best on held-out images is chosen
    epochs: int
    batch_size: int
    holdout_fraction: float  # of the labeled training images, held out to choose the LR
    knn_k: int
    knn_temperature: float


@dataclasses.dataclass(frozen=True)
class HParams:
    dataset_name: str
    backbone_name: str
    cifar_stem: bool
    pretrained_weights: Optional[str]
    global_batch_size: int
    epochs: int
    warmup_epochs: float
    optimizer: str  # lars or adamw; the default follows the backbone's family
    learning_rate: float
    weight_decay: float
    lars_momentum: float
    lars_trust_coefficient: float
    tau_base: float
    projector_hidden_dim: int
    projection_dim: int
    augmentation: Augmentation
    augment_on: str
    precision: str
    compile: Union[bool, str]  # true, false or "auto" (device.compiles)
    sync_batchnorm: bool
    validate_with_classifier: bool
    probe: "ProbeConfig"
    collapse_std_threshold: float

    @property
    def peak_learning_rate(self) -> float:
        """The linear scaling rule of the BYOL paper: base LR x batch / 256."""
        return self.learning_rate * self.global_batch_size / 256


@dataclasses.dataclass(frozen=True)
class DataConfig:
    download_dir: str
    train_dir: Optional[str]
    test_dir: Optional[str]
    unlabeled_dir: Optional[str]
    cache_dir: Optional[str]
    train_blob_list: Optional[str]
    test_blob_list: Optional[str]
    num_workers: int
    strict_images: bool
    gcs_concurrency: int
    # BYOL training's JPEGs: decoded by the loader workers (cpu) or on the training GPU (gpu;
    # auto: for a shard set on a GPU), see data.decodes_on_device.
    decode_on: str


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as a string; take it as the number a user meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


class _Reader:
    """Takes typed values out of one mapping, remembering which keys were read, so unknown keys
    (typos) can be reported with the list of known ones."""

    def __init__(self, raw: Dict[str, Any], where: str):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping, got {raw!r}")
        self.raw, self.where, self.read = raw, where, set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        self.read.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is dataclasses.MISSING:
            raise ConfigError(f"{self._name(key)} is required but missing")
        return default

    def choice(self, key: str, allowed: Sequence[Any], default: Any = dataclasses.MISSING) -> Any:
        value = self.get(key, default)
        # Compared with their types, so YAML's 1 is not `true`; booleans shown as YAML writes them.
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(str(a).lower() if isinstance(a, bool) else a for a in allowed)
            raise ConfigError(f"{self._name(key)}={value!r} is not one of: {shown}")
        return value

    def boolean(self, key: str, default: Any = dataclasses.MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}={value!r} must be true or false")
        return value

    def integer(self, key: str, default: Any = dataclasses.MISSING, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self._name(key)}={value!r} must be an integer >= {minimum}")
        return value

    def number(
        self,
        key: str,
        default: Any = dataclasses.MISSING,
        low: float = 0.0,
        high: float = math.inf,
        low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> float:
        value = _yaml_number(self.get(key, default))
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        ok = ok and (value >= low if low_inclusive else value > low)
        ok = ok and (value <= high if high_inclusive else value < high)
        if not ok:
            lo = "[" if low_inclusive else "("
            hi = "]" if high_inclusive else ")"
            raise ConfigError(
                f"{self._name(key)}={value!r} must be a number in {lo}{low}, {high}{hi}"
            )
        return float(value)

    def probability(self, key: str, default: Any = dataclasses.MISSING) -> float:
        return self.number(key, default, 0.0, 1.0)

    def positive(self, key: str, default: Any = dataclasses.MISSING) -> float:
        return self.number(key, default, 0.0, math.inf, low_inclusive=False)

    def interval(
        self, key: str, default: Any, low: float = 0.0, high: float = math.inf
    ) -> Tuple[float, float]:
        value = self.get(key, default)
        ok = isinstance(value, (list, tuple)) and len(value) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ok = ok and low <= value[0] <= value[1] <= high and value[1] > 0
        if not ok:
            raise ConfigError(
                f"{self._name(key)}={value!r} must be a pair [min, max] with "
                f"{low} <= min <= max <= {high}"
            )
        return (float(value[0]), float(value[1]))

    def optional_str(self, key: str) -> Optional[str]:
        value = self.get(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{self._name(key)}={value!r} must be a non-empty string or null")
        return value

    def optional(self, key: str, read: Callable[[str], Any]) -> Any:
        """None where the key is unset or null, else `read(key)` (one of the getters above)."""
        return None if self.get(key, None) is None else read(key)

    def sub(self, key: str, default: Any = dataclasses.MISSING) -> "_Reader":
        return _Reader(self.get(key, default), self._name(key))

    def refuse_unknown(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            raise ConfigError(
                f"{self.where} has unknown key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(self.read))}"
            )


def _parse_view(reader: _Reader) -> ViewAugmentation:
    view = ViewAugmentation(
        blur_prob=reader.probability("blur_prob"),
        solarize_prob=reader.probability("solarize_prob"),
    )
    reader.refuse_unknown()
    return view


def default_crop_scale(image_size: int) -> List[float]:
    """The paper's crop scale is 0.08-1 at 224 px; on 32 px images 0.08 leaves ~9 px crops,
    so small images default to the 0.2 lower bound that CIFAR BYOL/SimCLR runs use."""
    return [0.2, 1.0] if image_size <= 64 else [0.08, 1.0]


def _parse_augmentation(reader: _Reader) -> Augmentation:
    image_size = reader.integer("image_size", minimum=8)
    aug = Augmentation(
        image_size=image_size,
        crop_scale=reader.interval("crop_scale", default_crop_scale(image_size), 0.0, 1.0),
        crop_ratio=reader.interval("crop_ratio", [3 / 4, 4 / 3], 0.0),
        flip_prob=reader.probability("flip_prob", 0.5),
        jitter_prob=reader.probability("jitter_prob", 0.8),
        brightness=reader.number("brightness", 0.4, 0.0, 1.0),
        contrast=reader.number("contrast", 0.4, 0.0, 1.0),
        saturation=reader.number("saturation", 0.2, 0.0, 1.0),
        hue=reader.number("hue", 0.1, 0.0, 0.5),
        grayscale_prob=reader.probability("grayscale_prob", 0.2),
        blur_sigma=reader.interval("blur_sigma", [0.1, 2.0], 0.0),
        view1=_parse_view(reader.sub("view1", {"blur_prob": 1.0, "solarize_prob": 0.0})),
        view2=_parse_view(reader.sub("view2", {"blur_prob": 0.1, "solarize_prob": 0.2})),
    )
    reader.refuse_unknown()
    return aug


def _global_batch_size(r: _Reader, slots: int) -> int:
    """hyperparameters.global_batch_size, split evenly over `slots` processes."""
    global_batch_size = r.integer("global_batch_size", minimum=2)
    if global_batch_size % slots != 0 or global_batch_size // slots < 2:
        raise ConfigError(
            f"hyperparameters.global_batch_size={global_batch_size} cannot be split over "
            f"{slots} slots: it must be a multiple of the slot count with at least 2 images "
            f"per slot (BatchNorm needs 2), e.g. {max(2 * slots, global_batch_size // slots * slots)}"
        )
    return global_batch_size


def _backbone_name(r: _Reader) -> str:
    # Imported here so utils stays importable without torch (config checks in CI, tools).
    import backbone

    name = r.get("backbone_name")
    try:
        backbone.family_of(name)
    except ValueError as e:
        raise ConfigError(f"hyperparameters.{e}") from None
    return name


def check_input_size(name: str, cifar_stem: bool, image_size: int) -> None:
    """Refuse a backbone whose final feature map would vanish at this image size."""
    import backbone

    try:
        backbone.check_input_size(name, cifar_stem, image_size)
    except ValueError as e:
        raise ConfigError(f"hyperparameters.backbone_name={e}") from None


def _default_optimizer(name: str) -> str:
    import backbone

    return "lars" if backbone.is_convolutional(name) else "adamw"


def parse_hparams(raw: Dict[str, Any], slots: int = 1) -> HParams:
    """Validate the `hyperparameters` section and return it typed. `slots` is the number of
    processes the global batch is split over."""
    r = _Reader(raw, "hyperparameters")
    global_batch_size = _global_batch_size(r, slots)
    backbone_name = _backbone_name(r)
    cifar_stem = r.boolean("cifar_stem", False)
    augmentation = _parse_augmentation(r.sub("augmentation"))
    check_input_size(backbone_name, cifar_stem, augmentation.image_size)
    optimizer = r.choice("optimizer", OPTIMIZERS, _default_optimizer(backbone_name))
    learning_rate = r.positive("learning_rate")
    if optimizer == "adamw" and learning_rate > ADAMW_MAX_LEARNING_RATE:
        raise ConfigError(
            f"hyperparameters.learning_rate={learning_rate} is a LARS learning rate; with "
            f"optimizer=adamw (the default for ViT and Swin) the base LR must be at most "
            f"{ADAMW_MAX_LEARNING_RATE} (DINO's is 0.0005), or set hyperparameters.optimizer=lars"
        )
    classifier_lrs = r.get("classifier_lrs", [0.01, 0.03, 0.1, 0.3, 1.0])
    if (
        not isinstance(classifier_lrs, list)
        or not classifier_lrs
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for v in classifier_lrs
        )
    ):
        raise ConfigError(
            f"hyperparameters.classifier_lrs={classifier_lrs!r} must be a non-empty list of "
            f"positive numbers"
        )
    hp = HParams(
        dataset_name=r.choice("dataset_name", DATASETS),
        backbone_name=backbone_name,
        cifar_stem=cifar_stem,
        pretrained_weights=r.optional_str("pretrained_weights"),
        global_batch_size=global_batch_size,
        epochs=r.integer("epochs"),
        warmup_epochs=r.number("warmup_epochs", 10),
        optimizer=optimizer,
        learning_rate=learning_rate,
        # BYOL's LARS decay; AdamW's starts where DINO's does.
        weight_decay=r.number("weight_decay", 1.5e-6 if optimizer == "lars" else 0.04),
        lars_momentum=r.number("lars_momentum", 0.9, 0.0, 1.0, high_inclusive=False),
        lars_trust_coefficient=r.positive("lars_trust_coefficient", 1e-3),
        tau_base=r.number("tau_base", 0.996, 0.0, 1.0),
        projector_hidden_dim=r.integer("projector_hidden_dim", 4096),
        projection_dim=r.integer("projection_dim", 256),
        augmentation=augmentation,
        augment_on=r.choice("augment_on", AUGMENT_PLACES, "auto"),
        precision=r.choice("precision", PRECISIONS, "auto"),
        compile=r.choice("compile", ("auto", True, False), "auto"),
        sync_batchnorm=r.boolean("sync_batchnorm", False),
        validate_with_classifier=r.boolean("validate_with_classifier", True),
        probe=ProbeConfig(
            lrs=tuple(float(v) for v in classifier_lrs),
            epochs=r.integer("classifier_train_epochs", 50),
            batch_size=r.integer("classifier_batch_size", 256),
            holdout_fraction=r.number("classifier_holdout_fraction", 0.1, 0.0, 1.0, False, False),
            knn_k=r.integer("knn_k", 200),
            knn_temperature=r.positive("knn_temperature", 0.1),
        ),
        collapse_std_threshold=r.number("collapse_std_threshold", 0.01, 0.0, 1.0),
    )
    r.refuse_unknown()
    return hp


@dataclasses.dataclass(frozen=True)
class Length:
    """A Determined training length: `{epochs: N}` or `{batches: N}`; N = 0 means never."""

    unit: str
    value: int

    def batches(self, batches_per_epoch: int) -> int:
        return self.value * batches_per_epoch if self.unit == "epochs" else self.value


@dataclasses.dataclass(frozen=True)
class Searcher:
    name: str
    metric: Optional[str]
    smaller_is_better: bool
    time_metric: Optional[str]
    max_time: Optional[int]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a run is driven: periods, seed, checkpoint policy and the searcher's metric."""

    validation_period: Length
    checkpoint_period: Length
    reporting_period: int  # scheduling_unit, in batches
    seed: int
    checkpoint_policy: str
    searcher: Searcher
    initial_validation: bool  # perform_initial_validation: validate before the first step
    profiling: bool  # profiling.enabled: Determined's system-metrics profiler (cluster only)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment config, typed."""

    hparams: HParams
    data: DataConfig
    run: RunConfig


# What a searcher or `checkpoint_policy: best` may choose by, per validation mode (with its
# smaller_is_better): the linear probe's accuracy on held-out training images, or without labels
# the BYOL loss (no labels involved). Test-split accuracies are reported, never used to choose.
HELD_OUT_METRICS = {True: {"holdout_accuracy": False}, False: {"validation_loss": True}}
CHECKPOINT_POLICIES = ("best", "all", "none")
TIME_METRICS = ("batches", "epochs")


def _length(raw: Any, what: str, default: Dict[str, int]) -> Length:
    raw = default if raw is None else raw
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{what}={raw!r} must be {{epochs: N}} or {{batches: N}}")
    unit, value = next(iter(raw.items()))
    if (
        unit not in ("epochs", "batches")
        or isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
    ):
        raise ConfigError(
            f"{what}={raw!r} must be {{epochs: N}} or {{batches: N}} with N an integer >= 0 "
            f"(0: never)"
        )
    return Length(unit, value)


def _parse_searcher(raw: Any) -> Searcher:
    """What the trial needs of the searcher; its other keys (max_trials, mode, ...) are the
    master's business, and the master's own schema checks them."""
    raw = raw if raw is not None else {"name": "single"}
    if not isinstance(raw, dict):
        raise ConfigError(f"searcher must be a mapping, got {raw!r}")
    if raw.get("max_length") is not None:
        # A trial here trains hyperparameters.epochs whatever max_length says; Determined 0.38's
        # ASHA reads a trial's length from the validation metric that time_metric names.
        raise ConfigError(
            f"searcher.max_length={raw['max_length']!r} is deprecated in Determined 0.38 and not "
            f"used (a trial trains hyperparameters.epochs): remove it; for ASHA set "
            f"searcher.max_time (= hyperparameters.epochs) and searcher.time_metric: epochs"
        )
    return Searcher(
        name=raw.get("name", "single"),
        metric=raw.get("metric"),
        smaller_is_better=raw.get("smaller_is_better", True),
        time_metric=raw.get("time_metric"),
        max_time=raw.get("max_time"),
    )


def check_searcher(searcher: Searcher, hp: HParams) -> None:
    """A run chooses (searcher, checkpoint_policy: best) only by what its validation reports on
    held-out training images, and an ASHA search counts the length a trial really trains."""
    mode = f"hyperparameters.validate_with_classifier={str(hp.validate_with_classifier).lower()}"
    check_searcher_of(searcher, HELD_OUT_METRICS[hp.validate_with_classifier], mode, hp.epochs)


def check_searcher_of(
    searcher: Searcher, reported: Dict[str, bool], mode: str, epochs: int
) -> None:
    """searcher.metric must be one of `reported` ({held-out metric: smaller_is_better}), what
    the trial's validation reports in `mode`; time_metric: epochs must span `epochs`."""
    if searcher.metric is not None:
        check_metric(searcher, reported, mode)
    if searcher.time_metric is not None:
        if searcher.time_metric not in TIME_METRICS:
            raise ConfigError(
                f"searcher.time_metric={searcher.time_metric!r} is not one of: "
                f"{', '.join(TIME_METRICS)} (the training lengths that validation reports)"
            )
        if searcher.time_metric == "epochs" and searcher.max_time != epochs:
            raise ConfigError(
                f"searcher.max_time={searcher.max_time!r} must equal hyperparameters.epochs="
                f"{epochs} (time_metric: epochs): a trial trains that long"
            )


def has_labels(dataset_name: str, data: DataConfig) -> bool:
    """Whether the run has labeled images for the linear probe: CIFAR-10 and STL-10 always; an
    image folder when data.train_dir is set, not when data.unlabeled_dir is its only images."""
    return dataset_name != "image_folder" or data.train_dir is not None


def check_image_folders(data: DataConfig) -> None:
    """dataset_name=image_folder reads labeled <class>/<image> folders (data.train_dir with
    data.test_dir), images without labels (data.unlabeled_dir, any layout), or both."""
    if data.train_dir is None and data.test_dir is None and data.unlabeled_dir is not None:
        return
    for key in ("train_dir", "test_dir"):
        if getattr(data, key) is None:
            raise ConfigError(
                f"dataset_name=image_folder needs data.{key} (a <class>/<image> folder), or "
                f"only data.unlabeled_dir (images in any layout) to train without labels"
            )


# What to set for a cluster experiment on images without labels (a searcher waits for the metric
# it names, and validation then reports only the BYOL loss).
NO_LABELS_SEARCHER = (
    "no labeled images (dataset_name=image_folder with only data.unlabeled_dir): validation "
    "reports validation_loss; set searcher.metric=validation_loss and "
    "searcher.smaller_is_better=true"
)


def follows_the_data(searcher: Searcher, hp: HParams, data: DataConfig) -> bool:
    """True where the searcher is the one of the config written for labeled images (its
    classifier metric) and the run has no labels: validation reports the BYOL loss instead."""
    reported = HELD_OUT_METRICS[True]
    return (
        not has_labels(hp.dataset_name, data)
        and searcher.metric in reported
        and searcher.smaller_is_better == reported[searcher.metric]
    )


def check_metric(searcher: Searcher, reported: Dict[str, bool], mode: str) -> None:
    """searcher.metric must be the held-out metric of the run's validation mode."""
    if searcher.metric not in reported:
        raise ConfigError(
            f"searcher.metric={searcher.metric!r}: with {mode} the searcher and "
            f"checkpoint_policy choose by {', '.join(reported)}, which its validation reports for "
            f"that; test-split accuracies are reported, never used to choose"
        )
    if searcher.smaller_is_better != reported[searcher.metric]:
        raise ConfigError(
            f"searcher.smaller_is_better={str(searcher.smaller_is_better).lower()} is wrong "
            f"for searcher.metric={searcher.metric}: it must be "
            f"{str(reported[searcher.metric]).lower()}"
        )


def parse_run_config(raw: Dict[str, Any]) -> RunConfig:
    """The top-level keys of the experiment config that drive the run. Unset keys take the
    master's defaults, except the periods, which default to every epoch."""
    r = _Reader(raw, "")
    reproducibility = _Reader(raw.get("reproducibility") or {}, "reproducibility")
    return RunConfig(
        initial_validation=r.boolean("perform_initial_validation", False),
        validation_period=_length(
            raw.get("min_validation_period"), "min_validation_period", {"epochs": 1}
        ),
        checkpoint_period=_length(
            raw.get("min_checkpoint_period"), "min_checkpoint_period", {"epochs": 1}
        ),
        reporting_period=r.integer("scheduling_unit", 100),
        seed=reproducibility.integer("experiment_seed", 0, minimum=0),
        checkpoint_policy=r.choice("checkpoint_policy", CHECKPOINT_POLICIES, "best"),
        searcher=_parse_searcher(raw.get("searcher")),
        profiling=_Reader(raw.get("profiling") or {}, "profiling").boolean("enabled", False),
    )


def parse_experiment_config(
    raw: Dict[str, Any], slots: int = 1, local: bool = False
) -> ExperimentConfig:
    """Validate a whole experiment config (as a user wrote it, with resolved hyperparameter
    values) and return it typed. `slots`: the processes the global batch is split over.

    Validation uses what the data has: without labeled images hparams.validate_with_classifier
    is false whatever the config says (the BYOL loss is all there is to report). A `local` run
    has no searcher, so there its classifier metric follows to validation_loss too (logged); a
    cluster's searcher would wait for the metric forever, so there it is refused in one line."""
    hp = parse_hparams(raw.get("hyperparameters") or {}, slots)
    run = parse_run_config(raw)
    data = parse_data_config(raw.get("data"))
    if hp.dataset_name == "image_folder":
        check_image_folders(data)
    check_decode_on(hp, data)
    if not has_labels(hp.dataset_name, data):
        hp = dataclasses.replace(hp, validate_with_classifier=False)
        if local and follows_the_data(run.searcher, hp, data):
            logger.info(
                "%s for a cluster experiment (a local run has no searcher)", NO_LABELS_SEARCHER
            )
            searcher = dataclasses.replace(
                run.searcher, metric="validation_loss", smaller_is_better=True
            )
            run = dataclasses.replace(run, searcher=searcher)
        elif run.searcher.metric is not None and run.searcher.metric not in HELD_OUT_METRICS[False]:
            raise ConfigError(f"searcher.metric={run.searcher.metric!r}: {NO_LABELS_SEARCHER}")
    check_searcher(run.searcher, hp)
    return ExperimentConfig(hp, data, run)


def slots_per_trial(raw: Dict[str, Any]) -> int:
    """The processes a trial's global batch is split over on a cluster: resources.slots_per_trial
    (the master's default is 1); with 0 the launcher would start no training process."""
    return _Reader(raw.get("resources") or {}, "resources").integer("slots_per_trial", 1)


def parse_data_config(raw: Optional[Dict[str, Any]]) -> DataConfig:
    r = _Reader(raw or {}, "data")
    download_dir = r.get("download_dir", "~/.cache/byol-data")
    if not isinstance(download_dir, str) or not download_dir:
        raise ConfigError(f"data.download_dir={download_dir!r} must be a non-empty string")
    config = DataConfig(
        download_dir=download_dir,
        train_dir=r.optional_str("train_dir"),
        test_dir=r.optional_str("test_dir"),
        unlabeled_dir=r.optional_str("unlabeled_dir"),
        cache_dir=r.optional_str("cache_dir"),
        train_blob_list=r.optional_str("train_blob_list"),
        test_blob_list=r.optional_str("test_blob_list"),
        num_workers=r.integer("num_workers", 4, minimum=0),
        strict_images=r.boolean("strict_images", False),
        gcs_concurrency=r.integer("gcs_concurrency", 16),
        decode_on=r.choice("decode_on", DECODE_PLACES, "auto"),
    )
    r.refuse_unknown()
    return config


def check_decode_on(hp: HParams, data: DataConfig) -> None:
    """data.decode_on=gpu needs encoded images (an image folder or shard set) and the views
    made on the device, where the decoded crops are."""
    if data.decode_on != "gpu":
        return
    if hp.dataset_name != "image_folder":
        raise ConfigError(
            f"data.decode_on=gpu: hyperparameters.dataset_name={hp.dataset_name} comes decoded "
            f"(arrays); only image_folder images are decoded. Leave data.decode_on at auto"
        )
    if hp.augment_on == "loader":
        raise ConfigError(
            "data.decode_on=gpu decodes on the training device, so the views are made there: "
            "hyperparameters.augment_on=loader cannot be; set it to auto or device"
        )


# --------------------------------------------------------------------------------------------
# The fine-tuning experiment (finetune.py): a backbone and a new linear classifier trained end
# to end on labeled images
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """Where the fine-tuned backbone's weights come from (hyperparameters.pretrained): at most
    one of these; none is random initialisation, the baseline that shows what pretraining
    bought."""

    checkpoint: Optional[str]  # a local BYOL checkpoint directory
    checkpoint_uuid: Optional[str]  # a BYOL checkpoint in the cluster's checkpoint storage
    experiment_id: Optional[int]  # a cluster experiment: its best checkpoint (searcher metric)
    export: Optional[str]  # a file written by evaluate_result.py --export

    @property
    def given(self) -> List[str]:
        """The keys that are set (at most one in a parsed config)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    @property
    def kind(self) -> str:
        """checkpoint, checkpoint_uuid, experiment_id, export, or random."""
        return self.given[0] if self.given else "random"


@dataclasses.dataclass(frozen=True)
class FineTuneHParams:
    dataset_name: str
    pretrained: PretrainedSource
    # None: as the pretrained backbone was trained (its checkpoint or export says); required
    # for random initialisation.
    backbone_name: Optional[str]
    cifar_stem: Optional[bool]
    image_size: Optional[int]
    crop_scale: Optional[Tuple[float, float]]  # None: default_crop_scale(image size)
    crop_ratio: Tuple[float, float]
    label_fraction: float  # of the labeled training images outside the held-out part
    holdout_fraction: float  # of the labeled training images, to choose LR and epoch by
    global_batch_size: int
    epochs: int
    warmup_epochs: float
    learning_rate: float  # base LR of the classifier; peak = base x global_batch_size / 256
    momentum: float
    weight_decay: float
    # The backbone's LR as a fraction of the classifier's; 0 freezes it (a linear probe: the
    # backbone then runs in eval mode, BatchNorm on its running statistics).
    backbone_lr_scale: float
    precision: str

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate * self.global_batch_size / 256

    @property
    def frozen_backbone(self) -> bool:
        return self.backbone_lr_scale == 0


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
    hparams: FineTuneHParams
    data: DataConfig
    run: RunConfig


# The fine-tuning trial's validation scores held-out training images (holdout_accuracy, what a
# searcher and checkpoint_policy choose by) and the test split (test_accuracy, reported).
FINETUNE_HELD_OUT_METRICS = {"holdout_accuracy": False}


def _parse_pretrained(reader: _Reader) -> PretrainedSource:
    source = PretrainedSource(
        checkpoint=reader.optional_str("checkpoint"),
        checkpoint_uuid=reader.optional_str("checkpoint_uuid"),
        experiment_id=reader.optional("experiment_id", reader.integer),
        export=reader.optional_str("export"),
    )
    reader.refuse_unknown()
    if len(source.given) > 1:
        raise ConfigError(
            f"hyperparameters.pretrained sets {' and '.join(source.given)}: set at most one "
            f"(none: random initialisation)"
        )
    return source


def parse_finetune_hparams(raw: Dict[str, Any], slots: int = 1) -> FineTuneHParams:
    r = _Reader(raw, "hyperparameters")
    global_batch_size = _global_batch_size(r, slots)
    pretrained = _parse_pretrained(r.sub("pretrained", {}))
    backbone_name = r.optional("backbone_name", lambda key: _backbone_name(r))
    if backbone_name is None and pretrained.kind == "random":
        raise ConfigError(
            "hyperparameters.backbone_name is required without a pretrained backbone (random "
            "initialisation): a torchvision classifier such as resnet18, convnext_tiny or vit_b_16"
        )
    hp = FineTuneHParams(
        dataset_name=r.choice("dataset_name", DATASETS),
        pretrained=pretrained,
        backbone_name=backbone_name,
        cifar_stem=r.optional("cifar_stem", r.boolean),
        image_size=r.optional("image_size", lambda key: r.integer(key, minimum=8)),
        crop_scale=r.optional("crop_scale", lambda key: r.interval(key, None, 0.0, 1.0)),
        crop_ratio=r.interval("crop_ratio", [3 / 4, 4 / 3], 0.0),
        label_fraction=r.number("label_fraction", 1.0, 0.0, 1.0, low_inclusive=False),
        holdout_fraction=r.number("holdout_fraction", 0.1, 0.0, 1.0, False, False),
        global_batch_size=global_batch_size,
        epochs=r.integer("epochs"),
        warmup_epochs=r.number("warmup_epochs", 0),
        learning_rate=r.positive("learning_rate"),
        momentum=r.number("momentum", 0.9, 0.0, 1.0, high_inclusive=False),
        weight_decay=r.number("weight_decay", 0.0),
        backbone_lr_scale=r.number("backbone_lr_scale", 1.0, 0.0, 1.0),
        precision=r.choice("precision", PRECISIONS, "auto"),
    )
    r.refuse_unknown()
    return hp


def parse_finetune_config(raw: Dict[str, Any], slots: int = 1) -> FineTuneConfig:
    """Validate a whole fine-tuning experiment config and return it typed."""
    hp = parse_finetune_hparams(raw.get("hyperparameters") or {}, slots)
    run = parse_run_config(raw)
    check_searcher_of(run.searcher, FINETUNE_HELD_OUT_METRICS, "fine-tuning", hp.epochs)
    data = parse_data_config(raw.get("data"))
    if data.decode_on == "gpu":
        raise ConfigError(
            "data.decode_on=gpu is for BYOL pretraining; fine-tuning decodes its labeled images "
            "in the loader: leave data.decode_on at auto"
        )
    if hp.dataset_name == "image_folder" and (data.train_dir is None or data.test_dir is None):
        raise ConfigError(
            "fine-tuning on dataset_name=image_folder needs labeled images: data.train_dir and "
            "data.test_dir, <class>/<image> folders"
        )
    return FineTuneConfig(hp, data, run)
