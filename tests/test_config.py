"""Command-line flags override the typed config tree, one flag per leaf."""

import dataclasses
from typing import Literal

import pytest

from jaxdist.config import flag_help, parse_config, replace_flags
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
# value (the launcher passes unknown flags on to the command it runs)
BAD_FLAGS = {
    "jaxdist.launch": ["--processes", "two", "--", "true"],
    "jaxdist.observe.plots": ["runs/a", "--out", "plots", "--no_such_flag", "1"],
    "drills.reliability": ["--runs", "twenty"],
    "drills.chaos": ["--no_such_flag", "1"],
    **{f"benchmarks.{name}": ["--no_such_flag", "1"] for name in (
        "comm", "dp", "lm", "vs_torch", "parallel", "restart", "checkpoint", "multiprocess",
        "time_to_accuracy")},
}


@pytest.mark.parametrize("module", sorted(BAD_FLAGS))
def test_a_bad_flag_on_any_command_line_is_one_line_and_exit_2(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as ended:
        importlib.import_module(module).main(BAD_FLAGS[module])
    assert ended.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err


@dataclasses.dataclass(frozen=True)
class Watch:
    """What the watchdog does."""

    action: Literal["exit", "report"] = "exit"
    """exit 75, or only report"""
    every: int = dataclasses.field(default=5, metadata={"flag": "watch_every"})
    """seconds between looks"""


@dataclasses.dataclass(frozen=True)
class Job:
    steps: int = 10
    """steps to run"""
    watch: Watch = Watch()


def test_a_flags_help_is_the_docstring_under_its_field_and_its_choices_the_literals(capsys):
    with pytest.raises(SystemExit):
        parse_config(lambda _: Job(), ["--help"])
    out = capsys.readouterr().out
    assert "steps to run (default: 10)" in out and "exit 75, or only report" in out
    assert "--action {exit,report}" in out and "What the watchdog does." in out
    with pytest.raises(SystemExit) as e:
        parse_config(lambda _: Job(), ["--action", "shout"])
    assert e.value.code == EXIT_USAGE and "invalid choice" in capsys.readouterr().err


def test_a_field_can_name_its_flag_and_replace_flags_reaches_it_anywhere_in_the_tree():
    assert parse_config(lambda _: Job(), ["--watch_every", "7"]).watch.every == 7
    assert replace_flags(Job(), watch_every=3, steps=2) == Job(steps=2, watch=Watch(every=3))
    with pytest.raises(TypeError, match="no flag --every"):
        replace_flags(Job(), every=3)


# the flags of the flat RunConfig before it held component configs: every command keeps working
FLAT_RUN_FLAGS = """strategy mesh devices cpu_devices global_batch epochs seed local_steps grad_reduce
topk_fraction powersgd_rank microbatches staleness outer_optimizer outer_lr max_steps progress
progress_every workdir checkpoint_every keep_checkpoints keep_best best_metric best_mode
restore_step nonfinite_limit compile_cache coordinator num_processes process_id init_timeout
heartbeat_timeout bind logdir profile_steps peak_tflops hang_timeout hang_action optimizer
learning_rate schedule warmup_fraction momentum weight_decay clip_norm b1 b2 eps step_decay
step_boundaries""".split()


@pytest.mark.parametrize("recipe", ["mnist", "vit", "wide_cnn", "lm"])
def test_every_flag_of_the_flat_run_config_keeps_its_name_and_every_flag_has_help(recipe, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"experiments.{recipe}").main(["--help"])
    out = capsys.readouterr().out
    for flag in FLAT_RUN_FLAGS:
        assert f"--{flag} " in out, flag
    config = type(importlib.import_module(f"experiments.{recipe}").get_config())
    helpless = [flag for flag, text in flag_help(config).items() if not text.strip()]
    assert not helpless, helpless
