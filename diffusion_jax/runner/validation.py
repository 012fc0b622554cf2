"""Config checks, composed per mode; each problem is one line naming the key and the fix.

Each config section is checked by the code that owns it: the U-Net by `models.unet`, the
schedule by `schedules`, the sampler options by `samplers.SamplerSpec`, `eval.*` by
`runner.evaluate`, `edit.*` by `runner.edit`. This module holds the checks of the sections the
runner itself owns (`data`, `training`, `parallel`, the device split) and `validate`, which a
mode calls with the validators of the sections it uses, before loading data or compiling
anything.
Unknown keys and wrong types are already refused by ml_collections when a `--config.x.y=`
override is parsed, since config files return locked, typed ConfigDicts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections
from absl import logging

from diffusion_jax import diffusion, posthoc_ema, samplers, schedules, train_state
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.unet import validate_unet_config
from diffusion_jax.runner import ema_snapshots, xla_options
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.values import is_int, is_real

# `validator(config, num_devices)` raises ConfigError for the first bad value of its section.
Validator = Callable[[ml_collections.ConfigDict, int], None]


def validate(
    config: ml_collections.ConfigDict, num_devices: int, validators: Iterable[Validator]
) -> None:
    """Run `validators` in order; the first problem raises `ConfigError`."""
    for validator in validators:
        validator(config, num_devices)


def check_data(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`data.*` values that need no dataset: a data dir that is not a file, split names,
    reader threads. (Whether the splits exist is checked against the dataset, `check_splits`.)"""
    d = config.data
    data_dir = d.get("data_dir", "")
    if data_dir and os.path.exists(os.path.expanduser(data_dir)):
        if not os.path.isdir(os.path.expanduser(data_dir)):
            raise ConfigError(
                f"data.data_dir={data_dir!r} is a file; pass the TFDS data directory (or '' for "
                "$TFDS_DATA_DIR, else ~/tensorflow_datasets)"
            )
    for key in ("train_split", "eval_split"):
        value = d.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"data.{key}={value!r}; name a split of the dataset, e.g. 'train'")
    threads = d.get("num_read_threads", 0)
    if not is_int(threads) or threads < 0:
        raise ConfigError(
            f"data.num_read_threads={threads!r}; use 0 (read in the training thread) or more"
        )


def check_splits(
    config: ml_collections.ConfigDict, available: Iterable[str], keys: Iterable[str]
) -> None:
    """Raise `ConfigError` when a split named by one of the dotted config `keys` (e.g.
    'edit.split') is not among the dataset's `available` splits. Slices ('train[:50%]') and
    sums ('train+test') are checked by the names of their splits."""
    available = sorted(available)
    for key in keys:
        section, leaf = key.split(".")
        value = config[section][leaf]
        names = [part.split("[", 1)[0].strip() for part in str(value).split("+")]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ConfigError(
                f"{key}={value!r}: {config.data.name!r} has no split {unknown[0]!r}; use one of "
                f"{available} (slices like 'train[:50%]' work too)"
            )


