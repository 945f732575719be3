"""The progress line a user watches, on a clock that moves 7 s per training step."""

import logging

import torch

from conftest import FakeClock
from progress import Progress


def progress_lines(caplog, total_steps, batches_per_epoch, first_step=1, step_s=7.0):
    clock = FakeClock()
    progress = Progress(total_steps, batches_per_epoch, 256, True, 30.0, clock=clock.monotonic)
    with caplog.at_level(logging.INFO, logger="byol"):
        for step in range(first_step, total_steps + 1):
            clock.advance(step_s)
            progress.step_done(step, torch.tensor(0.5))
    return [r.getMessage() for r in caplog.records if r.name == "byol"]


def test_a_line_every_30_seconds_at_each_epoch_end_and_at_the_last_step(caplog):
    lines = progress_lines(caplog, total_steps=100, batches_per_epoch=40)
    steps = [int(line.split("/")[0].split()[1]) for line in lines]
    # 7 s a step: 5 steps after the previous line (35 s >= 30 s), timed from the end of step 1;
    # also at steps 40 and 80 (epoch ends) and 100 (the last).
    assert steps == [6, 11, 16, 21, 26, 31, 36, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100]
    # 256 images every 7 s: 36.6 images/s; at step 6, 94 steps of 7 s are left: 658 s.
    assert lines[0] == "step 6/100  epoch 1/3  loss 0.5000  37 images/s  ETA 0h10m58s"
    assert lines[7] == "step 40/100  epoch 1/3  loss 0.5000  37 images/s  ETA 0h07m00s"
    assert lines[-1] == "step 100/100  epoch 3/3  loss 0.5000  37 images/s  ETA 0h00m00s"


def test_a_resumed_run_times_from_its_own_first_step(caplog):
    lines = progress_lines(caplog, total_steps=12, batches_per_epoch=12, first_step=10)
    # Steps 10-12 of a run resumed at step 9: the line at the last step times steps 11 and 12.
    assert lines == ["step 12/12  epoch 1/1  loss 0.5000  37 images/s  ETA 0h00m00s"]


def test_a_line_at_a_runs_first_step_says_when_speed_comes(caplog):
    lines = progress_lines(caplog, total_steps=2, batches_per_epoch=1)
    assert lines == [
        "step 1/2  epoch 1/2  loss 0.5000  images/s and ETA from the next line",
        "step 2/2  epoch 2/2  loss 0.5000  37 images/s  ETA 0h00m00s",
    ]
