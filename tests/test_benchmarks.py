"""The benchmark commands refuse bad input with one line and exit 2, before measuring anything."""

import pytest

from experiments import bench_multiprocess, time_to_accuracy


@pytest.mark.parametrize("argv,message", [
    (["--layouts", "3"], "layout '3' is not PxD"),
    (["--layouts", "0x2"], "needs at least 1 process and 1 device"),
    (["--strategies", "fsdp"], "unknown strategy 'fsdp'"),
    (["--layouts", "3x3"], "does not split over 3x3 devices"),
])
def test_bench_multiprocess_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert bench_multiprocess.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "a"], "--seeds takes integers"),
    (["--compute_dtypes", "fp8"], "--compute_dtypes takes float32 and/or bfloat16"),
])
def test_time_to_accuracy_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert time_to_accuracy.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
