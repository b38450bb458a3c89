"""Looking inside compiled steps: memory per device and the collectives' ledger."""

from jaxdist.observe.ledger import (
    Collective,
    Ledger,
    collective_ledger,
    format_ledger,
    ideal_all_to_all_bytes,
    ideal_dp_bytes,
    ideal_fsdp_bytes,
    wire_factor,
)
from jaxdist.observe.memory import MemoryReport, bytes_per_device, memory_report, total_bytes

__all__ = [
    "Collective",
    "Ledger",
    "MemoryReport",
    "bytes_per_device",
    "collective_ledger",
    "format_ledger",
    "ideal_all_to_all_bytes",
    "ideal_dp_bytes",
    "ideal_fsdp_bytes",
    "memory_report",
    "total_bytes",
    "wire_factor",
]
