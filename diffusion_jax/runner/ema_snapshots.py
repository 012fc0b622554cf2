"""Post-hoc EMA files in a workdir: the snapshots training writes, and reconstructed parameter
sets that `--mode=sample|eval` load with `sampling.params='posthoc_ema:<sigma_rel>'`.

    <workdir>/posthoc_ema/snapshots/<step>.npz   the tracked power-function EMAs after <step>
        'step' int64 (), 'sigma_rels', 'gammas' float64 (K,), and 'ema<i>/<leaf path>' arrays
        ('ema0/conv_in/kernel', ...) of tracked EMA i
    <workdir>/posthoc_ema/sigma_rel<s>.npz     a reconstruction ('<leaf path>' arrays), with
    <workdir>/posthoc_ema/sigma_rel<s>.json    its record: step, sigma_rel, gamma, the snapshots
                                               used, their coefficients, the profile error

Every file is written atomically, by the chief, inside the workdir. Snapshots are never deleted
with old checkpoints (`training.max_checkpoints_to_keep` does not count them): a reconstruction
needs those of the whole run. The only ones removed are those written after the checkpoint a run
resumes from (`remove_after`): the interrupted run wrote them, the resumed one writes them again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.errors import ConfigError, NoCheckpointError
from diffusion_jax.runner import workdir as workdir_lib

PyTree = Any

DIRECTORY = "posthoc_ema"
SNAPSHOTS = "snapshots"
PARAMS_PREFIX = "posthoc_ema:"  # sampling.params='posthoc_ema:0.1'
_SNAPSHOT_FILE = re.compile(r"^(\d+)\.npz$")


def _leaf_key(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree: PyTree, prefix: str = "") -> dict[str, np.ndarray]:
    """{prefix + leaf path: numpy array} of a params tree (collective for multi-process
    arrays: every process calls it)."""
    return {
        prefix + _leaf_key(path): parallel.to_host(leaf) if isinstance(leaf, jax.Array) else leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def unflatten(arrays: Any, template: PyTree, prefix: str = "", *, source: str) -> PyTree:
    """The tree of `template` (arrays or ShapeDtypeStructs) filled from `arrays[prefix + path]`;
    `ConfigError` naming `source` when a leaf is missing or has another shape."""

    def leaf(path: tuple[Any, ...], like: Any) -> np.ndarray:
        key = prefix + _leaf_key(path)
        if key not in arrays:
            raise ConfigError(f"{source} has no {key!r}: it was written for another model")
        value = np.asarray(arrays[key])
        if value.shape != tuple(like.shape):
            raise ConfigError(
                f"{source}: {key} has shape {value.shape}, the model's is {tuple(like.shape)}"
            )
        return value.astype(like.dtype)

    return jax.tree_util.tree_map_with_path(leaf, template)


def snapshot_dir(workdir: str) -> str:
    return workdir_lib.contained_path(workdir, DIRECTORY, SNAPSHOTS)


def snapshot_steps(workdir: str) -> list[int]:
    """Steps of the snapshots in `workdir`, ascending (temporaries have other names)."""
    directory = snapshot_dir(workdir)
    if not workdir_lib.isdir(directory):
        return []
    return sorted(
        int(m.group(1))
        for name in workdir_lib.listdir(directory)
        if (m := _SNAPSHOT_FILE.match(name))
    )


def snapshot_path(workdir: str, step: int) -> str:
    return workdir_lib.contained_path(workdir, DIRECTORY, SNAPSHOTS, f"{step}.npz")


def write_snapshot(
    workdir: str,
    step: int,
    emas: Sequence[PyTree],
    sigma_rels: Sequence[float],
    gammas: Sequence[float],
) -> None:
    """Write the tracked EMAs after `step` (collective; the chief writes)."""
    arrays: dict[str, Any] = {}
    for i, ema in enumerate(emas):
        arrays.update(flatten(ema, f"ema{i}/"))
    if workdir_lib.is_chief():
        workdir_lib.atomic_savez(
            snapshot_path(workdir, step),
            step=np.int64(step),
            sigma_rels=np.asarray(sigma_rels, np.float64),
            gammas=np.asarray(gammas, np.float64),
            **arrays,
        )


def remove_after(workdir: str, step: int) -> list[int]:
    """Delete the snapshots of steps after `step` (the chief does); returns their steps."""
    later = [s for s in snapshot_steps(workdir) if s > step]
    if workdir_lib.is_chief():
        for s in later:
            workdir_lib.remove_file(snapshot_path(workdir, s))
    return later


def read_snapshot_profiles(workdir: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_rels, gammas), float64 (K,), of the EMAs in the snapshot of `step`."""
    with workdir_lib.load_npz(snapshot_path(workdir, step)) as stored:
        return np.asarray(stored["sigma_rels"]), np.asarray(stored["gammas"])


