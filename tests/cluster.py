"""A Determined cluster of one agent, as far as a trial can tell: the master's side (expanding the
experiment config, storing the model definition, answering the harness) on the loopback stand-in
of `master_standin.py`, and the agent's side (the environment a trial container gets, and the
commands it runs) as subprocesses.

How each piece mirrors Determined 0.38.1:
  - Experiment creation is the SDK's `create_experiment`, the same POST /api/v1/experiments with
    the config and the `.detignore`-filtered model definition that `det experiment create` sends.
  - The master expands the config: hyperparameters into {type: const, val} maps (nested ones as
    maps of those), top-level and searcher defaults from the master's own expconf schemas
    (../shared/tools/expconf/schemas), `checkpoint_storage` completed with the cluster's
    shared_fs storage (a temp dir); the user's other values stay as written.
  - A trial container gets the env vars the master's task spec sets (master/pkg/tasks:
    DET_EXPERIMENT_CONFIG, DET_HPARAMS with resolved values, DET_TRIAL_SEED, DET_LATEST_CHECKPOINT,
    DET_ALLOCATION_ID, ...) and runs master/static/srv/entrypoint.sh's steps: prep_container
    (downloads the model definition from the master, writes the info files), the package's
    startup-hook.sh sourced, rendezvous through the master, then `determined.exec.launch`, which
    runs the config's own `entrypoint` unchanged.
  - A trial of several containers (resources.slots_per_trial over several agents) starts one
    container per agent, each with its own DET_RESOURCES_ID (opaque ids, not in rank order) and
    its own loopback address (127.0.0.2, 127.0.0.3, ...). The master's rendezvous
    (master/internal/task/rendezvous.go) answers once every container has asked and none has
    exited, with every container's address and slot count, rank 0's first and then by resources
    id, and the asking container's rank; a container that exits first leaves the others waiting
    (after the rendezvous timeout the master only writes a line to the trial's log).
  - The master's handling of container exits (task/allocation.go, trial.go): a container that
    fails crashes the allocation, the master killing the rest; after an early exit (InvalidHP)
    it kills what still runs after InvalidHPKillDelay; the trial's next state follows
    handleAllocationExit (COMPLETED, RESTART within max_restarts, ERROR, CANCELED).
  - The searcher's word reaches a trial as the master gives it in 0.38.1: ASHA's stop only sets
    the trial's state to STOPPING_COMPLETED (master/internal/trial.go, PatchSearcherState), which
    GET /api/v1/trials/{id} returns; no preemption is sent for it (`transition` signals the
    allocation only for STOPPING_CANCELED, STOPPING_KILLED and STOPPING_ERROR). The master makes
    that decision while it handles the validation report, before it stores the metrics (which
    sets the trial's latest validation) and answers.
  - An adaptive_asha experiment's searcher (start_search, run_search) is searcher_standin.py's
    port of the master's: each validation reaches it before the metrics are stored
    (ReportTrialMetrics), each trial's end after its last run (handleAllocationExit, then
    trial.go's exit and experiment.go's trialExited); a searcher error errors the experiment.
  - Where the stand-in is stricter than the master: it refuses routes, fields and bodies it does
    not know (master_standin.py), and every container shares this machine's network namespace,
    so the chief's ports are free ones rather than Determined's fixed defaults.
  - What a container mounts is redirected by a `sitecustomize` on the subprocess's PYTHONPATH:
    the info files (/run/determined/info/*.json), the shared_fs mount (/determined_shared_fs) and
    the model copy (/run/determined/train/model) point into the test's temp dir, so nothing on
    this machine's /run is touched; the launcher's pid_server socket (/tmp/pid_server-ALLOCATION)
    goes into a /tmp of the container's own, as each container has one.
"""

import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import psutil
from determined.common.api import bindings

from conftest import HANG_GUARD_S, free_port
from master_standin import Call, MasterError, MasterStandIn, NotFound
from searcher_standin import AdaptiveASHASearcher, ExperimentStandIn

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT.parent / "shared" / "tools" / "expconf" / "schemas"

SITECUSTOMIZE = '''\
"""The trial container's mounts, as paths in the test's temp dir (see tests/cluster.py)."""
import os

if "STANDIN_CONTAINER" in os.environ:
    from determined import _info, constants
    from determined.common import constants as common_constants

    _root = os.environ["STANDIN_CONTAINER"]
    for _cls, _name in ((_info.ClusterInfo, "cluster"), (_info.TrialInfo, "trial"),
                        (_info.RendezvousInfo, "rendezvous"), (_info.ResourcesInfo, "resources")):
        _path = os.path.join(_root, "run", "info", _name + ".json")
        _cls._from_file.__func__.__defaults__ = (_path,)
        _cls._to_file.__defaults__ = (_path,)
    common_constants.SHARED_FS_CONTAINER_PATH = os.environ["STANDIN_SHARED_FS"]
    constants.MANAGED_TRAINING_MODEL_COPY = os.path.join(_root, "run", "model")

    from determined import ipc

    _read_pid_server_addr = ipc.read_pid_server_addr

    def _container_tmp(addr):
        addr = _read_pid_server_addr(addr)
        if isinstance(addr, str) and addr.startswith("/tmp/"):
            return os.path.join(os.environ["STANDIN_TMP"], addr[len("/tmp/"):])
        return addr

    ipc.read_pid_server_addr = _container_tmp

    import sys

    if os.environ.get("STANDIN_DIES_BEFORE_RENDEZVOUS") and "--rendezvous" in sys.argv:
        os._exit(137)  # a test's lost node: the container dies as its rendezvous starts
'''

