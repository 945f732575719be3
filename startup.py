"""A trial's start-up, agreed across its processes.

Every process checks its own start-up (the config, its data location, a download on its
machine). A problem that only some processes see (a data folder missing on one agent) would
otherwise make only those exit, while the others wait in a collective until the master kills
the trial. So each start-up step ends in one collective, `agree`, through which every process
learns whether any failed; then all stop with the same line, naming each process that failed
(its rank, its machine's rank and hostname) and what it saw.

The rule that keeps the processes in step: inside a step, every collective across machines
starts with `agree`. A process that fails leaves the step and calls `agree` with its problem;
the others meet it in the `agree` of their next collective or of the step's end.
"""

import socket
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from config import ConfigError

T = TypeVar("T")


class StartupFailed(ConfigError):
    """Some process's start-up failed; raised on every process, with the same message."""


def describe(failures: List[Tuple[int, int, str, str]]) -> str:
    """One line from (rank, machine rank, hostname, problem) of each failed process."""
    by_problem = {}
    for rank, machine, host, problem in failures:
        by_problem.setdefault(problem, []).append(f"rank {rank} (machine {machine}, {host})")
    return "; ".join(
        f"start-up failed on {', '.join(where)}: {problem}" for problem, where in by_problem.items()
    )


class Startup:
    """The start-up steps of one process. `distributed`: Determined's DistributedContext."""

    def __init__(self, distributed: Any, hostname: Optional[str] = None):
        self.distributed = distributed
        self.hostname = hostname or socket.gethostname()

    def step(self, fn: Callable[[], T]) -> T:
        """fn() in this process, then agree: if fn or any other process's step failed, every
        process raises the same StartupFailed (a lone process: fn's own ConfigError)."""
        result, problem = None, None
        try:
            result = fn()
        except StartupFailed:
            raise
        except ConfigError as error:
            if self.distributed.size == 1:
                raise
            problem = str(error)
        self.agree(problem)  # raises if any process, this one included, failed
        return result

    def agree(self, problem: Optional[str]) -> None:
        """The collective: raises StartupFailed on every process if any has a problem."""
        mine = (self.distributed.cross_rank, self.hostname, problem)
        everyone = self.distributed.allgather(mine)
        failures = [
            (rank, machine, host, problem)
            for rank, (machine, host, problem) in enumerate(everyone)
            if problem is not None
        ]
        if failures:
            raise StartupFailed(describe(failures))

    def share(self, fn: Callable[[], T]) -> T:
        """fn() on the chief only (a listing every process needs), its result to every process."""
        self.agree(None)
        result, problem = None, None
        if self.distributed.rank == 0:
            try:
                result = fn()
            except ConfigError as error:
                if self.distributed.size == 1:
                    raise
                problem = str(error)
        result, problem, chief_host = self.distributed.broadcast((result, problem, self.hostname))
        if problem is not None:
            raise StartupFailed(describe([(0, 0, chief_host, problem)]))
        return result

    def first_on_machine(self, open_dataset: Callable[[bool], T]) -> T:
        """open_dataset(download=True) in this machine's first process; the machine's others wait
        for it, then open_dataset(download=False). A download that fails fails on all of them."""
        self.agree(None)
        distributed = self.distributed
        if distributed.local_rank == 0:
            try:
                dataset = open_dataset(True)
            except ConfigError as error:
                distributed.broadcast_local(str(error))
                raise
            distributed.broadcast_local(None)
            return dataset
        problem = distributed.broadcast_local(None)
        if problem is not None:
            raise ConfigError(problem)
        return open_dataset(False)
