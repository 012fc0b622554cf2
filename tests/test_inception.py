"""The Flax FID Inception-v3: structure, weight loading and a forward on small images.

Numerical parity with pytorch-fid's torch network needs torch, so it lives outside the suite in
benchmarks/inception_parity.py; here the structure is pinned to numbers measured from torch.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation.features import FeatureNetwork

# Measured offline from pytorch-fid 0.3.0 (torch 2.14.1, torchvision 0.29.1): the network its
# fid_inception_v3() builds (torchvision Inception3(num_classes=1008, aux_logits=False) with the
# FIDInceptionA/C/E_1/E_2 blocks), before loading weights:
#   sum(p.numel() for p in net.parameters())                              -> 23,850,960
#   sum(b.numel() for n, b in net.named_buffers() if 'running' in n)      -> 34,432 (94 BNs)
#   state_dict minus num_batches_tracked: 472 arrays; sha256 of
#   "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(...)) -> the digest below.
TORCH_NUM_PARAMS = 23_850_960
TORCH_NUM_BN_STATS = 34_432
TORCH_NUM_ARRAYS = 472
TORCH_NAMES_SHAPES_SHA256 = "954403df03f5a6d824cbccdc11f2b359003e906b126822a8a9a1afc4b6c8b849"


def _synthetic_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for every expected name and torch shape, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in inception.expected_weight_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif name == "fc.weight":
            value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
        else:  # BN bias and running mean, fc bias
            value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        arrays[name] = value
    return arrays


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return _synthetic_weights()


@pytest.fixture(scope="module")
def weights_path(weights: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("inception") / "weights.npz")
    np.savez(path, **weights)
    return path


@pytest.fixture(scope="module")
def digit_images() -> np.ndarray:
    """Two 8x8 grayscale digits, uint8 (2, 8, 8, 1)."""
    digits = load_digits().images[:2]  # values 0..16
    return np.round(digits * (255 / 16)).astype(np.uint8)[..., None]


def test_port_has_pytorch_fid_parameter_and_batchnorm_statistic_counts() -> None:
    x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: inception.InceptionV3().init(jax.random.key(0), x), x)
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
    assert count(shapes["params"]) == TORCH_NUM_PARAMS
    assert count(shapes["batch_stats"]) == TORCH_NUM_BN_STATS


def test_expected_weights_are_pytorch_fid_state_dict_names_and_shapes() -> None:
    expected = inception.expected_weight_shapes()
    assert len(expected) == TORCH_NUM_ARRAYS
    assert expected["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert expected["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert expected["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert expected["Mixed_7c.branch_pool.bn.running_mean"] == (192,)
    assert expected["fc.weight"] == (1008, 2048)
    assert expected["fc.bias"] == (1008,)
    table = "\n".join(f"{k}:{tuple(v)}" for k, v in sorted(expected.items()))
    assert hashlib.sha256(table.encode()).hexdigest() == TORCH_NAMES_SHAPES_SHA256


def test_loader_transposes_torch_layouts_into_flax_variables(
    weights: dict[str, np.ndarray], weights_path: str
) -> None:
    variables = inception.load_inception_variables(weights_path)
    conv = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        conv, weights["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], weights["fc.weight"].T)
    bn = variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]
    np.testing.assert_array_equal(bn["var"], weights["Conv2d_1a_3x3.bn.running_var"])
    np.testing.assert_array_equal(
        variables["params"]["Conv2d_1a_3x3"]["bn"]["scale"], weights["Conv2d_1a_3x3.bn.weight"]
    )


def test_loader_names_missing_key(weights: dict[str, np.ndarray], tmp_path: str) -> None:
    path = os.path.join(tmp_path, "missing.npz")
    np.savez(path, **{k: v for k, v in weights.items() if k != "Mixed_7b.branch3x3_2a.bn.bias"})
    with pytest.raises(ValueError, match=r"missing: Mixed_7b\.branch3x3_2a\.bn\.bias") as err:
        inception.load_inception_variables(path)
    assert "\n" not in str(err.value)


def test_loader_names_wrong_shape(weights: dict[str, np.ndarray], tmp_path: str) -> None:
    path = os.path.join(tmp_path, "wrong.npz")
    np.savez(path, **{**weights, "fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(
        ValueError, match=r"wrong shape: fc\.weight \(1000, 2048\) != \(1008, 2048\)"
    ):
        inception.load_inception_variables(path)


def test_missing_weights_file_says_where_to_download_and_how_to_convert(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "nope.npz")
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception_variables(path)
    message = str(err.value)
    assert inception.PTH_URL in message
    converter = "convert_inception_weights.py --input=pt_inception-2015-12-05-6726825d.pth"
    assert f"{converter} --output={path}" in message
    assert f"eval.inception_weights={path}" in message
    assert "\n" not in message


def test_fingerprint_follows_the_weights_not_the_file(
    weights: dict[str, np.ndarray], weights_path: str, tmp_path: str
) -> None:
    reordered = os.path.join(tmp_path, "reordered.npz")
    np.savez(reordered, **dict(reversed(list(weights.items()))))
    changed = os.path.join(tmp_path, "changed.npz")
    np.savez(changed, **{**weights, "fc.bias": weights["fc.bias"] + 1e-3})
    fingerprint = inception.weights_fingerprint(weights_path)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert inception.weights_fingerprint(reordered) == fingerprint
    assert inception.weights_fingerprint(changed) != fingerprint


def _torch_bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's bilinear, align_corners=False (no antialiasing)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), i0), 1 - lam)
    np.add.at(matrix, (np.arange(n_out), i1), lam)
    return matrix


@pytest.mark.parametrize("height,width,channels", [(8, 8, 1), (333, 512, 3)])
def test_preprocess_matches_torch_bilinear_resize(height: int, width: int, channels: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, height, width, channels), np.uint8)
    x = np.asarray(inception.preprocess(jnp.asarray(images)))
    assert x.shape == (2, 299, 299, 3)
    rows, cols = _torch_bilinear_1d(height, 299), _torch_bilinear_1d(width, 299)
    want = np.einsum("yh,bhwc,xw->byxc", rows, images / 255.0, cols, optimize=True) * 2 - 1
    # Source coordinates are float32 (as in torch): at width 512 they are off by up to ~3e-5
    # pixels; antialiasing or other pixel-centre conventions would be off by > 1e-2.
    np.testing.assert_allclose(x, np.broadcast_to(want, x.shape), atol=1e-4)


@pytest.mark.slow  # compiles the full Inception-v3 twice (batch 3 and batch 1)
def test_forward_gives_finite_features_and_logits_independent_of_batch_size(
    weights_path: str, digit_images: np.ndarray
) -> None:
    padded: FeatureNetwork = inception.InceptionFeatures(weights_path, batch_size=3)  # +1 pad
    assert (padded.name, padded.feature_dim) == ("inception", 2048)
    assert padded.fingerprint == inception.weights_fingerprint(weights_path)
    features, logits = padded(digit_images)
    assert features.shape == (2, 2048) and features.dtype == np.float32
    assert logits.shape == (2, 1008) and logits.dtype == np.float32
    assert np.all(np.isfinite(features)) and np.all(np.isfinite(logits))
    assert np.all(features >= 0)  # pool3 averages ReLU outputs
    assert not np.allclose(features[0], features[1])  # the two digits are told apart

    one_at_a_time = inception.InceptionFeatures(weights_path, batch_size=1)
    features_1, logits_1 = one_at_a_time(digit_images)
    np.testing.assert_allclose(features_1, features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits_1, logits, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="uint8"):
        one_at_a_time(digit_images.astype(np.float32))
