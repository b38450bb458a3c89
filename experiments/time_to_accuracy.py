"""Time to 99% MNIST test accuracy: jaxdist and PyTorch on the same recipe, side by side.

    python -m experiments.time_to_accuracy --torch_python /path/to/python-with-torch
    python -m experiments.time_to_accuracy --rounds 2 --epochs 4 --torch_processes 2

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

from experiments.bench_torch import REFERENCE, compute_dtypes, torch_python, torch_version
from jaxdist.config import ArgumentParser


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

    cfg = get_config()
    cfg = dataclasses.replace(
        cfg, epochs=args.epochs, global_batch=args.global_batch, data_dir=args.data_dir,
        progress=False, seed=seed, compute_dtype=compute_dtype,
        optimizer=dataclasses.replace(cfg.optimizer, learning_rate=args.learning_rate))
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


def _row(run: dict, target: float, train_examples: int) -> str:
    epoch, seconds = time_to_target(run["history"], target)
    total = sum(r["epoch_seconds"] for r in run["history"])
    images = train_examples * len(run["history"])
    reached = f"{epoch:>6} | {seconds:>9.1f}" if epoch else f"{'-':>6} | {'not reached':>9}"
    compile_s = f"{run['first_step_seconds']:.1f}" if run["first_step_seconds"] is not None else "-"
    accs = " ".join(f"{100 * r['test_accuracy']:.2f}" for r in run["history"])
    return (f"{run['label']:<40} | {reached} | {images / total:>7,.0f} | {compile_s:>9} | {accs}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.time_to_accuracy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_python", default=None, help="interpreter that has torch")
    parser.add_argument("--torch_processes", type=int, default=1, help="PyTorch DDP processes")
    parser.add_argument("--cpu_devices", type=int, default=1,
                        help="jaxdist virtual CPU devices (1 measured fastest at batch 128 on 2 "
                             "cores since all convolutions run on oneDNN; docs/performance.md #21)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--global_batch", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds; each runs both frameworks (the epoch that "
                             "reaches the target varies by seed)")
    parser.add_argument("--compute_dtypes", default="float32",
                        help="jaxdist compute dtypes, comma-separated: float32, bfloat16 (fp32 "
                             "master weights)")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir")
    args = parser.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds takes integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    dtypes = compute_dtypes(args.compute_dtypes)
    if dtypes is None:
        return 2
    python = torch_python(args.torch_python)
    if python is None:
        print("error: no PyTorch found; pip install 'jaxdist[bench]' or pass --torch_python",
              file=sys.stderr)
        return 2
    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)
    import numpy as np

    from experiments.mnist import DATA_FALLBACKS
    from jaxdist.data import load_split
    from jaxdist.errors import UsageError

    try:
        splits = {s: load_split("mnist", s, args.data_dir, progress=False,
                                fallbacks=DATA_FALLBACKS) for s in ("train", "test")}
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, split in splits.items():
            paths[name] = str(Path(tmp) / f"mnist-{name}.npz")
            np.savez(paths[name], images=split.images, labels=split.labels)
        for r in range(args.rounds):
            for seed in seeds:
                runs.append(run_torch(python, args, paths["train"], paths["test"], seed))
                print(f"round {r + 1}: {runs[-1]['label']} done", file=sys.stderr, flush=True)
                for dtype in dtypes:
                    runs.append(run_jaxdist(args, seed, dtype))
                    print(f"round {r + 1}: {runs[-1]['label']} done", file=sys.stderr,
                          flush=True)
    from jaxdist.observe.machine import describe_machine

    print(f"# {describe_machine(**torch_version(python))}")
    print(f"target {100 * args.target:.1f}%, global batch {args.global_batch}, {args.epochs} epochs "
          f"of Adam {args.learning_rate:g} one-cycle")
    print(f"{'run':<40} | {'epochs':>6} | {'seconds':>9} | {'img/s':>7} | {'compile':>9} | "
          f"test accuracy per epoch (%)")
    for run in runs:
        print(_row(run, args.target, len(splits["train"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
