"""What every benchmark shares: its command line, rounds with medians, the machine it ran on, the
result as a markdown table, and (when asked) a dated result file.

    @dataclasses.dataclass(frozen=True)
    class Config(harness.BenchConfig):
        rounds: int = 3
        \"\"\"alternating rounds (the median is reported)\"\"\"

    @harness.reports_usage_errors
    def main(argv=None) -> int:
        cfg = harness.parse(Config, argv, __doc__)
        report = harness.Report(cfg)             # prints the machine: create it once JAX may start
        times = harness.alternate({"ours": ours, "baseline": theirs}, cfg.rounds)
        report.table(["side", "img/s"], [(k, f"{v.median:,.0f}") for k, v in times.items()])
        report.save()                             # only with --out: a file, or a folder for
        return 0                                  # <YYYY-MM-DD>-dp.md (--out benchmarks/results)

Results go to stdout (and the file), progress to stderr. Bad input is one line and exit 2
(`jaxdist.errors.EXIT_USAGE`), whether argparse finds it or the benchmark does.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

from jaxdist.config import parse_config
from jaxdist.errors import EXIT_USAGE, UsageError

C = TypeVar("C")
K = TypeVar("K", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The flags every benchmark has; a benchmark's config subclasses it."""

    out: str = ""
    """also write the result as markdown: a file, or a folder to hold <YYYY-MM-DD>-<name>.md
    (e.g. benchmarks/results); '' writes nothing"""


def parse(config: type[C], argv: Sequence[str] | None, doc: str | None, *,
          variants: Mapping[str, C] | None = None) -> C:
    """The config `config()` overridden by flags, one per field (`jaxdist.config.parse_config`:
    help from the docstring under each field, choices from `Literal` types); `--config NAME`
    starts from `variants[NAME]` instead (a `tuple[Literal[...], ...]` field's items are checked
    too). Bad input exits 2 with one line."""

    def get_config(variant: str) -> C:
        if not variant:
            return config()
        if variant not in (variants or {}):
            names = ", ".join(variants) if variants else "none (there are no variants)"
            raise ValueError(f"unknown --config {variant!r}; choose from {names}")
        return variants[variant]

    return parse_config(get_config, argv, description=(doc or "").split("\n\n")[0])


def fail(message: Any) -> int:
    """Says `error: message` on stderr (one line) and returns `EXIT_USAGE` for `main` to return."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def reports_usage_errors(main: Callable[..., int]) -> Callable[..., int]:
    """`main`, with a `UsageError` (a mesh that does not fit, too few devices, missing data)
    turned into one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            return fail(e)

    return wrapper


def progress(text: str) -> None:
    """A progress line: stderr, so the result on stdout stays clean."""
    print(text, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Rounds:
    """The values one measurement took, round by round; reported by their median."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self, spec: str = ",.0f") -> str:
        """Every round's value, e.g. '8,672, 7,218, 7,150'."""
        return ", ".join(format(v, spec) for v in self.values)


def alternate(measures: Mapping[K, Callable[[], float]], rounds: int, *,
              label: Callable[[K], str] = str, unit: str = "") -> dict[K, Rounds]:
    """Each round calls every measure once, in the mapping's order, `rounds` times: on a shared
    machine, drift then hits every side alike. A progress line per call goes to stderr."""
    values: dict[K, list[float]] = {key: [] for key in measures}
    for r in range(rounds):
        for key, measure in measures.items():
            values[key].append(measure())
            progress(f"  round {r + 1}/{rounds}: {label(key)}: {values[key][-1]:,.4g}{unit}")
    return {key: Rounds(tuple(v)) for key, v in values.items()}


def step_seconds(trainer: Any, state: Any, batches: Sequence[Any], *, steps: int,
                 rounds: int = 1, warmup: int = 2) -> tuple[Rounds, Any]:
    """(seconds per step, the last step's metrics) of `trainer` going round `batches`: `warmup`
    steps (the first compiles), then `rounds` timings of `steps` steps each, each ended by
    waiting for the last step's metrics."""
    import jax

    for k in range(warmup):
        state, metrics = trainer.step(state, batches[k % len(batches)])
    jax.block_until_ready(metrics)

    def timed() -> float:
        nonlocal state, metrics
        start = time.perf_counter()
        for k in range(steps):
            state, metrics = trainer.step(state, batches[k % len(batches)])
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps

    return repeat(timed, rounds), metrics


def repeat(measure: Callable[[], float], rounds: int) -> Rounds:
    """`measure` called `rounds` times (no progress lines)."""
    return Rounds(tuple(measure() for _ in range(rounds)))


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are written with `str` (format numbers before)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(cfg: Any) -> str:
    """`python -m <the config's module>` and the flags that differ from the config's defaults."""
    base = type(cfg)()
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "out" or value == getattr(base, f.name):
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = str(value).lower()
        flags.append(f"--{f.name} {shlex.quote(str(value))}")
    return " ".join([_prog(type(cfg)), *flags])


def _module(cls: type) -> str:
    """The module's name, also when it runs as `python -m` (then it is `__main__`)."""
    name = cls.__module__
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return spec.name if name == "__main__" and spec else name


def _prog(cls: type) -> str:
    return f"python -m {_module(cls)}"


class Report:
    """A benchmark's result as it is printed: the machine, the command, then lines and tables;
    `save()` writes the same as a dated markdown file when `--out` asks for one.

    Creating it prints the machine (`jaxdist.observe.machine.describe_machine`, which starts
    JAX's backend: create it after `configure_cpu_devices`). `versions` add to it, e.g.
    `torch="2.4.0"`; `passthrough`, the arguments after `--` that went to another command. The
    file's name ends in the module's, e.g. `2026-12-04-dp.md`.
    """

    def __init__(self, cfg: Any, *, passthrough: Sequence[str] = (), **versions: str):
        from jaxdist.observe.machine import describe_machine

        self.name, self.cfg = _module(type(cfg)).rsplit(".", 1)[-1], cfg
        self.machine = describe_machine(**versions)
        self.command = command_line(cfg) + (f" -- {shlex.join(passthrough)}" if passthrough
                                            else "")
        self.body: list[str] = []
        print(f"# {self.machine}\n# {self.command}", flush=True)

    def say(self, text: str = "") -> None:
        """A line (or lines) of the result: printed now, kept for the file."""
        print(text, flush=True)
        self.body.append(text)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.say(markdown_table(columns, rows))

    def markdown(self) -> str:
        doc = (sys.modules[type(self.cfg).__module__].__doc__ or "").split("\n\n")[0].strip()
        head = [f"# {_module(type(self.cfg))}", "", *([doc, ""] if doc else []),
                f"- machine: {self.machine}", f"- command: `{self.command}`", ""]
        return "\n".join(head + self.body).rstrip() + "\n"

    def save(self) -> Path | None:
        """Writes `markdown()` where `cfg.out` says (nothing when it is empty); returns the path.
        A folder gets `<YYYY-MM-DD>-<name>.md` (UTC date), `-2`, `-3`... when that exists."""
        out = getattr(self.cfg, "out", "")
        if not out:
            return None
        path = Path(out)
        if path.is_dir() or out.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{self.name}"
            path, n = path / f"{stem}.md", 1
            while path.exists():
                n += 1
                path = path.with_name(f"{stem}-{n}.md")
        path.write_text(self.markdown())
        progress(f"wrote {path}")
        return path
