"""Pictures: the training loss curve. matplotlib runs headless (Agg) and is imported only
when a plot is asked for, so runs without plots never pay for it."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a figure to PNG through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_loss_curve(history: dict, schedule, path, title: str = "minitf training") -> Path:
    """loss_curve.png: train loss (raw and smoothed) and validation loss (nats/token) against
    step, validation points marked, the learning rate on a second axis.

    Args:
        history: {"train": [[step, loss], ...], "val": [[step, loss], ...]}.
        schedule: callable update index (0-based) -> learning rate; history step s is the
            s-th update, made with schedule(s - 1).
    """
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = np.asarray(history.get("train") or np.zeros((0, 2)), dtype=float)
    val = np.asarray(history.get("val") or np.zeros((0, 2)), dtype=float)
    if len(train):
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        k = max(1, min(50, len(train) // 20))
        smooth = np.convolve(train[:, 1], np.ones(k) / k, mode="valid")
        # centred window, so the smoothed curve does not lag behind the raw one
        ax.plot(train[k // 2:k // 2 + len(smooth), 0], smooth, color="tab:blue", lw=1.6,
                label=f"train ({k}-step mean)")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="tab:orange", lw=1.6, ms=5, label="validation")
        ax.annotate(f"{val[-1, 1]:.3f}", (val[-1, 0], val[-1, 1]), xytext=(-6, 8),
                    textcoords="offset points", ha="right", color="tab:orange", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    # history step s is logged after the s-th update, which used the rate schedule(s - 1)
    last = int(max(train[-1, 0] if len(train) else 1, val[-1, 0] if len(val) else 1, 1))
    steps = np.arange(1, last + 1)
    ax2 = ax.twinx()
    ax2.plot(steps, [schedule(int(s) - 1) for s in steps], color="tab:gray", ls="--", lw=1,
             label="learning rate (right axis)")
    ax2.set_ylabel("learning rate")
    ax2.set_ylim(bottom=0)
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    # below the axes: a legend inside would cover the curves somewhere on some run
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=9, frameon=False)
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
