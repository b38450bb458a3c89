"""The benchmark commands refuse bad input with one line and the usage exit code, before
measuring anything."""

import pytest

from experiments import bench_multiprocess, bench_parallel, bench_torch, time_to_accuracy
from jaxdist.errors import EXIT_USAGE


@pytest.mark.parametrize("command,argv,message", [
    (bench_multiprocess, ["--layouts", "3"], "layout '3' is not PxD"),
    (bench_multiprocess, ["--layouts", "0x2"], "needs at least 1 process and 1 device"),
    (bench_multiprocess, ["--strategies", "fsdp"], "unknown strategy 'fsdp'"),
    (bench_multiprocess, ["--layouts", "3x3"], "does not split over 3x3 devices"),
    (time_to_accuracy, ["--seeds", "a"], "--seeds takes integers"),
    (time_to_accuracy, ["--compute_dtypes", "fp8"],
     "--compute_dtypes takes float32 and/or bfloat16"),
    (bench_torch, ["--compute_dtypes", "float16"], "--compute_dtypes takes float32 and/or bfloat16"),
    (bench_torch, ["--microbatches", "3"], "--microbatches 3 does not split the global batch 512"),
    (bench_parallel, ["--configs", "fsdp"], "--configs 'fsdp': expected STRATEGY:MESH"),
    (bench_parallel, ["--configs", "fsdq:fsdp=8"], "unknown strategy 'fsdq'; choose one of dp,"),
    (bench_parallel, ["--configs", "dp:data=8;fsdp:data=3"], "mesh data=3 needs 3 devices"),
])
def test_a_benchmark_given_bad_input_exits_with_the_usage_code_and_one_line(capsys, command, argv,
                                                                             message):
    assert command.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
