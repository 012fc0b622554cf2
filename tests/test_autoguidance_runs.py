"""Autoguidance and the guidance interval through the runner: `sampling.guide` sources in
sample / eval mode and `Run.sample`, refused sources in one line before anything compiles."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from diffusion_jax.errors import ConfigError, NoCheckpointError
from diffusion_jax.runner import edit, evaluate, guide, loading
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner.setup import ModelSetup


def _guided(config, source: str, scale: float = 2.0):
    config.sampling.guide = source
    config.sampling.guidance_scale = scale
    return config


def _no_compilation(monkeypatch) -> None:
    def must_not_compile(*args, **kwargs):
        raise AssertionError("a program was compiled before the problem was reported")

    monkeypatch.setattr(ModelSetup, "sample_fn", must_not_compile)


@pytest.mark.slow
def test_an_earlier_checkpoint_guides_an_unconditional_run(trained_tiny_run) -> None:
    workdir, config = trained_tiny_run
    config.sampling.guidance_interval = (0.5, 20.0)
    path = sample_mode.sample(_guided(config, "step:3"), workdir)
    assert os.path.basename(path) == "dpm_solverpp2m_sde4_g2_gi0.5-20_agstep3_seed0.npz"
    with open(path.replace(".npz", ".json")) as f:
        record = json.load(f)
    assert (record["step"], record["guide_step"]) == (6, 3)
    assert record["sampling"]["guide"] == "step:3"
    plain = np.load(sample_mode.sample(_guided(config, "", 1.0), workdir))["images"]
    guided = np.load(path)["images"]
    assert guided.shape == plain.shape == (6, 8, 8, 1)
    assert np.any(guided != plain)


@pytest.mark.slow
def test_the_model_guiding_itself_gives_the_unguided_samples(trained_tiny_run) -> None:
    workdir, config = trained_tiny_run
    plain = np.load(sample_mode.sample(config, workdir))["images"]
    itself = sample_mode.sample(_guided(config, f"workdir:{workdir}@6", 3.0), workdir)
    label = guide.parse(f"workdir:{workdir}@6").label
    assert re.fullmatch(r"agrun-run-[0-9a-f]{8}-step6", label)
    assert os.path.basename(itself) == f"dpm_solverpp2m_sde4_g3_{label}_seed0.npz"
    np.testing.assert_array_equal(np.load(itself)["images"], plain)


@pytest.mark.slow
def test_run_sample_takes_a_loaded_run_or_a_source_as_its_guide(shared_tiny_run) -> None:
    run = loading.load_run(shared_tiny_run.workdir)
    weaker = loading.load_run(shared_tiny_run.workdir, step=3)
    by_run = run.sample(4, guidance_scale=2.0, guide=weaker, guidance_interval=(0.1, 50.0))
    by_source = run.sample(4, guidance_scale=2.0, guide="step:3", guidance_interval=(0.1, 50.0))
    np.testing.assert_array_equal(by_run, by_source)
    compiled = len(run._samplers)
    run.sample(4, guidance_scale=2.0, guide="step:3", guidance_interval=(0.1, 50.0), seed=1)
    assert len(run._samplers) == compiled  # the guide loaded once, the program reused
    configured = loading.load_run(
        shared_tiny_run.workdir, config=_guided(shared_tiny_run.fresh_config(), "step:3")
    )  # the run's own sampling.guide is Run.sample's default
    np.testing.assert_array_equal(configured.sample(4, guidance_interval=(0.1, 50.0)), by_run)
    assert not np.array_equal(by_run, run.sample(4))
    np.testing.assert_array_equal(run.sample(4, guide=weaker), run.sample(4))  # scale 1
    with pytest.raises(ConfigError, match="another formulation"):
        flow_config = weaker.config.copy_and_resolve_references()
        flow_config.diffusion.formulation = "flow"
        guide.check_compatible(run.config, flow_config, "elsewhere")


@pytest.mark.slow
def test_eval_records_the_guide_and_the_network_evaluations(trained_tiny_run, tmp_path) -> None:
    workdir, config = trained_tiny_run
    config.eval.num_samples, config.eval.batch_size, config.eval.shard_size = 10, 5, 10
    config.eval.metrics, config.eval.bpd_num_images = ("is",), 0
    config.sampling.guidance_interval = (1.0, 1e9)
    result = evaluate.evaluate(_guided(config, "step:3"), workdir)
    assert result.name == "dpm_solverpp2m_sde4_g2_gi1-1e+09_agstep3_seed0_n10"
    with open(result.path) as f:
        record = json.load(f)
    spec_levels = record["model_evaluations"]
    assert spec_levels == 4 and record["guide_step"] == 3
    assert 4 < record["network_evaluations"] < 8  # the guide runs inside the interval only
    config.sampling.guidance_interval = ()
    unguided = evaluate.evaluate(_guided(config, "", 1.0), workdir)
    with open(os.path.join(workdir, "eval", unguided.name, "manifest.json")) as f:
        sampling = json.load(f)["sampling"]
    # New keys at their defaults stay out of the manifest: evals made before them resume.
    assert "guide" not in sampling and "guidance_interval" not in sampling


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        ("step:4", NoCheckpointError, r"has no checkpoint at step 4; it has \[3, 6\]"),
        ("posthoc_ema:0.05", NoCheckpointError, "no post-hoc EMA with sigma_rel=0.05"),
        ("workdir:/nonexistent/run", NoCheckpointError, "is not a directory"),
        ("workdir:FLOW", ConfigError, "another formulation"),
        ("workdir:SIGMA", ConfigError, r"model\.learn_sigma=True, not False"),
        ("workdir:BIG", ConfigError, r"data\.image_size=16, this run 8"),
        ("step3", ConfigError, "use '' .none. or 'step:<N>'"),
    ],
)
def test_a_guide_that_cannot_be_used_is_refused_in_one_line_before_compiling(
    trained_tiny_run,
    shared_flow_run,
    shared_learn_sigma_run,
    tmp_path,
    monkeypatch,
    source,
    error,
    message,
) -> None:
    workdir, config = trained_tiny_run
    big = str(tmp_path / "big")
    shutil.copytree(workdir, big)
    with open(os.path.join(big, "config.json")) as f:
        saved = json.load(f)
    saved["data"]["image_size"] = 16
    with open(os.path.join(big, "config.json"), "w") as f:
        json.dump(saved, f)
    places = {"FLOW": shared_flow_run.workdir, "SIGMA": shared_learn_sigma_run.workdir, "BIG": big}
    for name, place in places.items():
        source = source.replace(name, place)
    _no_compilation(monkeypatch)
    for mode in (sample_mode.sample, evaluate.evaluate):
        with pytest.raises(error, match=message) as caught:
            mode(_guided(config, source), workdir)
        assert "\n" not in str(caught.value)


def test_an_unconditional_run_needs_a_guide_and_editing_refuses_one(trained_tiny_run) -> None:
    workdir, config = trained_tiny_run
    config.sampling.guidance_scale = 2.0
    with pytest.raises(ConfigError, match=r"needs a guide: set sampling\.guide"):
        sample_mode.sample(config, workdir)
    with pytest.raises(ConfigError, match="editing and visualize modes"):
        edit.sdedit_mode(_guided(config, "step:3"), workdir)


@pytest.mark.slow
def test_a_smaller_run_guides_from_its_workdir_and_training_ignores_the_guide(
    shared_tiny_run, tmp_path
) -> None:
    """A guide with another architecture (one resolution, no attention) is built from its own saved
    config; a run trained with sampling.guide set draws its grids unguided."""
    small = shared_tiny_run.fresh_config()
    small.model.ch_mult, small.model.attn_resolutions = (1,), ()
    small.training.num_train_steps = small.training.checkpoint_every = 2
    small_dir = str(tmp_path / "small")
    _guided(small, "step:1")  # training with a guide set: the grids are unguided
    train_mode.train(small, small_dir)
    config = _guided(shared_tiny_run.fresh_config(), f"workdir:{small_dir}")
    sample_dir = str(tmp_path / "run")
    shutil.copytree(shared_tiny_run.workdir, sample_dir)
    path = sample_mode.sample(config, sample_dir)
    assert re.fullmatch(
        r"dpm_solverpp2m_sde4_g2_agrun-small-[0-9a-f]{8}_seed0\.npz", os.path.basename(path)
    )
    assert np.load(path)["images"].shape == (6, 8, 8, 1)


def test_guides_of_different_runs_never_share_a_file_name(tmp_path) -> None:
    labels = {
        guide.parse(source).label
        for source in (
            "step:1000",
            f"workdir:{tmp_path}/step1000",
            f"workdir:{tmp_path}/a/small",
            f"workdir:{tmp_path}/b/small",
            f"workdir:{tmp_path}/b/small@1000",
            "posthoc_ema:0.05",
        )
    }
    assert len(labels) == 6
    assert guide.parse("workdir:/x@y/run@500") == guide.Source(workdir="/x@y/run", step=500)
    for bad in ("step:1000\n", "step:-1", "workdir:", "posthoc_ema:0", "latest"):
        with pytest.raises(ConfigError, match=r"sampling\.guide="):
            guide.parse(bad)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["shared_edm_run", "shared_flow_run"])
def test_autoguidance_and_the_interval_on_the_continuous_formulations(fixture, request) -> None:
    shared = request.getfixturevalue(fixture)
    run = loading.load_run(shared.workdir)
    plain = run.sample(4)
    guided = run.sample(4, guidance_scale=2.0, guide="step:3", guidance_interval=(0.5, 1e999))
    assert np.isfinite(guided).all() and not np.array_equal(guided, plain)
    itself = run.sample(4, guidance_scale=2.0, guide="step:6")
    np.testing.assert_allclose(itself, plain, atol=1e-5)
