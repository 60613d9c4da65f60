"""Accuracy against N as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(curves: dict, path: str | Path, title: str) -> Path:
    """One line per method of ``curves`` (``best_of_n.accuracy_curves``), with its 95 % band."""
    import matplotlib  # matplotlib: heavy, loaded where used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: heavy, loaded where used

    ns, acc, band = curves["ns"], curves["accuracy"], curves["band"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in acc:
        ys = [100 * acc[method][str(n)] for n in ns]
        half = [100 * band[method][str(n)] for n in ns]
        style = "k:" if method == "pass" else ("--" if method in ("random", "majority") else "-o")
        (line,) = ax.plot(ns, ys, style, label=method, markersize=3)
        ax.fill_between(ns, [y - h for y, h in zip(ys, half)], [y + h for y, h in zip(ys, half)],
                        color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
