"""Autoguidance's guide network (`sampling.guide`): parsed, checked before anything compiles,
and loaded for the sampler.

    ''                            no guide: guidance_scale != 1 is classifier-free guidance
    'step:<N>'                    this run's EMA at its checkpoint step N (trained less)
    'posthoc_ema:<sigma_rel>'     this run's post-hoc EMA reconstruction (a shorter EMA)
    'workdir:<path>[@<N>]'        another run's EMA (latest checkpoint, or step N): e.g. a
                                  smaller model of the same data and formulation

The guide is evaluated in the same compiled sampler as the model, with the same labels; a
guidance_scale of 1 ignores it. Only reads: nothing is written to a guide's workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

import jax
import ml_collections

from diffusion_jax import checkpointing
from diffusion_jax.errors import ConfigError, NoCheckpointError
from diffusion_jax.runner import ema_snapshots
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import workdir as workdir_lib

PyTree = Any

_STEP = re.compile(r"step:(\d+)")
_WORKDIR = re.compile(r"workdir:(.+?)(?:@(\d+))?")  # a path ending in @<digits> is a step
FORMS = "'step:<N>', 'posthoc_ema:<sigma_rel>' or 'workdir:<path>[@<N>]'"


@dataclasses.dataclass(frozen=True)
class Source:
    """A parsed `sampling.guide`: this run's checkpoint `step`, its post-hoc EMA `sigma_rel`,
    or `workdir` (another run; `step` None = its latest checkpoint)."""

    step: int | None = None
    sigma_rel: float | None = None
    workdir: str | None = None

    @property
    def label(self) -> str:
        """The file-name part: 'agstep1000', 'agphema0.05', or 'agrun-<run name>-<hash of its
        absolute path>[-step<N>]' (two runs of one name do not share names)."""
        if self.sigma_rel is not None:
            return f"agphema{self.sigma_rel:g}"
        if self.workdir is None:
            return f"agstep{self.step}"
        path = self.workdir.rstrip("/") or "/"
        if "://" not in path:
            path = os.path.abspath(path)
        name = re.sub(r"[^A-Za-z0-9._]", "_", path.split("/")[-1])[:40]
        digest = hashlib.sha256(path.encode()).hexdigest()[:8]
        return f"agrun-{name}-{digest}" + ("" if self.step is None else f"-step{self.step}")


def parse(value: Any) -> Source | None:
    """`sampling.guide` as a `Source` ('' -> None); `ConfigError` naming the forms otherwise."""
    if value == "":
        return None
    if isinstance(value, str):
        if m := _STEP.fullmatch(value):
            return Source(step=int(m.group(1)))
        if value.startswith(ema_snapshots.PARAMS_PREFIX):
            try:
                sigma_rel = ema_snapshots.parse_params(value)
            except ConfigError:
                sigma_rel = None
            if sigma_rel is not None:
                return Source(sigma_rel=sigma_rel)
        if (m := _WORKDIR.fullmatch(value)) and m.group(1).strip():
            return Source(workdir=m.group(1), step=None if m.group(2) is None else int(m.group(2)))
    raise ConfigError(f"sampling.guide={value!r}; use '' (none) or {FORMS}")


def of_config(config: ml_collections.ConfigDict) -> Source | None:
    """The guide a config's sampling uses: None without one or at guidance_scale 1."""
    source = parse(config.sampling.get("guide", ""))
    return source if config.sampling.guidance_scale != 1.0 else None


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """`ConfigError` / `NoCheckpointError` in one line for a guide that cannot be used: a
    missing step or reconstruction, or another run of other data, image size, formulation or
    conditioning. Reads configs and directory listings only."""
    source = of_config(config)
    if source is not None:
        check_source(source, config, workdir)


def check_source(source: Source, config: ml_collections.ConfigDict, workdir: str) -> None:
    """`check` of one guide `source` for the run of `config` in `workdir`."""
    if source.sigma_rel is not None:
        ema_snapshots.require_params(workdir, f"{ema_snapshots.PARAMS_PREFIX}{source.sigma_rel!r}")
        return
    where = workdir if source.workdir is None else source.workdir
    if source.workdir is not None:
        if not workdir_lib.isdir(where):
            raise NoCheckpointError(f"sampling.guide: {where} is not a directory")
        checkpointing.require_checkpoint(where)
        check_compatible(config, _saved_config(where), where)
    if source.step is not None and source.step not in checkpointing.finished_steps(where):
        raise NoCheckpointError(
            f"sampling.guide: {where} has no checkpoint at step {source.step}; it has "
            f"{checkpointing.finished_steps(where)}"
        )


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
    try:
        return workdir_lib.read_config(workdir)
    except NoCheckpointError:
        raise NoCheckpointError(
            f"sampling.guide: {workdir} has no readable config.json; it is not a trained run's "
            "workdir"
        ) from None


def check_compatible(
    config: ml_collections.ConfigDict, guide: ml_collections.ConfigDict, where: str
) -> None:
    """`ConfigError` unless the guide (run config `guide`, in `where`) sees the same images and
    means the same by its output as the model of `config`."""
    for key in ("data.name", "data.image_size", "model.class_conditional"):
        section, leaf = key.split(".")
        ours, theirs = config[section].get(leaf), guide[section].get(leaf)
        if ours != theirs:
            raise ConfigError(
                f"sampling.guide: {where} has {key}={theirs!r}, this run {ours!r}; a guide "
                "must be a model of the same data, image size and conditioning"
            )
    try:
        difference = formulation_lib.denoiser_difference(config, guide)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            f"sampling.guide: the config saved in {where} does not say its formulation "
            f"({type(error).__name__}: {error}); guide with a run trained by this version"
        ) from None
    if difference:
        raise ConfigError(
            f"sampling.guide: {where} is another formulation ({difference}); a guide's output "
            "must mean what this model's does"
        )


@dataclasses.dataclass(frozen=True)
class Guide:
    """A loaded guide: its model (module), EMA parameters and the step they are from."""

    model: Any
    params: PyTree
    step: int
    source: Source


def load(setup: Any, workdir: str) -> Guide | None:
    """The guide `setup.config` names, loaded (None without one or at guidance_scale 1).

    setup: the model's `ModelSetup` (this run's restore and parameter template)."""
    source = of_config(setup.config)
    return None if source is None else load_source(source, setup, workdir)


def load_source(source: Source, setup: Any, workdir: str) -> Guide:
    """The guide `source` of the run in `workdir` (`setup`: its `ModelSetup`), checked, then
    loaded."""
    check_source(source, setup.config, workdir)
    if source.sigma_rel is not None:
        params, step = ema_snapshots.read_params(
            workdir, source.sigma_rel, setup.abstract_state.ema_params
        )
        return Guide(setup.model, jax.device_put(params, setup.replicated), step, source)
    if source.workdir is None:
        state = setup.restore(workdir, source.step)
        return Guide(setup.model, state.ema_params, int(state.step), source)
    # Another run: this config with the guide's model and training sections (its network and
    # train state), so its data (checked the same) is read from this run's data_dir and its
    # state lands on this run's mesh; setup's class builds it.
    saved = _saved_config(source.workdir)
    guide_config = setup.config.copy_and_resolve_references()
    with guide_config.unlocked():
        guide_config.model = saved.model
        guide_config.training = saved.training
    guide_setup = type(setup)(guide_config)
    state = guide_setup.restore(source.workdir, source.step)
    return Guide(guide_setup.model, state.ema_params, int(state.step), source)
