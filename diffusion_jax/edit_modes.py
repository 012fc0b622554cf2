"""The editing and visualisation modes of the runner, as library functions.

    sdedit_mode(config, workdir)     workdir/edits/sdedit_<...>.{png,npz}
    inpaint_mode(config, workdir)    workdir/edits/inpaint_<...>.{png,npz}
    visualize_mode(config, workdir)  workdir/visualize/forward_strip.png, reverse_<...>.{png,gif}

Each loads the run's latest checkpoint (EMA parameters), takes the first `edit.num_images`
images of `edit.split` (sdedit, inpaint and the forward strip), draws all noise from
`edit.seed` and uses `config.sampling` for the sampler options; each returns the paths it
wrote (process 0 writes; every process computes). `validate_edit_config` checks the `edit`
section before anything is loaded.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import editing, images, visualize
from diffusion_jax.config_validation import ConfigError, validate_config

# Columns of the forward strip: this many timesteps evenly spaced over [0, T - 1].
FORWARD_STRIP_COLUMNS = 10
# Columns of the reverse strip: this many evenly spaced model evaluations.
REVERSE_STRIP_COLUMNS = 10


def strengths(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """`edit.strength` as a tuple: a number, or a sequence of numbers (one grid row each)."""
    value = config.edit.strength
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_edit_config(config: ml_collections.ConfigDict) -> None:
    """Raise `ConfigError` (one line naming the fix) for an `edit` value that cannot work."""
    e = config.edit
    values = strengths(config)
    bad_strengths = [
        s
        for s in values
        if not isinstance(s, numbers.Real) or isinstance(s, bool) or not 0.0 <= s <= 1.0
    ]
    jump_length = e.get("jump_length", 1)
    checks: list[tuple[bool, str]] = [
        (
            isinstance(e.split, str) and bool(e.split),
            f"edit.split={e.split!r}; name a split of the dataset, e.g. 'test'",
        ),
        (
            _is_int(e.num_images) and e.num_images >= 1,
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
            _is_int(e.resample_steps) and e.resample_steps >= 1,
            f"edit.resample_steps={e.resample_steps!r}; use 1 or more (1 = no resampling)",
        ),
        (
            _is_int(jump_length) and jump_length >= 1,
            f"edit.jump_length={jump_length!r}; use 1 or more",
        ),
        (_is_int(e.seed) and e.seed >= 0, f"edit.seed={e.seed!r}; use an integer >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _load(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> Any:
    """The run in `workdir` (`run.Run`), after checking `config` against its saved one."""
    # Imported here: config_validation imports this module for validate_edit_config, and run /
    # train_loop import config_validation.
    from diffusion_jax import run as run_lib
    from diffusion_jax import train_loop

    validate_config(config, num_devices=jax.device_count())
    validate_edit_config(config)  # also part of validate_config once that calls it
    train_loop.check_saved_config(config, workdir, allow_config_change)
    return run_lib.load_run(workdir, config=config)


def _source_images(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """float32 (B, H, W, C) in [-1, 1] and int32 labels (B,): the first edit.num_images images
    of edit.split."""
    from diffusion_jax.data import pipeline

    num = config.edit.num_images
    uint8, labels = pipeline.eval_images(config.data, config.edit.split, max_examples=num)
    if len(uint8) < num:
        raise ConfigError(
            f"edit.num_images={num} but split {config.edit.split!r} has {len(uint8)} images; "
            f"lower edit.num_images"
        )
    return uint8.astype(np.float32) / 127.5 - 1.0, np.asarray(labels, np.int32)


def _sampler_options(run: Any) -> dict[str, Any]:
    """`samplers.sample` options from the run's config.sampling (and the model's kind)."""
    from diffusion_jax import run as run_lib

    return run_lib.config_sampler_kwargs(run.config, run.num_classes)


def _is_chief() -> bool:
    return jax.process_index() == 0


def _out_dir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    if _is_chief():
        os.makedirs(path, exist_ok=True)
    return path


def _save_npz(path: str, **arrays: Any) -> None:
    if _is_chief():
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def _save_grid(path: str, tiles: np.ndarray, ncols: int) -> None:
    if _is_chief():
        images.save_grid(path, tiles, ncols=ncols)


def _tag(options: dict[str, Any]) -> str:
    return f"{options['sampler'].replace('+', 'p')}{options['num_steps']}"


def _sdedit_fn(run: Any, strength: float, options: dict[str, Any]) -> Any:
    """Jitted `fn(params, x0 (B, H, W, C), rng, labels (B,) | None) -> (B, H, W, C)`."""

    @jax.jit
    def edit(params: Any, x: jax.Array, rng: jax.Array, labels: Any) -> jax.Array:
        model_fn = run.setup.model_fn(params)
        return editing.sdedit(
            model_fn, run.schedule, x, rng, strength=strength, labels=labels, **options
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
    run = _load(config, workdir, allow_config_change)
    x0, labels = _source_images(config)
    options = _sampler_options(run)
    cond_labels = None if run.num_classes is None else jnp.asarray(labels)
    rng = jax.random.PRNGKey(config.edit.seed)
    outputs = []
    for strength in strengths(config):
        edit = _sdedit_fn(run, strength, options)
        outputs.append(images.to_uint8(np.asarray(edit(run.params, x0, rng, cond_labels))))
    inputs = images.to_uint8(x0)
    name = "_".join(
        [
            "sdedit",
            _tag(options),
            "strength" + "-".join(f"{s:g}" for s in strengths(config)),
            f"seed{config.edit.seed}",
        ]
    )
    out_dir = _out_dir(workdir, "edits")
    png, npz = os.path.join(out_dir, name + ".png"), os.path.join(out_dir, name + ".npz")
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

    The chain has sampling.num_steps steps (ancestral, with sampling.variance, clip_x0,
    temperature, timestep_spacing and guidance_scale; sampling.sampler is not used) and
    edit.resample_steps resamplings with jumps of edit.jump_length (default 1).
    Writes edits/inpaint_<mask>_<steps>steps_U<resample>_seed<seed>.png (rows: inputs, inputs
    with the region grey, results) and .npz (inputs, masked, outputs uint8 (B, H, W, C),
    keep_mask bool (H, W, 1), labels (B,)). Returns [png, npz].
    """
    run = _load(config, workdir, allow_config_change)
    x0, labels = _source_images(config)
    options = _sampler_options(run)
    e = config.edit
    keep = editing.known_mask(e.mask, x0.shape[1], x0.shape[2])
    cond_labels = None if run.num_classes is None else jnp.asarray(labels)
    inpaint_options = {
        k: options[k]
        for k in (
            "num_steps",
            "prediction",
            "variance",
            "clip_x0",
            "temperature",
            "timestep_spacing",
            "guidance_scale",
            "num_classes",
        )
    }
    inpaint_options["learn_sigma"] = options.get("learn_sigma", False)

    @jax.jit
    def edit(params: Any, x: jax.Array, rng: jax.Array, labels: Any) -> jax.Array:
        return editing.inpaint(
            run.setup.model_fn(params),
            run.schedule,
            x,
            jnp.broadcast_to(jnp.asarray(keep), (x.shape[0], *keep.shape)),
            rng,
            resample_steps=e.resample_steps,
            jump_length=e.get("jump_length", 1),
            labels=labels,
            **inpaint_options,
        )

    result = edit(run.params, x0, jax.random.PRNGKey(e.seed), cond_labels)
    inputs, outputs = images.to_uint8(x0), images.to_uint8(np.asarray(result))
    masked = images.to_uint8(np.where(keep, x0, 0.0))  # the regenerated region in mid-grey
    name = f"inpaint_{e.mask}_{options['num_steps']}steps_U{e.resample_steps}_seed{e.seed}"
    out_dir = _out_dir(workdir, "edits")
    png, npz = os.path.join(out_dir, name + ".png"), os.path.join(out_dir, name + ".npz")
    _save_grid(png, np.concatenate([inputs, masked, outputs]), ncols=len(inputs))
    _save_npz(npz, inputs=inputs, masked=masked, outputs=outputs, keep_mask=keep, labels=labels)
    return [png, npz]


