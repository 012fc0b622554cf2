"""Configs: the command-line contract keys, the paper's CIFAR-10 model, and validation rules."""

from __future__ import annotations

import importlib
import json

import ml_collections
import pytest

from configs import cifar10_ddpm, digits, imagenet64_adm
from diffusion_jax import train_state
from diffusion_jax.models.unet import count_params
from diffusion_jax.runner.validation import (
    ConfigError,
    locked_key_changes,
    validate_against_dataset,
    validate_config,
)

CONFIG_MODULES = ["configs.default", "configs.digits", "configs.digits_edm", "configs.cifar10_ddpm"]
CONTRACT_KEYS = [
    "seed",
    "training.num_train_steps",
    "training.batch_size",
    "training.checkpoint_every",
    "sampling.sampler",
    "sampling.num_steps",
    "sampling.num_samples",
    "sampling.seed",
]


def _get(config: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_every_config_has_the_command_line_contract_keys_and_validates(module):
    config = importlib.import_module(module).get_config()
    for key in CONTRACT_KEYS:
        _get(config, key)
    validate_config(config, num_devices=1)


def test_cifar10_config_builds_the_35_7m_parameter_ddpm_model():
    # Ho et al.'s CIFAR-10 model: 35,746,307 parameters exactly (the reference implementation's
    # count), built from the config as training builds it.
    config = cifar10_ddpm.get_config()
    model = train_state.create_model(config.model, num_classes=10)
    assert count_params(model, (32, 32, 3)) == 35_746_307


def test_cifar10_config_uses_ho_et_al_hyperparameters():
    t = cifar10_ddpm.get_config().training
    assert (t.batch_size, t.learning_rate, t.warmup_steps, t.grad_clip, t.ema_decay) == (
        128,
        2e-4,
        5000,
        1.0,
        0.9999,
    )
    assert t.num_train_steps == 800_000
    assert cifar10_ddpm.get_config().model.dropout == 0.1
    assert cifar10_ddpm.get_config().data.random_flip


BAD_VALUES = [
    ("diffusion.schedule", "quadratic", "linear"),
    ("diffusion.prediction", "score", "use one of"),
    ("diffusion.loss_weighting", "p2", "use one of"),
    ("sampling.sampler", "no_such_sampler", "ddim"),
    ("sampling.timestep_spacing", "log", "linspace"),
    ("sampling.num_steps", 5000, "num_steps"),
    ("sampling.num_steps", 0, "num_steps"),
    ("sampling.eta", -1.0, "eta"),
    ("training.learning_rate", -1e-3, "positive rate"),
    ("training.ema_decay", 1.0, "ema_decay"),
    ("training.checkpoint_every", 0, "checkpoint_every"),
    ("training.max_consecutive_nonfinite", 0, "max_consecutive_nonfinite"),
    ("training.debug_sleep_after_save", -1.0, "debug_sleep_after_save"),
    ("model.dtype", "float16", "bfloat16"),
    ("model.attn_resolutions", (3,), "attn_resolutions"),
    ("data.image_size", 9, "divisible"),
    ("sampling.guidance_scale", 3.0, r"needs a guide: set sampling\.guide"),
    ("training.ema_warmup", "warm", r"use one of \('ramp', 'debias', 'none'\)"),
    ("diffusion.zero_terminal_snr", True, r"prediction=v"),
    ("sampling.sigma_max", 0.0, "sigma_max must be a finite number > 0"),
    ("sampling.rho", -1.0, "rho must be a finite number > 0"),
    ("sampling.gaussian_start_t", 1000, r"gaussian_start_t must be an integer in \[0, 999\]"),
    ("sampling.gaussian_start_t", 10, "num_steps=20 exceeds the 11 timesteps"),
    ("parallel.fsdp", 0, r"parallel\.fsdp=0 does not divide the 1 devices"),
    ("parallel.fsdp_min_size", -1, r"parallel\.fsdp_min_size=-1; use an integer >= 0"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_bad_config_value_is_refused_with_a_message_naming_the_fix(key, value, message):
    config = digits.get_config()
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, num_devices=1)


def test_a_training_batch_that_does_not_divide_over_the_devices_is_refused_naming_key_and_fix():
    config = digits.get_config()
    config.training.batch_size = 12
    message = r"training\.batch_size=12 does not divide over 8 devices; .*multiple of 8"
    with pytest.raises(ConfigError, match=message):
        validate_config(config, num_devices=8)
    config.training.batch_size = 16
    validate_config(config, num_devices=8)


def test_an_fsdp_size_that_does_not_divide_the_devices_is_refused_naming_the_fix():
    config = digits.get_config()
    config.parallel.fsdp = 3
    message = r"parallel\.fsdp=3 does not divide the 8 devices; use a divisor of 8"
    with pytest.raises(ConfigError, match=message):
        validate_config(config, num_devices=8)
    config.parallel.fsdp = 4  # the other 2 form the 'data' axis
    validate_config(config, num_devices=8)


def test_imagenet64_adm_config_builds_a_472m_parameter_model_sharded_over_8_devices():
    config = imagenet64_adm.get_config()
    model = train_state.create_model(config.model, num_classes=1000)
    assert count_params(model, (64, 64, 3)) == 471_875_078
    validate_config(config, num_devices=64)
    with pytest.raises(ConfigError, match=r"parallel\.fsdp=8 does not divide the 4 devices"):
        validate_config(config, num_devices=4)


@pytest.mark.parametrize("batch_size", [4, 500])
def test_a_sampling_batch_that_does_not_divide_over_the_devices_is_accepted(batch_size):
    # The README's 8-device example: samples do not depend on the batch size, so it is rounded
    # to a multiple of the device count where it is used (generate.device_batch_size).
    config = digits.get_config()
    config.sampling.batch_size = batch_size
    validate_config(config, num_devices=8)
    config.sampling.batch_size = 0
    with pytest.raises(ConfigError, match=r"sampling\.batch_size=0; use 1 or more"):
        validate_config(config, num_devices=8)


def test_ddim_eta_too_large_for_the_schedule_is_refused_before_compiling():
    config = digits.get_config()
    config.sampling.sampler = "ddim"
    config.sampling.eta = 3.0
    with pytest.raises(ConfigError, match="use eta <="):
        validate_config(config, num_devices=1)


def test_guidance_without_label_dropout_is_refused():
    config = digits.get_config()
    config.model.class_conditional = True
    config.diffusion.label_dropout = 0.0
    config.sampling.guidance_scale = 3.0
    with pytest.raises(ConfigError, match="label_dropout > 0"):
        validate_config(config, num_devices=1)


@pytest.mark.parametrize(
    "conditional, label, num_classes, message",
    [
        (True, 0, None, "needs a labelled dataset"),
        (False, 3, 10, "needs a class-conditional model"),
        (True, 10, 10, "is not a class of"),
    ],
)
def test_dataset_dependent_values_are_refused(conditional, label, num_classes, message):
    config = digits.get_config()
    config.model.class_conditional = conditional
    config.sampling.label = label
    with pytest.raises(ConfigError, match=message):
        validate_against_dataset(config, num_classes)


def test_keys_added_to_the_configs_since_a_run_was_saved_are_not_config_changes():
    config = digits.get_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["model"]["dtype"]  # a run saved before model.dtype existed
    assert locked_key_changes(saved, config) == []
    saved["model"]["ch"] = 64
    assert locked_key_changes(saved, config) == [("model.ch", 64, 32)]


def test_turning_remat_on_or_off_is_not_a_config_change_on_resume():
    config = digits.get_config()
    saved = json.loads(config.to_json_best_effort())
    config.model.remat = True  # same parameters, computed with rematerialisation
    assert locked_key_changes(saved, config) == []
