"""Faults a user can cause stop with one line naming the fix before anything expensive (model
build, compilation, sampling), or are repaired: config files, data dirs, splits, optimizer
values, reference statistics, unwritable outputs, damaged eval shards and metrics lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import digits
from diffusion_jax import train_state
from diffusion_jax.errors import ConfigError, ReferenceStatsError
from diffusion_jax.runner import cli, edit, evaluate, validation
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.setup import ModelSetup
from diffusion_jax.runner.validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_model(monkeypatch) -> None:
    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the problem was reported")

    monkeypatch.setattr(train_state, "create_model", must_not_build)


def _no_compilation(monkeypatch) -> None:
    def must_not_compile(*args, **kwargs):
        raise AssertionError("a program was compiled before the problem was reported")

    monkeypatch.setattr(ModelSetup, "sample_fn", must_not_compile)
    monkeypatch.setattr(ModelSetup, "train_step", must_not_compile)


def _eval_settings(config, **overrides):
    config.eval.num_samples, config.eval.batch_size, config.eval.shard_size = 12, 4, 5
    config.eval.metrics, config.eval.bpd_num_images = ("is",), 0
    for key, value in overrides.items():
        config.eval[key] = value
    return config


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# --- Config files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, message",
    [
        (None, "is not a file; pass a config file such as configs/digits.py"),
        ("x = (\n", "has a syntax error at line 1"),
        ("def get_config():\n    return {'a': 1}\n", "returned dict, not an ml_collections"),
        ("def get_config():\n    return None\n", "returned NoneType, not an ml_collections"),
        ("def get_config():\n    return undefined_name\n", "raised NameError at line 2"),
        ("CONFIG = 1\n", "defines no get_config()"),
    ],
)
def test_a_config_file_that_gives_no_config_is_one_line_naming_the_fix(tmp_path, source, message):
    path = tmp_path / "config.py"
    if source is not None:
        path.write_text(source)
    error = cli.command_line_error([f"--config={path}", "--workdir=w"])
    assert error is not None and error.startswith("error: ") and "\n" not in error
    assert message in error, error


def test_a_working_config_file_passes_the_command_line_check():
    argv = [f"--config={REPO}/configs/digits.py", "--workdir=w", "--config.seed=3"]
    assert cli.command_line_error(argv) is None


def test_a_config_file_with_a_syntax_error_exits_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(:\n")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--config={path}", f"--workdir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: --config={path} has a syntax error at line 1: invalid syntax; fix the file"
    ]


# --- Config values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("learning_rate", float("inf"), "training.learning_rate=inf; use a finite, positive rate"),
        ("learning_rate", float("nan"), "training.learning_rate=nan"),
        ("learning_rate", 0.0, "training.learning_rate=0.0"),
        ("adam_b1", 1.0, r"training.adam_b1=1.0; use a value in \[0, 1\)"),
        ("adam_b1", -0.1, "training.adam_b1=-0.1"),
        ("adam_b1", float("nan"), "training.adam_b1=nan"),
        ("adam_b2", 1.0, "training.adam_b2=1.0"),
        ("adam_b2", 1.5, "training.adam_b2=1.5"),
        ("weight_decay", float("inf"), "training.weight_decay=inf; use a finite value >= 0"),
        ("weight_decay", float("nan"), "training.weight_decay=nan"),
        ("weight_decay", -1e-4, "training.weight_decay=-0.0001"),
        ("grad_clip", float("inf"), "training.grad_clip=inf; use a finite value >= 0"),
        ("grad_clip", float("nan"), "training.grad_clip=nan"),
        ("grad_clip", -1.0, "training.grad_clip=-1.0"),
        ("warmup_steps", -1, "training.warmup_steps=-1; use an integer >= 0"),
        ("ema_decay", 1.0, r"training.ema_decay=1.0; use a value in \[0, 1\)"),
        ("ema_decay", float("nan"), "training.ema_decay=nan"),
        ("ema_decay", -0.5, "training.ema_decay=-0.5"),
    ],
)
def test_every_optimizer_value_is_checked_to_be_finite_and_in_range(key, value, message):
    config = digits.get_config()
    config.training[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, num_devices=1)


def test_the_default_optimizer_values_pass():
    validate_config(digits.get_config(), num_devices=1)


def test_a_data_dir_that_is_a_file_is_refused_before_the_model_is_built(
    tiny_config, tmp_path, monkeypatch
):
    data_file = tmp_path / "data"
    data_file.write_text("")
    tiny_config.data.data_dir = str(data_file)
    _no_model(monkeypatch)
    with pytest.raises(ConfigError, match=r"data\.data_dir=.* is a file; pass the TFDS data dir"):
        train_mode.train(tiny_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_negative_reader_thread_count_is_refused():
    config = digits.get_config()
    config.data.num_read_threads = -1  # (a fractional one is refused by the typed config)
    with pytest.raises(ConfigError, match=r"data.num_read_threads=.*; use 0 .* or more"):
        validate_config(config, num_devices=1)


# --- Splits -----------------------------------------------------------------------------------


def test_split_names_are_checked_with_slices_and_sums_allowed():
    config = digits.get_config()
    config.data.train_split, config.edit.split = "train[:50%]", "train+test[:10]"
    validation.check_splits(config, ["train", "test"], ["data.train_split", "edit.split"])
    config.edit.split = "train+validation"
    with pytest.raises(ConfigError, match=r"edit.split='train\+validation': .*no split 'valid"):
        validation.check_splits(config, ["train", "test"], ["edit.split"])


def test_an_unknown_training_split_is_refused_before_compiling(tiny_config, tmp_path, monkeypatch):
    tiny_config.data.train_split = "nope"
    _no_compilation(monkeypatch)
    with pytest.raises(ConfigError) as raised:
        train_mode.train(tiny_config, str(tmp_path / "run"))
    assert _one_line(raised.value).startswith("data.train_split='nope': 'digits' has no split")
    assert "['test', 'train']" in str(raised.value)


@pytest.mark.parametrize(
    "key, overrides",
    [
        ("eval.reference_split", {"metrics": ("is", "precision_recall"), "pr_num_samples": 10}),
        ("data.eval_split", {"bpd_num_images": 4}),
    ],
)
def test_an_unknown_split_of_an_eval_is_refused_before_sampling(
    trained_tiny_run, monkeypatch, key, overrides
):
    path, config = trained_tiny_run
    _eval_settings(config, **overrides)
    section, leaf = key.split(".")
    config[section][leaf] = "nope"
    _no_compilation(monkeypatch)
    with pytest.raises(ConfigError, match=f"{key}='nope': 'digits' has no split 'nope'"):
        evaluate.evaluate(config, path)
    assert not os.path.exists(os.path.join(path, "eval", evaluate.eval_name(config)))


@pytest.mark.slow
def test_an_unknown_edit_split_is_refused_before_editing(trained_tiny_run, monkeypatch):
    path, config = trained_tiny_run
    config.edit.split = "nope"
    config.edit.num_images = 2

    def must_not_read(*args, **kwargs):
        raise AssertionError("images were read before the split was checked")

    monkeypatch.setattr(edit, "source_images", must_not_read)
    with pytest.raises(ConfigError, match=r"edit\.split='nope': 'digits' has no split 'nope'"):
        edit.sdedit_mode(config, path)


# --- Reference statistics ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "wrong_keys", "directory"])
def test_reference_statistics_that_are_not_a_stats_file_stop_eval_before_sampling(
    trained_tiny_run, tmp_path, monkeypatch, kind
):
    path, config = trained_tiny_run
    stats = tmp_path / "stats.npz"
    if kind == "text":
        stats.write_text("not statistics")
    elif kind == "wrong_keys":
        np.savez(stats, foo=np.zeros(3))
    else:
        stats.mkdir()
    _eval_settings(config, metrics=("fd",), reference_stats=str(stats))
    _no_compilation(monkeypatch)
    with pytest.raises(ReferenceStatsError) as raised:
        evaluate.evaluate(config, path)
    message = _one_line(raised.value)
    assert str(stats) in message and "python -m experiments.reference_stats" in message


# --- Unwritable outputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, subdir",
    [(sample_mode.sample, "samples"), (evaluate.evaluate, "eval"), (edit.sdedit_mode, "edits")],
)
def test_an_output_directory_that_cannot_take_files_stops_the_mode_before_any_work(
    trained_tiny_run, monkeypatch, mode, subdir
):
    path, config = trained_tiny_run
    _eval_settings(config)
    blocked = os.path.join(path, subdir)
    if os.path.isdir(blocked):
        os.rename(blocked, blocked + ".moved")
    with open(blocked, "w") as f:
        f.write("a file where the outputs go")
    _no_model(monkeypatch)
    with pytest.raises(ConfigError) as raised:
        mode(config, path)
    message = _one_line(raised.value)
    assert f"--workdir={path} ({subdir}/ in it) is not writable" in message


def test_a_read_only_workdir_stops_sample_mode_before_sampling(trained_tiny_run, monkeypatch):
    # Tests run as root, which chmod cannot stop: refuse the write check's file as a read-only
    # file system would.
    path, config = trained_tiny_run

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(validation.tempfile, "NamedTemporaryFile", read_only)
    _no_model(monkeypatch)
    with pytest.raises(ConfigError, match=r"\(samples/ in it\) is not writable \(Permission"):
        sample_mode.sample(config, path)


# --- Damaged files the program wrote ----------------------------------------------------------


def _damage(shard_dir: str, how: str) -> None:
    manifest = os.path.join(shard_dir, "manifest.json")
    shard = os.path.join(shard_dir, "shard_00001.npz")
    if how == "truncated_shard":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif how == "garbage_shard":
        with open(shard, "wb") as f:
            f.write(b"\x00garbage")
    elif how == "wrong_shape_shard":
        np.savez(shard, images=np.zeros((5, 4, 4, 1), np.uint8))
    elif how == "garbage_manifest":
        with open(manifest, "w") as f:
            f.write('{"step": 6, "num_sa')
    elif how == "list_manifest":
        with open(manifest, "w") as f:
            json.dump([1, 2], f)
    elif how == "non_utf8_manifest":
        with open(manifest, "wb") as f:
            f.write(b"\xff\xfe\x00")


@pytest.mark.slow
def test_damaged_eval_shards_or_manifest_are_generated_again_with_the_same_samples(
    trained_tiny_run, caplog
):
    path, config = trained_tiny_run
    _eval_settings(config)
    first = evaluate.evaluate(config, path)
    shard_dir = os.path.join(path, "eval", first.name)
    with np.load(os.path.join(shard_dir, "shard_00001.npz")) as f:
        reference_shard = f["images"]
    for how in [
        "truncated_shard",
        "garbage_shard",
        "wrong_shape_shard",
        "garbage_manifest",
        "list_manifest",
        "non_utf8_manifest",
    ]:
        _damage(shard_dir, how)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = evaluate.evaluate(config, path)
        assert again.metrics == first.metrics, how
        with np.load(os.path.join(shard_dir, "shard_00001.npz")) as f:
            np.testing.assert_array_equal(f["images"], reference_shard)
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert "generating it again" in warned or "manifest is missing or damaged" in warned, how


def test_damaged_metrics_lines_are_skipped_with_one_warning_and_do_not_block_resume(
    tiny_config, trained_tiny_run, caplog
):
    path, _ = trained_tiny_run
    with open(os.path.join(path, workdir_lib.METRICS_FILE), "ab") as f:
        f.write(b"[1, 2]\n")  # JSON, not a record
        f.write(b'{"step": "4", "loss": 1.0}\n')  # a non-numeric step
        f.write(b"\xff\xfe not utf-8\n")
        f.write(b'{"step": 5, "lo')  # cut short
    with caplog.at_level(logging.WARNING):
        records = workdir_lib.read_metrics(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Skipped 4 damaged line(s)" in warnings[0], warnings
    assert [r["step"] for r in records] == [2, 4, 6]

    state = train_mode.train(tiny_config, path)  # resumes at 6: the damaged lines are dropped
    assert int(state.step) == 6
    assert [r["step"] for r in workdir_lib.read_metrics(path)] == [2, 4, 6]
