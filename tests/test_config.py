"""Command-line flags override the typed config tree, one flag per leaf."""

import dataclasses

import pytest

from jaxdist.config import parse_config
from jaxdist.errors import EXIT_USAGE
from jaxdist.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 10
    verbose: bool = True
    data_dir: str | None = None
    optimizer: OptimizerConfig = OptimizerConfig()


def get_config(variant=""):
    if variant == "short":
        return Cfg(steps=2)
    if variant:
        raise ValueError(f"unknown config variant {variant!r}")
    return Cfg()


def test_defaults_come_from_get_config_and_variants_shrink_them():
    assert parse_config(get_config, []) == Cfg()
    assert parse_config(get_config, ["--config", "short"]).steps == 2


def test_flags_reach_nested_fields_and_a_nested_name_takes_the_group_name():
    cfg = parse_config(get_config, ["--optimizer", "sgd", "--learning_rate", "0.5",
                                    "--step_boundaries", "0.3,0.6", "--verbose", "false",
                                    "--data_dir", "/data"])
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.learning_rate == 0.5
    assert cfg.optimizer.step_boundaries == (0.3, 0.6)
    assert cfg.verbose is False and cfg.data_dir == "/data"


@pytest.mark.parametrize("argv", [["--steps", "x"], ["--verbose", "maybe"], ["--config", "nope"],
                                  ["--no_such_flag", "1"]])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(get_config, argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# each project command line with one bad flag: unknown where it rejects unknown flags, else a bad
# value (the launcher and the reliability drill pass unknown flags on to the command they run)
BAD_FLAGS = {
    "jaxdist.launch": ["--processes", "two", "--", "true"],
    "jaxdist.observe.plots": ["runs/a", "--out", "plots", "--no_such_flag", "1"],
    "experiments.reliability": ["--runs", "twenty"],
    **{f"experiments.{name}": ["--no_such_flag", "1"] for name in (
        "chaos", "bench_comm", "bench_dp", "bench_lm", "bench_torch", "bench_parallel",
        "bench_restart", "bench_checkpoint", "bench_multiprocess", "time_to_accuracy")},
}


@pytest.mark.parametrize("module", sorted(BAD_FLAGS))
def test_a_bad_flag_on_any_command_line_is_one_line_and_exit_2(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as ended:
        importlib.import_module(module).main(BAD_FLAGS[module])
    assert ended.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err