def visualize_mode(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> list[str]:
    """Pictures of the forward and reverse processes of the run in `workdir`.

    visualize/forward_strip.png: the first edit.num_images images of edit.split noised to
    FORWARD_STRIP_COLUMNS timesteps evenly spaced over [0, T - 1] (one row each).
    visualize/reverse_<sampler><steps>_seed<seed>.png: edit.num_images samples drawn with
    config.sampling, rows x_t / x0 prediction at REVERSE_STRIP_COLUMNS evenly spaced model
    evaluations; .gif: one frame per model evaluation (x_t above, x0 prediction below).
    Class-conditional models sample the labels of `sampling.sample_labels`.
    Returns [forward png, reverse png, reverse gif].
    """
    from diffusion_jax import sampling

    run = _load(config, workdir, allow_config_change)
    x0, _ = _source_images(config)
    options = _sampler_options(run)
    rng = jax.random.PRNGKey(config.edit.seed)
    num_t = run.schedule.num_timesteps
    timesteps = visualize.evenly_spaced(num_t, FORWARD_STRIP_COLUMNS)
    forward = visualize.forward_strip(run.schedule, x0, timesteps, jax.random.fold_in(rng, 1))

    num = config.edit.num_images
    labels = None
    if run.num_classes is not None:
        labels = sampling.sample_labels(np.arange(num), config.sampling, run.num_classes)
    frames = visualize.reverse_frames(
        run.model_fn(), run.schedule, (num, *x0.shape[1:]), rng, labels=labels, **options
    )
    out_dir = _out_dir(workdir, "visualize")
    name = f"reverse_{_tag(options)}_seed{config.edit.seed}"
    paths = [
        os.path.join(out_dir, "forward_strip.png"),
        os.path.join(out_dir, name + ".png"),
        os.path.join(out_dir, name + ".gif"),
    ]
    if _is_chief():
        images.save_png(paths[0], forward, scale=_scale(forward))
        strip = visualize.trajectory_strip(frames, num_columns=REVERSE_STRIP_COLUMNS)
        images.save_png(paths[1], strip, scale=_scale(strip))
        visualize.save_gif(paths[2], visualize.gif_frames(frames))
    return paths


def _scale(image: np.ndarray) -> int:
    """Nearest-neighbour enlargement that brings the longer side to about 512 pixels."""
    return max(1, 512 // max(image.shape[:2]))


MODES: dict[str, Callable[..., list[str]]] = {
    "sdedit": sdedit_mode,
    "inpaint": inpaint_mode,
    "visualize": visualize_mode,
}


def run_mode(
    mode: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
) -> list[str]:
    """Run the edit mode `mode` ('sdedit' | 'inpaint' | 'visualize'); returns written paths."""
    if mode not in MODES:
        raise ValueError(f"unknown edit mode {mode!r}; use one of {tuple(MODES)}")
    return MODES[mode](config, workdir, allow_config_change=allow_config_change)
