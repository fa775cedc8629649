"""The benchmark's figure: speedup over HF `generate` against the measured MAT, one line per
method (and per frame count)."""
from __future__ import annotations

from pathlib import Path


def plot_speedup_vs_mat(rows: list[dict], path: str | Path, title: str) -> Path | None:
    """x: the pair's MAT at each eps (sequential SD's measured MAT), y: decode speedup over HF
    generate. Written as PNG (matplotlib, headless); None, with nothing written, where
    matplotlib is not installed (an optional dependency: the `bench` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("pair_MAT") is None or row.get("x hf_generate") is None:
            continue
        series.setdefault((row["method"], row["frames"]), []).append(
            (row["pair_MAT"], row["x hf_generate"]))
    for (method, frames), points in sorted(series.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=f"{method} ({frames} frames)")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("measured MAT (sequential SD, same pair)")
    axes.set_ylabel("decode speedup over HF generate")
    axes.set_title(title)
    if series:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, _why_empty(rows), ha="center", transform=axes.transAxes)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _why_empty(rows: list[dict]) -> str:
    """What --methods left out that the figure needs."""
    if not any(row.get("x hf_generate") is not None for row in rows):
        return "no speedup over HF generate was measured (add hf_generate to --methods)"
    return "no MAT of the pair was measured (the x axis: add sequential to --methods)"
