"""The command line, experiments/main.py: one subprocess per mode (exit status, the summary line
and the files it names), and its error handling in-process: a `UserError` from any mode exits
with one line `error: <message>`, and a misspelt `--config.*` key is caught before absl parses
the flags."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging

from diffusion_jax.runner import cli
from experiments import main as main_program  # defines its absl flags in the pytest process
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

# config_flags loads the config file with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(REPO, "configs", "digits.py")


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config=configs/digits.py", *args],
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _summary(result: subprocess.CompletedProcess[str]) -> str:
    """The mode's one-line summary, the last line the program logs."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


# --- One subprocess per mode ----------------------------------------------------------------


@pytest.mark.slow
def test_train_command_applies_overrides_and_writes_the_resolved_config(digits_data_dir, tmp_path):
    # The tiny config's values, so the subprocess reuses the programs the other tests compiled.
    workdir = tmp_path / "cli"
    result = _run_cli(
        f"--workdir={workdir}",
        f"--config.data.data_dir={digits_data_dir}",
        *TINY_OVERRIDES,
        "--config.training.num_train_steps=2",
    )
    assert _summary(result).endswith("Trained to step 2")
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["ch"] == 32 and config["training"]["num_train_steps"] == 2
    assert config["data"]["data_dir"] == digits_data_dir
    assert os.listdir(workdir / "checkpoints") == ["2"]
    assert [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))] == [2]


# The settings of the in-process tests of each mode, so the programs come from the cache.
MODE_RUNS = {
    "sample": ([], "samples", {".npz"}),
    "eval": (
        [
            "--config.eval.num_samples=12",
            "--config.eval.batch_size=4",
            "--config.eval.shard_size=5",
            "--config.eval.metrics=('is',)",
        ],
        "eval",
        {".json"},
    ),
    "sdedit": (
        [
            "--config.edit.num_images=3",
            "--config.edit.resample_steps=2",
            "--config.edit.strength=(0.0, 0.6)",
        ],
        "edits",
        {".png", ".npz"},
    ),
    "inpaint": (
        [
            "--config.edit.num_images=3",
            "--config.edit.resample_steps=2",
            "--config.edit.mask=top_half",
        ],
        "edits",
        {".png", ".npz"},
    ),
    "visualize": (["--config.edit.num_images=2"], "visualize", {".png", ".gif"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODE_RUNS))
def test_each_mode_command_on_a_trained_run_exits_zero_and_writes_what_it_reports(
    mode, trained_tiny_run, digits_data_dir
):
    workdir, _ = trained_tiny_run
    overrides, subdir, suffixes = MODE_RUNS[mode]
    result = _run_cli(
        f"--workdir={workdir}",
        f"--mode={mode}",
        f"--config.data.data_dir={digits_data_dir}",
        *TINY_OVERRIDES,
        *overrides,
    )
    summary = _summary(result)
    written = re.findall(r"(/\S+?\.(?:npz|png|gif|json))\b", summary)
    assert written, summary
    for path in written:
        assert path.startswith(os.path.join(workdir, subdir, "")), path
        assert os.path.getsize(path) > 0, path
    assert {os.path.splitext(p)[1] for p in written} >= suffixes, summary
    if mode == "sample":
        with np.load(written[0]) as f:
            assert f["images"].shape == (6, 8, 8, 1) and f["images"].dtype == np.uint8
        stem = written[0][: -len(".npz")]
        assert os.path.exists(stem + ".png") and os.path.exists(stem + ".json")
    if mode == "eval":
        record = json.loads(open(written[0]).read())
        assert record["step"] == 6 and record["metrics"]["is_mean"] >= 1.0


# --- Error handling, in-process ---------------------------------------------------------------


@pytest.fixture
def run_main(monkeypatch):
    """run(*flags) -> the message `experiments.main.main` exits with (None if it returns), after
    absl parsed `--config=configs/digits.py *flags` as `app.run` does."""
    verbosity = absl_logging.get_verbosity()
    defined = set(flags.FLAGS)

    def run(*args: str) -> str | None:
        argv = ["main", f"--config={DIGITS_CONFIG}", *args]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
        try:
            flags.FLAGS(argv)
            main_program.main(argv[:1])
        except SystemExit as exit_:
            assert isinstance(exit_.code, str)  # sys.exit(message): printed, exit status 1
            return exit_.code
        finally:  # parsing defines a flag per --config.* override; the next parse would clash
            flags.FLAGS.unparse_flags()
            for name in set(flags.FLAGS) - defined:
                delattr(flags.FLAGS, name)
        return None

    yield run
    absl_logging.set_verbosity(verbosity)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--mode=sample"], "no checkpoint in"),
        (["--config.data.name=mnist"], "tfds build mnist"),
        (["--config.sampling.sampler=no_such_sampler"], "sampler"),
    ],
)
def test_a_user_error_in_any_mode_exits_with_one_error_line(run_main, overrides, message, tmp_path):
    exit_message = run_main(
        f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'tfds'}", *overrides
    )
    assert exit_message is not None and exit_message.startswith("error: "), exit_message
    assert message in exit_message and "\n" not in exit_message


