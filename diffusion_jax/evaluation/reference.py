"""Reference feature statistics of a real dataset split, with the provenance to reproduce them.

    net = DigitsFeatures()
    ref = compute_reference_stats(net, config.data, 'train')   # every image of the split
    save_reference_stats(default_reference_path(config.data, 'train', net.name), ref)
    ref = load_reference_stats(path, expected_network=net)      # refuses other weights
    fd = metrics.frechet_distance(mu, cov, ref.stats.mean, ref.stats.cov)

The .npz holds `mean` (D,) and `cov` (D, D) in float64, `provenance` (a JSON string: dataset,
TFDS version, split, image shape and count, feature network name and fingerprint, creation
time) and `sha256`, the hash of the mean, cov and provenance bytes, checked on load.
`python -m experiments.reference_stats` writes these files.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import zipfile
from typing import Any

import numpy as np

from diffusion_jax.data import pipeline
from diffusion_jax.errors import ReferenceStatsError
from diffusion_jax.evaluation.features import FeatureNetwork
from diffusion_jax.evaluation.metrics import FeatureStats, StatsAccumulator

FORMAT_VERSION = 1
# Images read from the data source at once (features are reduced batch by batch).
READ_CHUNK = 10_000


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of every image of one dataset split, and where they came from.

    stats: mean (D,), cov (D, D) float64 and count (= num_images).
    image_shape: (H, W, C) of the images fed to the network.
    created: ISO 8601 UTC time the statistics were computed.
    """

    stats: FeatureStats
    dataset: str
    tfds_version: str
    split: str
    image_shape: tuple[int, int, int]
    network_name: str
    network_fingerprint: str
    created: str

    @property
    def num_images(self) -> int:
        return self.stats.count

    def provenance(self) -> dict[str, Any]:
        """Everything but the statistics, as JSON-compatible values."""
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "tfds_version": self.tfds_version,
            "split": self.split,
            "image_shape": list(self.image_shape),
            "num_images": self.num_images,
            "network_name": self.network_name,
            "network_fingerprint": self.network_fingerprint,
            "created": self.created,
        }


def reference_stats_command(
    dataset: str,
    split: str,
    network: str,
    *,
    output: str = "",
    data_dir: str = "",
    image_size: int = 0,
) -> str:
    """The command line that (re)creates reference statistics."""
    command = (
        f"python -m experiments.reference_stats --dataset={dataset or 'DATASET'} "
        f"--split={split or 'SPLIT'} --network={network}"
    )
    if data_dir:
        command += f" --data_dir={data_dir}"
    if image_size:
        command += f" --image_size={image_size}"
    if network == "inception":
        command += " --inception_weights=PATH"
    if output:
        command += f" --output={output}"
    return command


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def default_reference_path(data_config: Any, split: str, network_name: str) -> str:
    """`<TFDS data_dir>/reference_stats/<dataset>_<split>_<network>.npz`.

    Characters other than letters, digits, '.', '-' and '_' (the '/' of a dataset config, a
    split's '[:50%]') become '_'.
    """
    data_dir = pipeline.resolve_data_dir(getattr(data_config, "data_dir", ""))
    filename = f"{_safe(data_config.name)}_{_safe(split)}_{_safe(network_name)}.npz"
    return os.path.join(data_dir, "reference_stats", filename)


