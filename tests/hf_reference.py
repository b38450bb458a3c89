"""transformers' side of tests/test_hf.py, run by the reference venv's Python 3.11
(`scripts/reference_env.sh`: torch, transformers, numpy), never imported by the tests.

    python tests/hf_reference.py create DIR --config '{"vocab_size": 256, ...}' [--seed 0]
                                            [--dtype bfloat16] [--max-shard-size 20000]
    python tests/hf_reference.py logits DIR TOKENS.npy OUT.npy
    python tests/hf_reference.py jobs JOBS.json   # many, one interpreter start (torch: ~4 s)

`create` saves a random `LlamaForCausalLM` with `save_pretrained` (safetensors), its weights
drawn with a standard deviation of 0.2 (HF's default 0.02 leaves logits so near zero that a
1e-4 comparison would show little) and its norm weights drawn around 1 (HF's ones would hide a
swapped norm). `logits` loads a directory with `from_pretrained` and writes the float32 logits
of int tokens (batch, seq). JOBS.json is a list of {"create": DIR, "config": {...}, ...} and
{"logits": DIR, "tokens": PATH, "out": PATH}.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import transformers

INIT_STD = 0.2


def create(directory: str, config: dict, seed: int = 0, dtype: str = "float32",
           max_shard_size: int | None = None) -> None:
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config, initializer_range=INIT_STD)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.copy_(1 + 0.1 * torch.randn_like(weight))
    model = model.to(getattr(torch, dtype))
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **extra)


def logits(directory: str, tokens: str, out: str) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.from_numpy(np.load(tokens).astype(np.int64))
    with torch.no_grad():
        np.save(out, model(input_ids=ids).logits.float().numpy())


def run_job(job: dict) -> None:
    if "create" in job:
        create(job["create"], job["config"], job.get("seed", 0), job.get("dtype", "float32"),
               job.get("max_shard_size"))
    else:
        logits(job["logits"], job["tokens"], job["out"])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("create", help="save a random tiny LlamaForCausalLM")
    make.add_argument("directory")
    make.add_argument("--config", required=True, help="LlamaConfig fields as JSON")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="float32")
    make.add_argument("--max-shard-size", type=int, default=None)
    score = commands.add_parser("logits", help="a directory's logits of tokens (.npy)")
    score.add_argument("directory")
    score.add_argument("tokens")
    score.add_argument("out")
    batch = commands.add_parser("jobs", help="a JSON list of create/logits jobs")
    batch.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "create":
        create(args.directory, json.loads(args.config), args.seed, args.dtype,
               args.max_shard_size)
    elif args.command == "logits":
        logits(args.directory, args.tokens, args.out)
    else:
        with open(args.file) as f:
            for job in json.load(f):
                run_job(job)


if __name__ == "__main__":
    main(sys.argv[1:])
