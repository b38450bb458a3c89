"""Time to 99% MNIST test accuracy: jaxdist and PyTorch on the same recipe, side by side.

    python -m benchmarks.time_to_accuracy --torch_python /path/to/python-with-torch
    python -m benchmarks.time_to_accuracy --rounds 2 --epochs 4 --torch_processes 2

The recipe is the experiment's default (the classic CNN, Adam 3e-3, one-cycle cosine schedule with
15% warm-up, global batch 128) for `--epochs` epochs. Both frameworks evaluate the whole test set
after every epoch; the clock counts training only (input pipeline included, evaluation excluded)
and stops at the first epoch whose accuracy reaches `--target`. jaxdist's first step (compilation)
is reported apart. Rounds alternate the frameworks; the table shows every round.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.vs_torch import REFERENCE, ComputeDtype, torch_python, torch_version


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    torch_python: str | None = None
    """interpreter that has torch (None: $JAXDIST_TORCH_PYTHON, else this one if it has torch)"""
    torch_processes: int = 1
    """PyTorch DDP processes"""
    cpu_devices: int = 1
    """jaxdist virtual CPU devices (1 measured fastest at batch 128 on 2 cores since all
    convolutions run on oneDNN; docs/performance.md #21)"""
    epochs: int = 5
    """epochs each run trains"""
    global_batch: int = 128
    """images per step"""
    learning_rate: float = 3e-3
    """Adam's peak learning rate (one-cycle schedule)"""
    target: float = 0.99
    """test accuracy whose first epoch stops the clock"""
    rounds: int = 1
    """rounds, alternating the frameworks (every round is shown)"""
    seeds: tuple[int, ...] = (0,)
    """seeds, comma-separated; each runs both frameworks (the epoch that reaches the target
    varies by seed)"""
    compute_dtypes: tuple[ComputeDtype, ...] = ("float32",)
    """jaxdist compute dtypes, comma-separated (bfloat16: fp32 master weights)"""
    data_dir: str | None = None
    """TFDS data dir"""


def time_to_target(history: list[dict], target: float) -> tuple[int | None, float | None]:
    """(first epoch reaching `target`, cumulative training seconds up to it), or (None, None)."""
    seconds = 0.0
    for record in history:
        seconds += record["epoch_seconds"]
        if record["test_accuracy"] >= target:
            return record["epoch"], seconds
    return None, None


def run_jaxdist(args, seed: int, compute_dtype: str = "float32") -> dict:
    from experiments.mnist import get_config, train
    from jaxdist.config import replace_flags

    cfg = replace_flags(get_config(), epochs=args.epochs, global_batch=args.global_batch,
                        data_dir=args.data_dir, progress=False, seed=seed,
                        compute_dtype=compute_dtype, learning_rate=args.learning_rate)
    s = train(cfg)
    return {"history": [{k: r[k] for k in ("epoch", "epoch_seconds", "test_accuracy")}
                        for r in s["history"]],
            "first_step_seconds": s["first_step_seconds"],
            "label": f"jaxdist jit, {s['devices']} {s['platform']} dev, "
                     f"{'bf16' if compute_dtype == 'bfloat16' else 'fp32'}, seed {seed}"}


def run_torch(python: str, args, train_npz: str, test_npz: str, seed: int) -> dict:
    proc = subprocess.run(
        [python, str(REFERENCE), "--processes", str(args.torch_processes), "--global_batch",
         str(args.global_batch), "--lr", str(args.learning_rate), "--train_epochs",
         str(args.epochs), "--data", train_npz, "--test", test_npz, "--seed", str(seed)],
        capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"the PyTorch reference failed: {proc.stderr.strip()[-500:]}")
    history, seconds = [], 0.0
    for line in proc.stdout.strip().splitlines():
        r = json.loads(line)
        history.append({"epoch": r["epoch"], "epoch_seconds": r["train_seconds"] - seconds,
                        "test_accuracy": r["test_accuracy"]})
        seconds = r["train_seconds"]
    ddp = f"DDP gloo, {args.torch_processes} processes" if args.torch_processes > 1 else "1 process"
    return {"history": history, "first_step_seconds": None,
            "label": f"PyTorch, {ddp}, seed {seed}"}


def _row(run: dict, target: float, train_examples: int) -> tuple:
    epoch, seconds = time_to_target(run["history"], target)
    total = sum(r["epoch_seconds"] for r in run["history"])
    images = train_examples * len(run["history"])
    compile_s = f"{run['first_step_seconds']:.1f}" if run["first_step_seconds"] is not None else "-"
    accs = " ".join(f"{100 * r['test_accuracy']:.2f}" for r in run["history"])
    return (run["label"], epoch or "-", f"{seconds:.1f}" if epoch else "not reached",
            f"{images / total:,.0f}", compile_s, accs)


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    python = torch_python(args.torch_python)
    if python is None:
        return harness.fail("no PyTorch found; pip install 'jaxdist[bench]' or pass "
                            "--torch_python")
    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)
    import numpy as np

    from experiments.mnist import DATA_FALLBACKS
    from jaxdist.data import load_split

    splits = {s: load_split("mnist", s, args.data_dir, progress=False, fallbacks=DATA_FALLBACKS)
              for s in ("train", "test")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, split in splits.items():
            paths[name] = str(Path(tmp) / f"mnist-{name}.npz")
            np.savez(paths[name], images=split.images, labels=split.labels)
        for r in range(args.rounds):
            for seed in args.seeds:
                runs.append(run_torch(python, args, paths["train"], paths["test"], seed))
                harness.progress(f"round {r + 1}: {runs[-1]['label']} done")
                for dtype in args.compute_dtypes:
                    runs.append(run_jaxdist(args, seed, dtype))
                    harness.progress(f"round {r + 1}: {runs[-1]['label']} done")
    report = harness.Report(args, **torch_version(python))
    report.say(f"target {100 * args.target:.1f}%, global batch {args.global_batch}, "
               f"{args.epochs} epochs of Adam {args.learning_rate:g} one-cycle; seconds of "
               f"training (evaluation excluded) until the first epoch at the target\n")
    report.table(["run", "epochs", "seconds", "img/s", "compile s",
                  "test accuracy per epoch (%)"],
                 [_row(run, args.target, len(splits["train"])) for run in runs])
    report.save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
