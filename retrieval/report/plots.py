"""The report's plots: training curves, Recall@K, score histograms (matplotlib without pyplot: no global backend
state, nothing opened on screen), each returned as a base64 PNG for the self-contained page."""

from __future__ import annotations

import base64
import io

import numpy as np

from retrieval.report.html import METRICS


def figure_png(draw) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.2), dpi=100, layout="constrained")
    draw(fig.subplots())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _x_key(records: list[dict]) -> str:
    """The curves' x: images seen (``samples``) when every record has it, monotone across an elastic resume, where
    ``step`` is renumbered for the new world; else the step (logs of older runs)."""
    have = [r for r in records if "step" in r]
    return "samples" if have and all(isinstance(r.get("samples"), int) for r in have) else "step"


def _x_label(records: list[dict]) -> str:
    return "images seen" if _x_key(records) == "samples" else "step"


def _series(records: list[dict], key: str) -> tuple[list, list]:
    x = _x_key(records)
    pairs = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def sane_step_axis(ax, steps: list) -> None:
    """Integer step ticks; one step alone gets a window around it (matplotlib would draw a +-0.05 axis with
    offset ticks, which reads as broken) and stays a visible point."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(set(steps)) == 1:
        step = steps[0]
        ax.set_xlim(step - max(1, abs(step) * 0.5), step + max(1, abs(step) * 0.5))


def draw_validation(ax, val: list[dict], present: list[tuple[str, str]]) -> None:
    steps = []
    for key, label in present:
        xs, values = _series(val, key)
        steps += xs
        ax.plot(xs, [100 * v for v in values], marker="o", ms=3 if len(xs) > 1 else 6, lw=1.5, label=label)
    ax.set(xlabel=_x_label(val), ylabel="%", title="Validation retrieval metrics", ylim=(0, 100))
    sane_step_axis(ax, steps)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def curve_images(train: list[dict], val: list[dict], loss_name: str = "loss") -> list[tuple[str, str]]:
    """(title, base64 PNG) for each curve that has data: loss (named after the run's ``loss.name``), validation
    metrics, throughput."""
    images = []
    if _series(train, "loss")[0]:

        def loss(ax):
            steps, losses = _series(train, "loss")
            ax.plot(steps, losses, color="#1f5fbf", lw=1.5, marker="o" if len(steps) == 1 else None, label="loss")
            title = loss_name.replace("_", " ")
            ax.set(xlabel=_x_label(train), ylabel=title if title.endswith("loss") else f"{title} loss")
            ax.set_title("Training loss")
            sane_step_axis(ax, steps)
            steps, active = _series(train, "active_fraction")
            if steps:
                twin = ax.twinx()
                twin.plot(steps, active, color="#999999", lw=1, ls="--")
                twin.set_ylabel("active fraction (terms with a loss)", color="#777777")

        images.append(("Training loss", figure_png(loss)))
    present = [(key, label) for key, label in METRICS if _series(val, key)[0]]
    if present:
        images.append(("Validation metrics", figure_png(lambda ax: draw_validation(ax, val, present))))
    if _series(train, "images_per_s")[0]:

        def speed(ax):
            ax.plot(*_series(train, "images_per_s"), color="#6a3d9a", lw=1.5, label="all ranks")
            steps, per_gpu = _series(train, "images_per_s_per_gpu")
            if steps:
                ax.plot(steps, per_gpu, color="#cab2d6", lw=1.5, label="per rank")
            ax.set(xlabel=_x_label(train), ylabel="images / s", title="Training throughput")
            ax.legend(fontsize=7)

        images.append(("Throughput", figure_png(speed)))
    return images


def draw_recall(ax, curves: dict[str, tuple[list[int], list[float]]]) -> None:
    for name, (ks, recall) in curves.items():
        ax.plot(ks, [100 * r for r in recall], marker="o", ms=4, lw=1.5, label=name, clip_on=False)
    ks = sorted({k for ks, _ in curves.values() for k in ks})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])  # 1, 2, 4 ... rather than 2^0, 2^1, 2^2
    ax.minorticks_off()
    ax.set(xlabel="K", ylabel="Recall@K (%)", title="Recall@K", ylim=(0, 100))
    ax.legend(fontsize=7, loc="lower right")


def draw_histograms(ax, positive: np.ndarray, negative: np.ndarray) -> None:
    bins = np.linspace(min(positive.min(), negative.min()), max(positive.max(), negative.max()), 50)
    ax.hist(negative, bins=bins, density=True, alpha=0.6, color="#d62728", label=f"other class ({len(negative)} pairs)")
    ax.hist(positive, bins=bins, density=True, alpha=0.6, color="#1a9a3c", label=f"same class ({len(positive)} pairs)")
    ax.set(xlabel="cosine score", ylabel="density", title="Scores of same-class and other-class pairs")
    ax.legend(fontsize=7)
