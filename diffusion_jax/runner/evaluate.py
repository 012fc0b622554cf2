"""`--mode=eval`: sample a trained run in resumable shards and score the samples.

    evaluate(config, workdir) -> EvalResult

1. Checks everything that can be missing before any compilation: the checkpoint, the feature
   network's weights and the reference statistics (each a one-line error naming the fix).
2. Generates `eval.num_samples` images from the EMA parameters with `config.sampling.*`,
   sample i from fold_in(PRNGKey(sampling.seed), i) (so the set does not depend on batch size,
   device or process count), written as `<workdir>/eval/<name>/shard_NNNNN.npz` of
   `eval.shard_size` images each. Shards are written atomically; a pre-empted eval rerun with
   the same command keeps the finished shards and generates only the rest. A manifest pins the
   checkpoint step and sampling settings (shards from another step or settings are discarded)
   and records each shard's sha256: a shard damaged on disk is generated again. While it runs,
   `<workdir>/eval/<name>.lock` keeps a second eval of the same name out.
3. Scores them against reference statistics of a real split (`experiments.reference_stats`):
   'fd' Frechet distance in the feature network's space (FID with 'inception'; "digits FD"
   with the shipped digits classifier), 'is' Inception Score (10 splits) from its logits,
   'precision_recall' (k-NN manifolds) against `eval.pr_num_samples` real images; plus
   bits/dim on `eval.bpd_num_images` images of `data.eval_split` when > 0. When stats of the
   eval split exist, 'fd_floor' is the FD of those real images: the best a model can score.
4. Writes `<workdir>/eval/<name>.json` and adds `eval/<name>/<metric>` to `metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpointing, likelihood, parallel, samplers
from diffusion_jax.data import pipeline
from diffusion_jax.errors import ConfigError, MissingEvalInputError
from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax.evaluation import reference
from diffusion_jax.evaluation.features import FeatureNetwork
from diffusion_jax.runner import ema_snapshots, generate, validation, workdir_lock
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.setup import ModelSetup

INCEPTION_WEIGHTS_HELP = (
    "download pytorch-fid's pt_inception-2015-12-05-6726825d.pth from "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth, convert it with `python -m "
    "experiments.convert_inception_weights --input=pt_inception-2015-12-05-6726825d.pth "
    "--output=inception_fid.npz` and pass --config.eval.inception_weights=inception_fid.npz"
)


# class_accuracy: the share of a class-conditional model's samples that the digits classifier
# assigns to the class they were sampled for.
METRICS = ("fd", "is", "precision_recall", "class_accuracy")
IS_SPLITS = 10
FEATURE_NETWORKS = ("digits", "inception")


def eval_name(config: ml_collections.ConfigDict) -> str:
    """`eval.name`, else e.g. 'ddim50_eta0.5_g2_seed0_n1000': every setting that changes the
    samples is in the name (the sampler's through `SamplerSpec.name`), so two evals never share
    shards."""
    if config.eval.name:
        return workdir_lib.output_name(str(config.eval.name), "eval.name")
    s = config.sampling
    spec = samplers.SamplerSpec.from_config(config)
    # Every sampler setting from the spec; temperature and clipping after the label, as names
    # have always been composed, so existing evals keep resuming.
    formulation = formulation_lib.from_config(config)
    parts = [spec.replace(temperature=1.0, clip_x0=True).name(formulation)]
    if s.label >= 0:
        parts.append(f"label{s.label}")
    if s.temperature != 1.0:
        parts.append(f"temp{s.temperature:g}")
    if not s.clip_x0:
        parts.append("noclip")
    if (sigma_rel := ema_snapshots.parse_params(s.get("params", "ema"))) is not None:
        parts.append(f"phema{sigma_rel:g}")
    if (source := guide_lib.of_config(config)) is not None:
        parts.append(source.label)
    parts += [f"seed{s.seed}", f"n{config.eval.num_samples}"]
    return "_".join(parts)


def check_eval(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise `ConfigError` for an `eval.*` value that cannot work: allowed values, a feature
    network for the dataset, a plain eval name. (The batch sizes are rounded to multiples of
    the device count where they are used.)"""
    e = config.eval
    unknown = [m for m in e.metrics if m not in METRICS]
    checks: list[tuple[bool, str]] = [
        (not unknown, f"eval.metrics has {unknown}; use any of {METRICS}"),
        (
            e.feature_network in FEATURE_NETWORKS,
            f"eval.feature_network={e.feature_network!r}; use one of {FEATURE_NETWORKS}",
        ),
        (e.num_samples >= 2, f"eval.num_samples={e.num_samples}; use 2 or more"),
        (
            e.num_samples >= IS_SPLITS or "is" not in e.metrics,
            f"eval.num_samples={e.num_samples}: the inception score averages {IS_SPLITS} "
            f"splits; use {IS_SPLITS} or more samples, or drop 'is' from eval.metrics",
        ),
        (e.batch_size >= 1, f"eval.batch_size={e.batch_size}; use 1 or more"),
        (e.shard_size >= 1, f"eval.shard_size={e.shard_size}; use 1 or more"),
        (e.pr_k >= 1, f"eval.pr_k={e.pr_k}; use 1 or more"),
        (
            e.pr_num_samples > e.pr_k or "precision_recall" not in e.metrics,
            f"eval.pr_num_samples={e.pr_num_samples} must exceed eval.pr_k={e.pr_k}",
        ),
        (e.bpd_num_images >= 0, f"eval.bpd_num_images={e.bpd_num_images}; use 0 (off) or more"),
        (e.bpd_batch_size >= 1, f"eval.bpd_batch_size={e.bpd_batch_size}; use 1 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if e.bpd_num_images > 0 and not formulation_lib.from_config(config).has_discrete_vlb:
        raise ConfigError(
            "eval.bpd_num_images > 0 computes the ddpm formulation's discrete-time bits/dim; a "
            f"{formulation_lib.name_of(config)} run's likelihood (probability-flow ODE) is not "
            "implemented: set --config.eval.bpd_num_images=0"
        )
    if e.name:
        workdir_lib.output_name(e.name, "eval.name")
    if "class_accuracy" in e.metrics and not (
        config.model.class_conditional and e.feature_network == "digits"
    ):
        raise ConfigError(
            "eval.metrics 'class_accuracy' scores a class-conditional model's samples with the "
            "digits classifier: it needs model.class_conditional=True and "
            "eval.feature_network='digits'"
        )
    if e.feature_network == "digits" and config.data.name != "digits":
        raise ConfigError(
            f"eval.feature_network='digits' only scores the digits dataset; use 'inception' "
            f"for {config.data.name!r}"
        )


# The config sections the eval mode uses.
VALIDATORS = (*validation.MODEL_VALIDATORS, validation.check_sampling, check_eval)


@dataclasses.dataclass
class EvalResult:
    """What one eval wrote to `<workdir>/eval/<name>.json`."""

    name: str
    step: int
    metrics: dict[str, float]
    path: str
    seconds_per_1000_samples: float | None

    def summary(self) -> str:
        """One line: name, step, metrics and where they were written."""
        scores = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        return f"Eval {self.name} at step {self.step}: {scores} ({self.path})"


def reference_stats_path(config: ml_collections.ConfigDict, split: str | None = None) -> str:
    """`eval.reference_stats`, else the tool's default path for the reference split."""
    if config.eval.reference_stats and split is None:
        return str(config.eval.reference_stats)
    return reference.default_reference_path(
        config.data, split or config.eval.reference_split, config.eval.feature_network
    )


def _reference_stats_command(config: ml_collections.ConfigDict) -> str:
    e = config.eval
    command = (
        f"python -m experiments.reference_stats --dataset={config.data.name} "
        f"--split={e.reference_split} --network={e.feature_network}"
    )
    if config.data.data_dir:
        command += f" --data_dir={config.data.data_dir}"
    if e.feature_network == "inception":
        command += f" --inception_weights={e.inception_weights or 'inception_fid.npz'}"
    return command


def check_eval_inputs(config: ml_collections.ConfigDict) -> None:
    """Raise `MissingEvalInputError` (one line, naming the fix) before anything is compiled."""
    e = config.eval
    if e.feature_network == "inception":
        if not e.inception_weights:
            raise MissingEvalInputError(
                f"eval.feature_network='inception' needs its weights: {INCEPTION_WEIGHTS_HELP}"
            )
        if not os.path.exists(e.inception_weights):
            raise MissingEvalInputError(
                f"eval.inception_weights={e.inception_weights!r} does not exist; "
                + INCEPTION_WEIGHTS_HELP
            )
    if any(m in e.metrics for m in ("fd",)):
        path = reference_stats_path(config)
        if not os.path.exists(path):
            raise MissingEvalInputError(
                f"no reference statistics at {path}; compute them with "
                f"`{_reference_stats_command(config)}` (or set eval.reference_stats)"
            )


def make_feature_network(eval_config: ml_collections.ConfigDict) -> FeatureNetwork:
    """The configured feature network, with its weights loaded."""
    if eval_config.feature_network == "inception":
        from diffusion_jax.evaluation.inception import InceptionFeatures

        return InceptionFeatures(eval_config.inception_weights)
    from diffusion_jax.evaluation.digits_net import DigitsFeatures

    return DigitsFeatures()


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    after_shard: Callable[[int], None] | None = None,
) -> EvalResult:
    """Sample and score the latest checkpoint of `workdir`; see the module docstring.

    after_shard(k) is called after shard k is on disk (a hook for progress and tests).
    Raises `ConfigError`, `NoCheckpointError`, `MissingEvalInputError`, `ReferenceStatsError` or
    `DatasetNotPreparedError` (all `errors.UserError`) before compiling anything.
    """
    validation.validate(config, jax.device_count(), VALIDATORS)
    checkpointing.require_checkpoint(workdir)
    validation.check_saved_config(config, workdir, allow_config_change)
    ema_snapshots.require_params(workdir, config.sampling.get("params", "ema"))
    guide_lib.check(config, workdir)
    name = eval_name(config)
    workdir_lib.contained_path(workdir, "eval", name + ".json")  # before any work, not after
    workdir_lib.contained_path(workdir, "eval", name)
    validation.check_workdir_writable(workdir, "eval")
    validation.check_splits(
        config, pipeline.dataset_info(config.data).num_examples, _splits(config)
    )
    check_eval_inputs(config)
    setup = ModelSetup(config)
    network = make_feature_network(config.eval)
    if "fd" in config.eval.metrics:  # a damaged or mismatched stats file stops us before sampling
        reference.load_reference_stats(reference_stats_path(config), expected_network=network)
    state = setup.restore(workdir)
    params, step = setup.sampling_params(state, workdir)
    guide = guide_lib.load(setup, workdir)

    started = time.perf_counter()
    images, generated = _generate_shards(
        config, setup, params, guide, workdir, name, step, after_shard
    )
    elapsed = time.perf_counter() - started
    per_1000 = 1000.0 * elapsed / generated if generated else None
    logging.info("Eval %s: %d samples ready (%d generated now)", name, len(images), generated)

    labels_fn = setup.labels_fn()
    labels = None if labels_fn is None else labels_fn(np.arange(len(images)))
    scores = _score_samples(config, network, images, labels)
    if config.eval.bpd_num_images > 0:
        scores["bits_per_dim"] = _bits_per_dim(config, setup, params)
    result_path = workdir_lib.contained_path(workdir, "eval", name + ".json")
    if per_1000 is None:  # every shard was on disk: keep the time measured when they were made
        per_1000 = _previous_timing(result_path, step)
    if workdir_lib.is_chief():
        spec = setup.sampler_spec()
        record = {
            "name": name,
            "step": step,
            "metrics": scores,
            "num_samples": len(images),
            "feature_network": {"name": network.name, "fingerprint": network.fingerprint},
            "reference_stats": reference_stats_path(config) if "fd" in config.eval.metrics else "",
            "seconds_per_1000_samples": per_1000,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "sampling": config.sampling.to_dict(),
            # What the sampling settings resolved to on this run's formulation.
            "grid": spec.spacing_for(setup.formulation),
            **({} if guide is None else {"guide_step": guide.step}),
            "model_evaluations": spec.num_evaluations,
            # With guidance, the guide's evaluations too (doubled batches count twice).
            "network_evaluations": spec.network_evaluations(setup.formulation),
            "eval": config.eval.to_dict(),
        }
        workdir_lib.atomic_write_json(result_path, record)
        writer = workdir_lib.MetricWriter(workdir)
        writer.write(step, {f"eval/{name}/{k}": v for k, v in scores.items()})
        writer.close()
    return EvalResult(name, step, scores, result_path, per_1000)


# Sampling keys added after evals were first written, left out of a shard manifest at their
# defaults ('' and (): the samples of before), so those evals keep resuming.
_LATER_SAMPLING_KEYS = ("guide", "guidance_interval")


def _manifest_sampling(config: ml_collections.ConfigDict) -> dict[str, Any]:
    sampling = config.sampling.to_dict()
    for key in _LATER_SAMPLING_KEYS:
        if key in sampling and not sampling[key]:
            del sampling[key]
    return sampling


def _splits(config: ml_collections.ConfigDict) -> list[str]:
    """The split keys an eval reads: the reference split (its statistics, or its images for
    precision/recall) and, for bits/dim, the eval split."""
    e = config.eval
    keys = []
    if "precision_recall" in e.metrics or ("fd" in e.metrics and not e.reference_stats):
        keys.append("eval.reference_split")
    if config.eval.bpd_num_images > 0:
        keys.append("data.eval_split")
    return keys


def _generate_shards(
    config: ml_collections.ConfigDict,
    setup: ModelSetup,
    params: Any,
    guide: guide_lib.Guide | None,
    workdir: str,
    name: str,
    step: int,
    after_shard: Callable[[int], None] | None,
) -> tuple[np.ndarray, int]:
    """All eval samples, uint8 (N, H, W, C), and how many were generated by this call."""
    e = config.eval
    shard_dir = workdir_lib.contained_path(workdir, "eval", name)
    manifest = {
        "step": step,
        **({} if guide is None else {"guide_step": guide.step}),
        "num_samples": e.num_samples,
        "shard_size": e.shard_size,
        "sampling": _manifest_sampling(config),
        "class_conditional": bool(config.model.class_conditional),
    }
    chief = workdir_lib.is_chief()
    with workdir_lock.hold(
        shard_dir + ".lock",
        what=f"eval making the same samples ({name})",
        fix="wait for it to finish or stop it (rerunning then resumes), or set eval.name",
    ):
        digests = _start_or_resume(shard_dir, manifest, chief, workdir)
        batch_size = generate.device_batch_size(e.batch_size, setup.mesh.size, e.num_samples)
        sample_fn = None
        shards, generated = [], 0
        for k, first in enumerate(range(0, e.num_samples, e.shard_size)):
            file_name = f"shard_{k:05d}.npz"
            path = workdir_lib.join(shard_dir, file_name)
            count = min(e.shard_size, e.num_samples - first)
            shard = _load_shard(path, count, setup.image_shape, digests.get(file_name))
            if shard is not None:
                shards.append(shard)
                continue
            if sample_fn is None:  # compile only when something is left to generate
                sample_fn = setup.sample_fn(batch_size, workdir=workdir, guide=guide)
            batches = generate.generate_batches(
                sample_fn,
                params,
                seed=config.sampling.seed,
                num_samples=count,
                batch_size=batch_size,
                labels_fn=setup.labels_fn(),
                first_id=first,
            )
            shard = np.concatenate(list(batches))
            generated += count
            if chief:
                workdir_lib.atomic_savez(path, images=shard)
                digests[file_name] = _file_sha256(path)
                manifest_path = workdir_lib.join(shard_dir, "manifest.json")
                workdir_lib.atomic_write_json(manifest_path, {**manifest, "shards": digests})
            shards.append(shard)
            if after_shard is not None:
                after_shard(k)
    return np.concatenate(shards), generated


def _file_sha256(path: str) -> str:
    with workdir_lib.open_file(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# The files `_generate_shards` writes in `eval/<name>/` (and their temporary names): the only
# ones it ever deletes.
SHARD_DIR_FILES = re.compile(r"(manifest\.json|shard_\d{5,}\.npz)(\.tmp(\.npz)?)?")


def _read_manifest(path: str) -> dict[str, Any] | None:
    """The manifest of a shard directory, or None when it is missing or damaged."""
    try:
        with workdir_lib.open_file(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logging.warning("The eval manifest %s is unreadable (%s)", path, error)
        return None
    return manifest if isinstance(manifest, dict) else None


def _start_or_resume(
    shard_dir: str, manifest: dict[str, Any], chief: bool, workdir: str
) -> dict[str, str]:
    """Keep the shards of an interrupted eval with the same manifest; discard any others (a
    damaged manifest discards them too). Only files this mode writes are deleted: a shard
    directory holding anything else is refused (`UnsafePathError`), deleting nothing.
    Returns the sha256 of each kept shard file ({} when starting over)."""
    path = workdir_lib.join(shard_dir, "manifest.json")
    previous = _read_manifest(path)
    shards = previous.pop("shards", {}) if previous is not None else {}
    if previous == json.loads(json.dumps(manifest)):
        return dict(shards) if isinstance(shards, dict) else {}
    if workdir_lib.lexists(shard_dir):
        logging.warning(
            "Discarding the samples in %s: %s",
            shard_dir,
            "their manifest is missing or damaged"
            if previous is None
            else f"they were made from step {previous.get('step')} with other settings",
        )
    fix = "move it away, or set eval.name to another name"
    # Every process checks, so that all of them stop (not only the chief) when it is refused.
    workdir_lib.check_owned_dir(shard_dir, workdir, SHARD_DIR_FILES, fix=fix)
    if chief:
        workdir_lib.remove_owned_dir(shard_dir, workdir, SHARD_DIR_FILES, fix=fix)
        workdir_lib.makedirs(shard_dir)
        workdir_lib.atomic_write_json(path, manifest)
    return {}


def _load_shard(
    path: str, count: int, image_shape: tuple[int, ...], sha256: str | None
) -> np.ndarray | None:
    """The images of a finished shard, or None when it is missing, different from the sha256
    its manifest recorded (shards recorded before manifests held digests are not checked),
    damaged (cut short, unreadable) or not `count` uint8 images of `image_shape` (then it is
    generated again)."""
    if not workdir_lib.exists(path):
        return None
    if sha256 is not None and _file_sha256(path) != sha256:
        logging.warning(
            "Eval shard %s differs from the sha256 in its manifest (damaged on disk); "
            "generating it again.",
            path,
        )
        return None
    try:
        with workdir_lib.load_npz(path) as data:
            shard = np.asarray(data["images"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        logging.warning("Eval shard %s is unreadable (%s); generating it again", path, error)
        return None
    if shard.dtype != np.uint8 or shard.shape != (count, *image_shape):
        logging.warning(
            "Eval shard %s holds %s %s, not %d images of %s; generating it again",
            path,
            shard.dtype,
            shard.shape,
            count,
            image_shape,
        )
        return None
    return shard


def _score_samples(
    config: ml_collections.ConfigDict,
    network: FeatureNetwork,
    images: np.ndarray,
    labels: np.ndarray | None,
) -> dict[str, float]:
    e = config.eval
    features, logits = network(images)
    scores: dict[str, float] = {}
    if "fd" in e.metrics:
        ref = reference.load_reference_stats(reference_stats_path(config), expected_network=network)
        stats = metrics_lib.StatsAccumulator(features.shape[1])
        stats.update(features)
        sample_stats = stats.result()
        scores["fd"] = metrics_lib.frechet_distance(
            sample_stats.mean, sample_stats.cov, ref.stats.mean, ref.stats.cov
        )
        floor_path = reference_stats_path(config, split=config.data.eval_split)
        if config.data.eval_split != e.reference_split and os.path.exists(floor_path):
            real = reference.load_reference_stats(floor_path, expected_network=network)
            scores["fd_floor"] = metrics_lib.frechet_distance(
                real.stats.mean, real.stats.cov, ref.stats.mean, ref.stats.cov
            )
    if "is" in e.metrics:
        scores["is_mean"], scores["is_std"] = metrics_lib.inception_score(logits, splits=IS_SPLITS)
    if "class_accuracy" in e.metrics:
        assert labels is not None  # check_eval: a class-conditional model
        scores["class_accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == labels))
    if "precision_recall" in e.metrics:
        real_images, _ = pipeline.eval_images(
            config.data, e.reference_split, max_examples=e.pr_num_samples
        )
        real_features, _ = network(real_images)
        scores["precision"], scores["recall"] = metrics_lib.precision_recall(
            real_features, features[: e.pr_num_samples], k=e.pr_k
        )
    return {k: float(v) for k, v in scores.items()}


def _bits_per_dim(config: ml_collections.ConfigDict, setup: ModelSetup, params: Any) -> float:
    """Mean bits/dim of the first `eval.bpd_num_images` images of `data.eval_split`; image i's
    noise comes from its index, so the result does not depend on eval.bpd_batch_size."""
    e = config.eval
    images, labels = pipeline.eval_images(
        config.data, config.data.eval_split, max_examples=e.bpd_num_images
    )
    conditional = bool(config.model.class_conditional)
    batch = parallel.batch_sharding(setup.mesh)

    @functools.partial(
        jax.jit,
        in_shardings=(setup.replicated, setup.replicated, batch, batch, batch),
        out_shardings=batch,
    )
    def bpd(params: Any, rng: jax.Array, x0: jax.Array, y: jax.Array, ids: jax.Array) -> jax.Array:
        result = likelihood.bits_per_dim(
            setup.model_fn(params),
            setup.schedule,
            x0,
            rng,
            prediction=config.diffusion.prediction,
            variance=_likelihood_variance(config),
            labels=y if conditional else None,
            example_ids=ids,
        )
        return result["total"]

    rng = parallel.host_to_global(
        np.asarray(jax.random.PRNGKey(config.sampling.seed)), setup.replicated
    )
    params = jax.device_put(params, setup.replicated)  # gathered once if split along 'fsdp'
    totals = []
    size = generate.device_batch_size(e.bpd_batch_size, setup.mesh.size)
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        y = labels[start : start + size]
        count = len(chunk)
        if count < size:  # pad so nothing recompiles; padded rows are dropped below
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - count, axis=0)])
            y = np.concatenate([y, np.repeat(y[-1:], size - count)])
        x0 = chunk.astype(np.float32) / 127.5 - 1.0
        out = bpd(
            params,
            rng,
            parallel.host_to_global(x0, batch),
            parallel.host_to_global(y.astype(np.int32), batch),
            parallel.host_to_global(np.arange(start, start + size, dtype=np.int32), batch),
        )
        totals.append(parallel.to_host(out)[:count])
    return float(np.mean(np.concatenate(totals)))


def _likelihood_variance(config: ml_collections.ConfigDict) -> str:
    """The reverse variance the bound is computed with: the model's own when it learns it."""
    if config.model.learn_sigma:
        return "learned_range"
    return str(config.sampling.variance)


def _previous_timing(result_path: str, step: int) -> float | None:
    try:
        with workdir_lib.open_file(result_path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if previous.get("step") != step:
        return None
    timing = previous.get("seconds_per_1000_samples")
    return float(timing) if timing is not None else None
