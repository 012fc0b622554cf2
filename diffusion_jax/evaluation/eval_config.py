"""The `config.eval` section: allowed values, checks and the name of an eval's outputs.

Kept free of heavy imports so `config_validation` can check eval keys in every mode.
"""

from __future__ import annotations

import ml_collections

from diffusion_jax.config_validation import ConfigError

METRICS = ("fd", "is", "precision_recall")
FEATURE_NETWORKS = ("digits", "inception")


class MissingEvalInputError(FileNotFoundError):
    """Feature-network weights or reference statistics the eval needs are not on disk."""


def eval_name(config: ml_collections.ConfigDict) -> str:
    """`eval.name`, else e.g. 'ddim50_eta0.5_g2_seed0_n1000': every setting that changes the
    samples is in the name, so two evals never share shards."""
    if config.eval.name:
        return str(config.eval.name)
    s = config.sampling
    parts = [f"{s.sampler.replace('+', 'p')}{s.num_steps}"]
    if s.sampler == "ddim" and s.eta:
        parts.append(f"eta{s.eta:g}")
    if s.sampler == "ddpm" and s.variance != "fixed_small":
        parts.append(s.variance)
    if s.timestep_spacing != "linspace":
        parts.append(s.timestep_spacing)
    if s.guidance_scale != 1.0:
        parts.append(f"g{s.guidance_scale:g}")
    if s.label >= 0:
        parts.append(f"label{s.label}")
    if s.temperature != 1.0:
        parts.append(f"temp{s.temperature:g}")
    if not s.clip_x0:
        parts.append("noclip")
    parts += [f"seed{s.seed}", f"n{config.eval.num_samples}"]
    return "_".join(parts)


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
    """Raise `ConfigError` for an eval setting that cannot work (called by `validate_config`)."""
    e = config.eval
    unknown = [m for m in e.metrics if m not in METRICS]
    checks: list[tuple[bool, str]] = [
        (not unknown, f"eval.metrics has {unknown}; use any of {METRICS}"),
        (
            e.feature_network in FEATURE_NETWORKS,
            f"eval.feature_network={e.feature_network!r}; use one of {FEATURE_NETWORKS}",
        ),
        (e.num_samples >= 2, f"eval.num_samples={e.num_samples}; use 2 or more"),
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


def check_eval_mode(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """What only the eval mode needs (so a training run is not refused over eval settings it
    does not use): a feature network for the dataset, and batches that split over the devices."""
    e = config.eval
    if e.feature_network == "digits" and config.data.name != "digits":
        raise ConfigError(
            f"eval.feature_network='digits' only scores the digits dataset; use 'inception' "
            f"for {config.data.name!r}"
        )
    for key in ("batch_size", "bpd_batch_size"):
        if e[key] % num_devices:
            raise ConfigError(
                f"eval.{key}={e[key]} does not divide over {num_devices} devices; use a multiple "
                f"of {num_devices}"
            )
