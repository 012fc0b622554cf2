"""--mode=eval: names, config checks, missing inputs, resumable shards and the scores written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffusion_jax.errors import ConfigError, MissingEvalInputError
from diffusion_jax.evaluation import reference
from diffusion_jax.evaluation.digits_net import DigitsFeatures
from diffusion_jax.runner import evaluate
from diffusion_jax.runner.evaluate import check_eval, eval_name
from diffusion_jax.runner.validation import validate_config
from tests.conftest import make_tiny_config


def _eval_config(config, tmp_path, **eval_overrides):
    config.eval.num_samples = 12
    config.eval.batch_size = 4
    config.eval.shard_size = 5
    config.eval.metrics = ("fd", "is", "precision_recall")
    config.eval.pr_num_samples = 10
    config.eval.bpd_num_images = 0
    config.eval.reference_stats = str(tmp_path / "stats" / "digits_train_digits.npz")
    for key, value in eval_overrides.items():
        config.eval[key] = value
    return config


def _write_reference_stats(config) -> None:
    stats = reference.compute_reference_stats(DigitsFeatures(), config.data, "train")
    reference.save_reference_stats(config.eval.reference_stats, stats)


def test_eval_names_differ_for_every_setting_that_changes_the_samples(digits_data_dir):
    config = make_tiny_config(digits_data_dir)
    names = {eval_name(config)}
    for key, value in [
        ("sampler", "ddpm"),
        ("num_steps", 5),
        ("seed", 1),
        ("guidance_scale", 2.0),
        ("temperature", 0.9),
        ("timestep_spacing", "trailing"),
        ("clip_x0", False),
    ]:
        changed = make_tiny_config(digits_data_dir)
        changed.sampling[key] = value
        names.add(eval_name(changed))
    for changes in [
        {"guidance_scale": 2.0, "guidance_interval": (0.3, 5.0)},
        {"guidance_scale": 2.0, "guide": "step:3"},
        {"guidance_scale": 2.0, "guide": "posthoc_ema:0.05"},
    ]:
        changed = make_tiny_config(digits_data_dir)
        changed.sampling.update(changes)
        names.add(eval_name(changed))
    changed = make_tiny_config(digits_data_dir)
    changed.sampling.sampler, changed.sampling.eta = "ddim", 0.5
    names.add(eval_name(changed))
    changed = make_tiny_config(digits_data_dir)
    changed.eval.num_samples = 7
    names.add(eval_name(changed))
    assert len(names) == 13
    changed.eval.name = "mine"
    assert eval_name(changed) == "mine"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("metrics", ("fd", "kid"), "eval.metrics has ['kid']"),
        ("feature_network", "clip", "eval.feature_network='clip'"),
        ("num_samples", 1, "eval.num_samples=1"),
        ("bpd_num_images", -1, "eval.bpd_num_images=-1"),
        ("pr_num_samples", 3, "must exceed eval.pr_k=3"),
        ("metrics", ("is",), None),
        ("metrics", ("class_accuracy",), "needs model.class_conditional=True"),
    ],
)
def test_bad_eval_values_are_refused_naming_the_key(digits_data_dir, key, value, message):
    config = make_tiny_config(digits_data_dir)
    config.eval.metrics = ("fd", "precision_recall")
    config.eval[key] = value
    if message is None:  # is with fewer samples than its splits
        config.eval.num_samples = 9
        message = "the inception score averages 10 splits"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_eval(config, 1)


def test_class_accuracy_is_the_share_of_samples_the_classifier_puts_in_their_class(
    digits_data_dir,
):
    """On real test digits with their true labels it is the classifier's accuracy (0.989)."""
    from diffusion_jax.data import pipeline
    from diffusion_jax.evaluation.digits_net import DigitsFeatures
    from diffusion_jax.runner.evaluate import _score_samples

    config = make_tiny_config(digits_data_dir)
    config.model.class_conditional = True
    config.eval.metrics = ("class_accuracy",)
    check_eval(config, 1)
    images, labels = pipeline.eval_images(config.data, "test")
    scores = _score_samples(config, DigitsFeatures(), images, labels)
    assert scores == {"class_accuracy": pytest.approx(0.989, abs=0.0015)}
    shuffled = _score_samples(config, DigitsFeatures(), images, (labels + 1) % 10)
    assert shuffled["class_accuracy"] < 0.05


def test_eval_batches_that_do_not_divide_over_the_devices_are_accepted(digits_data_dir):
    # Samples do not depend on the batch size: it is rounded to the devices where it is used.
    config = make_tiny_config(digits_data_dir)
    config.eval.batch_size, config.eval.bpd_batch_size, config.sampling.batch_size = 500, 3, 7
    validate_config(config, num_devices=8)
    check_eval(config, 8)
    config.eval.batch_size = 0
    with pytest.raises(ConfigError, match=r"eval\.batch_size=0; use 1 or more"):
        check_eval(config, 8)


def test_digits_feature_network_is_refused_for_other_datasets_in_eval_mode(digits_data_dir):
    config = make_tiny_config(digits_data_dir)
    config.data.name = "cifar10"
    validate_config(config, num_devices=1)  # training cifar10 with the digits config is fine
    with pytest.raises(ConfigError, match="use 'inception'"):
        check_eval(config, 1)


