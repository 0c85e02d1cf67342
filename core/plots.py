"""Figures for the report (matplotlib, no display needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_miou_vs_k(ks: list[int], series: dict[str, list[float]], baselines: dict[str, float], path: Path) -> None:
    """mIoU (%) against k, one line per series, baselines as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, values) in enumerate(series.items()):
        ax.plot(ks, [100 * v for v in values], marker="o", color=colors[i % len(colors)], label=label)
    for i, (label, value) in enumerate(baselines.items()):
        ax.axhline(100 * value, linestyle="--", color=colors[i % len(colors)], alpha=0.7, label=label)
    ax.set_xlabel("k (number of k-means clusters)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
