"""Training curves as an image: train and validation loss (or bits per byte) of one or more runs
against steps, tokens or time, drawn headless with matplotlib's Agg backend (PNG or SVG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmkit.config import ConfigError
from lmkit.fileio import atomic_file
from lmkit.runs import BITS_PER_NAT, RunSummary

X_AXES = {"step": ("step", "step"), "tokens": ("tokens", "tokens seen"), "time": ("elapsed", "seconds")}
METRICS = ("loss", "bpb")
FORMATS = (".png", ".svg")
MIN_PIXELS, MAX_PIXELS = 50, 10_000  # each side of an image


def parse_size(text: str) -> tuple[int, int]:
    """--size WIDTHxHEIGHT: the image's (width, height) in pixels, each 50 to 10,000.

    Raises:
        ConfigError: TEXT is not two such numbers.
    """
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if not (MIN_PIXELS <= width <= MAX_PIXELS and MIN_PIXELS <= height <= MAX_PIXELS):
        raise ConfigError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 900x540")
    return width, height


def plot_runs(runs: Sequence[RunSummary], out: Path, *, metric: str = "loss", x: str = "step", log: bool = False,
              size: tuple[int, int] = (900, 540)) -> list[RunSummary]:
    """Draw RUNS' curves into OUT (its suffix picks PNG or SVG), SIZE pixels wide and high; the
    runs left out (bits per byte of a run that cannot tell them: a finetune on other data).

    Raises:
        ConfigError: an unknown metric, x axis or file type; no run to draw.
    """
    if metric not in METRICS or x not in X_AXES:
        raise ConfigError(f"--metric is one of {', '.join(METRICS)} and --x one of {', '.join(X_AXES)}")
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"{out}: the image is PNG or SVG (a file ending in .png or .svg)")
    scales = {}
    for run in runs:
        per_token = run.val_bytes_per_token
        if metric == "loss" or per_token:
            scales[id(run)] = BITS_PER_NAT / per_token if metric == "bpb" else 1.0
    drawn = [run for run in runs if id(run) in scales and run.rows]
    if not drawn:
        raise ConfigError("no metrics to plot: the runs have no metrics.jsonl rows yet" if metric == "loss" else
                          "bits per byte need a pretraining run's validation text; use --metric loss")
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable, editable)
    import matplotlib.pyplot as plt

    key, label = X_AXES[x]
    dpi = 100
    figure, axes = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(drawn):
        scale = scales[id(run)]
        name = f"{Path(run.project).name}/{run.run} ({run.arch}"
        name += f", {run.parameters / 1e6:.2f}M)" if run.parameters else ")"
        color = colors[k % len(colors)]
        train = [(r[key], r["loss"] * scale) for r in run.rows if key in r and isinstance(r.get("loss"), float)]
        val = [(r[key], r["val_loss"] * scale) for r in run.rows if key in r and isinstance(r.get("val_loss"), float)]
        if train:
            axes.plot(*zip(*train), color=color, alpha=0.45, linewidth=1.2, label=f"{name} train")
        if val:
            axes.plot(*zip(*val), color=color, marker="o", markersize=3, linewidth=1.8, label=f"{name} val")
    axes.set_xlabel(label)
    axes.set_ylabel("bits per byte" if metric == "bpb" else "loss (nats per token)")
    if log:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(out) as f:  # never through a link left at OUT (PROJECT/curves.png by default)
        figure.savefig(f, dpi=dpi, format=out.suffix.lower()[1:])
    plt.close(figure)
    return [run for run in runs if run not in drawn]
