"""Train a language model on real text, under any strategy and mesh: a byte-level GPT, or a
Llama with a BPE tokenizer on packed documents, from scratch or from a Hugging Face checkpoint.

    python -m experiments.lm                                   # the tiny GPT on the stdlib's source
    python -m experiments.lm --model llama                     # a Llama, a BPE trained on the corpus
    python -m experiments.lm --model llama --init_from ckpt/   # fine-tune an HF Llama checkpoint
    python -m experiments.lm --model llama --tokenizer tokenizer.json --save_hf out/
    python -m experiments.lm --strategy fsdp_tp --mesh fsdp=4,tensor=2
    python -m experiments.lm --mesh data=2,pipeline=4 --pipeline_schedule 1f1b
    python -m experiments.lm --model llama --seq_len 1024 --mesh data=2,context=4
    python -m experiments.lm --model llama --moe_experts 8 --strategy ep --mesh expert=8
    python -m experiments.lm --text 'books/*.txt' --lm_size small
    python -m experiments.lm --config smoke                    # a few steps, for CI

The default corpus is the Python standard library's source of the interpreter running the job
(every machine has it; validation files chosen by a hash of their path); `--text` takes your own
files. The GPT reads text as bytes (vocabulary 256) in windows cut across files; the Llama reads
each file as a document of BPE tokens ended by an end-of-document token, packed into windows
where no token attends across a document boundary. Both are prepared once into a keyed cache.
Loss is reported in bits per byte (the Llama's per-token loss over the split's bytes per token);
the run ends with a sample of generated text and the MFU against this machine's measured matmul
peak. Every flag of `experiments.mnist`
for checkpoints, resume, preemption and multi-process jobs applies.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Literal

from jaxdist.errors import UsageError
from jaxdist.models.lm import REMAT_POLICIES
from jaxdist.models.registry import ModelVariant, get_model
from jaxdist.train import CheckpointConfig, EvalConfig, run_config
from jaxdist.train.optim import OptimizerConfig
from jaxdist.train.run_config import (
    ParallelConfig,
    RunConfig,
    check_best_metric,
    check_directory,
    eval_metric_names,
    run_main,
    trainer_options,
)


@dataclasses.dataclass(frozen=True)
class LmConfig(RunConfig):
    """The shared run flags and the LM's model, text and sampling."""

    model: Literal["gpt", "llama"] = "gpt"
    """gpt (bytes, GELU MLP) or llama (BPE tokens on packed documents, GQA, SwiGLU)"""
    lm_size: str = "tiny"
    """model size: gpt test, tiny, small, 125m, 350m, 1.3b, 7b; llama test, tiny, small, base,
    3.2-1b, 3.1-8b, 3.1-70b, qwen2.5-7b, mistral-7b (the large ones are for the planner: a run
    of them starts only where the planner's estimate of its step fits the devices' memory)"""
    seq_len: int = 0
    """tokens per sequence (0: the size's own)"""
    tokenizer: str = ""
    """llama: a tokenizer.json (or a directory holding one); empty: the --init_from directory's,
    else a byte-level BPE of --vocab tokens trained on the corpus once (cached)"""
    vocab: int = 4096
    """llama: the vocabulary of the BPE trained when no tokenizer is given"""
    init_from: str = ""
    """llama: a Hugging Face checkpoint directory (config.json, *.safetensors) to start from; its
    config sets the model's shape, each process reads only its shards"""
    save_hf: str = ""
    """llama: write the trained model here as a Hugging Face checkpoint at the end"""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """llama: bfloat16 runs the matmuls in bfloat16 (float32 weights, norms, softmax, loss)"""
    moe_experts: int = 0
    """llama: each layer's MLP a mixture of this many experts (0: the dense SwiGLU); --strategy ep
    splits them over the mesh's expert axis"""
    moe_top_k: int = 2
    """llama with --moe_experts: the experts each token is routed to"""
    moe_exchange: Literal["all_gather", "all_to_all"] = "all_gather"
    """llama with --moe_experts under --strategy ep: how tokens reach their experts' devices
    (all_to_all: only where they go, in buffers of twice an even split; see MoEConfig)"""
    remat: str = "none"
    """activation checkpointing policy of each block"""
    text: str = ""
    """your text instead of the stdlib's source: files, directories or globs, comma-separated"""
    validation_fraction: float = 0.05
    """share of files (by a hash of the path) held out for validation"""
    cache_dir: str | None = None
    """where prepared token files go (default $JAXDIST_CACHE_DIR/text)"""
    pipeline_microbatches: int = 0
    """microbatches per step on a mesh with pipeline > 1 (0: 2 x stages)"""
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved"] = "gpipe"
    """gpipe; 1f1b (at most 2 S - 1 microbatches' activations per stage, whatever M); or
    interleaved (--pipeline_virtual_stages chunks of layers per device, a smaller bubble)"""
    pipeline_virtual_stages: int = 2
    """chunks of layers per device of the interleaved schedule"""
    context_attention: Literal["ring", "allgather"] = "ring"
    """on a mesh with context > 1 (the sequence split over it): ring (key/value blocks passed
    around the context devices) or allgather (every device gathers all keys and values)"""
    sample_bytes: int = 200
    """tokens (bytes for the gpt) of text to generate at the end (0: none)"""
    prompt: str = "def "
    """what the generated sample continues"""
    temperature: float = 0.8
    """sampling temperature of the sample"""
    parallel: ParallelConfig = ParallelConfig(strategy="dp")
    global_batch: int = 32
    epochs: float = 0.45  # ~1,100 steps: about 9 minutes on 8 virtual devices of 2 cores
    # every N steps (0: four times per run), on N sequences of the validation split (0: all)
    eval: EvalConfig = EvalConfig(every=0, examples=512, batch=64, prefix="val")
    checkpoint: CheckpointConfig = CheckpointConfig(every=200, keep_best=0, best_metric="val_loss",
                                                    best_mode="min")
    optimizer: OptimizerConfig = OptimizerConfig(
        name="adamw", learning_rate=3e-3, schedule="warmup_cosine", warmup_fraction=0.05,
        weight_decay=0.1)