def compute_reference_stats(
    feature_net: FeatureNetwork, data_config: Any, split: str
) -> ReferenceStats:
    """Feature statistics of ALL images of a TFDS split, in the data source's fixed order.

    Images are the uint8 images the pipeline feeds the model (resized to data.image_size as
    in training, never flipped), read in chunks of READ_CHUNK so memory stays bounded.

    Args:
      feature_net: the FeatureNetwork the statistics are for.
      data_config: the data config (name, data_dir, image_size, image_key, ...).
      split: a TFDS split name ('train', 'test') or slice ('train[:10000]').
    """
    builder = pipeline.ensure_prepared(data_config.name, getattr(data_config, "data_dir", ""))
    info = pipeline.dataset_info(data_config)
    if "[" in split:  # Already a slice: read it whole (tfds cannot slice a slice).
        pieces = [split]
    elif split in info.num_examples:
        n = info.num_examples[split]
        pieces = [f"{split}[{s}:{min(s + READ_CHUNK, n)}]" for s in range(0, n, READ_CHUNK)]
    else:
        raise ValueError(
            f"dataset {data_config.name!r} has no split {split!r}; use one of "
            f"{sorted(info.num_examples)}"
        )
    acc = StatsAccumulator(feature_net.feature_dim)
    for piece in pieces:
        images, _ = pipeline.eval_images(data_config, piece)
        features, _ = feature_net(images)
        acc.update(features)
    return ReferenceStats(
        stats=acc.result(),
        dataset=data_config.name,
        tfds_version=str(builder.info.version),
        split=split,
        image_shape=info.image_shape,
        network_name=feature_net.name,
        network_fingerprint=feature_net.fingerprint,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _digest(mean: np.ndarray, cov: np.ndarray, provenance_json: str) -> str:
    h = hashlib.sha256()
    for array in (mean, cov):
        h.update(np.ascontiguousarray(array, "<f8").tobytes())
    h.update(provenance_json.encode())
    return h.hexdigest()


def save_reference_stats(path: str, stats: ReferenceStats) -> None:
    """Writes `stats` to `path` (.npz) atomically, creating its directory."""
    provenance = json.dumps(stats.provenance(), sort_keys=True)
    mean = np.asarray(stats.stats.mean, "<f8")
    cov = np.asarray(stats.stats.cov, "<f8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # A file object: np.savez would append '.npz' to a name.
        np.savez(
            f,
            mean=mean,
            cov=cov,
            provenance=np.array(provenance),
            sha256=np.array(_digest(mean, cov, provenance)),
        )
    os.replace(tmp, path)  # Readers never see a half-written file.


def _read(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Raises ValueError (with the reason) on anything but an intact file of this format."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mean, cov = data["mean"], data["cov"]
            provenance_json, digest = str(data["provenance"]), str(data["sha256"])
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"unreadable: {reason}") from None
    if _digest(mean, cov, provenance_json) != digest:
        raise ValueError("sha256 of the statistics does not match the one stored")
    try:
        provenance = json.loads(provenance_json)
    except json.JSONDecodeError:
        raise ValueError("provenance is not JSON") from None
    d = mean.shape[0] if mean.ndim == 1 else -1
    if mean.shape != (d,) or cov.shape != (d, d):
        raise ValueError(f"mean {mean.shape} and cov {cov.shape} do not fit together")
    return mean, cov, provenance


def _peek_provenance(path: str) -> dict[str, Any]:
    """The provenance of a file that failed its checks, or {} when even that is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            provenance = json.loads(str(data["provenance"]))
        return provenance if isinstance(provenance, dict) else {}
    except Exception:
        return {}


def load_reference_stats(
    path: str,
    *,
    expected_network: FeatureNetwork,
    dataset: str | None = None,
    split: str | None = None,
) -> ReferenceStats:
    """Reads statistics written by save_reference_stats and checks they fit their use.

    Args:
      path: the .npz file.
      expected_network: the network whose features will be compared with these statistics;
        its name and fingerprint must match the ones stored.
      dataset, split: when given, must match the stored ones (and name them in errors).

    Raises:
      ReferenceStatsError: the file is missing, corrupted (unreadable, hash mismatch) or was
        made for another network, dataset or split; the message holds the command that
        recreates it.
    """
    network = expected_network.name

    def fix(ds: str | None, sp: str | None, image_shape: Any = None) -> str:
        size = 0
        if image_shape is not None and len(image_shape) == 3 and image_shape[0] == image_shape[1]:
            size = int(image_shape[0])
        command = reference_stats_command(ds or "", sp or "", network, output=path, image_size=size)
        return f"create them with: {command}"

    if not os.path.exists(path):
        raise ReferenceStatsError(f"no reference statistics at {path}; {fix(dataset, split)}")
    try:
        mean, cov, prov = _read(path)
        stats = ReferenceStats(
            stats=FeatureStats(mean=mean, cov=cov, count=int(prov["num_images"])),
            dataset=str(prov["dataset"]),
            tfds_version=str(prov["tfds_version"]),
            split=str(prov["split"]),
            image_shape=tuple(int(s) for s in prov["image_shape"]),  # type: ignore[arg-type]
            network_name=str(prov["network_name"]),
            network_fingerprint=str(prov["network_fingerprint"]),
            created=str(prov["created"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        hint = _peek_provenance(path)  # Untrusted, but names the command best.
        raise ReferenceStatsError(
            f"reference statistics {path} are corrupted ({e}); delete the file and "
            f"{fix(dataset or hint.get('dataset'), split or hint.get('split'))}"
        ) from None
    again = fix(stats.dataset, stats.split, stats.image_shape)
    if (stats.network_name, stats.network_fingerprint) != (
        network,
        expected_network.fingerprint,
    ):
        raise ReferenceStatsError(
            f"reference statistics {path} were made with feature network "
            f"{stats.network_name!r} (fingerprint {stats.network_fingerprint}), not "
            f"{network!r} (fingerprint {expected_network.fingerprint}); {again}"
        )
    for what, want, got in (("dataset", dataset, stats.dataset), ("split", split, stats.split)):
        if want is not None and want != got:
            raise ReferenceStatsError(
                f"reference statistics {path} are of {what} {got!r}, not {want!r}; "
                f"{fix(dataset or stats.dataset, split or stats.split, stats.image_shape)}"
            )
    return stats
