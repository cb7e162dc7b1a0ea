"""Figures as files: matplotlib without a display, saved atomically, and curve smoothing."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from pipeline.io import atomic_path

__all__ = ["moving_mean", "plt", "save"]


def moving_mean(steps: np.ndarray, values: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """The mean of each `window` consecutive values, at the step of the last one."""
    if window < 2 or len(values) < window:
        return steps, values
    return steps[window - 1 :], np.convolve(values, np.ones(window) / window, mode="valid")


def save(fig: Figure, path: Path, dpi: int = 100) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
