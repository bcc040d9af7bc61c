"""The benchmarks' tables as PNG plots (matplotlib, Agg backend, imported only
here and only when a plot is drawn). Without matplotlib the tables still print,
and one line says why there is no plot.

    scale(rows, dir)   rows: {"label", "servers", "push", "pull"} (events/s)
    watch(rows, dir)   rows: {"label", "median", "p99", "max"} (ms)

Each returns the path of the PNG it wrote, or None."""

import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("bench: no plots (matplotlib is not installed: pip install -e '.[dev]');"
              " the tables above are the results", file=sys.stderr)
        return None
    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _bars(plt, title, labels, series, unit, path):
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2), 3.6), dpi=100)
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="{:,.0f}" if max(values, default=0) >= 100 else "{:,.1f}",
                     fontsize=7, padding=2)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"bench: wrote {path}", file=sys.stderr)
    return path


def scale(rows, out_dir=OUT, title="sk bench_scale: throughput by configuration"):
    """Push and pull+resolve events/s per configuration (bench_scale.py's table)."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    labels = [f"{r['label']}\nx{r['servers']}" for r in rows]
    return _bars(plt, title, labels, [("push ev/s", [r["push"] for r in rows]),
                                      ("pull+resolve ev/s", [r["pull"] for r in rows])],
                 "events / s", str(Path(out_dir) / "bench_scale.png"))


def watch(rows, out_dir=OUT, title="sk bench_watch: stamp on A to committed on B"):
    """Real-time latency (median, p99, max ms) per number of watchers."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    return _bars(plt, title, [r["label"] for r in rows],
                 [(k, [r[k] for r in rows]) for k in ("median", "p99", "max")],
                 "ms", str(Path(out_dir) / "bench_watch.png"))
