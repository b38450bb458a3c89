"""The PyTorch side of `benchmarks.lm_torch`: HF's `LlamaForCausalLM` trained on random tokens.

Standalone on purpose (imports only torch, transformers and the standard library at the top) so
it runs under another interpreter:

    python benchmarks/torch_lm_reference.py --hf_config '{"vocab_size": 4096, ...}' --compile

It builds the model from the HF config fields given (random init, float32), warms up (that is
when `torch.compile` compiles), prints one JSON line saying it is ready, then times rounds of
whole train steps (forward, next-token cross-entropy over every position, backward, AdamW) and
prints a JSON line per round. With `--serve` the rounds are asked for on stdin, one line with a
number of steps each, so a caller can alternate them with other frameworks' without paying for
the compilation again; otherwise it runs `--rounds` rounds of `--steps` and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build(hf_config: dict, *, compile: bool, seed: int):
    """(the model to call, its parameters); `torch.compile`d when asked (Inductor)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**hf_config, "use_cache": False})).float().train()
    return (torch.compile(model) if compile else model), list(model.parameters())


def train_step(model, opt, inputs, targets, bfloat16: bool = False):
    """One step; the loss is the mean over every position, as jaxdist's (no shift inside).
    `bfloat16`: PyTorch's mixed precision on CPU, `torch.autocast` (float32 weights)."""
    import torch
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    loss.backward()
    opt.step()
    return loss.detach()


def timed_round(step, steps: int, tokens_per_step: int) -> dict:
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # CPU work is synchronous; this also reads the last loss
    seconds = time.perf_counter() - start
    return {"steps": steps, "step_seconds": seconds / steps,
            "tokens_per_second": steps * tokens_per_step / seconds, "loss": float(loss)}


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_config", required=True, help="HF LlamaConfig fields, as JSON")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="optax.adamw's default")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (bfloat16: torch.autocast, float32 weights)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (without --serve)")
    parser.add_argument("--serve", action="store_true",
                        help="read a step count per round from stdin until it closes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model, params = build(json.loads(args.hf_config), compile=args.compile, seed=args.seed)
    # fused: PyTorch's fastest AdamW on CPU (one kernel over all tensors), the same update
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(args.seed))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        return train_step(model, opt, inputs, targets, args.dtype == "bfloat16")

    start = time.perf_counter()
    for _ in range(args.warmup):
        step().item()
    say({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "attention": model.config._attn_implementation, "compile": args.compile,
         "dtype": args.dtype,
         "params": sum(p.numel() for p in params), "warmup_seconds": time.perf_counter() - start})
    tokens_per_step = args.batch * args.seq_len
    if not args.serve:
        for _ in range(args.rounds):
            say(timed_round(step, args.steps, tokens_per_step))
        return 0
    for line in sys.stdin:
        if line.strip():
            say(timed_round(step, int(line), tokens_per_step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