def params_name(sigma_rel: float) -> str:
    """The file stem of the reconstruction with `sigma_rel`: 'sigma_rel0.08'."""
    return f"sigma_rel{sigma_rel:g}"


def parse_params(value: str) -> float | None:
    """`sampling.params`: 'ema' -> None (the run's EMA), 'posthoc_ema:<sigma_rel>' -> sigma_rel;
    `ConfigError` otherwise."""
    if value == "ema":
        return None
    if value.startswith(PARAMS_PREFIX):
        try:
            sigma_rel = float(value[len(PARAMS_PREFIX) :])
        except ValueError:
            sigma_rel = float("nan")
        if np.isfinite(sigma_rel) and sigma_rel > 0:
            return sigma_rel
    raise ConfigError(
        f"sampling.params={value!r}; use 'ema' (the run's EMA) or 'posthoc_ema:<sigma_rel>' "
        "(a reconstruction written by --mode=posthoc_ema), e.g. 'posthoc_ema:0.1'"
    )


def params_paths(workdir: str, sigma_rel: float) -> tuple[str, str]:
    """(.npz, .json) paths of the reconstruction with `sigma_rel`, inside the workdir."""
    stem = params_name(sigma_rel)
    return (
        workdir_lib.contained_path(workdir, DIRECTORY, stem + ".npz"),
        workdir_lib.contained_path(workdir, DIRECTORY, stem + ".json"),
    )


def write_params(workdir: str, sigma_rel: float, params: PyTree, record: dict[str, Any]) -> str:
    """Write a reconstructed parameter set and its record (the chief does); returns the .npz."""
    arrays = flatten(params)
    npz, record_path = params_paths(workdir, sigma_rel)
    if workdir_lib.is_chief():
        workdir_lib.atomic_savez(npz, **arrays)
        workdir_lib.atomic_write_json(record_path, record)
    return npz


def require_params(workdir: str, params: str) -> None:
    """Raise `NoCheckpointError`, naming the command that writes it, when `sampling.params`
    names a reconstruction `workdir` does not have (cheap: before any model is built)."""
    sigma_rel = parse_params(params)
    if sigma_rel is None:
        return
    npz, record_path = params_paths(workdir, sigma_rel)
    if not (workdir_lib.exists(npz) and workdir_lib.exists(record_path)):
        raise NoCheckpointError(
            f"no post-hoc EMA with sigma_rel={sigma_rel:g} in {workdir_lib.dirname(npz)}; write it "
            f"with --mode=posthoc_ema --config.posthoc_ema.sigma_rel={sigma_rel:g} "
            "and the same --workdir"
        )


def read_params(workdir: str, sigma_rel: float, template: PyTree) -> tuple[PyTree, int]:
    """(params, step) of the reconstruction with `sigma_rel` (`require_params` first)."""
    require_params(workdir, f"{PARAMS_PREFIX}{sigma_rel!r}")
    npz, record_path = params_paths(workdir, sigma_rel)
    with workdir_lib.open_file(record_path) as f:
        step = int(json.load(f)["step"])
    with workdir_lib.load_npz(npz) as stored:
        return unflatten(stored, template, source=npz), step
