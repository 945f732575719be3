"""The progress line a user watches while training runs (chief only)."""

import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from determined import pytorch

from utils import format_duration

logger = logging.getLogger("byol")


class Progress:
    """The progress line a user watches: step, epoch, loss, images/s and ETA, at least every
    `every_s` seconds and at each epoch's end, on the chief, whatever the reporting period.
    Reading the loss is the only host sync it adds, at most once per line; `before_line` runs
    just before each line (where the host waits for the device anyway). `clock` gives seconds
    (a test passes its own)."""

    def __init__(
        self,
        total_steps: int,
        batches_per_epoch: int,
        global_batch_size: int,
        enabled: bool,
        every_s: float = 30.0,
        before_line: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps, self.batches_per_epoch = total_steps, batches_per_epoch
        self.global_batch_size, self.enabled, self.every_s = global_batch_size, enabled, every_s
        self.since: Optional[Tuple[float, int]] = None  # (time, steps done) of the last line
        self.before_line, self.clock = before_line, clock

    def step_done(self, steps_done: int, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self.since is None:  # the first step of this run (a resumed run starts mid-way)
            self.since = (now, steps_done)  # its start is unknown: time the steps after it
        last_time, last_steps = self.since
        epoch_end = steps_done % self.batches_per_epoch == 0
        if now - last_time < self.every_s and not epoch_end and steps_done < self.total_steps:
            return
        self.before_line()
        if steps_done > last_steps:
            seconds_per_step = (now - last_time) / (steps_done - last_steps)
            speed = (
                f"{self.global_batch_size / max(seconds_per_step, 1e-9):.0f} images/s  ETA "
                f"{format_duration((self.total_steps - steps_done) * seconds_per_step)}"
            )
        else:  # a line at the run's first step: nothing timed yet
            speed = "images/s and ETA from the next line"
        logger.info(
            "step %d/%d  epoch %d/%d  loss %.4f  %s",
            steps_done,
            self.total_steps,
            -(-steps_done // self.batches_per_epoch),
            -(-self.total_steps // self.batches_per_epoch),
            float(loss),
            speed,
        )
        self.since = (now, steps_done)


class ValidationSummary(pytorch.PyTorchCallback):
    """One line after each validation, on the chief: the metrics `names` (those reported) of a
    trial with `context` and `steps_done`."""

    def __init__(self, trial, names: Sequence[str]):
        self.trial, self.names = trial, names

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        if self.trial.context.distributed.rank != 0:
            return
        shown = ", ".join(f"{n} {float(metrics[n]):.4f}" for n in self.names if n in metrics)
        logger.info("validation at step %d: %s", self.trial.steps_done, shown)