# master/static/srv/entrypoint.sh, less task-setup.sh's log links and pip install of the wheel
# (determined is already installed in the venv, as DET_SKIP_PIP_INSTALL would require).
ENTRYPOINT_SH = """
set -e
python3 -m determined.exec.prep_container --download_context_directory --resources --proxy
STARTUP_HOOK="startup-hook.sh"
test -f "${STARTUP_HOOK}" && source "${STARTUP_HOOK}"
python3 -m determined.exec.prep_container --rendezvous
exec python3 -m determined.exec.launch
"""


def expand_hyperparameters(hparams: Dict[str, Any]) -> Dict[str, Any]:
    """The master's form: a value becomes {type: const, val}, a map without `type` is a nested
    group of hyperparameters, a map with `type` is a search space and stays as it is."""
    out = {}
    for name, value in hparams.items():
        if isinstance(value, dict) and "type" in value:
            out[name] = copy.deepcopy(value)
        elif isinstance(value, dict):
            out[name] = expand_hyperparameters(value)
        else:
            out[name] = {"type": "const", "val": copy.deepcopy(value)}
    return out


def _schema_defaults(name: str) -> Dict[str, Any]:
    with open(SCHEMAS / name) as f:
        schema = json.load(f)
    return {k: v["default"] for k, v in schema["properties"].items() if "default" in v}


def master_form(config: Dict[str, Any], storage_dir: str) -> Dict[str, Any]:
    """The experiment config as the master hands it to a trial (DET_EXPERIMENT_CONFIG)."""
    expanded = copy.deepcopy(config)
    for key, default in _schema_defaults("experiment.json").items():
        expanded.setdefault(key, copy.deepcopy(default))
    searcher = expanded["searcher"]
    for key, default in _schema_defaults(
        f"searcher-{searcher['name'].replace('_', '-')}.json"
    ).items():
        searcher.setdefault(key, copy.deepcopy(default))
    expanded["hyperparameters"] = expand_hyperparameters(config.get("hyperparameters") or {})
    storage = dict(expanded.get("checkpoint_storage") or {})
    storage.update(
        type="shared_fs", host_path=storage_dir, storage_path=None, propagation="rprivate"
    )
    expanded["checkpoint_storage"] = storage
    return expanded


def resolve(hparams: Dict[str, Any], sampled: Dict[str, Any]) -> Dict[str, Any]:
    """DET_HPARAMS: const values unwrapped, nested groups as dicts, search spaces taken from
    `sampled` (what the searcher chose)."""
    out = {}
    for name, value in hparams.items():
        if value.get("type") == "const":
            out[name] = value["val"]
        elif "type" in value:
            out[name] = sampled[name]
        else:
            out[name] = resolve(value, sampled.get(name, {}))
    return out