def with_variant(cfg: LmConfig, variant: str) -> LmConfig:
    """`cfg` itself, or its 'smoke' variant: the test-size LM for a few steps."""
    return run_config.with_variant(cfg, variant, dict(
        lm_size="test", max_steps=6, eval_examples=64, sample_bytes=16, eval_every=3))


def get_config(variant: str = "") -> LmConfig:
    return with_variant(LmConfig(), variant)


def model_variant(cfg: LmConfig, vocab: int | None = None) -> ModelVariant:
    """The registry's `cfg.model` at `cfg.lm_size` with `cfg.remat` and `cfg.seq_len` (0: the
    size's own); a Llama takes the shape of its --init_from checkpoint and the vocabulary of its
    tokenizer. UsageError for a size or shape that does not exist."""
    fields: dict = {"remat": cfg.remat, **({"seq_len": cfg.seq_len} if cfg.seq_len else {})}
    if cfg.model == "llama":
        fields["compute_dtype"] = cfg.compute_dtype
    if cfg.model == "llama" and cfg.moe_experts:
        from jaxdist.models.moe import MoEConfig

        fields["moe"] = MoEConfig(num_experts=cfg.moe_experts, top_k=cfg.moe_top_k,
                                  exchange=cfg.moe_exchange)
    if cfg.model == "llama" and cfg.init_from:
        from jaxdist.io.hf import load_hf_config

        shape = load_hf_config(cfg.init_from)
        fields |= {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape)
                   if f.name not in ("seq_len", "remat", "moe")}
    elif cfg.model == "llama" and vocab is not None:
        fields["vocab"] = vocab
    return get_model("lm" if cfg.model == "gpt" else "llama").variant(cfg.lm_size, **fields)


def _check_llama_flags(cfg: LmConfig) -> None:
    if cfg.model != "llama":
        given = [f"--{k}" for k in ("tokenizer", "init_from", "save_hf") if getattr(cfg, k)]
        given += ["--compute_dtype"] * (cfg.compute_dtype != "float32")
        given += ["--moe_experts"] * (cfg.moe_experts != 0)
        if given:
            raise UsageError(f"{', '.join(given)}: options of --model llama")
        return
    if cfg.moe_experts < 0:
        raise UsageError(f"--moe_experts {cfg.moe_experts}: 0 (dense) or more experts")
    if cfg.moe_experts and (cfg.init_from or cfg.save_hf):
        raise UsageError("--moe_experts: Hugging Face checkpoints (--init_from, --save_hf) are of "
                         "the dense Llama")
    if cfg.vocab < 257 and not (cfg.tokenizer or cfg.init_from):
        raise UsageError(f"--vocab {cfg.vocab}: a byte-level BPE needs at least 257 tokens")
    for flag in ("init_from", "tokenizer"):
        path = getattr(cfg, flag)
        if path and not os.path.exists(path):
            raise UsageError(f"--{flag} {path}: no such file or directory")


