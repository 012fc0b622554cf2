"""Every write and delete stays inside the workdir: names from the config are names, not paths
(refused before any work, in-process and on the command line), writes and deletes are checked
to resolve inside the workdir (a symlink leading out is refused), and a delete removes only the
files the program wrote."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from diffusion_jax import train_state
from diffusion_jax.errors import ConfigError, UnsafePathError
from diffusion_jax.runner import evaluate, workdir
from diffusion_jax.runner import sample as sample_mode
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Values of a name-like config key that would leave (or replace) the directory they name a file
# in; "{outside}" becomes an absolute path outside the workdir.
ESCAPING_NAMES = ["../checkpoints", "..", ".", "{outside}", "sub/name", " ", "a\0b"]
NAME_KEYS = {"sampling.name": sample_mode.sample, "eval.name": evaluate.evaluate}


def _tree(root: str) -> dict[str, int]:
    """{relative path: size} of everything under `root` (directories as -1)."""
    found = {}
    for directory, subdirs, names in os.walk(root):
        for name in subdirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = -1
        for name in names:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_size
    return found


def _eval_settings(config):
    config.eval.num_samples, config.eval.batch_size, config.eval.shard_size = 12, 4, 5
    config.eval.metrics, config.eval.bpd_num_images = ("is",), 0
    return config


@pytest.mark.parametrize("value", ESCAPING_NAMES)
@pytest.mark.parametrize("key", list(NAME_KEYS))
def test_a_name_from_the_config_that_is_a_path_is_refused_and_nothing_is_touched(
    trained_tiny_run, tmp_path, monkeypatch, key, value
):
    path, config = trained_tiny_run
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    value = value.format(outside=outside)
    _eval_settings(config)
    section, leaf = key.split(".")
    config[section][leaf] = value
    before, outside_before = _tree(path), _tree(str(outside))

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the name was checked")

    monkeypatch.setattr(train_state, "create_model", must_not_build)
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r}") + ".*plain name"):
        NAME_KEYS[key](config, path)
    assert _tree(path) == before  # checkpoints and everything else survive
    assert _tree(str(outside)) == outside_before


def test_eval_name_that_escapes_the_workdir_is_one_line_on_the_command_line(
    trained_tiny_run, digits_data_dir
):
    path, _ = trained_tiny_run
    before = _tree(path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=configs/digits.py",
            f"--workdir={path}",
            "--mode=eval",
            f"--config.data.data_dir={digits_data_dir}",
            *TINY_OVERRIDES,
            "--config.eval.name=../checkpoints",
        ],
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: eval.name='../checkpoints' must be a plain name"), last
    assert _tree(path) == before


def test_contained_path_refuses_paths_that_resolve_outside_the_directory(tmp_path):
    root = tmp_path / "run"
    (root / "eval").mkdir(parents=True)
    assert workdir.contained_path(str(root), "eval", "x.json") == str(root / "eval" / "x.json")
    for parts in [("..", "x"), ("eval", "..", "..", "x"), (str(tmp_path / "x"),), (".",)]:
        with pytest.raises(UnsafePathError, match="outside"):
            workdir.contained_path(str(root), *parts)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "samples")
    with pytest.raises(UnsafePathError, match="symlink"):
        workdir.contained_path(str(root), "samples", "x.npz")


def test_a_symlink_leading_out_of_the_workdir_stops_sample_mode_before_sampling(
    trained_tiny_run, tmp_path, monkeypatch
):
    path, config = trained_tiny_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(os.path.join(path, "samples"))  # the training grids: this copy's own
    os.symlink(elsewhere, os.path.join(path, "samples"))

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the output path was checked")

    monkeypatch.setattr(train_state, "create_model", must_not_build)
    with pytest.raises(UnsafePathError, match="outside"):
        sample_mode.sample(config, path)
    assert os.listdir(elsewhere) == []


def test_remove_owned_dir_deletes_only_a_directory_of_the_programs_own_files(tmp_path):
    owned = evaluate.SHARD_DIR_FILES
    shards = tmp_path / "eval" / "run1"
    shards.mkdir(parents=True)
    for name in ("manifest.json", "shard_00000.npz", "shard_00001.npz.tmp.npz"):
        (shards / name).write_text("x")
    workdir.remove_owned_dir(str(shards), str(tmp_path), owned, fix="f")
    assert not shards.exists()
    workdir.remove_owned_dir(str(shards), str(tmp_path), owned, fix="f")  # missing: fine

    foreign = tmp_path / "eval" / "run2"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "shard_00000.npz").write_text("x")
    with pytest.raises(UnsafePathError, match=r"holds 'sub', which this program did not write"):
        workdir.remove_owned_dir(str(foreign), str(tmp_path), owned, fix="move it away")
    (foreign / "sub").rmdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UnsafePathError, match=r"notes\.txt.*move it away"):
        workdir.remove_owned_dir(str(foreign), str(tmp_path), owned, fix="move it away")
    assert sorted(os.listdir(foreign)) == ["notes.txt", "shard_00000.npz"]

    target = tmp_path / "target"
    target.mkdir()
    (target / "manifest.json").write_text("x")
    os.symlink(target, tmp_path / "eval" / "link")
    with pytest.raises(UnsafePathError):
        workdir.remove_owned_dir(str(tmp_path / "eval" / "link"), str(tmp_path), owned, fix="f")
    assert os.listdir(target) == ["manifest.json"]


@pytest.mark.slow
def test_eval_refuses_to_discard_a_shard_directory_holding_foreign_files(
    trained_tiny_run, monkeypatch
):
    path, config = trained_tiny_run
    _eval_settings(config)
    shard_dir = os.path.join(path, "eval", evaluate.eval_name(config))
    os.makedirs(shard_dir)
    with open(os.path.join(shard_dir, "notes.txt"), "w") as f:
        f.write("someone's notes")  # no manifest: an eval would discard the directory
    with pytest.raises(UnsafePathError, match=r"notes\.txt.*set eval\.name to another name"):
        evaluate.evaluate(config, path)
    assert os.listdir(shard_dir) == ["notes.txt"]
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == ["3", "6"]