def context_tgz(files: List[bindings.v1File]) -> str:
    """The model definition as GET /api/v1/tasks/{id}/context_directory serves it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for f in files:
            info = tarfile.TarInfo(f.path)
            info.mode = f.mode
            info.type = bytes([f.type])
            content = base64.b64decode(f.content) if info.isfile() else b""
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return base64.b64encode(buffer.getvalue()).decode()


def shipped_model_definition(dest: pathlib.Path) -> pathlib.Path:
    """Write to `dest` the files `det experiment create .` sends from the package (its
    `.detignore` applied by Determined's own reader), for a test that edits what it ships.
    Copying the folder itself would also copy each virtual environment in it (gigabytes)."""
    from determined.common import context

    for f in context.read_v1_context(ROOT):
        path = dest / f.path
        if f.type == ord(tarfile.DIRTYPE):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(f.content))
    return dest


# What the master writes to a trial's log when a rendezvous waits too long (rendezvous.go).
RENDEZVOUS_TIMEOUT_LOG = (
    "some containers are taking a long time to connect to master; when running on kubernetes "
    "this may happen because only some of the pods have been scheduled; it is possible that "
    "some pods will never be scheduled without adding compute resources or pausing / killing "
    "other experiments in the cluster"
)


@dataclasses.dataclass
class Container:
    """One container of an allocation: the resources the master gave it, and its process."""

    rank: int
    resources_id: str
    address: str  # the address the agent reports for the container's rendezvous port
    slots: int
    env: Dict[str, str] = dataclasses.field(default_factory=dict)  # a test's additions
    process: Optional[subprocess.Popen] = None
    log: str = ""


class RendezvousTerminated(MasterError):
    """The watchers' answer once the allocation is closed (rendezvous.go, close)."""


class Rendezvous:
    """One allocation's rendezvous (master/internal/task/rendezvous.go). A container asks, and is
    answered once every container has started and asked, and none has exited (`ready`); then
    each gets every container's address and slot count, rank 0's first and the others ordered
    by resources id (`info`), and its own rank. Once a container has exited before that, the
    others wait; after `timeout` the master writes RENDEZVOUS_TIMEOUT_LOG to the trial's log
    (RendezvousTimeout) and they go on waiting, until the allocation is closed."""

    def __init__(self, containers: List[Container], timeout: float, log: Callable[[str], None]):
        self.containers = {c.resources_id: c for c in containers}
        self.timeout, self.log = timeout, log
        self.asked: List[str] = []
        self.exited: List[str] = []
        self.closed = False
        self.succeeded = False
        self.changed = threading.Condition()

    def _ready(self) -> bool:
        self.succeeded = self.succeeded or (
            not self.exited and len(self.asked) == len(self.containers)
        )
        return self.succeeded

    def info(self, resources_id: str) -> bindings.v1RendezvousInfo:
        order = sorted(self.containers.values(), key=lambda c: (c.rank != 0, c.resources_id))
        return bindings.v1RendezvousInfo(
            addresses=[c.address for c in order],
            slots=[c.slots for c in order],
            rank=self.containers[resources_id].rank,
        )

    def join(self, resources_id: str) -> bindings.v1RendezvousInfo:
        if resources_id not in self.containers:  # the master's StaleResourcesError
            raise ValueError(f"stale resources {resources_id}")
        with self.changed:
            self.asked.append(resources_id)
            self.changed.notify_all()
            ended = lambda: self.closed or self._ready()  # noqa: E731
            if not self.changed.wait_for(ended, self.timeout):
                self.log(RENDEZVOUS_TIMEOUT_LOG)
                self.changed.wait_for(ended)
            if not self._ready():
                raise RendezvousTerminated("task terminated")
        return self.info(resources_id)

    def container_exited(self, resources_id: str) -> None:
        with self.changed:
            self.exited.append(resources_id)
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


class Allocation:
    """One run of a trial on the agents: its containers and the master's handling of their exits
    (master/internal/task/allocation.go and trial.go):
      - a container that exits with a failure while others run crashes the allocation: the
        master kills the rest ("crashed: ...", then "forcibly killing ...");
      - an early exit (det.InvalidHP) makes the master kill whatever still runs after
        InvalidHPKillDelay (trial.go, SetUserInitiatedEarlyExit);
      - when all have exited, `outcome` is the trial's next state (handleAllocationExit):
        COMPLETED, ERROR, or RESTART (a failure within max_restarts)."""

    def __init__(self, allocation_id: str, trial: "Trial", containers: List[Container]):
        self.id, self.trial, self.containers = allocation_id, trial, containers
        self.task_log: List[str] = []  # what the master writes to the trial's log
        self.rendezvous: Optional[Rendezvous] = None
        self.killed = False
        self.lock = threading.Lock()

    def log(self, line: str) -> None:
        with self.lock:
            self.task_log.append(line)

    def container_exited(self, container: Container) -> None:
        code = container.process.returncode
        if self.rendezvous is not None:
            self.rendezvous.container_exited(container.resources_id)
        if code != 0 and not self.killed:
            self.log(f"crashed: resources {container.resources_id} exited with code {code}")
            self.kill(f"resources {container.resources_id} failed")

    def kill(self, reason: str) -> None:
        """Every process of every container dies at once (torchrun starts its workers in
        sessions of their own, so walk the process tree), as for a lost node."""
        with self.lock:
            if not self.killed:
                self.task_log.append(
                    f"forcibly killing allocation's remaining resources (reason: {reason})"
                )
            self.killed = True
        if self.rendezvous is not None:
            self.rendezvous.close()
        for container in self.containers:
            with contextlib.suppress(psutil.NoSuchProcess, AttributeError):
                root = psutil.Process(container.process.pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()

    def outcome(self, max_restarts: int) -> str:
        failed = any(c.process.returncode != 0 for c in self.containers)
        if self.trial.state.startswith("STOPPING_"):
            terminal = {"STOPPING_COMPLETED": "COMPLETED", "STOPPING_KILLED": "CANCELED"}
            return "ERROR" if failed else terminal.get(self.trial.state, "CANCELED")
        if failed:
            self.trial.restarts += 1
            return "ERROR" if self.trial.restarts > max_restarts else "RESTART"
        return "COMPLETED"


class Trial:
    """The master's record of one trial."""

    def __init__(self, trial_id: int, hparams: Dict[str, Any], seed: int):
        self.id, self.hparams, self.seed = trial_id, hparams, seed
        self.run_id = 0
        self.metrics: List[Dict[str, Any]] = []  # {"group", "steps", "metrics"}
        self.progress: List[float] = []
        self.checkpoints: List[bindings.v1Checkpoint] = []
        self.preempt = threading.Event()
        # The master's trial state (master/pkg/model: ACTIVE, STOPPING_COMPLETED, ...).
        self.state = "ACTIVE"
        self.early_exits: List[bindings.v1TrialEarlyExitExitedReason] = []
        self.restarts = 0
        self.outcomes: List[str] = []  # each run's end: COMPLETED, RESTART, ERROR, CANCELED

    def reported(self, group: str) -> Dict[int, Dict[str, Any]]:
        return {m["steps"]: m["metrics"] for m in self.metrics if m["group"] == group}


class Cluster:
    """The master's handlers (one per binding name) and the agent's launcher.
    `rendezvous_timeout_s` and `invalid_hp_kill_delay_s` are the master's 10 minutes and 10 s
    (rendezvous.go, trial.go); a test may shorten or lengthen them."""

    def __init__(
        self,
        tmp: pathlib.Path,
        rendezvous_timeout_s: float = 600,
        invalid_hp_kill_delay_s: float = 10,
    ):
        self.tmp = tmp
        self.storage = tmp / "shared_fs"
        self.storage.mkdir()
        self.site = tmp / "site"
        self.site.mkdir()
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.invalid_hp_kill_delay_s = invalid_hp_kill_delay_s
        self.experiments: Dict[int, Dict[str, Any]] = {}
        self.trials: Dict[int, Trial] = {}
        self.allocations: Dict[str, Allocation] = {}
        self.running: Optional[Allocation] = None
        self.searches: Dict[int, ExperimentStandIn] = {}  # by experiment id (start_search)
        self.request_ids: Dict[int, int] = {}  # trial id -> its searcher request id
        # Called with each recorded call before it is answered (tests steer here: a trial's
        # preemption flag, the searcher's decision, a held answer, a lost node).
        self.on_call: Callable[["Cluster", Call], None] = lambda cluster, call: None
        self.master = MasterStandIn(self)

    def __enter__(self) -> "Cluster":
        self.master.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.master.__exit__(*exc)

    def on_request(self, call: Call) -> None:
        """Every recorded call, before its handler answers: where tests steer (on_call)."""
        self.on_call(self, call)

    # ---- the user's side: create an experiment as `det experiment create` does ---------------

    def create_experiment(self, config: Dict[str, Any], model_dir: pathlib.Path = ROOT) -> int:
        from determined.experimental import client

        sdk = client.Determined(master=self.master.url, user="determined", password="")
        return sdk.create_experiment(config, str(model_dir)).id

    def submit_evaluation(self, experiment_id: int, *options: str) -> Tuple[int, Dict[str, Any]]:
        """`evaluate_result.py --experiment-id ID --classifier-train-epochs 2 OPTIONS...` against
        this master: the evaluation experiment it created, and that experiment's config as it
        was submitted."""
        import yaml

        import evaluate_result

        known = set(self.experiments)
        evaluate_result.main(
            [
                "--experiment-id",
                str(experiment_id),
                "--classifier-train-epochs",
                "2",
                "--master",
                self.master.url,
                *options,
            ]
        )
        (evaluation_id,) = set(self.experiments) - known
        return evaluation_id, yaml.safe_load(self.experiments[evaluation_id]["original"])

    # ---- the agent's side: start a trial container ---------------------------------------------

    def add_trial(self, experiment_id: int, sampled: Optional[Dict[str, Any]] = None) -> Trial:
        experiment = self.experiments[experiment_id]
        trial_id = len(self.trials) + 1
        hparams = resolve(experiment["config"]["hyperparameters"], sampled or {})
        # The master draws trial seeds from a generator seeded with the experiment seed: the
        # n-th trial of two experiments with the same seed gets the same trial seed.
        index = sum(t.experiment_id == experiment_id for t in self.trials.values())
        seed = experiment["config"]["reproducibility"]["experiment_seed"] * 1000 + index
        trial = Trial(trial_id, hparams, seed)
        trial.experiment_id = experiment_id
        self.trials[trial_id] = trial
        return trial

    def launch(
        self,
        trial: Trial,
        slots: Union[int, List[int]],
        latest_checkpoint: Optional[str] = None,
        steps_completed: int = 0,
        timeout: float = HANG_GUARD_S,
        containers: int = 1,
        container_env: Optional[List[Dict[str, str]]] = None,
    ) -> List[subprocess.CompletedProcess]:
        """One run of the trial: `containers` containers (one per agent) of `slots` slots each
        (or slots[rank] in container `rank`), started together; returns each container's exit
        and log once all have exited, and appends the run's end to trial.outcomes.
        `container_env`: extra variables per container (a test's steering)."""
        trial.run_id += 1
        trial.preempt.clear()
        experiment = self.experiments[trial.experiment_id]
        task_id = f"{trial.experiment_id}.{trial.id}"
        allocation_id = f"{task_id}.{trial.run_id}"
        per_container = slots if isinstance(slots, list) else [slots] * containers
        allocation = Allocation(
            allocation_id,
            trial,
            [
                Container(
                    rank=rank,
                    # Opaque ids, as the agents' are: their order is not the ranks' order.
                    resources_id=hashlib.sha1(f"{allocation_id}/{rank}".encode()).hexdigest()[:12],
                    # Each container's own address, as each agent reports its container's.
                    address=f"127.0.0.{2 + rank}",
                    slots=per_container[rank],
                    env=(container_env or [{}] * containers)[rank],
                )
                for rank in range(containers)
            ],
        )
        allocation.rendezvous = Rendezvous(
            allocation.containers, self.rendezvous_timeout_s, allocation.log
        )
        self.allocations[allocation_id] = allocation
        self.running = allocation
        # Ports the chief container listens on. In one network namespace the containers reach
        # them there, and two test runs on one machine must not meet: free ones, not
        # Determined's fixed defaults (C10D_PORT 29400, INTER_TRAIN_PROCESS_COMM_PORT_1 12360).
        ports = {
            "C10D_PORT": str(free_port()),
            "INTER_TRAIN_PROCESS_COMM_PORT_1": str(free_port()),
            "INTER_TRAIN_PROCESS_COMM_PORT_2": str(free_port()),
        }
        with contextlib.ExitStack() as stack:
            for container in allocation.containers:
                root = self.tmp / f"container-{trial.id}-{trial.run_id}-{container.rank}"
                (root / "run" / "info").mkdir(parents=True)
                workdir = root / "workdir"
                workdir.mkdir(exist_ok=True)  # a test may have put files there
                env = {
                    "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
                    "HOME": str(root),
                    "PYTHONPATH": str(self.site),
                    "STANDIN_CONTAINER": str(root),
                    "STANDIN_SHARED_FS": str(self.storage),
                    # A short path: a unix socket's path may not exceed 107 bytes.
                    "STANDIN_TMP": stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="standin-")
                    ),
                    # Set by the agent for a docker container.
                    "DET_MASTER": self.master.url,
                    "DET_CLUSTER_ID": "standin-cluster",
                    "DET_AGENT_ID": f"agent-{container.rank}",
                    "DET_SLOT_IDS": json.dumps(list(range(container.slots))),
                    "DET_RESOURCES_TYPE": "docker-container",
                    # Set by the master's task spec (master/pkg/tasks/task.go, task_trial.go).
                    "DET_TASK_ID": task_id,
                    "DET_ALLOCATION_ID": allocation_id,
                    "DET_RESOURCES_ID": container.resources_id,
                    "DET_CONTAINER_ID": f"container-{allocation_id}-{container.rank}",
                    "DET_SESSION_TOKEN": "allocation-token",
                    "DET_USER_TOKEN": "user-token",
                    "DET_USER": "determined",
                    "DET_WORKDIR": str(workdir),
                    "DET_RUN_DIR": str(root / "run"),
                    "DET_USE_TLS": "false",
                    "DET_TASK_TYPE": "TRIAL",
                    "DET_EXPERIMENT_ID": str(trial.experiment_id),
                    "DET_TRIAL_ID": str(trial.id),
                    "DET_TRIAL_RUN_ID": str(trial.run_id),
                    "DET_TRIAL_SEED": str(trial.seed),
                    "DET_EXPERIMENT_CONFIG": json.dumps(experiment["config"]),
                    "DET_HPARAMS": json.dumps(trial.hparams),
                    "DET_STEPS_COMPLETED": str(steps_completed),
                    "OMP_NUM_THREADS": "1",
                    **ports,
                    **container.env,
                }
                if latest_checkpoint is not None:
                    env["DET_LATEST_CHECKPOINT"] = latest_checkpoint
                container.process = subprocess.Popen(
                    ["bash", "-c", ENTRYPOINT_SH],
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )

            def wait(container: Container) -> None:
                container.log = container.process.communicate(timeout=timeout)[0]
                allocation.container_exited(container)

            try:
                with concurrent.futures.ThreadPoolExecutor(containers) as pool:
                    list(pool.map(wait, allocation.containers))
            finally:
                if any(c.process.poll() is None for c in allocation.containers):
                    allocation.kill("the test's launch ended")  # nothing is left running
                self.running = None
        trial.outcomes.append(allocation.outcome(experiment["config"]["max_restarts"]))
        search = self.searches.get(trial.experiment_id)
        if search is not None and trial.outcomes[-1] != "RESTART":
            search.trial_exited(self.request_ids[trial.id], trial.outcomes[-1])
        return [
            subprocess.CompletedProcess(c.process.args, c.process.returncode, c.log)
            for c in allocation.containers
        ]

    def kill_containers(self) -> None:
        """What a lost node does to a trial: every process of the running allocation dies."""
        self.running.kill("the agent was lost")

    # ---- the searcher's side -------------------------------------------------------------------

    def start_search(
        self, experiment_id: int, sample: Callable[[], Dict[str, Any]]
    ) -> ExperimentStandIn:
        """The experiment's searcher (searcher_standin.py), started as experiment.go's start
        does: its initial trials are created. `sample()` gives each new trial's values."""
        config = self.experiments[experiment_id]["config"]
        by_request: Dict[int, Trial] = {}

        def create(request_id: int, sampled: Dict[str, Any]) -> None:
            trial = self.add_trial(experiment_id, sampled)
            self.request_ids[trial.id] = request_id
            by_request[request_id] = trial

        search = ExperimentStandIn(
            AdaptiveASHASearcher(config["searcher"], sample),
            create,
            lambda request_id: self.searcher_stops(by_request[request_id]),
        )
        self.searches[experiment_id] = search
        search.start()
        return search

    def run_search(self, experiment_id: int, slots: int = 1) -> None:
        """The agent runs the search's trials, one at a time in creation order (one slot's
        cluster: any order is one ASHA may see), each until it ends: a RESTART is run again
        from the trial's latest checkpoint, as the master reschedules it."""
        search = self.searches[experiment_id]
        while True:
            waiting = [
                t
                for t in self.trials.values()
                if t.experiment_id == experiment_id
                and (not t.outcomes or t.outcomes[-1] == "RESTART")
            ]
            if not waiting or search.state != "ACTIVE":
                return
            trial = waiting[0]
            latest = max(
                trial.checkpoints, key=lambda c: c.metadata["steps_completed"], default=None
            )
            self.launch(
                trial,
                slots,
                latest_checkpoint=latest.uuid if latest else None,
                steps_completed=latest.metadata["steps_completed"] if latest else 0,
            )

    def searcher_stops(self, trial: Trial) -> None:
        """ASHA stops the trial, as PatchSearcherState does in 0.38.1: the state only."""
        trial.state = "STOPPING_COMPLETED"

    # ---- the master's REST handlers, named after the bindings ----------------------------------

    def post_Login(self, call: Call) -> bindings.v1LoginResponse:
        user = bindings.v1User(active=True, admin=True, username=call.body.username, id=1)
        return bindings.v1LoginResponse(token="user-token", user=user)

    def get_GetMe(self, call: Call) -> bindings.v1GetMeResponse:
        return bindings.v1GetMeResponse(
            user=bindings.v1User(active=True, admin=True, username="determined", id=1)
        )

    def post_CreateExperiment(self, call: Call) -> bindings.v1CreateExperimentResponse:
        import yaml

        original = call.body.config
        config = yaml.safe_load(original)
        experiment_id = len(self.experiments) + 1
        expanded = master_form(config, str(self.storage))
        self.experiments[experiment_id] = {
            "original": original,
            "config": expanded,
            "files": call.body.modelDefinition or [],
            "request": call.body,
        }
        return bindings.v1CreateExperimentResponse(
            config=expanded, experiment=self._experiment(experiment_id)
        )

    def _experiment(self, experiment_id: int) -> bindings.v1Experiment:
        experiment = self.experiments[experiment_id]
        return bindings.v1Experiment(
            archived=False,
            config=experiment["config"],
            id=experiment_id,
            jobId=f"job-{experiment_id}",
            name=experiment["config"].get("name") or "",
            numTrials=len(self.trials),
            originalConfig=experiment["original"],
            projectId=1,
            projectOwnerId=1,
            searcherType=experiment["config"]["searcher"]["name"],
            startTime="2026-11-28T00:00:00Z",
            state=bindings.experimentv1State.ACTIVE,
            username="determined",
        )

    def get_GetTaskContextDirectory(self, call: Call) -> bindings.v1GetTaskContextDirectoryResponse:
        experiment_id = int(call.params["taskId"].split(".")[0])
        return bindings.v1GetTaskContextDirectoryResponse(
            b64Tgz=context_tgz(self.experiments[experiment_id]["files"])
        )

    def post_PostAllocationAcceleratorData(self, call: Call) -> None:
        return None

    def get_AllocationRendezvousInfo(
        self, call: Call
    ) -> bindings.v1AllocationRendezvousInfoResponse:
        """A long poll, answered as the master's rendezvous answers (Rendezvous)."""
        allocation = self.allocations[call.params["allocationId"]]
        info = allocation.rendezvous.join(call.params["resourcesId"])
        return bindings.v1AllocationRendezvousInfoResponse(rendezvousInfo=info)

    def post_RunPrepareForReporting(self, call: Call) -> bindings.v1RunPrepareForReportingResponse:
        return bindings.v1RunPrepareForReportingResponse(storageId=1)

    def get_GetTrial(self, call: Call) -> bindings.v1GetTrialResponse:
        trial = self.trials[int(call.params["trialId"])]
        latest = self._latest_validation(trial)
        return bindings.v1GetTrialResponse(
            trial=bindings.trialv1Trial(
                experimentId=trial.experiment_id,
                hparams=trial.hparams,
                id=trial.id,
                restarts=trial.restarts,
                startTime="2026-11-28T00:00:00Z",
                state=self._trial_state(trial),
                totalBatchesProcessed=0,
                latestValidation=latest,
            )
        )

    def _latest_validation(self, trial: Trial) -> Optional[bindings.v1MetricsWorkload]:
        """The trial's latest stored validation that holds the searcher's metric: AddTrialMetrics
        sets latest_validation_id only for those (postgres_trial.go)."""
        metric = self.experiments[trial.experiment_id]["config"]["searcher"]["metric"]
        stored = [m for m in trial.metrics if m["group"] == "validation" and metric in m["metrics"]]
        if not stored:
            return None
        return bindings.v1MetricsWorkload(
            metrics=bindings.v1Metrics(avgMetrics=stored[-1]["metrics"]),
            numInputs=0,
            totalBatches=stored[-1]["steps"],
        )

    @staticmethod
    def _trial_state(trial: Trial) -> bindings.trialv1State:
        """GetTrial's state: the stored one as 'STATE_' || state (proto_get_trials_plus.sql),
        an ACTIVE trial shown by its allocation's state (enrichTrialState): RUNNING here."""
        if trial.state == "ACTIVE":
            return bindings.trialv1State.RUNNING
        return bindings.trialv1State("STATE_" + trial.state)

    def post_ReportTrialSearcherEarlyExit(self, call: Call) -> None:
        """The master notes the reason (trial.go, SetUserInitiatedEarlyExit; again for each
        process that reports it) and kills whatever of the allocation still runs after
        InvalidHPKillDelay. A trial whose containers all exit 0 is then COMPLETED, never
        restarted and never replaced by the searcher (handleAllocationExit: exit(nil))."""
        trial = self.trials[int(call.params["trialId"])]
        trial.early_exits.append(call.body.reason)
        allocation = self.running

        def kill_after_delay():
            if any(c.process.poll() is None for c in allocation.containers):
                trial.state = "STOPPING_KILLED"
                allocation.kill("timeout after user initiated early exit")

        timer = threading.Timer(self.invalid_hp_kill_delay_s, kill_after_delay)
        timer.daemon = True
        timer.start()

    def post_PostTrialRunnerMetadata(self, call: Call) -> None:
        return None

    def get_AllocationPreemptionSignal(
        self, call: Call
    ) -> bindings.v1AllocationPreemptionSignalResponse:
        """A long poll: answers at once when the allocation is to stop, else when its timeout
        passes (or the flag is set meanwhile), as the master does."""
        trial = self.allocations[call.params["allocationId"]].trial
        timeout = float(call.query.get("timeoutSeconds", 0))
        return bindings.v1AllocationPreemptionSignalResponse(preempt=trial.preempt.wait(timeout))

    def post_AckAllocationPreemptionSignal(self, call: Call) -> None:
        return None

    def post_ReportTrialMetrics(self, call: Call) -> None:
        """In the master's order (api_trials.go, ReportTrialMetrics): a validation goes to the
        searcher first, whose decision may patch the trial's state (tests decide in `on_call`,
        before this handler, and may hold the answer there, as a busy master does); then the
        metrics are stored."""
        metrics = call.body.metrics
        trial = self.trials[metrics.trialId]
        search = self.searches.get(trial.experiment_id)
        if search is not None and call.body.group == "validation":
            search.validation(self.request_ids[trial.id], metrics.metrics.avgMetrics)
        trial.metrics.append(
            {
                "group": call.body.group,
                "steps": metrics.stepsCompleted,
                "metrics": metrics.metrics.avgMetrics,
            }
        )

    def get_GetBestSearcherValidationMetric(
        self, call: Call
    ) -> bindings.v1GetBestSearcherValidationMetricResponse:
        experiment_id = int(call.params["experimentId"])
        searcher = self.experiments[experiment_id]["config"]["searcher"]
        values = [
            m["metrics"][searcher["metric"]]
            for t in self.trials.values()
            if t.experiment_id == experiment_id
            for m in t.metrics
            if m["group"] == "validation" and searcher["metric"] in m["metrics"]
        ]
        if not values:
            raise NotFound(f"experiment {experiment_id} has no validation yet")
        best = min(values) if searcher["smaller_is_better"] else max(values)
        return bindings.v1GetBestSearcherValidationMetricResponse(metric=best)

    def get_GetExperiment(self, call: Call) -> bindings.v1GetExperimentResponse:
        experiment_id = int(call.params["experimentId"])
        if experiment_id not in self.experiments:
            raise NotFound(f"experiment {experiment_id} not found")
        return bindings.v1GetExperimentResponse(experiment=self._experiment(experiment_id))

    def _checkpoint(self, trial: Trial, reported: bindings.v1Checkpoint) -> bindings.v1Checkpoint:
        """A reported checkpoint as the master serves it: with the trial's training metadata and
        the validation metrics of the same step."""
        config = self.experiments[trial.experiment_id]["config"]
        validation = trial.reported("validation").get(reported.metadata["steps_completed"])
        training = bindings.v1CheckpointTrainingMetadata(
            experimentConfig=config,
            experimentId=trial.experiment_id,
            hparams=trial.hparams,
            trialId=trial.id,
            validationMetrics=bindings.v1Metrics(avgMetrics=validation) if validation else None,
            searcherMetric=validation.get(config["searcher"]["metric"]) if validation else None,
        )
        return bindings.v1Checkpoint(
            metadata=reported.metadata,
            resources=reported.resources,
            state=bindings.checkpointv1State.COMPLETED,
            training=training,
            uuid=reported.uuid,
            allocationId=reported.allocationId,
            reportTime=reported.reportTime,
            taskId=reported.taskId,
        )

    def get_GetExperimentCheckpoints(
        self, call: Call
    ) -> bindings.v1GetExperimentCheckpointsResponse:
        """Sorted by the searcher metric (best first), the SDK's default; other sorts are refused."""
        experiment_id = int(call.params["id"])
        if call.query.get("sortByAttr") != bindings.checkpointv1SortBy.SEARCHER_METRIC.value:
            raise ValueError(f"sorting by {call.query} is not modelled")
        searcher = self.experiments[experiment_id]["config"]["searcher"]
        found = [
            self._checkpoint(t, c)
            for t in self.trials.values()
            if t.experiment_id == experiment_id
            for c in t.checkpoints
        ]
        scored = [c for c in found if c.training.searcherMetric is not None]
        scored.sort(
            key=lambda c: c.training.searcherMetric, reverse=not searcher["smaller_is_better"]
        )
        # The master's pagination (api.Paginate in master/internal/api/query.go).
        offset, limit = int(call.query.get("offset", 0)), int(call.query.get("limit", 0))
        page = scored[offset : offset + limit if limit else None]
        return bindings.v1GetExperimentCheckpointsResponse(
            checkpoints=page,
            pagination=bindings.v1Pagination(
                offset=offset,
                limit=limit,
                startIndex=offset,
                endIndex=offset + len(page),
                total=len(scored),
            ),
        )

    def get_GetCheckpoint(self, call: Call) -> bindings.v1GetCheckpointResponse:
        uuid = call.params["checkpointUuid"]
        for trial in self.trials.values():
            for reported in trial.checkpoints:
                if reported.uuid == uuid:
                    return bindings.v1GetCheckpointResponse(
                        checkpoint=self._checkpoint(trial, reported)
                    )
        raise NotFound(f"checkpoint {uuid} not found")

    def get_GetMetrics(self, call: Call) -> List[bindings.v1GetMetricsResponse]:
        """One trial's metrics of a group (the SDK's iter_trials_metrics asks for one trial
        here), as 0.38.1's streamMetrics sends them (master/internal/api_trials.go,
        db.GetMetrics): ordered by steps, 1,000 a message, the stream ending after the last
        stored one, also while the trial runs. Each report holds the body the master stores
        (model.TrialMetricsJSONPath): a validation's metrics under validation_metrics, other
        groups' under avg_metrics with batch_metrics beside them."""
        trial = self.trials[int(call.query["trialIds"])]
        group = call.query["group"]
        body = (
            (lambda m: {"validation_metrics": m})
            if group == "validation"
            else (lambda m: {"avg_metrics": m, "batch_metrics": None})
        )
        reports = [
            bindings.v1MetricsReport(
                archived=False,
                endTime="2026-11-28T00:00:00Z",
                group=group,
                id=number,
                metrics=body(m["metrics"]),
                totalBatches=m["steps"],
                trialId=trial.id,
                trialRunId=trial.run_id,
            )
            for number, m in enumerate(trial.metrics, start=1)
            if m["group"] == group
        ]
        reports.sort(key=lambda r: r.totalBatches)
        return [
            bindings.v1GetMetricsResponse(metrics=reports[start : start + 1000])
            for start in range(0, len(reports), 1000)
        ]

    def post_ReportTrialProgress(self, call: Call) -> None:
        self.trials[call.body.trialId].progress.append(call.body.progress)

    def post_ReportCheckpoint(self, call: Call) -> None:
        checkpoint = call.body
        self.allocations[checkpoint.allocationId].trial.checkpoints.append(checkpoint)
