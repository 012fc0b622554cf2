"""`--mode=sdedit` and `--mode=inpaint`: edit real images with a trained run.

    sdedit_mode(config, workdir)     workdir/edits/sdedit_<...>.{png,npz}
    inpaint_mode(config, workdir)    workdir/edits/inpaint_<...>.{png,npz}

Each loads the run's latest checkpoint (EMA parameters), takes the first `edit.num_images`
images of `edit.split`, draws all noise from `edit.seed` and uses `config.sampling` (through
`samplers.SamplerSpec`) for the sampler options; each returns the paths it wrote (process 0
writes; every process computes). `check_edit` checks the `edit` section, which this module
owns, before anything is loaded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import checkpointing, editing, images, samplers
from diffusion_jax.data import pipeline
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import generate, loading, validation
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.values import is_int, is_real


def strengths(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """`edit.strength` as a tuple: a number, or a sequence of numbers (one grid row each)."""
    value = config.edit.strength
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def check_edit(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raise `ConfigError` (one line naming the fix) for an `edit` value that cannot work."""
    e = config.edit
    values = strengths(config)
    bad_strengths = [s for s in values if not is_real(s) or not 0.0 <= s <= 1.0]
    jump_length = e.get("jump_length", 1)
    checks: list[tuple[bool, str]] = [
        (
            isinstance(e.split, str) and bool(e.split),
            f"edit.split={e.split!r}; name a split of the dataset, e.g. 'test'",
        ),
        (
            is_int(e.num_images) and e.num_images >= 1,
            f"edit.num_images={e.num_images!r}; use 1 or more",
        ),
        (
            bool(values) and not bad_strengths,
            f"edit.strength={e.strength!r}; use numbers in [0, 1] (0 = input unchanged)",
        ),
        (
            e.mask in editing.MASKS,
            f"edit.mask={e.mask!r}; use one of {editing.MASKS}",
        ),
        (
            is_int(e.resample_steps) and e.resample_steps >= 1,
            f"edit.resample_steps={e.resample_steps!r}; use 1 or more (1 = no resampling)",
        ),
        (
            is_int(jump_length) and jump_length >= 1,
            f"edit.jump_length={jump_length!r}; use 1 or more",
        ),
        (is_int(e.seed) and e.seed >= 0, f"edit.seed={e.seed!r}; use an integer >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if guide_lib.of_config(config) is not None:
        raise ConfigError(
            "sampling.guide (autoguidance) is for --mode=sample|eval and Run.sample; the editing "
            "and visualize modes guide by the unconditional model only: set sampling.guide=''"
        )


# The config sections the editing and visualisation modes use.
VALIDATORS = (*validation.MODEL_VALIDATORS, validation.check_sampling, check_edit)


def load_for_edit(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool, out_dir: str
) -> loading.Run:
    """The run in `workdir`, after checking `config`, comparing it with the saved one, checking
    that `<workdir>/<out_dir>` takes files and that `edit.split` is a split of the dataset."""
    validation.validate(config, jax.device_count(), VALIDATORS)
    checkpointing.require_checkpoint(workdir)
    validation.check_saved_config(config, workdir, allow_config_change)
    workdir_lib.contained_path(workdir, out_dir)
    validation.check_workdir_writable(workdir, out_dir)
    run = loading.load_run(workdir, config=config)
    validation.check_splits(config, run.setup.info.num_examples, ["edit.split"])
    return run


def source_images(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """float32 (B, H, W, C) in [-1, 1] and int32 labels (B,): the first edit.num_images images
    of edit.split."""
    num = config.edit.num_images
    uint8, labels = pipeline.eval_images(config.data, config.edit.split, max_examples=num)
    if len(uint8) < num:
        raise ConfigError(
            f"edit.num_images={num} but split {config.edit.split!r} has {len(uint8)} images; "
            f"lower edit.num_images"
        )
    return uint8.astype(np.float32) / 127.5 - 1.0, np.asarray(labels, np.int32)


def _save_npz(path: str, **arrays: Any) -> None:
    if workdir_lib.is_chief():
        workdir_lib.atomic_savez(path, **arrays)


def _save_grid(path: str, tiles: np.ndarray, ncols: int) -> None:
    if workdir_lib.is_chief():
        workdir_lib.write_grid(path, tiles, ncols=ncols)


def _sdedit_fn(run: loading.Run, strength: float, spec: samplers.SamplerSpec) -> Any:
    """Jitted `fn(params, x0 (B, H, W, C), rng, labels (B,) | None) -> (B, H, W, C)`."""

    @jax.jit
    def edit(params: Any, x: jax.Array, rng: jax.Array, labels: Any) -> jax.Array:
        model_fn = run.setup.model_fn(params)
        return editing.sdedit(
            model_fn, run.formulation, x, rng, strength=strength, spec=spec, labels=labels
        )

    return edit


def sdedit_mode(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> list[str]:
    """SDEdit the first edit.num_images images of edit.split at each edit.strength.

    Writes edits/sdedit_<sampler><steps>_strength<s1>-<s2>..._seed<seed>.png (first row the
    inputs, then one row per strength) and .npz (inputs uint8 (B, H, W, C), outputs uint8
    (S, B, H, W, C), strengths (S,), labels (B,)). Class-conditional models get the images'
    labels. Returns [png, npz].
    """
    run = load_for_edit(config, workdir, allow_config_change, "edits")
    x0, labels = source_images(config)
    spec = run.sampler_spec()
    cond_labels = None if run.num_classes is None else jnp.asarray(labels)
    rng = jax.random.PRNGKey(config.edit.seed)
    outputs = []
    for strength in strengths(config):
        edit = _sdedit_fn(run, strength, spec)
        result = np.asarray(edit(run.params, x0, rng, cond_labels))
        outputs.append(images.to_uint8(generate.check_finite(result)))
    inputs = images.to_uint8(x0)
    name = "_".join(
        [
            "sdedit",
            spec.tag,
            "strength" + "-".join(f"{s:g}" for s in strengths(config)),
            f"seed{config.edit.seed}",
        ]
    )
    png = workdir_lib.contained_path(workdir, "edits", name + ".png")
    npz = workdir_lib.contained_path(workdir, "edits", name + ".npz")
    _save_grid(png, np.concatenate([inputs, *outputs]), ncols=len(inputs))
    _save_npz(
        npz,
        inputs=inputs,
        outputs=np.stack(outputs),
        strengths=np.asarray(strengths(config), np.float32),
        labels=labels,
    )
    return [png, npz]


def inpaint_mode(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> list[str]:
    """RePaint-inpaint the edit.mask region of the first edit.num_images images of edit.split.

    The chain has sampling.num_steps levels (ancestral, with sampling.variance, clip_x0,
    temperature, the grid of timestep_spacing and guidance_scale; sampling.sampler is not
    used) and
    edit.resample_steps resamplings with jumps of edit.jump_length (default 1).
    Writes edits/inpaint_<mask>_<steps>steps_U<resample>_seed<seed>.png (rows: inputs, inputs
    with the region grey, results) and .npz (inputs, masked, outputs uint8 (B, H, W, C),
    keep_mask bool (H, W, 1), labels (B,)). Returns [png, npz].
    """
    run = load_for_edit(config, workdir, allow_config_change, "edits")
    x0, labels = source_images(config)
    spec = run.sampler_spec()
    e = config.edit
    keep = editing.known_mask(e.mask, x0.shape[1], x0.shape[2])
    cond_labels = None if run.num_classes is None else jnp.asarray(labels)
    # The ancestral sampler on the configured grid: an unset spacing means ddpm's default.
    spec = spec.choose(sampler="ddpm", variance=config.sampling.variance)

    @jax.jit
    def edit(params: Any, x: jax.Array, rng: jax.Array, labels: Any) -> jax.Array:
        return editing.inpaint(
            run.setup.model_fn(params),
            run.formulation,
            x,
            jnp.broadcast_to(jnp.asarray(keep), (x.shape[0], *keep.shape)),
            rng,
            resample_steps=e.resample_steps,
            jump_length=e.get("jump_length", 1),
            labels=labels,
            spec=spec,
        )

    result = edit(run.params, x0, jax.random.PRNGKey(e.seed), cond_labels)
    inputs = images.to_uint8(x0)
    outputs = images.to_uint8(generate.check_finite(np.asarray(result)))
    masked = images.to_uint8(np.where(keep, x0, 0.0))  # the regenerated region in mid-grey
    name = f"inpaint_{e.mask}_{spec.num_steps}steps_U{e.resample_steps}_seed{e.seed}"
    png = workdir_lib.contained_path(workdir, "edits", name + ".png")
    npz = workdir_lib.contained_path(workdir, "edits", name + ".npz")
    _save_grid(png, np.concatenate([inputs, masked, outputs]), ncols=len(inputs))
    _save_npz(npz, inputs=inputs, masked=masked, outputs=outputs, keep_mask=keep, labels=labels)
    return [png, npz]