def validate(cfg: LmConfig, num_devices: int) -> None:
    """The shared flags' checks, then the LM's own, before any text is read."""
    from jaxdist import STRATEGIES

    if STRATEGIES[cfg.parallel.strategy].parallelism == "data":
        raise UsageError(f"the LM trains under the sharding strategies (dp, zero1, fsdp, tp, sp, "
                         f"fsdp_tp, ep), not {cfg.parallel.strategy}")
    cfg.validate(num_devices)
    if cfg.eval.batch < 1 or cfg.eval.batch % num_devices:
        raise UsageError(f"eval batch {cfg.eval.batch} does not divide over {num_devices} "
                         f"devices")
    if cfg.seq_len < 0 or cfg.sample_bytes < 0:
        raise UsageError("seq_len and sample_bytes must be >= 0")
    if cfg.pipeline_microbatches < 0:
        raise UsageError("pipeline_microbatches must be >= 0")
    if cfg.temperature <= 0:
        raise UsageError(f"temperature must be positive, got {cfg.temperature}")
    if not cfg.prompt:
        raise UsageError("--prompt must not be empty")
    _check_llama_flags(cfg)
    check_directory("cache_dir", cfg.cache_dir)
    model = model_variant(cfg)  # a size or shape that does not exist fails here
    check_best_metric(cfg, eval_metric_names(model.eval_fn, model.model_fn(cfg.seed),
                                             model.eval_batch(1), cfg.eval.prefix))


# sizes from here on (125m and up) are the planner's: a run first checks that its step fits
PLANNED_PARAMS = 100e6


def check_memory(cfg: LmConfig, devices) -> None:
    """Refuses a planner-size LM (`PLANNED_PARAMS` and up) whose train step, as `jaxdist.plan`
    estimates it (an ahead-of-time compile from shapes, ~2 s, nothing allocated), needs more
    memory per device than a device has: the run would otherwise exhaust memory and be killed.
    """
    from jaxdist.observe.memory import device_memory_bytes
    from jaxdist.plan import GIB, analyze_step
    from jaxdist.train import make_optimizer

    model = model_variant(cfg)
    if model.param_count < PLANNED_PARAMS:
        return
    trainer = make_trainer(cfg, devices, make_optimizer(cfg.optimizer, 1))
    need = analyze_step(trainer, model.batch(cfg.global_batch)).memory.peak_estimate
    have, where = device_memory_bytes(devices[0])
    mesh = ",".join(f"{axis}={n}" for axis, n in trainer.mesh.shape.items() if n > 1) or "1 device"
    if need > have:
        lm = model.spec
        fits = ", ".join(s for s in lm.sizes if lm.variant(s).param_count < PLANNED_PARAMS)
        raise UsageError(
            f"{cfg.model}-{cfg.lm_size} needs about {need / GIB:.1f} GiB per device for this step "
            f"(the planner's estimate: {cfg.parallel.strategy} over {mesh}, global batch "
            f"{cfg.global_batch}, remat {cfg.remat}), more than a device has here "
            f"({have / GIB:.1f} GiB: {where}); train a smaller --lm_size ({fits}) or more "
            f"devices, or plan it with python -m jaxdist.plan --model lm --lm_size {cfg.lm_size}")


def make_trainer(cfg: LmConfig, devices, tx, model: ModelVariant | None = None):
    """The `jaxdist.Trainer` of the configured LM, a pipeline on a mesh with pipeline > 1,
    starting from the --init_from checkpoint's weights, read into the strategy's layout."""
    from jaxdist import Pipeline, Trainer
    from jaxdist.parallel.mesh import parse_mesh_shape
    from jaxdist.parallel.strategies import resolve

    model = model or model_variant(cfg)
    options = trainer_options(cfg)
    if cfg.model == "llama" and cfg.init_from:
        from jaxdist.io.hf import hf_init_params

        options["init_params"] = hf_init_params(cfg.init_from, cfg=model.config)
    shape = parse_mesh_shape(cfg.parallel.mesh or "")
    if shape.get("context", 1) > 1:
        options["strategy"] = dataclasses.replace(resolve(cfg.parallel.strategy),
                                                  context_attention=cfg.context_attention)
    if shape.get("pipeline", 1) > 1:
        options["strategy"] = Pipeline(rules=options.get("strategy", cfg.parallel.strategy),
                                       microbatches=cfg.pipeline_microbatches or None,
                                       schedule=cfg.pipeline_schedule,
                                       virtual_stages=cfg.pipeline_virtual_stages)
    return Trainer(model.model_fn(cfg.seed), tx, model.loss_fn, devices=devices,
                   eval_fn=model.eval_fn, **options)


