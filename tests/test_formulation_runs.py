"""Every formulation through the runner: a tiny run of each (ddpm, edm, flow) trains, and the
command line samples and scores it with every registered sampler; the flow config and the
formulation's keys are checked in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluation import reference
from diffusion_jax.evaluation.digits_net import DigitsFeatures
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import validation
from diffusion_jax.runner.workdir import read_metrics
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES, TrainedRun

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def formulation_run(request: pytest.FixtureRequest, shared_tiny_run: TrainedRun) -> TrainedRun:
    name = request.param
    if name == "ddpm":
        return shared_tiny_run
    return request.getfixturevalue(f"shared_{name}_run")  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("formulation_run", ["ddpm", "edm", "flow"], indirect=True)
def test_the_command_line_samples_a_tiny_run_of_each_formulation_with_every_sampler(
    formulation_run: TrainedRun, tmp_path
) -> None:
    run = formulation_run
    records = read_metrics(run.workdir)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in records)
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir, symlinks=True)
    stats = str(tmp_path / "digits_train_digits.npz")
    reference.save_reference_stats(
        stats, reference.compute_reference_stats(DigitsFeatures(), run.config.data, "train")
    )
    name = run.config.diffusion.formulation
    config_file = "configs/digits.py" if name == "ddpm" else f"configs/digits_{name}.py"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sampler_table",
            f"--config={config_file}",
            f"--workdir={workdir}",
            f"--config.data.data_dir={run.config.data.data_dir}",
            *TINY_OVERRIDES,
            f"--samplers={','.join(samplers.names())}",
            "--steps=3",
            f"--config.eval.reference_stats={stats}",
            "--config.eval.num_samples=8",
            "--config.eval.batch_size=8",
            "--config.eval.metrics=('fd',)",
        ],
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = sorted(os.listdir(os.path.join(workdir, "eval")))
    scored = [f for f in evals if f.endswith(".json")]
    assert len(scored) == len(samplers.names()), evals
    for file_name in scored:
        with open(os.path.join(workdir, "eval", file_name)) as f:
            assert np.isfinite(json.load(f)["metrics"]["fd"]), file_name


@pytest.mark.slow
def test_a_tiny_flow_run_trains_and_samples_through_the_runner(
    shared_flow_run: TrainedRun, tmp_path
) -> None:
    run = shared_flow_run
    records = read_metrics(run.workdir)
    assert all(np.isfinite(r["loss"]) for r in records)
    config = run.fresh_config()
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir, symlinks=True)
    config.sampling.sampler = "unipc"
    path = sample_mode.sample(config, workdir)
    with np.load(path) as stored:
        assert stored["images"].shape == (6, 8, 8, 1)
    # The flow's default grid starts at pure noise (t = 1); heun takes its own (karras).
    assert os.path.basename(path) == "unipc4_seed0.npz"
    config.sampling.sampler = "heun"
    assert os.path.basename(sample_mode.sample(config, workdir)) == "heun4_karras_seed0.npz"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("diffusion.formulation", "rectified", "use one of \\('ddpm', 'edm', 'flow'\\)"),
        ("diffusion.flow_time_sampling", "beta", "flow_time_sampling='beta'"),
        ("diffusion.flow_shift", 0.0, "flow_shift=0.0; use a finite value > 0"),
        ("diffusion.flow_logit_std", -1.0, "flow_logit_std=-1.0"),
        ("diffusion.prediction", "v", "has no meaning for diffusion.formulation='flow'"),
        ("model.learn_sigma", True, "has no meaning for diffusion.formulation='flow'"),
        ("sampling.gaussian_start_t", 5, "set gaussian_start_sigma instead"),
        ("sampling.timestep_spacing", "trailing", "continuous"),
        ("eval.bpd_num_images", 10, "bits/dim"),
    ],
)
def test_bad_flow_values_are_refused_in_one_line(tiny_config, key, value, message) -> None:
    config = tiny_config
    config.diffusion.formulation = "flow"
    config.eval.bpd_num_images = 0
    section, leaf = key.split(".")
    config[section][leaf] = value
    from diffusion_jax.runner import evaluate

    with pytest.raises(ConfigError, match=message) as error:
        validation.validate(config, 1, (*validation.MODEL_VALIDATORS, validation.check_sampling))
        evaluate.check_eval(config, 1)
    assert "\n" not in str(error.value)


def test_the_config_picks_each_formulation() -> None:
    from configs import digits, digits_edm, digits_flow

    names = [
        formulation_lib.from_config(c.get_config()).name for c in (digits, digits_edm, digits_flow)
    ]
    assert names == ["ddpm", "edm", "flow"]
    flow = formulation_lib.from_config(digits_flow.get_config())
    assert (flow.time_sampling, flow.logit_mean, flow.logit_std, flow.shift) == (
        "logit_normal",
        0.0,
        1.0,
        1.0,
    )
