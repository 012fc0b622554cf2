"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as ported by pytorch-fid) in Flax.

This is the network behind the FID/IS numbers of TF-GAN, pytorch-fid and EDM: torchvision's
Inception3 without the auxiliary head, with 1008 output classes and pytorch-fid's patches
(average pools in the A/C/E blocks exclude the padding from the count; the last E block pools
with max). Features are pool3 (2048-d, the input of the classifier); logits are its 1008-way
output (for the Inception Score).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` converted to an `.npz` by
`experiments/convert_inception_weights.py`; the `.npz` keys are the torch state_dict names
and its arrays keep torch layouts (conv OIHW, fc (out, in)). Layout is NHWC throughout.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PTH_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
IMAGE_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3

# FID numbers must not depend on the accelerator: keep float32 convolutions and matmuls exact
# (GPUs would otherwise use TF32 and TPUs bfloat16 passes).
_PRECISION = jax.lax.Precision.HIGHEST

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
    return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU.

    Submodules are named 'conv' and 'bn' like pytorch-fid's BasicConv2d, so the torch
    state_dict maps onto the Flax variables by name.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: Padding = ((0, 0), (0, 0))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H', W', features)."""
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=self.padding,
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels in the window.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and avg-pool branches; 224 + pool_features out."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 35, 35, C) -> (B, 35, 35, 224 + pool_features)."""
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 35, 35, 288) -> (B, 17, 17, 768)."""
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches with `channels_7x7` inner channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 17, 17, 768) -> (B, 17, 17, 768)."""
        c7 = self.channels_7x7
        row, col = ((1, 7), _pad(0, 3)), ((7, 1), _pad(3, 0))
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
        b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, col[0], padding=col[1], name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, row[0], padding=row[1], name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, col[0], padding=col[1], name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 17, 17, 768) -> (B, 8, 8, 1280)."""
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (avg pool branch) and Mixed_7c (max pool branch, as in the TF graph)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, 8, 8, C) -> (B, 8, 8, 2048)."""
        row, col = ((1, 3), _pad(0, 1)), ((3, 1), _pad(1, 0))
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, row[0], padding=row[1], name="branch3x3_2a")(b3),
                BasicConv(384, col[0], padding=col[1], name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, row[0], padding=row[1], name="branch3x3dbl_3a")(bd),
                BasicConv(384, col[0], padding=col[1], name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3. Variables: {'params', 'batch_stats'} (inference only)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: float32 (B, 299, 299, 3) in [-1, 1] (see `preprocess`).

        Returns (pool3 features (B, 2048), logits (B, 1008)).
        """
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)  # 149
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = BasicConv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)  # 73
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_stride2(x)  # 35
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)  # 17
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)  # 8
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=_PRECISION, name="fc")(pool3)
        return pool3, logits


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (B, H, W, C), C in {1, 3} -> float32 (B, 299, 299, 3) in [-1, 1], as pytorch-fid.

    Bilinear resize with half-pixel centres and no antialiasing, which is what torch's
    F.interpolate(mode='bilinear', align_corners=False) computes, also when downsampling.
    """
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(
            x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), method="bilinear", antialias=False
        )
    return 2.0 * x - 1.0


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"Inception expects uint8 images of shape (B, H, W, 1 or 3), got {images.dtype} "
            f"{images.shape}; convert with np.clip(np.round(x), 0, 255).astype(np.uint8)."
        )


# ---------------------------------------------------------------------------------------------
# Weights: torch state_dict names <-> Flax variables.

# Flax leaf name -> (collection, torch suffix).
_FLAX_TO_TORCH = {
    "kernel": ("params", "weight"),
    "scale": ("params", "weight"),
    "bias": ("params", "bias"),
    "mean": ("batch_stats", "running_mean"),
    "var": ("batch_stats", "running_var"),
}


def _torch_shape(flax_path: Sequence[str], shape: tuple[int, ...]) -> tuple[int, ...]:
    if flax_path[-1] != "kernel":
        return shape
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return (shape[1], shape[0])  # Dense (in, out) -> (out, in)


def _flax_layout(flax_path: Sequence[str], value: np.ndarray) -> np.ndarray:
    if flax_path[-1] != "kernel":
        return value
    if value.ndim == 4:  # OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    return np.transpose(value)


def _variable_shapes() -> dict[str, Any]:
    """Shape tree of the Flax variables ({'params', 'batch_stats'}), without computing them."""
    x = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    return dict(jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x), x))


def _torch_names(variable_shapes: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], Any]]:
    """torch state_dict name -> (Flax path incl. collection, ShapeDtypeStruct)."""
    names: dict[str, tuple[tuple[str, ...], Any]] = {}
    for collection, tree in variable_shapes.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(str(k.key) for k in key_path)
            expected_collection, suffix = _FLAX_TO_TORCH[path[-1]]
            assert expected_collection == collection, path
            names[".".join((*path[:-1], suffix))] = ((collection, *path), leaf)
    return names


def expected_weight_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid state_dict name -> torch shape, for every array the `.npz` must hold.

    BatchNorm's `num_batches_tracked` counters are not part of it (unused at inference).
    """
    return {
        name: _torch_shape(path[1:], tuple(leaf.shape))
        for name, (path, leaf) in _torch_names(_variable_shapes()).items()
    }


def _missing_weights_message(path: str) -> str:
    pth = PTH_URL.rsplit("/", 1)[-1]
    output = path or "inception.npz"
    where = f"Inception weights not found at {path!r}" if path else "No Inception weights given"
    return (
        f"{where}: download {PTH_URL}, convert it with "
        f"`python experiments/convert_inception_weights.py --input={pth} --output={output}` "
        f"(needs torch) and set eval.inception_weights={output}."
    )


def _first(names: Sequence[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_inception_variables(path: str) -> dict[str, Any]:
    """Reads a converted `.npz` into Flax variables {'params': ..., 'batch_stats': ...}.

    Every pytorch-fid state_dict name must be present with its torch shape; arrays are
    transposed to Flax layouts (conv OIHW -> HWIO, fc (out, in) -> (in, out)) as float32.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(path))
    names = _torch_names(_variable_shapes())
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if not k.endswith("num_batches_tracked")}
    missing = [k for k in names if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in names)
    wrong = [
        f"{k} {arrays[k].shape} != {_torch_shape(p[1:], tuple(leaf.shape))}"
        for k, (p, leaf) in names.items()
        if k in arrays and arrays[k].shape != _torch_shape(p[1:], tuple(leaf.shape))
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{label}: {_first(items)}"
            for label, items in (
                ("missing", missing),
                ("wrong shape", wrong),
                ("unexpected", unexpected),
            )
            if items
        ]
        raise ValueError(
            f"{path} is not a converted FID Inception state_dict ({'; '.join(problems)}); "
            "convert pytorch-fid's pt_inception-2015-12-05 .pth with "
            "experiments/convert_inception_weights.py."
        )
    variables: dict[str, Any] = {}
    for name, (flax_path, _) in names.items():
        node = variables
        for key in flax_path[:-1]:
            node = node.setdefault(key, {})
        node[flax_path[-1]] = _flax_layout(flax_path, np.asarray(arrays[name], np.float32))
    return variables


def weights_fingerprint(path: str) -> str:
    """First 16 hex digits of the sha256 of the weights in a converted `.npz`.

    Hashes the arrays (sorted names, shapes, float32 bytes) rather than the file: np.savez
    stamps the write time into the zip, so two conversions of the same .pth differ as files.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(path))
    digest = hashlib.sha256()
    with np.load(path) as npz:
        for name in sorted(npz.files):
            if name.endswith("num_batches_tracked"):
                continue
            value = np.ascontiguousarray(npz[name], dtype=np.float32)
            digest.update(f"{name}{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()[:16]


class InceptionFeatures:
    """FeatureNetwork 'inception': uint8 images -> (pool3 features (B, 2048), logits (B, 1008)).

    Images go through one jitted program in batches of `batch_size`; the last batch is padded,
    so any number of images of one size compiles once.
    """

    name = "inception"
    feature_dim = FEATURE_DIM

    def __init__(self, weights_path: str, batch_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.fingerprint = weights_fingerprint(weights_path)
        self._variables = jax.device_put(load_inception_variables(weights_path))
        model = InceptionV3()
        self._forward = jax.jit(lambda variables, x: model.apply(variables, preprocess(x)))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, C), C in {1, 3} -> (features float32 (B, 2048), logits (B, 1008))."""
        images = np.asarray(images)
        _check_images(images)
        n, b = images.shape[0], self.batch_size
        features = np.empty((n, FEATURE_DIM), np.float32)
        logits = np.empty((n, NUM_CLASSES), np.float32)
        for start in range(0, n, b):
            batch = images[start : start + b]
            real = batch.shape[0]
            if real < b:
                pad = np.zeros((b - real, *batch.shape[1:]), np.uint8)
                batch = np.concatenate([batch, pad])
            f, lg = self._forward(self._variables, batch)
            features[start : start + real] = np.asarray(f)[:real]
            logits[start : start + real] = np.asarray(lg)[:real]
        return features, logits
