"""PNG plots of training runs from their metrics.jsonl: loss curves, MaxVio, expert load per layer over time.

Several runs can be drawn together (e.g. with and without the bias update): loss and MaxVio curves
overlay them, and each run gets its own load heatmap. Matplotlib is used through `Figure` with
the Agg canvas, so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import DsV3Error, RequestError

LOSS_KEYS = (
    ("loss", "total loss"),
    ("lm_loss", "next-token loss"),
    ("mtp_loss", "MTP loss"),
    ("balance_loss", "balance loss (alpha-weighted)"),
)


def read_metrics(run: str) -> list[dict[str, Any]]:
    """The per-step metric objects of a run, in step order; a clear error when there are none."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RequestError(f"{run} has no metrics.jsonl: train into it first (dsv3 train ... --out {run})")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break  # the last line of a run killed mid-write
            raise RequestError(f"{path}:{n}: not valid JSON") from None
    if not rows:
        raise RequestError(f"{path} is empty: the run has not finished a step yet")
    return sorted(rows, key=lambda r: r["step"])


def layer_names(run: str, num_layers: int) -> list[str]:
    """MoE layer names from train.json, or plain indices."""
    try:
        with open(os.path.join(run, "train.json"), encoding="utf-8") as f:
            names = json.load(f).get("moe_layers")
        if isinstance(names, list) and len(names) == num_layers:
            return [str(n) for n in names]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return [f"MoE layer {i}" for i in range(num_layers)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (shorter at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs: list[str], out_dir: str) -> list[str]:
    """Write loss.png, maxvio.png and one expert-load heatmap per run into out_dir; returns the paths."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DsV3Error("dsv3 plot needs matplotlib (pip install matplotlib)") from None
    data = {run: read_metrics(run) for run in runs}
    labels = _labels(runs)
    os.makedirs(out_dir, exist_ok=True)
    written = []

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    for ax, (key, title) in zip(axes, LOSS_KEYS):
        for run, rows in data.items():
            _curve(ax, [r["step"] for r in rows], [r[key] for r in rows], labels[run])
        ax.set_title(title)
        ax.set_xlabel("step")
        if key != "balance_loss":
            ax.set_ylabel("nats/token")
        ax.legend(fontsize=8)
    written.append(_save(fig, out_dir, "loss.png"))

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    for run, rows in data.items():
        _curve(ax, [r["step"] for r in rows], [r["maxvio"] for r in rows], f"{labels[run]} (max over layers)")
    ax.set_title("MaxVio = max expert load / mean load - 1")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir, "maxvio.png"))

    for run, rows in data.items():
        name = "expert_load.png" if len(runs) == 1 else f"expert_load-{labels[run]}.png"
        written.append(_save(_load_heatmaps(Figure, run, rows, labels[run]), out_dir, name))
    return written


def _labels(runs: list[str]) -> dict[str, str]:
    names = [os.path.basename(os.path.normpath(r)) or r for r in runs]
    if len(set(names)) < len(names):  # same basename in different folders: number them
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    return dict(zip(runs, names))


def _curve(ax: Any, steps: list[int], values: list[float], label: str) -> None:
    """Raw values faint, a trailing mean over ~2% of the run on top (one color per run)."""
    window = max(1, len(values) // 50)
    (line,) = ax.plot(steps, moving_average(values, window), label=label, linewidth=1.5)
    if window > 1:
        ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.7)


def _load_heatmaps(figure_cls: Any, run: str, rows: list[dict[str, Any]], label: str) -> Any:
    """One heatmap per MoE layer: steps on x, experts on y, load / mean load as color."""
    load = torch.tensor([r["expert_load"] for r in rows], dtype=torch.float64)  # (S, L, E)
    if load.dim() != 3 or load.shape[1] == 0:
        raise RequestError(f"{run}: metrics have no expert_load (a model without MoE layers?)")
    rel = load / load.mean(dim=-1, keepdim=True).clamp(min=1e-12)
    names = layer_names(run, load.shape[1])
    steps = [r["step"] for r in rows]
    vmax = max(2.0, float(rel.max()))
    fig = figure_cls(figsize=(10, 1.2 + 2.0 * load.shape[1]), layout="constrained")
    axes = fig.subplots(load.shape[1], 1, squeeze=False)[:, 0]
    for i, ax in enumerate(axes):
        image = ax.imshow(
            rel[:, i].T.numpy(),
            aspect="auto",
            origin="lower",
            cmap="magma",
            vmin=0,
            vmax=vmax,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[2] - 0.5),
            interpolation="nearest",
        )
        ax.set_ylabel(f"{names[i]}\nexpert")
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{label}: expert load / mean load per MoE layer")
    fig.colorbar(image, ax=list(axes), label="load / mean")
    return fig


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=72)
    return path
