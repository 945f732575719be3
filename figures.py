"""Figures drawn alike by the pictures (pictures.py) and the curves (curves.py): matplotlib's
Agg renderer on Figure objects (no pyplot, no display, no global state), written whole or not
at all. Only these three modules import matplotlib, so training never pays for it.
"""

import csv
import textwrap
from typing import List, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import checkpoint
import utils


def new_figure(width_px: int, height_px: int, dpi: int, layout: Optional[str] = None) -> Figure:
    """A Figure of exactly width x height pixels, drawn by Agg."""
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str) -> str:
    """The PNG written whole or not at all (utils.atomic_write), at the figure's own size."""
    with utils.atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=figure.dpi, facecolor="white")
    return path


def wrapped(lines: Sequence[str], width_px: int, fontsize: float, dpi: int) -> List[str]:
    """Title lines broken to fit `width_px` (DejaVu Sans is about 0.6 em wide a character)."""
    characters = int(width_px / (0.6 * fontsize * dpi / 72))
    return [part for line in lines for part in textwrap.wrap(line, characters)]


def suptitle(figure: Figure, lines: Sequence[str], fontsize: float) -> None:
    figure.suptitle(
        "\n".join(wrapped(lines, figure.bbox.width, fontsize, figure.dpi)), fontsize=fontsize
    )


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A CSV file written whole or not at all, one line per row."""
    with utils.atomic_write(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def checkpoint_line(ckpt: checkpoint.Checkpoint) -> str:
    return f"checkpoint {ckpt.uuid} (step {ckpt.steps_completed})"