def test_missing_reference_stats_are_one_line_naming_the_command_that_makes_them(
    shared_tiny_run, tmp_path
):
    config = _eval_config(shared_tiny_run.fresh_config(), tmp_path)
    with pytest.raises(MissingEvalInputError) as raised:
        evaluate.evaluate(config, shared_tiny_run.workdir)
    # The command line prints it as `error: <message>` (test_cli.py).
    message = str(raised.value)
    assert message.startswith(f"no reference statistics at {config.eval.reference_stats}")
    assert "python -m experiments.reference_stats" in message and "\n" not in message
    assert not os.path.exists(os.path.join(shared_tiny_run.workdir, "eval"))


def test_missing_inception_weights_say_where_to_get_them(shared_tiny_run, tmp_path):
    workdir = shared_tiny_run.workdir
    config = _eval_config(shared_tiny_run.fresh_config(), tmp_path)
    config.data.name = "digits"
    config.eval.feature_network = "inception"
    with pytest.raises(MissingEvalInputError, match="pt_inception-2015-12-05"):
        evaluate.evaluate(config, workdir)
    config.eval.inception_weights = str(tmp_path / "absent.npz")
    with pytest.raises(MissingEvalInputError, match=r"absent\.npz' does not exist"):
        evaluate.evaluate(config, workdir)


@pytest.mark.slow
def test_interrupted_eval_resumes_at_the_next_shard_with_the_same_samples(
    trained_tiny_run, tmp_path
):
    workdir, config = trained_tiny_run
    config = _eval_config(config, tmp_path)
    _write_reference_stats(config)

    class Preempted(Exception):
        pass

    def preempt_after_first(k: int) -> None:
        if k == 0:
            raise Preempted

    with pytest.raises(Preempted):
        evaluate.evaluate(config, workdir, after_shard=preempt_after_first)
    shard_dir = os.path.join(workdir, "eval", eval_name(config))
    first = os.path.join(shard_dir, "shard_00000.npz")
    assert sorted(os.listdir(shard_dir)) == ["manifest.json", "shard_00000.npz"]
    mtime = os.stat(first).st_mtime_ns

    result = evaluate.evaluate(config, workdir)
    assert os.stat(first).st_mtime_ns == mtime  # kept, not regenerated
    assert sorted(os.listdir(shard_dir))[-3:] == [
        "shard_00000.npz",
        "shard_00001.npz",
        "shard_00002.npz",
    ]
    resumed = np.concatenate(
        [np.load(os.path.join(shard_dir, f"shard_0000{k}.npz"))["images"] for k in range(3)]
    )
    assert resumed.shape == (12, 8, 8, 1) and resumed.dtype == np.uint8

    # One uninterrupted eval with other shard and batch sizes draws the very same images.
    config.eval.shard_size, config.eval.batch_size, config.eval.name = 12, 8, "whole"
    first_run = evaluate.evaluate(config, workdir)
    # Rescoring a finished eval keeps the sampling time measured when the shards were made.
    rescored = evaluate.evaluate(config, workdir)
    assert rescored.seconds_per_1000_samples == first_run.seconds_per_1000_samples is not None
    whole = np.load(os.path.join(workdir, "eval", "whole", "shard_00000.npz"))["images"]
    np.testing.assert_array_equal(resumed, whole)

    with open(result.path) as f:
        record = json.load(f)
    assert record["step"] == config.training.num_train_steps
    assert set(record["metrics"]) >= {"fd", "is_mean", "is_std", "precision", "recall"}
    assert record["metrics"]["fd"] > 0
    assert 1.0 <= record["metrics"]["is_mean"] <= 10.0
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert logged[-3][f"eval/{result.name}/fd"] == pytest.approx(result.metrics["fd"])


@pytest.mark.slow
def test_shards_from_an_older_checkpoint_are_discarded(trained_tiny_run, tmp_path):
    workdir, config = trained_tiny_run
    config = _eval_config(config, tmp_path, metrics=("is",))
    shard_dir = os.path.join(workdir, "eval", eval_name(config))
    os.makedirs(shard_dir)
    with open(os.path.join(shard_dir, "manifest.json"), "w") as f:
        json.dump({"step": 3}, f)
    stale = np.zeros((5, 8, 8, 1), np.uint8)
    np.savez(os.path.join(shard_dir, "shard_00000.npz"), images=stale)
    evaluate.evaluate(config, workdir)
    fresh = np.load(os.path.join(shard_dir, "shard_00000.npz"))["images"]
    assert fresh.any()


@pytest.mark.slow
def test_bits_per_dim_is_reported_for_eval_split_images(trained_tiny_run, tmp_path):
    workdir, config = trained_tiny_run
    config = _eval_config(config, tmp_path, metrics=(), bpd_num_images=6, bpd_batch_size=4)
    result = evaluate.evaluate(config, workdir)
    # An almost untrained model on 8x8 digits: worse than a good model (~1-3 bits/dim), but a
    # finite bound well under the 8 bits/dim of a uniform distribution over uint8 values.
    assert 0.5 < result.metrics["bits_per_dim"] < 8.0
