"""``steermoe plot RUN_DIR``: PNG charts of a run's ``metrics.jsonl`` (matplotlib, ``pip install -e ".[plot]"``).

Writes into ``RUN_DIR/plots`` (or ``output_dir``):

- ``training.png``: training loss, each parameter group's learning rate and the gradient norm over steps;
- ``eval_wer.png``: evaluation WER over steps (when the run evaluated);
- ``gate_usage.png``: the latest evaluation's mean gate per steered layer × expert, a heatmap (when it has one).
"""
import os
from typing import Any, Dict, List, Optional

from .fileio import METRICS_FILE, read_metrics


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend; ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError('steermoe plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(records: List[Dict[str, Any]], key: str):
    """(steps, values) of the records holding ``key``."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _plot_training(plt, records: List[Dict[str, Any]], path: str) -> None:
    lr_keys = sorted({k for r in records for k in r if k.startswith("lr/")})
    fig, (loss_ax, lr_ax, norm_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_ax.plot(*_series(records, "loss"), color="tab:blue")
    loss_ax.set_ylabel("training loss (nats/token)")
    for key in lr_keys:
        lr_ax.plot(*_series(records, key), label=key[len("lr/"):])
    lr_ax.set_ylabel("learning rate")
    if lr_keys:
        lr_ax.legend(loc="best", fontsize="small")
    norm_ax.plot(*_series(records, "grad_norm"), color="tab:red")
    norm_ax.set_ylabel("gradient norm (before clipping)")
    norm_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, lr_ax, norm_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_wer(plt, evals: List[Dict[str, Any]], path: str) -> None:
    steps, wers = _series(evals, "eval/wer")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps, [100 * w for w in wers], marker="o", color="tab:green")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval WER (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_usage(plt, record: Dict[str, Any], path: str) -> None:
    usage = record["eval/router/usage"]
    layers = list(usage)
    matrix = [usage[layer] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(matrix[0]) + 2), max(3, 0.4 * len(layers) + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(matrix[0])))
    ax.set_yticks(range(len(layers)), labels=layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("steered encoder layer")
    ax.set_title(f"mean gate per expert, eval at step {record['step']}")
    fig.colorbar(image, ax=ax, label="share of the gate mass")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str, output_dir: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Write the run's charts; returns ``{name: path}``, a path None where the metrics hold nothing to plot.

    Raises FileNotFoundError when ``run_dir`` has no ``metrics.jsonl``, ValueError when it records no step.
    """
    metrics = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{metrics} not found: RUN_DIR must be a training run's output_dir")
    records = read_metrics(metrics)
    steps = [r for r in records if "loss" in r]
    if not steps:
        raise ValueError(f"{metrics} records no training step yet")
    plt = _pyplot()
    out = output_dir or os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    evals = [r for r in records if "eval/wer" in r]
    usage = [r for r in evals if r.get("eval/router/usage")]
    written: Dict[str, Optional[str]] = {"training": None, "eval_wer": None, "gate_usage": None}
    for name, draw, data in (("training", _plot_training, steps), ("eval_wer", _plot_wer, evals),
                             ("gate_usage", _plot_usage, usage[-1] if usage else None)):
        if data:
            written[name] = os.path.join(out, f"{name}.png")
            draw(plt, data, written[name])
    return written
