"""One figure of one or several runs' metrics.jsonl, one panel per kind of curve.

Panels, each drawn only where some run has its numbers: train and eval loss; eval perplexity on
a log scale (token classification: entity F1); learning rate; throughput (tokens/s); MFU; each
mixture source's eval loss (eval_loss/<source>); each downstream metric of the eval harness
(downstream/<task>/<metric>). Several runs share a colour each across the panels, with a legend.
"""
from __future__ import annotations

from pathlib import Path

from train import durable
from train.errors import UsageError
from train.run.metrics import NAME, read_records

COLUMNS = 3
PER_SOURCE = "eval_loss/"
DOWNSTREAM = "downstream/"


def run_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / NAME
    if not path.exists():
        raise UsageError(f"{path} does not exist: is {run_dir} a run's output_dir?")
    return read_records(path)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a number for `key`."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in points], [v for _, v in points]


def panels(runs: dict[str, list[dict]]) -> list[tuple[str, str, list[tuple[str, str]], bool]]:
    """(title, y label, [(key, line label)], log scale) of each panel some run has data for."""
    keys = {k for records in runs.values() for r in records for k in r}
    f1 = "eval_f1" in keys
    found = [
        ("loss", "loss (nats/token)", [("loss", "train"), ("eval_loss", "eval")], False),
        ("eval entity F1" if f1 else "eval perplexity", "entity F1" if f1 else "perplexity",
         [("eval_f1" if f1 else "perplexity", "")], not f1),
        ("learning rate", "learning rate", [("lr", "")], False),
        ("throughput", "tokens/s", [("tokens_per_s", "")], False),
        ("MFU", "model FLOPs utilization", [("mfu", "")], False),
    ]
    sources = sorted(k for k in keys if k.startswith(PER_SOURCE))
    if sources:
        found.append(("eval loss per source", "loss (nats/token)",
                      [(k, k.removeprefix(PER_SOURCE)) for k in sources], False))
    for key in sorted(k for k in keys if k.startswith(DOWNSTREAM)):
        task_metric = key.removeprefix(DOWNSTREAM)
        found.append((f"downstream {task_metric}", task_metric.rpartition("/")[2],
                      [(key, "")], False))
    return [p for p in found if any(k in keys for k, _ in p[2])]


def plot_runs(run_dirs: list[Path], out: Path | None = None, svg: bool = False) -> Path:
    """Draw the runs into one figure: out (default: the first run's metrics.png), and beside it
    the same as .svg on request. Returns the PNG's path."""
    import matplotlib.pyplot as plt

    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):  # same basenames: tell them apart by their full paths
        names = [str(Path(d)) for d in run_dirs]
    out = Path(out) if out else Path(run_dirs[0]) / "metrics.png"
    if not out.parent.is_dir() or out.is_dir():
        raise UsageError(f"cannot write the plot to {out}: "
                         + (f"{out} is a directory" if out.is_dir() else
                            f"the directory {out.parent} does not exist")
                         + "; give --out a file path in an existing directory")
    fig = draw({name: run_records(d) for name, d in zip(names, run_dirs)})
    targets = [(out, out.suffix.lstrip(".") or "png")] + [(out.with_suffix(".svg"), "svg")] * svg
    for path, fmt in targets:
        with durable.written_whole(path, binary=True) as f:  # never through a symlink
            fig.savefig(f, dpi=100, format=fmt)
    plt.close(fig)
    return out


def draw(runs: dict[str, list[dict]]):
    """The figure of {run name: its records}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = panels(runs)
    rows = -(-len(found) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(5 * COLUMNS, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, keys, log) in zip(axes.flat, found):
        for i, (name, records) in enumerate(runs.items()):
            for j, (key, label) in enumerate(keys):
                steps, values = series(records, key)
                if not steps:
                    continue
                # one colour per run; within a panel of several curves, one style per curve
                marker = "o" if key.startswith(("eval", "perplexity", DOWNSTREAM)) else None
                line_label = " ".join(x for x in (name if len(runs) > 1 else "", label) if x)
                ax.plot(steps, values, marker=marker, color=colours[i % len(colours)],
                        linestyle=["-", "--", ":", "-."][j % 4], markersize=3,
                        label=line_label or None)
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(found):]:
        ax.remove()
    fig.tight_layout()
    return fig
