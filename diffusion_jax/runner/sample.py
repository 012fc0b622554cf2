"""`--mode=sample`: write a fixed-seed sample set of a trained run.

    sample(config, workdir) -> <workdir>/samples/<name>.npz

`<name>.npz` holds uint8 (N, H, W, C) under 'images' (and int32 'labels' (N,) for a
class-conditional model), `<name>.png` a grid of the first 100 and `<name>.json` the checkpoint
step and the sampling settings. Sample i depends only on (sampling.seed, i), not on the batch
size or the device count.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpointing, samplers
from diffusion_jax.runner import ema_snapshots, generate, validation
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.setup import ModelSetup

VALIDATORS = (*validation.MODEL_VALIDATORS, validation.check_sampling)


def sample(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> str:
    """Write `<workdir>/samples/<name>.npz` and `.png` from the latest checkpoint's EMA params
    (or the post-hoc EMA that `sampling.params` names), guided by `sampling.guide` if set.

    Refuses (`ConfigError`) a config whose model, data or diffusion keys differ from the run's
    saved `config.json` (sampling a v-prediction model as eps would give wrong images silently)
    unless `allow_config_change`. Returns the path of the .npz file.
    """
    scfg = config.sampling
    validation.validate(config, jax.device_count(), VALIDATORS)
    spec = samplers.SamplerSpec.from_config(config)  # this mode's one spec, checked above
    name = generate.sample_name(config, spec)
    checkpointing.require_checkpoint(workdir)
    validation.check_saved_config(config, workdir, allow_config_change)
    ema_snapshots.require_params(workdir, config.sampling.get("params", "ema"))
    guide_lib.check(config, workdir)
    stem = workdir_lib.contained_path(workdir, "samples", name)
    for suffix in (".npz", ".png", ".json"):
        workdir_lib.contained_path(workdir, "samples", name + suffix)
    validation.check_workdir_writable(workdir, "samples")
    setup = ModelSetup(config)
    state = setup.restore(workdir)
    params, step = setup.sampling_params(state, workdir)
    guide = guide_lib.load(setup, workdir)
    labels_fn = setup.labels_fn()
    batch_size = generate.device_batch_size(scfg.batch_size, setup.mesh.size, scfg.num_samples)
    batches = generate.generate_batches(
        setup.sample_fn(
            batch_size, spec.replace(num_classes=setup.num_classes), workdir, guide=guide
        ),
        params,
        seed=scfg.seed,
        num_samples=scfg.num_samples,
        batch_size=batch_size,
        labels_fn=labels_fn,
    )
    started = time.perf_counter()
    samples = np.concatenate(list(batches))
    logging.info(
        "Sampled %d images (%s, %d steps) in %.1f s",
        len(samples),
        scfg.sampler,
        scfg.num_steps,
        time.perf_counter() - started,
    )
    if workdir_lib.is_chief():
        arrays = {"images": samples}
        if labels_fn is not None:
            arrays["labels"] = labels_fn(np.arange(len(samples)))
        workdir_lib.atomic_savez(stem + ".npz", **arrays)
        workdir_lib.write_grid(stem + ".png", samples[: min(len(samples), 100)])
        record = {"step": step, "sampling": scfg.to_dict()}
        if guide is not None:
            record["guide_step"] = guide.step
        workdir_lib.atomic_write_json(stem + ".json", record)
    return stem + ".npz"