def test_a_bug_is_not_disguised_as_a_user_error(run_main, monkeypatch, tmp_path):
    def broken(config, workdir, allow_config_change):
        raise KeyError("a bug")

    monkeypatch.setitem(main_program.MODES, "train", (broken, str))
    with pytest.raises(KeyError, match="a bug"):  # a traceback, not `error: ...`
        run_main(f"--workdir={tmp_path / 'w'}")


def test_misspelt_override_key_is_named_with_the_close_keys_before_flag_parsing():
    argv = ["--config=configs/digits.py", "--workdir=w", "--config.training.batch_sise=8"]
    error = cli.unknown_override_key([a.replace("configs/", REPO + "/configs/") for a in argv])
    assert error is not None and "\n" not in error
    assert error.startswith("error: unknown config key 'training.batch_sise'"), error
    assert "training.batch_size" in error
    known = [f"--config={DIGITS_CONFIG}", "--config.training.batch_size=8", *TINY_OVERRIDES]
    assert cli.unknown_override_key(known) is None


# --- Repeated overrides -----------------------------------------------------------------------


def test_a_repeated_tuple_override_keeps_the_last_value():
    argv = [
        "main",
        "--config=configs/digits.py",
        "--config.model.ch_mult=(1,2)",
        "--config.seed=1",
        "--config.model.ch_mult",
        "(1, 2, 2)",
        "--config.eval.metrics=fd",  # element by element: ml_collections builds ('fd', 'is')
        "--config.eval.metrics=is",
    ]
    assert cli.last_override_wins(argv) == [
        "main",
        "--config=configs/digits.py",
        "--config.seed=1",
        "--config.model.ch_mult",
        "(1, 2, 2)",
        "--config.eval.metrics=fd",
        "--config.eval.metrics=is",
    ]


def test_a_repeated_tuple_override_on_the_command_line_is_not_concatenated(tmp_path):
    # Concatenated, (1, 2, 2, 2, 2) + (1, 2) would fail the U-Net check on 8x8 images; the last
    # value alone passes every check, and the sample mode stops at the missing checkpoint.
    result = _run_cli(
        f"--workdir={tmp_path / 'empty'}",
        "--mode=sample",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.model.ch_mult=(1, 2, 2, 2, 2)",
        "--config.model.ch_mult=(1, 2)",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint in"), last


def test_only_process_zero_logs_progress_and_warnings():
    assert cli.log_level(0) == absl_logging.INFO
    assert cli.log_level(1) == absl_logging.ERROR


def test_a_multi_process_run_without_a_coordinator_exits_with_one_line_naming_the_flags(tmp_path):
    result = _run_cli(f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: starting jax.distributed failed (")
        and "--coordinator_address" in last
    )
