"""The workdir's files: config.json, metrics.jsonl, eval records, atomic writes and output names
that cannot escape the workdir."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import digits
from diffusion_jax.errors import ConfigError, NoCheckpointError
from diffusion_jax.runner import evaluate, generate, workdir
from diffusion_jax.runner import sample as sample_mode


@pytest.mark.parametrize(
    "name", ["../checkpoints", "..", ".", "/tmp/elsewhere", "a/b", "a\\b", "", " ", "a\0b", " x"]
)
def test_output_names_that_are_not_plain_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"eval\.name=.*plain name"):
        workdir.output_name(name, "eval.name")


@pytest.mark.parametrize("name", ["fid_50k", "ddim50_seed0", "run.v2", "a-b"])
def test_plain_output_names_are_kept(name):
    assert workdir.output_name(name, "eval.name") == name


def test_eval_name_escaping_the_workdir_is_refused_before_anything_is_touched(
    trained_tiny_run,
):
    path, config = trained_tiny_run
    checkpoints = sorted(os.listdir(os.path.join(path, "checkpoints")))
    config.eval.name = "../checkpoints"
    with pytest.raises(ConfigError, match=r"eval\.name='\.\./checkpoints'"):
        evaluate.evaluate(config, path)
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == checkpoints


def test_sampling_name_outside_the_workdir_is_refused(trained_tiny_run, tmp_path):
    path, config = trained_tiny_run
    config.sampling.name = str(tmp_path / "outside")
    with pytest.raises(ConfigError, match=r"sampling\.name="):
        sample_mode.sample(config, path)
    assert not os.path.exists(str(tmp_path / "outside") + ".npz")


def test_default_sample_name_names_every_setting_that_changes_the_samples():
    config = digits.get_config()
    config.sampling.update(
        sampler="ddim", num_steps=20, seed=3, timestep_spacing="linspace", gaussian_start_t=0
    )
    assert generate.sample_name(config) == "ddim20_seed3"
    config.sampling.update(eta=0.5, gaussian_start_t=900, timestep_spacing="karras")
    assert generate.sample_name(config) == "ddim20_eta0.5_karras_gs900_seed3"


def _write_lines(path, lines: list[bytes]) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, workdir.METRICS_FILE), "wb") as f:
        f.write(b"".join(lines))


def test_read_metrics_skips_damaged_lines(tmp_path):
    _write_lines(
        tmp_path,
        [
            b'{"step": 1, "loss": 0.5}\n',
            b"[1, 2, 3]\n",  # JSON, but not a record
            b'{"step": "two", "loss": 0.4}\n',  # non-numeric step
            b'{"step": true, "loss": 0.4}\n',  # a bool is not a step
            b'{"loss": 0.3}\n',  # no step
            b"\xff\xfe not utf-8\n",
            b'{"step": 3, "loss": 0.2}\n',
            b'{"step": 4, "lo',  # cut short by a kill
        ],
    )
    assert workdir.read_metrics(str(tmp_path)) == [
        {"step": 1, "loss": 0.5},
        {"step": 3, "loss": 0.2},
    ]


def test_read_metrics_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist"):
        workdir.read_metrics(str(tmp_path))


def test_truncate_metrics_keeps_records_up_to_the_step_and_drops_damaged_lines(tmp_path):
    _write_lines(
        tmp_path,
        [b'{"step": 2, "loss": 1.0}\n', b"garbage\n", b'{"step": 4, "loss": 0.5}\n'],
    )
    workdir.truncate_metrics(str(tmp_path), 3)
    with open(tmp_path / workdir.METRICS_FILE) as f:
        assert [json.loads(line) for line in f] == [{"step": 2, "loss": 1.0}]


def test_metric_writer_appends_records_read_back_as_columns(tmp_path):
    writer = workdir.MetricWriter(str(tmp_path))
    writer.write(1, {"loss": 0.5})
    writer.write(2, {"loss": 0.25, "fd": 3.0})
    writer.close()
    columns = workdir.metric_columns(workdir.read_metrics(str(tmp_path)))
    np.testing.assert_array_equal(columns["step"], [1, 2])
    np.testing.assert_array_equal(columns["loss"], [0.5, 0.25])
    np.testing.assert_array_equal(columns["fd"], [np.nan, 3.0])
    assert workdir.final_metrics(str(tmp_path), ["loss", "fd", "absent"]) == {
        "loss": 0.25,
        "fd": 3.0,
    }


def test_atomic_writes_leave_only_the_final_files(tmp_path):
    target = tmp_path / "sub"
    workdir.atomic_write_json(str(target / "r.json"), {"a": 1})
    workdir.atomic_savez(str(target / "x.npz"), images=np.zeros((2, 2), np.uint8))
    workdir.atomic_write_text(str(target / "t.md"), "hi\n")
    assert sorted(os.listdir(target)) == ["r.json", "t.md", "x.npz"]
    with np.load(target / "x.npz") as data:
        assert data["images"].shape == (2, 2)


def test_config_json_round_trips_with_tuples(tmp_path):
    config = digits.get_config()
    workdir.write_config(config, str(tmp_path))
    loaded = workdir.read_config(str(tmp_path))
    assert loaded.model.ch_mult == tuple(config.model.ch_mult)
    assert workdir.saved_num_train_steps(str(tmp_path)) == config.training.num_train_steps


def test_a_missing_or_damaged_config_json_names_the_fix(tmp_path):
    with pytest.raises(NoCheckpointError, match="train there first"):
        workdir.read_config(str(tmp_path))
    (tmp_path / workdir.CONFIG_FILE).write_bytes(b"\xff{not json")
    with pytest.raises(NoCheckpointError, match=r"no readable config\.json"):
        workdir.read_config(str(tmp_path))


def test_read_eval_results_skips_files_that_are_not_eval_records(tmp_path):
    directory = tmp_path / "eval"
    directory.mkdir()
    (directory / "b.json").write_text(json.dumps({"step": 3, "metrics": {"fd": 1.5}}))
    (directory / "a.json").write_text(json.dumps({"name": "a", "step": 1, "metrics": {}}))
    (directory / "list.json").write_text("[1, 2]")
    (directory / "broken.json").write_text('{"metrics": ')
    (directory / "no_metrics.json").write_text(json.dumps({"step": 1}))
    (directory / "shards").mkdir()
    results = workdir.read_eval_results(str(tmp_path))
    assert [r["name"] for r in results] == ["a", "b"]
    assert results[1]["metrics"] == {"fd": 1.5}
