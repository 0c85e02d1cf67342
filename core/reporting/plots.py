"""Figures for the report (matplotlib, no display needed)."""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def plot_miou_vs_k(ks: list[int], series: dict[str, list[float]], baselines: dict[str, float], path: Path) -> None:
    """mIoU (%) against k, one line per series, baselines as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, values) in enumerate(series.items()):
        # None: no pixel was scored (every image failed), so there is no point to draw
        ax.plot(
            ks,
            [np.nan if v is None else 100 * v for v in values],
            marker="o",
            color=colors[i % len(colors)],
            label=label,
        )
    for i, (label, value) in enumerate(baselines.items()):
        if value is None:
            continue
        ax.axhline(100 * value, linestyle="--", color=colors[i % len(colors)], alpha=0.7, label=label)
    ax.set_xlabel("k (number of k-means clusters)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save_atomic(fig, path: Path, dpi: int = 120) -> None:
    """Save to a temporary file beside `path`, then rename it into place; closes the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def plot_confusion(conf: np.ndarray, names: list[str], path: Path, title: str | None = None) -> None:
    """Row-normalised confusion heatmap: each ground-truth row shows where its pixels went (%).

    conf: (C, C) or (C, C+1) counts (rows = ground truth); an extra column is drawn as
    "unassigned". Rows without pixels stay blank.
    """
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    if conf.ndim != 2 or conf.shape[1] not in (c, c + 1) or len(names) != c:
        raise ValueError(f"confusion matrix must be (C, C) or (C, C+1) with C = {len(names)} names, got {conf.shape}")
    totals = conf.sum(axis=1, keepdims=True)
    share = np.full(conf.shape, np.nan)
    np.divide(conf, totals, out=share, where=totals > 0)
    columns = list(names) + ["unassigned"] * (conf.shape[1] - c)
    size = 2.5 + 0.42 * conf.shape[1]
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(100 * share, cmap="Blues", vmin=0, vmax=100)
    if conf.shape[1] <= 40:
        for i, j in zip(*np.nonzero(share >= 0.005)):
            v = 100 * share[i, j]
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6.5, color="white" if v > 55 else "black")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=90, fontsize=8)
    ax.set_yticks(range(c))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="% of the ground-truth class's pixels")
    fig.tight_layout()
    _save_atomic(fig, path)


def plot_per_class_iou(
    runs: dict[str, dict[str, float | None]], path: Path, class_names: list[str] | None = None, title: str | None = None
) -> None:
    """Grouped bars of per-class IoU (%), one bar per run; values are fractions, None = undefined.

    Classes follow `class_names` (default: the first run's order); the legend carries each run's
    mean over its defined classes.
    """
    if not runs:
        raise ValueError("no runs to plot")
    class_names = list(class_names if class_names is not None else next(iter(runs.values())).keys())
    n_runs, n_cls = len(runs), len(class_names)
    width = 0.8 / n_runs
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * n_cls + 2), 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = np.arange(n_cls)
    for r, (run, per_class) in enumerate(runs.items()):
        values = np.array([np.nan if per_class.get(n) is None else 100 * per_class[n] for n in class_names])
        defined = values[~np.isnan(values)]
        label = f"{run} (mean {defined.mean():.1f})" if defined.size else run
        ax.bar(x - 0.4 + width * (r + 0.5), np.nan_to_num(values), width, label=label, color=colors[r % len(colors)])
    ax.set_xticks(x)
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, n_cls - 0.4)
    ax.grid(axis="y", alpha=0.3)
    rows = -(-n_runs // 3)  # legend rows above the axes; the title goes above them
    ax.legend(fontsize=8, ncol=min(n_runs, 3), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        ax.set_title(title, pad=8 + 14 * rows)
    fig.tight_layout()
    _save_atomic(fig, path)


def plot_overlay_grid(
    rows: list[tuple[np.ndarray, ...]],
    path: Path,
    column_titles: tuple[str, ...] = ("image", "ground truth", "baseline", "overclustered"),
    row_titles: list[str] | None = None,
    image_weight: float = 0.3,
) -> None:
    """A grid of (image, gt_color, baseline_color, overclustered_color, ...) rows.

    The first entry of a row is the RGB image; the others are (H, W, 3) uint8 colour label maps,
    drawn over the image with `image_weight` of the image mixed in (0 = plain colour maps) when
    their sizes match.
    """
    if not rows:
        raise ValueError("no rows to plot")
    n_cols = max(len(r) for r in rows)
    h, w = rows[0][0].shape[:2]
    cell_w = 3.6
    cell_h = cell_w * h / w + 0.25
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(cell_w * n_cols, cell_h * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        image = np.asarray(row[0])
        for j in range(n_cols):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(row):
                continue
            panel = np.asarray(row[j])
            if j > 0 and image_weight > 0 and panel.shape == image.shape:
                panel = (
                    image_weight * image.astype(np.float32) + (1 - image_weight) * panel.astype(np.float32)
                ).astype(np.uint8)
            ax.imshow(panel, interpolation="nearest")
            if i == 0 and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=10)
        if row_titles is not None and i < len(row_titles):
            axes[i, 0].text(
                -0.02,
                0.5,
                row_titles[i],
                transform=axes[i, 0].transAxes,
                rotation=90,
                ha="right",
                va="center",
                fontsize=8,
            )
    fig.tight_layout(pad=0.3)
    _save_atomic(fig, path, dpi=100)


def plot_few_shot(
    curves: dict[str, dict[int, tuple[float, float]]], lines: dict[str, float | None], path: Path
) -> None:
    """mIoU (%) against m, the labelled patches drawn per cluster (log scale), one curve per fit
    with its spread over draws as error bars; other protocols as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shots = sorted({m for curve in curves.values() for m in curve})
    for i, (label, curve) in enumerate(curves.items()):
        ms = sorted(curve)
        ax.errorbar(
            ms,
            [100 * curve[m][0] for m in ms],
            yerr=[100 * curve[m][1] for m in ms],
            marker="o",
            capsize=3,
            color=colors[i % len(colors)],
            label=label,
        )
    for i, (label, value) in enumerate(lines.items()):
        if value is not None:
            ax.axhline(
                100 * value, linestyle="--", color=colors[(len(curves) + i) % len(colors)], alpha=0.8, label=label
            )
    ax.set_xscale("log")
    ax.set_xticks(shots)
    ax.set_xticklabels([str(m) for m in shots])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("m: labelled patches looked at per cluster")
    ax.set_ylabel("pixel mIoU (%), held-out folds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_atomic(fig, path)
