"""Which devices a job runs on, and virtual CPU devices for machines without accelerators.

JAX fixes the number of CPU devices when its backend starts, so `configure_cpu_devices` must run
before anything asks JAX for devices. It is harmless on GPU/TPU hosts: the accelerator stays the
default backend and the extra CPU devices are simply unused.
"""

from __future__ import annotations

import os
import warnings

import jax

from jaxdist.errors import UsageError

DEFAULT_CPU_DEVICES = 8

# jit/shard_map programs over several CPU devices deadlocked in ~60% of runs on a 2-core machine
# with jaxlib 0.10.2 ("Expected N threads to join the rendezvous"); 0.12 did not (see README).
_RELIABLE_CPU_COLLECTIVES = (0, 12)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # private, but the only way to ask without starting one

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # pragma: no cover - layout changed; assume not started
        return False


# XLA:CPU runs convolutions with Eigen unless told to hand them to oneDNN. The classic CNN's train
# step ran 40-60% faster with it, with the same results to float32 rounding (docs/performance.md).
ONEDNN_XLA_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true")
# jaxlib 0.12 gives float32 gradient convolutions to YNNPACK before the oneDNN rewriter sees them;
# leaving them to oneDNN as well made the CNN's step 15-40% faster on 1-2 devices a process
# (docs/performance.md #17). Older jaxlibs do not know the flag, and XLA aborts on unknown flags.
# The matmuls stay with YNNPACK: handing them to oneDNN too (`-individual_dot`) made the Llama's
# step 10% faster and bfloat16 matmuls use AMX, but XLA:CPU then computed wrong gradients for a
# batched SwiGLU behind a scatter (the MoE's capacity dispatch; tests/test_moe.py), so it is not
# the default (docs/performance.md #26).
ONEDNN_ALL_CONVOLUTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

# compiler_options for one compilation with XLA's own CPU kernels, whatever XLA_FLAGS say: XLA's cost
# analysis counts no FLOPs inside oneDNN calls, and planning should not depend on CPU libraries
XLA_OWN_CPU_KERNELS = {"xla_cpu_use_onednn": False, "xla_cpu_experimental_onednn_custom_call": False}


def use_onednn_convolutions() -> bool:
    """Adds `ONEDNN_XLA_FLAGS` to XLA_FLAGS, before JAX's backends start; True if they are in use.

    On jaxlib >= 0.12 the gradient convolutions go to oneDNN too (`ONEDNN_ALL_CONVOLUTIONS_FLAG`,
    unless XLA_FLAGS set a YNN fusion type). Skipped when $JAXDIST_CPU_ONEDNN is 0, when XLA_FLAGS
    already says anything about oneDNN (the user decides), or once the backends have started (XLA
    has read its flags by then). The flags only concern the CPU backend; GPU and TPU compilations
    ignore them.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "onednn" in flags:
        return "onednn_custom_call=true" in flags
    if os.environ.get("JAXDIST_CPU_ONEDNN", "1") == "0" or _backends_started():
        return False
    extra = list(ONEDNN_XLA_FLAGS)
    if "ynn_fusion_type" not in flags and _jax_version() >= (0, 12):
        extra.append(ONEDNN_ALL_CONVOLUTIONS_FLAG)
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return True


def configure_cpu_devices(count: int | None = None, *, onednn: bool = True) -> None:
    """Asks JAX for `count` virtual CPU devices (default: $JAXDIST_CPU_DEVICES or 8), and for
    oneDNN convolutions unless `onednn` is False (see `use_onednn_convolutions`).

    Respects an explicit `--xla_force_host_platform_device_count` in XLA_FLAGS, and does nothing
    once JAX's backends have started (the count can no longer change then).

    Raises:
        UsageError: a count below 1, or a $JAXDIST_CPU_DEVICES that is not a whole number.
    """
    if onednn:
        use_onednn_convolutions()
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if count is None:
        text = os.environ.get("JAXDIST_CPU_DEVICES", "").strip() or str(DEFAULT_CPU_DEVICES)
        try:
            count = int(text)
        except ValueError:
            raise UsageError(f"JAXDIST_CPU_DEVICES={text!r} is not a number of CPU devices; set "
                             f"a whole number such as {DEFAULT_CPU_DEVICES}, or unset it") from None
    if count < 1:
        raise UsageError(f"the number of CPU devices must be at least 1, got {count}")
    if _backends_started():
        return
    jax.config.update("jax_num_cpu_devices", count)


def _jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:2])


def select_devices(count: int | None = None) -> list[jax.Device]:
    """The first `count` devices of the default backend (all of them when `count` is None).

    Raises `UsageError` when more devices are asked for than exist, with the fix in the message.
    """
    available = jax.devices()
    if count is None or count == 0:
        count = len(available)
    if count < 1:
        raise UsageError(f"the device count must be positive, got {count}")
    if count > len(available):
        platform = available[0].platform
        hint = (
            " (on CPU, raise the number of virtual devices with JAXDIST_CPU_DEVICES or "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N)"
            if platform == "cpu"
            else ""
        )
        raise UsageError(
            f"asked for {count} devices but only {len(available)} {platform} device(s) exist{hint}"
        )
    if available[0].platform == "cpu" and count > 1 and _jax_version() < _RELIABLE_CPU_COLLECTIVES:
        warnings.warn(
            f"jax {jax.__version__} can deadlock collectives across virtual CPU devices on "
            "machines with few cores; use jax>=0.12 (Python>=3.12) for multi-device CPU runs",
            RuntimeWarning,
            stacklevel=2,
        )
    if jax.process_count() == 1:
        return list(available[:count])
    if count != len(available):
        raise UsageError(
            f"in a multi-process job every device takes part; asked for {count} of {len(available)}"
        )
    return list(available)