def load_corpus(cfg: LmConfig, leader: bool):
    """(corpus, tokenizer): the GPT's bytes, or the Llama's documents in its tokenizer's tokens
    (--tokenizer, the --init_from directory's tokenizer.json, else a BPE trained once)."""
    from jaxdist import data
    from jaxdist.data import documents

    patterns = [p for p in cfg.text.split(",") if p] if cfg.text else None
    progress = cfg.observe.progress and leader
    if cfg.model == "gpt":
        return data.load_text(patterns, cfg.cache_dir, validation_fraction=cfg.validation_fraction,
                              progress=progress), None
    path = cfg.tokenizer or (cfg.init_from if cfg.init_from and os.path.exists(
        os.path.join(cfg.init_from, "tokenizer.json")) else "")
    if path:
        tokenizer = documents.load_tokenizer(path)
    else:
        root = data.text.stdlib_root() if patterns is None else None
        tokenizer = documents.train_bpe(data.text.text_files(patterns), cfg.vocab, cfg.cache_dir,
                                        root=root, progress=progress)
    return documents.load_documents(patterns, tokenizer, cfg.cache_dir,
                                    validation_fraction=cfg.validation_fraction,
                                    progress=progress), tokenizer


def measured_peak(cfg: LmConfig, devices) -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, where it comes from): --peak_tflops per device if
    given, else a dense-matmul measurement here beside the theoretical peak of the CPU."""
    import jax

    from jaxdist.observe.flops import measure_matmul_peak
    from jaxdist.observe.machine import theoretical_peak_flops

    if cfg.observe.peak_tflops:
        return (cfg.observe.peak_tflops * 1e12 * len(devices),
                f"{cfg.observe.peak_tflops:g} TFLOP/s per device (--peak_tflops)")
    measured = measure_matmul_peak("float32")
    if devices[0].platform == "cpu":  # virtual CPU devices share one process's cores
        total = measured * jax.process_count()
        theory, how = theoretical_peak_flops("float32")
        theory_note = f"; theoretical: {how}" if theory else ""
        return total, (f"a measured fp32 matmul peak of {measured / 1e9:,.0f} GFLOP/s per "
                       f"process{theory_note}")
    return measured * len(devices), (f"a measured fp32 matmul peak of "
                                     f"{measured / 1e12:,.1f} TFLOP/s per device")


def train(cfg: LmConfig) -> dict:
    """Runs the experiment and returns its summary (also printed by `main`)."""
    import jax
    import jax.numpy as jnp

    from jaxdist import fit
    from jaxdist.cluster import select_devices
    from jaxdist.models.lm import generate
    from jaxdist import STRATEGIES, Schedule, make_mesh, make_optimizer

    start = time.perf_counter()
    devices = select_devices(cfg.parallel.devices or None)
    validate(cfg, len(devices))
    mesh = cfg.parallel.mesh or STRATEGIES[cfg.parallel.strategy].default_mesh(len(devices))
    make_mesh(mesh, devices)  # a bad mesh fails before any text is read
    check_memory(cfg, devices)
    leader = jax.process_index() == 0
    corpus, tokenizer = load_corpus(cfg, leader)
    lm = model_variant(cfg, tokenizer.vocab_size if tokenizer else None)
    if tokenizer and tokenizer.vocab_size > lm.config.vocab:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                         f"model's vocabulary of {lm.config.vocab}")
    seq = lm.config.seq_len
    train_data = corpus.dataset("train", seq_len=seq, global_batch=cfg.global_batch,
                                seed=cfg.seed)
    val_data = corpus.dataset("validation", seq_len=seq, global_batch=cfg.eval.batch)
    total_steps = Schedule.of(train_data, epochs=cfg.epochs, steps=cfg.max_steps or None).total
    tx = make_optimizer(cfg.optimizer, total_steps)
    trainer = make_trainer(cfg, devices, tx, lm)
    title = "LM" if cfg.model == "gpt" else "Llama"
    name = f"{title}-{cfg.lm_size} ({lm.param_count / 1e6:.2f}M params, seq {seq})"
    if cfg.init_from:
        name = f"Llama from {cfg.init_from} ({lm.param_count / 1e6:.2f}M params, seq {seq})"
    unit = "bytes" if tokenizer is None else f"tokens of a {tokenizer.vocab_size}-token BPE"
    if leader:
        pipeline = (f", {cfg.pipeline_schedule} pipeline" if trainer.mesh.shape["pipeline"] > 1
                    else "")
        pipeline += (f", {cfg.context_attention} attention over context"
                     if trainer.mesh.shape["context"] > 1 else "")
        print(f"training the {name} on {len(devices)} {devices[0].platform} device(s), strategy "
              f"{cfg.parallel.strategy} over mesh {mesh}{pipeline}, global batch {cfg.global_batch} x "
              f"{seq} {unit}, {total_steps} steps, {cfg.optimizer.name} lr "
              f"{cfg.optimizer.learning_rate} ({cfg.optimizer.schedule})", flush=True)
    options = cfg.fit_options()
    options["eval"] = dataclasses.replace(cfg.eval, every=cfg.eval.every or max(1, total_steps // 4))
    meta = {"model": f"{cfg.model}-{cfg.lm_size}", "model_name": name, "mesh": mesh,
            "pipeline_schedule": cfg.pipeline_schedule, "optimizer": cfg.optimizer.name,
            "learning_rate": cfg.optimizer.learning_rate,
            **({"init_from": os.path.abspath(cfg.init_from)} if cfg.init_from else {}),
            **(tokenizer.meta if tokenizer else {})}
    run = fit(trainer, train_data, eval_data=val_data, **options, meta=meta)
    summary = {"wall_seconds": time.perf_counter() - start, "workdir": cfg.checkpoint.workdir,
               "logdir": cfg.logdir}
    if run.stopped:
        return {**summary, "stopped_at": run.stopped_at}
    if cfg.save_hf:
        from jaxdist.io.hf import save_hf

        save_hf(cfg.save_hf, trainer.canonical(run.state), lm.config)
        if tokenizer is not None and leader:
            tokenizer.backend.save(os.path.join(cfg.save_hf, "tokenizer.json"))
    tokens_per_second = run.images_per_second * seq
    peak, peak_note = measured_peak(cfg, devices)
    mfu = tokens_per_second * lm.step_flops(1) / seq / peak
    # bits per byte: the loss per token over the split's bytes per token (1 for the GPT)
    per_byte = 1.0 if tokenizer is None else corpus.bytes_per_token("validation")
    train_per_byte = 1.0 if tokenizer is None else corpus.bytes_per_token("train")
    sample = ""
    if cfg.sample_bytes:
        model = trainer.sync_model(run.state)
        ids = list(cfg.prompt.encode()) if tokenizer is None else tokenizer.encode(cfg.prompt)
        out = generate(model, jnp.asarray(ids, jnp.int32), cfg.sample_bytes,
                       jax.random.key(cfg.seed), cfg.temperature)
        sample = cfg.prompt + (bytes(int(t) for t in out).decode("utf-8", errors="replace")
                               if tokenizer is None else tokenizer.decode(map(int, out)))
    final, first = run.history[-1], run.history[0]
    bits = "val_bits_per_byte" if tokenizer is None else "val_bits_per_token"
    return {**summary, "val_bits_per_byte": final[bits] / per_byte,
            "first_val_bits_per_byte": first[bits] / per_byte,
            "train_bits_per_byte": final.get("train_loss", math.nan) / math.log(2)
            / train_per_byte,
            "val_loss": final["val_loss"], "bytes_per_token": per_byte,
            "tokens_per_second": tokens_per_second, "mfu": mfu, "peak_note": peak_note,
            "first_step_seconds": run.first_step_seconds, "devices": len(devices),
            "platform": devices[0].platform, "strategy": cfg.parallel.strategy, "mesh": mesh,
            "steps": total_steps, "sample": sample, "history": run.history,
            "state": run.state, "trainer": trainer}


def format_summary(s: dict) -> str:
    if "stopped_at" in s:
        where = f"; checkpoint in {s['workdir']}" if s.get("workdir") else ""
        return f"stopped at step {s['stopped_at']} after {s['wall_seconds']:.1f} s{where}"
    lines = []
    if s["sample"]:
        lines += ["sample:", *("  | " + line for line in s["sample"].splitlines() or [""])]
    lines.append(
        f"done: val loss {s['val_loss']:.3f} nats/token, {s['val_bits_per_byte']:.3f} "
        f"bits/byte (first eval "
        f"{s['first_val_bits_per_byte']:.3f}), train {s['train_bits_per_byte']:.3f} | "
        f"{s['tokens_per_second']:,.0f} tokens/s | MFU {100 * s['mfu']:.1f}% of "
        f"{s['peak_note']} | wall {s['wall_seconds']:.1f} s (first step "
        f"{s['first_step_seconds']:.1f} s) | {s['devices']} {s['platform']} device(s) | "
        f"{s['strategy']} over {s['mesh']} | {s['steps']} steps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, get_config, description=__doc__.split("\n\n")[0], train=train,
                    summary=format_summary,
                    choices={"lm_size": tuple(dict.fromkeys(
                        get_model("lm").sizes + get_model("llama").sizes)),
                        "remat": REMAT_POLICIES})


if __name__ == "__main__":
    sys.exit(main())
