"""Metrics, goodput, MFU and hang diagnosis for a training run: one import for all of them.

Each concern has its module: `writer` (metrics.jsonl and TensorBoard events), `goodput`, `flops`
(FLOPs per step and MFU), `watchdog` (status, hang diagnosis), `monitor` (`TrainMonitor`, what
the training loop reports to).
"""

from jaxdist.observe.flops import (  # noqa: F401
    CPU_CORE_TFLOPS,
    compiled_step,
    default_peak_tflops,
    flops_per_step,
    lowered_step,
    mfu,
)
from jaxdist.observe.goodput import Goodput, format_goodput  # noqa: F401
from jaxdist.observe.monitor import TrainMonitor, parse_step_range, throughput_key  # noqa: F401
from jaxdist.observe.watchdog import (  # noqa: F401
    KV_PREFIX,
    PHASES,
    ProgressStatus,
    Watchdog,
    _kv_client,
    diagnose_hang,
)
from jaxdist.observe.writer import MetricsWriter, read_records  # noqa: F401
