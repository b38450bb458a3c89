"""The Llama LM's train step, jaxdist vs PyTorch (eager and torch.compile) on the same machine.

    python -m benchmarks.lm_torch --torch_python /path/to/python-with-torch-and-transformers
    python -m benchmarks.lm_torch --size small --seq_len 256 --batch 8 --steps 10 --rounds 3

The same Llama (`jaxdist.models.llama`, HF's `LlamaForCausalLM` on the PyTorch side, built from
the config's `to_hf()` fields with a random init), batch and sequence length, precision (float32,
or `--dtype bfloat16`: bfloat16 compute with float32 weights on both sides), AdamW at
the same learning rate, random tokens already in memory; each side times whole train steps
(forward, loss over every position, backward, update) on every core. jaxdist: a `Trainer` (the
default `jit` strategy) on 1 device of 1 process. PyTorch runs `benchmarks/torch_lm_reference.py`
under `--torch_python` (default: $JAXDIST_TORCH_PYTHON, else `.venv-reference/bin/python`, else
this interpreter when it has torch), one process per variant kept alive across rounds, so
`torch.compile`'s compilation is paid once, in its warm-up. Rounds alternate jaxdist, eager and
compiled; warm-ups are excluded and medians of tokens/s are printed, with each variant's MFU
against the dense matmul peak measured here first (`measure_matmul_peak`, in `--dtype`) and the ratio
of jaxdist to the best PyTorch variant. Model FLOPs are `jaxdist.models.llama.train_flops` for
every variant (the full causal square, as jaxdist computes it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from benchmarks import harness
from benchmarks.vs_torch import torch_python as _torch_python_or_env
from jaxdist.errors import UsageError

REFERENCE = Path(__file__).with_name("torch_lm_reference.py")
REFERENCE_VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv-reference/bin/python"
TORCH_VARIANTS = {"PyTorch eager": False, "PyTorch torch.compile": True}
"""name: whether the model is `torch.compile`d"""


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    torch_python: str | None = None
    """interpreter with torch and transformers (None: $JAXDIST_TORCH_PYTHON, else
    .venv-reference/bin/python, else this one if it has torch)"""
    size: str = "small"
    """Llama size (jaxdist.models.llama.LLAMA_SIZES: test, tiny, small, ...)"""
    seq_len: int = 256
    """tokens per sequence"""
    batch: int = 8
    """sequences per step"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """compute dtype on both sides; bfloat16 is mixed precision with float32 weights (jaxdist's
    Llama compute_dtype, PyTorch's torch.autocast), MFU against the bfloat16 peak"""
    lr: float = 1e-3
    """AdamW learning rate (weight decay 1e-4 on both sides, optax's default)"""
    warmup: int = 3
    """untimed steps per variant before the rounds (compilation included; at least 1)"""
    steps: int = 10
    """timed steps per round"""
    rounds: int = 3
    """alternating rounds (the median is shown)"""
    peak_size: int = 2048
    """n of the n x n matmuls timed for the measured peak"""


def find_torch_python(explicit: str | None) -> str | None:
    """`--torch_python`, else $JAXDIST_TORCH_PYTHON, else the reference venv's interpreter
    (`scripts/reference_env.sh`), else this one when it has torch; None without any."""
    if explicit or os.environ.get("JAXDIST_TORCH_PYTHON"):
        return _torch_python_or_env(explicit)
    if REFERENCE_VENV_PYTHON.exists():
        return str(REFERENCE_VENV_PYTHON)
    return _torch_python_or_env(None)


def library_versions(python: str) -> dict[str, str]:
    """{"torch": ..., "transformers": ...} of `python`, for the machine line."""
    code = "import torch, transformers; print(torch.__version__, transformers.__version__)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise UsageError(f"{python} cannot import torch and transformers: "
                         f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    torch_version, transformers_version = out.stdout.split()
    return {"torch": torch_version, "transformers": transformers_version}


class TorchWorker:
    """A `torch_lm_reference.py --serve` process: built and warmed up once, then asked for rounds
    on its stdin (one JSON line back per round); idle between them."""

    def __init__(self, python: str, hf_config: dict, args: Config, *, compile: bool):
        self.log = tempfile.TemporaryFile("w+")  # stderr: a pipe nobody reads could fill up
        command = [python, str(REFERENCE), "--serve", "--hf_config", json.dumps(hf_config),
                   "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--lr",
                   str(args.lr), "--warmup", str(args.warmup), "--dtype", args.dtype,
                   *(["--compile"] * compile)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"the PyTorch reference ended: {self.log.read().strip()[-800:]}")
        return json.loads(line)

    def ready(self) -> dict:
        """Waits for the warm-up; its JSON line (torch version, threads, attention kernel)."""
        return self._reply()

    def tokens_per_second(self, steps: int) -> float:
        try:
            self.proc.stdin.write(f"{steps}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has ended: the reply says why
        return self._reply()["tokens_per_second"]

    def close(self) -> None:
        """Closes its stdin (it exits after the round in progress), waits a minute, kills it."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def jax_runner(variant, args: Config):
    """A function timing `args.steps` jaxdist train steps of the registry's `variant` (compiled
    and warmed up here)."""
    import jax
    import optax

    from jaxdist import Trainer

    trainer = Trainer(variant.model_fn(seed=0), optax.adamw(args.lr, weight_decay=1e-4),
                      variant.loss_fn, devices=1)
    state = trainer.init()
    batch = trainer.shard_batch(variant.random_batch(args.batch, 0))
    for _ in range(args.warmup):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)

    def run() -> float:
        nonlocal state, metrics
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        return args.steps * args.batch * args.seq_len / (time.perf_counter() - start)

    return run


def peak_lines(n: int, dtype: str) -> tuple[float, list[str]]:
    """(measured FLOP/s in `dtype`, the header lines): measured and theoretical peaks, fp32,
    bf16."""
    from jaxdist.observe.flops import measure_matmul_peak
    from jaxdist.observe.machine import theoretical_peak_flops

    harness.progress(f"measuring the float32 and bfloat16 matmul peaks ({n}x{n})...")
    measured = {d: measure_matmul_peak(d, n) for d in ("float32", "bfloat16")}
    lines = [f"- {d} peak: measured {flops / 1e9:,.0f} GFLOP/s (jax, {n}x{n} matmul, 1 "
             f"device on all cores); theoretical: {theoretical_peak_flops(d)[1]}"
             for d, flops in measured.items()]
    return measured[dtype], lines


def race(variant, python: str, args: Config) -> tuple[dict[str, harness.Rounds], dict]:
    """Tokens/s per variant over alternating rounds, and the PyTorch side's ready line (threads
    and attention kernel, the same for both of its variants)."""
    workers = {name: TorchWorker(python, variant.config.to_hf(), args, compile=compile)
               for name, compile in TORCH_VARIANTS.items()}
    try:
        harness.progress("compiling and warming up jaxdist; PyTorch warms up alongside...")
        measures = {"jaxdist": jax_runner(variant, args)}
        for name, worker in workers.items():
            info = worker.ready()
            harness.progress(f"{name}: ready after {info['warmup_seconds']:.1f} s "
                             f"({info['threads']} threads, attention {info['attention']})")
            measures[name] = lambda w=worker: w.tokens_per_second(args.steps)
        return harness.alternate(measures, args.rounds, unit=" tokens/s"), info
    finally:
        for worker in workers.values():
            worker.close()


def rows(rounds: dict[str, harness.Rounds], flops_per_token: float, peak: float, tokens: int):
    """Table rows: variant, tokens/s median, step ms, every round's tokens/s, MFU."""
    for name, r in rounds.items():
        yield (name, f"{r.median:,.0f}", f"{1e3 * tokens / r.median:,.0f}", r.spread(),
               f"{flops_per_token * r.median / peak:.1%}")


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    if min(args.seq_len, args.batch, args.warmup, args.steps, args.rounds, args.peak_size) < 1:
        return harness.fail("--seq_len, --batch, --warmup (it compiles), --steps, --rounds and "
                            "--peak_size must be >= 1")

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(1)
    from jaxdist.models import get_model
    from jaxdist.models.llama import train_flops

    variant = get_model("llama").variant(args.size, seq_len=args.seq_len,  # UsageError: no size
                                         compute_dtype=args.dtype)
    cfg = variant.config
    python = find_torch_python(args.torch_python)
    if python is None:
        return harness.fail("no PyTorch found; run scripts/reference_env.sh, or pass "
                            "--torch_python (or set JAXDIST_TORCH_PYTHON) to an interpreter "
                            "that has torch and transformers")
    report = harness.Report(args, **library_versions(python))
    peak, header = peak_lines(args.peak_size, args.dtype)
    rounds, info = race(variant, python, args)
    tokens = args.batch * args.seq_len
    best = max((n for n in rounds if n != "jaxdist"), key=lambda n: rounds[n].median)
    precision = ("float32" if args.dtype == "float32" else
                 "bfloat16 compute, float32 weights (jaxdist compute_dtype, torch.autocast)")
    report.say(f"{variant.title}, batch {args.batch} x seq {args.seq_len}, {precision}, AdamW lr "
               f"{args.lr:g}; jaxdist on 1 device (jit), PyTorch HF LlamaForCausalLM "
               f"({info['attention']} attention, {info['threads']} threads); medians of "
               f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} "
               f"warm-up steps\n")
    report.say("\n".join(header))
    report.say(f"- model FLOPs: {train_flops(cfg, 1) / 1e6:.1f} MFLOP per token "
               f"(`jaxdist.models.llama.train_flops`); MFU is against the measured {args.dtype} "
               f"peak\n")
    report.table(["variant", "tokens/s", "step ms", "rounds (tokens/s)", "MFU"],
                 list(rows(rounds, train_flops(cfg, 1), peak, tokens)))
    report.say(f"\njaxdist / best PyTorch ({best}): "
               f"{rounds['jaxdist'].median / rounds[best].median:.2f}x")
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
