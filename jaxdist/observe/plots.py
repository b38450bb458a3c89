"""PNG figures from runs' metrics.jsonl (written by `jaxdist.observe.writer.MetricsWriter`).

    python -m jaxdist.observe.plots RUN_DIR [RUN_DIR ...] --out DIR

RUN_DIR is a logdir (holding metrics.jsonl), a workdir (holding logs/metrics.jsonl) or the file
itself. Figures: `loss.png`, `accuracy.png` (train per step, evaluation per epoch, under the
run's eval prefix: `test_loss`, or `val_loss` for the LM), `throughput.png` (images/s, or
tokens/s for token data, over wall time), `goodput.png` (the wall-time breakdown of each run),
and, when they apply, `scaling.png` (images/s against device count, for runs that differ in
device count), `collective_bytes.png` (ring wire bytes per device per step, per strategy, from
`compile` records carrying `collective_bytes`) and `expert_load.png` (a mixture of experts' router
per layer over the steps: its busiest and idlest expert's load and the share dropped, and every
expert's load at the last step; from `jaxdist.models.moe.moe_metrics`).
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

from jaxdist.observe.writer import read_records
from jaxdist.config import ArgumentParser


class Run:
    """One run's records, split by kind, with a label from its metadata record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records = read_records(self.path)
        metas = self.of("meta")
        self.meta = metas[-1] if metas else {}
        name = self.path.name if self.path.name not in ("logs", "metrics.jsonl") else (
            self.path.parent.name)
        if self.meta:
            self.label = (f"{self.meta.get('model', '?')} {self.meta.get('strategy', '?')} "
                          f"{self.meta.get('devices', '?')} dev, batch "
                          f"{self.meta.get('global_batch', '?')}")
        else:
            self.label = name

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    @property
    def eval_prefix(self) -> str:
        """What `fit` named the evaluation's metrics (`eval_prefix`; "test" for runs that did
        not record it)."""
        return self.meta.get("eval_prefix", "test")

    def evals(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of the evaluation metric `name` ("loss": `<eval_prefix>_loss`)."""
        key = f"{self.eval_prefix}_{name}" if self.eval_prefix else name
        return [(r["step"], r[key]) for r in self.of("eval")
                if isinstance(r.get(key), (int, float))]

    @property
    def throughput_key(self) -> str:
        """The train records' throughput: "tokens_per_second" for token data, else images."""
        tokens = any("tokens_per_second" in r for r in self.of("train"))
        return "tokens_per_second" if tokens else "images_per_second"

    @property
    def devices(self) -> int | None:
        return self.meta.get("devices")

    def steady_images_per_second(self) -> float | None:
        """Median images/s of the train records after each (re)start's first (compile) step."""
        compiled = {r["step"] for r in self.of("compile")}
        values = [r["images_per_second"] for r in self.of("train")
                  if r["step"] not in compiled and r.get("images_per_second")]
        if not values:
            epochs = [r["images_per_second"] for r in self.of("epoch") if r.get("images_per_second")]
            return statistics.median(epochs) if epochs else None
        return statistics.median(values)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(runs: list[Run]) -> list[str]:
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # same settings: tell them apart by directory
        labels = [f"{r.label} ({r.path.name})" for r in runs]
    return labels


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _curves(plt, runs, labels, train_key, ylabel, path, log_y=False):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, label in zip(runs, labels):
        train = [r for r in run.of("train") if isinstance(r.get(train_key), (int, float))]
        if train:
            window = max(1, len(train) // 50)
            line, = ax.plot([r["step"] for r in train],
                            _smooth([r[train_key] for r in train], window), lw=1.2,
                            label=f"{label}: train" + (f" ({window}-step mean)" if window > 1
                                                       else ""))
            color = line.get_color()
        else:
            color = None
        evals = run.evals(train_key)
        if evals:
            ax.plot([step for step, _ in evals], [value for _, value in evals], "o--",
                    color=color, label=f"{label}: {run.eval_prefix or 'eval'}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    _save(plt, fig, ax, path)


def _save(plt, fig, ax, path) -> None:
    """The figures' common finish: grid, legend, tight layout, PNG, closed."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # e.g. no accuracy in an LM's runs
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(plt, runs, labels, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    units = set()
    for j, (run, label) in enumerate(zip(runs, labels)):
        key = run.throughput_key
        units.add(key.removesuffix("_per_second"))
        t0 = run.records[0]["time"]
        segments: list[list[dict]] = [[]]  # one per (re)start: no line across a restart's gap
        first = None  # each (re)start's first step: its time is compilation
        for r in run.records:
            if r["kind"] in ("meta", "compile") and segments[-1]:
                segments.append([])
            if r["kind"] == "compile":
                first = r["step"]
            elif r["kind"] == "train" and r.get(key) and r["step"] != first:
                segments[-1].append(r)
        window = max(1, sum(map(len, segments)) // 50)
        for k, train in enumerate(s for s in segments if s):
            ax.plot([r["time"] - t0 for r in train],
                    _smooth([r[key] for r in train], window), lw=1.2,
                    color=f"C{j}", label=label if k == 0 else None)
    ax.set_xlabel("wall time since the run started (s)")
    ax.set_ylabel(f"{' or '.join(sorted(units)) or 'images'} / s (global)")
    ax.set_ylim(bottom=0)
    _save(plt, fig, ax, path)


def plot_goodput(plt, runs, labels, path):
    categories = ("step", "compile", "data", "eval", "checkpoint", "startup", "restart", "other")
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.6 * len(runs)))
    longest = 0.0
    for i, run in enumerate(runs):
        reports = run.of("goodput")
        if not reports:
            continue
        report, left = reports[-1], 0.0
        for j, category in enumerate(categories):
            seconds = float(report.get(f"{category}_seconds", 0.0))
            ax.barh(i, seconds, left=left, color=f"C{j}", label=category if i == 0 else None)
            left += seconds
        ax.text(left, i, f" {100 * report['goodput']:.0f}% goodput", va="center", fontsize=8)
        longest = max(longest, left)
    ax.set_yticks(range(len(runs)), labels, fontsize=8)
    ax.set_xlim(0, longest * 1.2 or 1)
    ax.set_xlabel("wall seconds")
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
              handlelength=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(plt, runs, path) -> bool:
    """images/s against devices, one line per strategy; False when there is nothing to compare."""
    by_strategy: dict[str, dict[int, float]] = {}
    for run in runs:
        ips = run.steady_images_per_second()
        if run.devices and ips:
            by_strategy.setdefault(run.meta.get("strategy", "?"), {})[run.devices] = ips
    if len({d for points in by_strategy.values() for d in points}) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, (strategy, points) in enumerate(sorted(by_strategy.items())):
        devices = sorted(points)
        ax.plot(devices, [points[d] for d in devices], "o-", color=f"C{j}", label=strategy)
        base = devices[0]
        ax.plot(devices, [points[base] * d / base for d in devices], ":", color=f"C{j}",
                alpha=0.6, label=f"{strategy}: linear from {base}")
    ax.set_xlabel("devices")
    ax.set_ylabel("images / s (median step)")
    ax.set_xscale("log", base=2)
    _save(plt, fig, ax, path)
    return True


def plot_collective_bytes(plt, runs, labels, path) -> bool:
    rows = []
    for run, label in zip(runs, labels):
        compiles = [r for r in run.of("compile") if "collective_bytes" in r]
        if compiles:
            rows.append((label, compiles[-1]["collective_bytes"]))
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.5 * len(rows)))
    ax.barh(range(len(rows)), [b / 1e6 for _, b in rows], color="C0")
    for i, (_, b) in enumerate(rows):
        ax.text(b / 1e6, i, f" {b / 1e6:.3g} MB", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_xlabel("ring wire bytes per device per step (MB, from the compiled HLO)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _layer_series(train: list[dict], prefix: str) -> dict[int, list[tuple[int, float]]]:
    """{layer: [(step, value)]} of the train records' `<prefix><layer>` metrics."""
    series: dict[int, list[tuple[int, float]]] = {}
    for r in train:
        for key, value in r.items():
            m = re.fullmatch(re.escape(prefix) + r"(\d+)", key)
            if m and isinstance(value, (int, float)):
                series.setdefault(int(m.group(1)), []).append((r["step"], value))
    return series


def _last_loads(record: dict) -> list[list[float]]:
    """The per-expert loads (`moe_load_l{i}_e{j}`) of one record, layers x experts."""
    loads: dict[int, dict[int, float]] = {}
    for key, value in record.items():
        m = re.fullmatch(r"moe_load_l(\d+)_e(\d+)", key)
        if m:
            loads.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    return [[row[j] for j in sorted(row)] for _, row in sorted(loads.items())]


def plot_expert_load(plt, runs, labels, path) -> bool:
    """Per MoE run, a row: each layer's busiest (solid) and idlest (dashed) expert's load over
    the steps (1: balanced), each layer's dropped share, and the last step's load of every
    expert (layers x experts). False when no run has a mixture of experts."""
    rows = [(run, label, [r for r in run.of("train") if "moe_max_load_l0" in r])
            for run, label in zip(runs, labels)]
    rows = [row for row in rows if row[2]]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 3, figsize=(14, 3.6 * len(rows)), squeeze=False)
    for (run, label, train), (busy, drop, heat) in zip(rows, axes):
        for layer, points in sorted(_layer_series(train, "moe_max_load_l").items()):
            busy.plot(*zip(*points), color=f"C{layer % 10}", lw=1.2, label=f"layer {layer}")
        for layer, points in sorted(_layer_series(train, "moe_min_load_l").items()):
            busy.plot(*zip(*points), "--", color=f"C{layer % 10}", lw=1.0)
        busy.axhline(1.0, color="k", lw=0.6, alpha=0.5)
        busy.set(title=f"{label}: busiest / idlest expert", xlabel="step",
                 ylabel="load / even split")
        busy.grid(alpha=0.3)
        busy.legend(fontsize=7, ncol=2)
        for layer, points in sorted(_layer_series(train, "moe_dropped_l").items()):
            drop.plot(*zip(*points), color=f"C{layer % 10}", lw=1.2)
        drop.set(title="share of assignments dropped", xlabel="step", ylim=(0, None))
        drop.grid(alpha=0.3)
        loads = _last_loads(train[-1])
        if loads:
            image = heat.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
            fig.colorbar(image, ax=heat, label="load / even split")
            heat.set(title=f"expert load at step {train[-1]['step']}", xlabel="expert",
                     ylabel="layer")
            for axis in (heat.xaxis, heat.yaxis):
                axis.get_major_locator().set_params(integer=True)
        else:
            heat.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Writes the figures for `run_dirs` into `out`; returns their paths."""
    plt = _figure()
    runs = [Run(d) for d in run_dirs]
    labels = _labels(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, ylabel, log_y in (("loss.png", "loss", "loss (NLL)", True),
                                     ("accuracy.png", "accuracy", "accuracy", False)):
        _curves(plt, runs, labels, key, ylabel, out / name, log_y)
        written.append(out / name)
    plot_throughput(plt, runs, labels, out / "throughput.png")
    written.append(out / "throughput.png")
    if any(r.of("goodput") for r in runs):
        plot_goodput(plt, runs, labels, out / "goodput.png")
        written.append(out / "goodput.png")
    if plot_scaling(plt, runs, out / "scaling.png"):
        written.append(out / "scaling.png")
    if plot_collective_bytes(plt, runs, labels, out / "collective_bytes.png"):
        written.append(out / "collective_bytes.png")
    if plot_expert_load(plt, runs, labels, out / "expert_load.png"):
        written.append(out / "expert_load.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m jaxdist.observe.plots",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="logdirs, workdirs or metrics.jsonl files")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
