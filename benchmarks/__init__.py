"""Measurements: `python -m benchmarks.<name> --help`. Each prints the machine it ran on and its
result as a markdown table, and with `--out benchmarks/results` writes them to a dated file there.

checkpoint, comm, dp, lm, moe, multiprocess, parallel, restart, time_to_accuracy, vs_torch; `harness`
is what they share, `torch_reference.py` the PyTorch side (torch and numpy only, any interpreter).
"""