def check_model(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`model.*` and `data.image_size`: the U-Net must be buildable."""
    m = config.model
    _check_all(
        [
            (config.data.image_size >= 1, "data.image_size must be a positive integer"),
            (
                m.dtype in ("float32", "bfloat16"),
                f"model.dtype={m.dtype!r}; use 'float32' or 'bfloat16'",
            ),
            (0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout}; use a value in [0, 1)"),
            (m.num_res_blocks >= 1, f"model.num_res_blocks={m.num_res_blocks}; use 1 or more"),
        ]
    )
    _reraise(
        lambda: validate_unet_config(
            image_size=config.data.image_size,
            ch=m.ch,
            ch_mult=tuple(m.ch_mult),
            attn_resolutions=tuple(m.attn_resolutions),
            num_res_blocks=m.num_res_blocks,
            dropout=m.dropout,
        )
    )


def check_diffusion(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`diffusion.*`: schedule, prediction and loss."""
    d = config.diffusion
    _check_all(
        [
            (
                d.prediction in diffusion.PREDICTIONS,
                f"diffusion.prediction={d.prediction!r}; use one of {diffusion.PREDICTIONS}",
            ),
            (
                d.loss_weighting in diffusion.LOSS_WEIGHTINGS,
                f"diffusion.loss_weighting={d.loss_weighting!r}; use one of "
                f"{diffusion.LOSS_WEIGHTINGS}",
            ),
            (
                d.min_snr_gamma > 0,
                f"diffusion.min_snr_gamma={d.min_snr_gamma}; use a positive value",
            ),
            (
                0.0 <= d.label_dropout < 1.0,
                f"diffusion.label_dropout={d.label_dropout}; use [0, 1)",
            ),
            (
                d.get("vlb_weight", 0.0) >= 0,
                f"diffusion.vlb_weight={d.get('vlb_weight')}; use >= 0 (0 = L_simple only)",
            ),
            (d.num_timesteps >= 1, f"diffusion.num_timesteps={d.num_timesteps}; use 1 or more"),
        ]
    )
    _reraise(lambda: schedules.from_config(d))
    formulation_lib.check(config)
    if d.get("zero_terminal_snr", False) and d.prediction == "eps":
        raise ConfigError(
            "diffusion.zero_terminal_snr=True makes the last timestep pure noise, where an eps "
            "model cannot tell x0; use --config.diffusion.prediction=v (Lin et al.) or x0"
        )


def check_training(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`training.*`: optimizer, EMA, logging and checkpoint cadence, the global batch."""
    t = config.training
    _check_all(
        [
            (t.num_train_steps >= 0, f"training.num_train_steps={t.num_train_steps}; use >= 0"),
            (
                _finite(t.learning_rate) and t.learning_rate > 0,
                f"training.learning_rate={t.learning_rate}; use a finite, positive rate",
            ),
            (
                is_int(t.warmup_steps) and t.warmup_steps >= 0,
                f"training.warmup_steps={t.warmup_steps!r}; use an integer >= 0",
            ),
            (
                _finite(t.grad_clip) and t.grad_clip >= 0,
                f"training.grad_clip={t.grad_clip}; use a finite value >= 0 (0 disables clipping)",
            ),
            (
                _finite(t.weight_decay) and t.weight_decay >= 0,
                f"training.weight_decay={t.weight_decay}; use a finite value >= 0",
            ),
            (
                _finite(t.adam_b1) and 0.0 <= t.adam_b1 < 1.0,
                f"training.adam_b1={t.adam_b1}; use a value in [0, 1), e.g. 0.9",
            ),
            (
                _finite(t.adam_b2) and 0.0 <= t.adam_b2 < 1.0,
                f"training.adam_b2={t.adam_b2}; use a value in [0, 1), e.g. 0.999",
            ),
            (
                _finite(t.ema_decay) and 0.0 <= t.ema_decay < 1.0,
                f"training.ema_decay={t.ema_decay}; use a value in [0, 1)",
            ),
            (t.log_every >= 1, f"training.log_every={t.log_every}; use 1 or more"),
            (
                t.checkpoint_every >= 1,
                f"training.checkpoint_every={t.checkpoint_every}; use 1 or more",
            ),
            (
                t.max_checkpoints_to_keep >= 1,
                f"training.max_checkpoints_to_keep={t.max_checkpoints_to_keep}; use 1 or more",
            ),
            (
                t.sample_every >= 0,
                f"training.sample_every={t.sample_every}; use >= 0 (0 = at the end)",
            ),
            (
                t.num_grid_samples >= 1,
                f"training.num_grid_samples={t.num_grid_samples}; use >= 1",
            ),
            (
                t.max_consecutive_nonfinite >= 1,
                f"training.max_consecutive_nonfinite={t.max_consecutive_nonfinite}; use 1 or more",
            ),
            (
                t.debug_sleep_after_save >= 0,
                f"training.debug_sleep_after_save={t.debug_sleep_after_save}; use >= 0",
            ),
        ]
    )
    _check_divides("training.batch_size", t.batch_size, num_devices)
    every = t.get("posthoc_ema_every", 0)
    if not is_int(every) or every < 0:
        raise ConfigError(
            f"training.posthoc_ema_every={every!r}; use an integer >= 0 (0 = no post-hoc EMA)"
        )
    if every:
        sigma_rels = tuple(t.posthoc_ema_sigma_rels)
        if not sigma_rels:
            raise ConfigError(
                "training.posthoc_ema_sigma_rels is empty; track at least one EMA, e.g. "
                "(0.05, 0.10), or set training.posthoc_ema_every=0"
            )
        for sigma_rel in sigma_rels:
            _reraise_as("training.posthoc_ema_sigma_rels", sigma_rel)
    if t.ema_warmup not in train_state.EMA_WARMUPS:
        raise ConfigError(
            f"training.ema_warmup={t.ema_warmup!r}; use one of {train_state.EMA_WARMUPS}"
        )


def _reraise_as(key: str, sigma_rel: Any) -> None:
    try:
        posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    except (ConfigError, TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None


def check_posthoc_ema(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`posthoc_ema.*` (--mode=posthoc_ema): the relative length to reconstruct."""
    _reraise_as("posthoc_ema.sigma_rel", config.posthoc_ema.sigma_rel)


def check_sampling(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`sampling.*`: the sampler options (`samplers.SamplerSpec`), counts, guidance."""
    s, m, d = config.sampling, config.model, config.diffusion
    _check_all(
        [
            (s.num_samples >= 1, f"sampling.num_samples={s.num_samples}; use 1 or more"),
            (s.guidance_scale >= 0, f"sampling.guidance_scale={s.guidance_scale}; use >= 0"),
        ]
    )
    autoguided = guide_lib.parse(s.get("guide", "")) is not None
    if s.guidance_scale != 1.0 and not autoguided:
        if m.class_conditional and d.label_dropout == 0:
            raise ConfigError(
                "sampling.guidance_scale needs an unconditional model too: train with "
                "diffusion.label_dropout > 0 (e.g. 0.1), set sampling.guide (autoguidance), "
                "or leave guidance_scale=1.0"
            )
        if not m.class_conditional:
            raise ConfigError(
                "sampling.guidance_scale on an unconditional model needs a guide: set "
                "sampling.guide (autoguidance, e.g. 'step:1000'; docs/guidance.md), or leave "
                "guidance_scale=1.0"
            )
    formulation = formulation_lib.from_config(config)
    _reraise(lambda: samplers.check_options(s, formulation))
    _reraise(lambda: samplers.SamplerSpec.from_config(config).validate(formulation))
    if not is_int(s.batch_size) or s.batch_size < 1:
        raise ConfigError(
            f"sampling.batch_size={s.batch_size!r}; use 1 or more (it is rounded to a multiple "
            "of the device count)"
        )
    if s.get("name"):
        workdir_lib.output_name(s.name, "sampling.name")
    ema_snapshots.parse_params(s.get("params", "ema"))


def check_parallel(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`parallel.*`: an fsdp size that divides the devices (the rest form the 'data' axis).
    A config saved before the section existed means fsdp=1."""
    section = config.get("parallel") or {}
    fsdp, min_size = section.get("fsdp", 1), section.get("fsdp_min_size", 0)
    if not is_int(fsdp) or fsdp < 1 or num_devices % fsdp:
        raise ConfigError(
            f"parallel.fsdp={fsdp!r} does not divide the {num_devices} devices; use a divisor "
            f"of {num_devices} (1 = no parameter sharding)"
        )
    if not is_int(min_size) or min_size < 0:
        raise ConfigError(f"parallel.fsdp_min_size={min_size!r}; use an integer >= 0")


def check_xla(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`xla.cpu_ynnpack_ops`: op kinds XLA:CPU knows how to hand to YNNPACK."""
    xla_options.ynnpack_ops(config)


# The sections every mode that builds the model checks (the mesh included).
MODEL_VALIDATORS: tuple[Validator, ...] = (
    check_data,
    check_model,
    check_diffusion,
    check_parallel,
    check_xla,
)
# The sections a training run uses (the sampling section draws the training grids).
TRAINING_VALIDATORS: tuple[Validator, ...] = (*MODEL_VALIDATORS, check_training, check_sampling)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """The checks of a training run (`TRAINING_VALIDATORS`); other modes compose their own."""
    validate(config, num_devices, TRAINING_VALIDATORS)


def validate_against_dataset(config: ml_collections.ConfigDict, num_classes: int | None) -> None:
    """The checks that need the dataset's description (after it is found, before compiling)."""
    if config.model.class_conditional and not num_classes:
        raise ConfigError(
            f"model.class_conditional=True needs a labelled dataset; {config.data.name!r} has no "
            "labels: set model.class_conditional=False"
        )
    label = config.sampling.label
    if label >= 0 and not config.model.class_conditional:
        raise ConfigError(
            f"sampling.label={label} needs a class-conditional model; leave sampling.label=-1 "
            "or train with model.class_conditional=True"
        )
    if config.model.class_conditional and not -1 <= label < (num_classes or 0):
        raise ConfigError(
            f"sampling.label={label} is not a class of {config.data.name!r}; use -1 (all "
            f"classes in turn) or 0..{(num_classes or 0) - 1}"
        )


# Keys that fix the shapes of the saved state or the meaning of its parameters: resuming a run
# with any of them changed would fail to restore, or silently train a different model.
RESUME_LOCKED_KEYS = (
    "model",
    "data.name",
    "data.image_size",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.zero_terminal_snr",
    "diffusion.prediction",
    "diffusion.formulation",
    "diffusion.sigma_data",
)
# Keys that also fix the shapes of the saved state, but only training restores it whole: the
# tracked post-hoc EMAs (the other modes restore them as the run saved them,
# `setup.ModelSetup.restore`, and ignore them).
TRAINING_LOCKED_KEYS = ("training.posthoc_ema_every", "training.posthoc_ema_sigma_rels")
# How the same parameters are computed, not what they are: free to change on resume.
RESUME_FREE_KEYS = ("model.remat",)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def locked_key_changes(
    saved: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    keys: tuple[str, ...] = RESUME_LOCKED_KEYS,
) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each `keys` entry (default `RESUME_LOCKED_KEYS`)
    that differs.

    saved: a run's `config.json` as loaded by `json`; `config` is compared in the same JSON form
    (tuples as lists), so an unchanged value never counts as a change.
    """
    old = _flatten(saved)
    new = _flatten(json.loads(config.to_json_best_effort()))
    changes = []
    # Keys in only one of the two (added to the configs since the run was saved) are not
    # changes: refusing them would lock every existing workdir out after a new key is added.
    for key in sorted(set(old) & set(new)):
        locked = any(key == k or key.startswith(k + ".") for k in keys)
        if locked and key not in RESUME_FREE_KEYS:
            if old[key] != new[key]:
                changes.append((key, old[key], new[key]))
    return changes


def check_resume_compatible(
    saved: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    *,
    workdir: str,
    keys: tuple[str, ...] = RESUME_LOCKED_KEYS,
) -> None:
    """Raise `ConfigError` naming the keys (and the override flag) when `config` changes a
    `keys` value (default `RESUME_LOCKED_KEYS`) of the run saved in `workdir`."""
    changes = locked_key_changes(saved, config, keys)
    if changes:
        diff = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
        raise ConfigError(
            f"--workdir={workdir} holds checkpoints of a run with a different config ({diff}); "
            "use a new --workdir, or pass --allow_config_change to use the new config anyway"
        )


def check_workdir_writable(workdir: str, subdir: str = "") -> None:
    """Raise `ConfigError` unless `workdir` exists (or can be created: this creates it) and
    accepts a file; with `subdir` (where a mode writes its outputs), unless that directory, or
    the nearest of its parents that exists, accepts a file (nothing is created then).
    Checked before anything is computed. On an object store (gs://...), which has no
    directories, a probe object is written under `<workdir>/<subdir>/` and deleted."""
    if not workdir_lib.is_local(workdir):
        _check_url_writable(workdir, subdir)
        return
    directory = workdir
    try:
        if subdir:
            directory = os.path.join(workdir, subdir)
            while not os.path.exists(directory) and os.path.dirname(directory) != directory:
                directory = os.path.dirname(directory) or "."
            if not os.path.isdir(directory):
                raise NotADirectoryError(0, f"{directory} is a file")
        else:
            os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        where = f"--workdir={workdir}" + (f" ({subdir}/ in it)" if subdir else "")
        raise ConfigError(
            f"{where} is not writable ({reason}); choose a directory you can write to"
        ) from None


def _check_url_writable(workdir: str, subdir: str) -> None:
    probe = workdir_lib.join(workdir, *([subdir] if subdir else []), f".write_check{os.getpid()}")
    try:
        workdir_lib.atomic_write_bytes(probe, b"")
        workdir_lib.remove_file(probe)
    except Exception as error:  # the stores' clients raise their own types (auth, HTTP, ...)
        where = f"--workdir={workdir}" + (f" ({subdir}/ in it)" if subdir else "")
        reason = (str(error).splitlines() or [""])[0]
        raise ConfigError(
            f"{where} is not writable ({type(error).__name__}: {reason}); "
            "check the credentials and the bucket name, or choose a directory you can write to"
        ) from None


def _check_divides(key: str, value: int, num_devices: int) -> None:
    if value < 1 or value % num_devices:
        raise ConfigError(
            f"{key}={value} does not divide over {num_devices} devices; "
            f"use a positive multiple of {num_devices}"
        )


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN."""
    return is_real(value) and math.isfinite(value)


def _check_all(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _reraise(check: Callable[[], Any]) -> None:
    try:
        check()
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_saved_config(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool,
    *,
    keys: tuple[str, ...] = RESUME_LOCKED_KEYS,
) -> None:
    """Refuse (`ConfigError`) a config that changes a `RESUME_LOCKED_KEYS` value of the run
    saved in `workdir` (training it on, or sampling a v-prediction model as eps, would go
    wrong silently); with `allow_config_change`, warn about the changes instead. The run's
    config is the one saved inside its newest checkpoint, else (checkpoints written before
    that) `config.json`. A workdir without checkpoints has nothing to compare; an unreadable
    config.json is warned about. Training passes `keys=(*RESUME_LOCKED_KEYS,
    *TRAINING_LOCKED_KEYS)`."""
    if not workdir_lib.finished_steps(workdir):
        return
    saved = workdir_lib.checkpoint_config(workdir) or workdir_lib.read_config_json(workdir)
    if saved is None:
        if workdir_lib.exists(workdir_lib.join(workdir, workdir_lib.CONFIG_FILE)):
            logging.warning("Cannot read %s/config.json; not comparing configs.", workdir)
        return
    if not allow_config_change:
        check_resume_compatible(saved, config, workdir=workdir, keys=keys)
    elif changes := locked_key_changes(saved, config, keys):
        logging.warning(
            "Using a changed config (--allow_config_change): %s",
            ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes),
        )


def saved_posthoc_every(saved: Mapping[str, Any]) -> int:
    """`training.posthoc_ema_every` of a saved run config (JSON); 0 for runs saved before the
    key existed, which track no post-hoc EMA."""
    training = saved.get("training")
    return int(training.get("posthoc_ema_every", 0)) if isinstance(training, Mapping) else 0


def check_posthoc_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse (`ConfigError`) to turn post-hoc EMA on when resuming a run trained without it:
    the reconstruction needs the tracked EMAs from step 0 (and its checkpoints lack them)."""
    if not workdir_lib.finished_steps(workdir) or not config.training.get("posthoc_ema_every"):
        return
    saved = workdir_lib.checkpoint_config(workdir) or workdir_lib.read_config_json(workdir)
    if saved is not None and saved_posthoc_every(saved) == 0:
        raise ConfigError(
            f"--workdir={workdir} holds a run trained without post-hoc EMA; it must track its "
            "EMAs from step 0: leave training.posthoc_ema_every=0, or use a new --workdir"
        )
