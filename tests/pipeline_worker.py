"""One fresh process that trains the test LM for 2 steps with a 1F1B pipeline on 8 virtual CPU
devices, its stages FSDP- and tensor-parallel (collectives inside every tick), and prints the
loss; `tests/test_pipeline_deadlock.py` runs it many times. With a directory as its second
argument it caches its compiled programs there (the runs after the first load them)."""

import sys

from jaxdist.cluster import configure_cpu_devices

configure_cpu_devices(8)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxdist import Pipeline, Trainer  # noqa: E402
from jaxdist.models.lm import GPT, lm_config, lm_loss  # noqa: E402


def main(mesh: str, cache: str | None = None) -> None:
    if cache:
        from jaxdist.cluster.compile_cache import enable_compilation_cache

        enable_compilation_cache(cache)
    cfg = lm_config("test", seq_len=16)
    trainer = Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-3), lm_loss, mesh=mesh,
                      strategy=Pipeline(rules="fsdp_tp", schedule="1f1b", microbatches=4))
    state = trainer.init()
    tokens = np.random.default_rng(0).integers(0, 256, (16, 17), dtype=np.int32)
    batch = trainer.shard_batch((tokens[:, :-1], tokens[:, 1:]))
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
    print(f"loss {float(metrics['loss']):.6f}", flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["fsdp=2,pipeline=2,tensor=2"]))
