r"""Compute the reference feature statistics of a real dataset split (for FD / FID).

    python -m experiments.reference_stats --dataset=digits --split=train --network=digits
    python -m experiments.reference_stats --dataset=digits --split=test --network=digits
    python -m experiments.reference_stats --dataset=cifar10 --split=train --network=inception \
        --inception_weights=PATH

Reads every image of the split (as the pipeline serves it: resized to --image_size, never
flipped), writes mean, covariance and provenance to --output, by default
`<TFDS data_dir>/reference_stats/<dataset>_<split>_<network>.npz`, where `--mode=eval` looks.
The statistics of the held-out split against those of the train split give the FD floor: the
FD a perfect model would get from a sample of that size.
"""

from __future__ import annotations

import time

import ml_collections
from absl import app, flags

from diffusion_jax.evaluation import reference
from diffusion_jax.evaluation.features import FeatureNetwork

_DATASET = flags.DEFINE_string("dataset", None, "TFDS dataset name, e.g. digits or cifar10.")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split (or slice, e.g. 'train[:10000]').")
_NETWORK = flags.DEFINE_enum("network", "digits", ["digits", "inception"], "Feature network.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir; '' = $TFDS_DATA_DIR or default.")
_OUTPUT = flags.DEFINE_string("output", "", "Output .npz; '' = the default path (see above).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Resize images to this side, like data.image_size; 0 = stored size."
)
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "Feature holding the images.")
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    "inception_weights", "", "Inception weights file (required for --network=inception)."
)
flags.mark_flag_as_required("dataset")


def _feature_network(name: str, inception_weights: str) -> FeatureNetwork:
    if name == "inception":
        if not inception_weights:
            raise app.UsageError("--network=inception needs --inception_weights=PATH")
        # Imported only when asked for: the Inception port is large and digits need none of it.
        from diffusion_jax.evaluation.inception import InceptionFeatures

        return InceptionFeatures(inception_weights)
    from diffusion_jax.evaluation.digits_net import DigitsFeatures

    return DigitsFeatures()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data_config = ml_collections.ConfigDict(
        {
            "name": _DATASET.value,
            "data_dir": _DATA_DIR.value,
            "image_size": _IMAGE_SIZE.value,
            "image_key": _IMAGE_KEY.value,
            "label_key": "",
            "random_flip": False,
            "num_read_threads": 0,
        }
    )
    network = _feature_network(_NETWORK.value, _INCEPTION_WEIGHTS.value)
    start = time.perf_counter()
    stats = reference.compute_reference_stats(network, data_config, _SPLIT.value)
    output = _OUTPUT.value or reference.default_reference_path(
        data_config, _SPLIT.value, network.name
    )
    reference.save_reference_stats(output, stats)
    print(
        f"wrote {output}: {stats.num_images} images of {stats.dataset} {stats.tfds_version} "
        f"{stats.split} {stats.image_shape}, network {network.name} ({network.fingerprint}), "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    app.run(main)
