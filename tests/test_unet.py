"""Tests of the DDPM U-Net (tiny models on CPU; the CIFAR-10 model only via eval_shape)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet, count_params, validate_unet_config
from diffusion_jax.models.unet import model_resolutions, timestep_embedding

# Tiny model: 8x8 images, two levels (8, 4), attention at 4, GroupNorm with 8 groups.
TINY: dict[str, Any] = dict(
    ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=8
)
B, H, W, C = 2, 8, 8, 1


def _inputs(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(seed), (B, H, W, C))
    t = jnp.array([3, 700], jnp.int32)
    return x, t


def _perturb(params: Any, seed: int = 1, scale: float = 0.05) -> Any:
    """Add noise to every parameter so the ~zero-initialised layers pass signal through.

    numpy, not jax.random: eager jax.random compiles one kernel per parameter shape (slow).
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(p + scale * rng.standard_normal(p.shape, dtype=np.float32)), params
    )


@pytest.fixture(scope="module")
def tiny_init_params() -> Any:
    """The one real (compiled) initialisation of the test file: XLA:CPU compiles of init are slow
    (an 'rbg' key compiles ~2x faster than threefry; the initialisers are the same)."""
    x, t = _inputs()
    key = jax.random.key(0, impl="rbg")
    return jax.jit(lambda: UNet(**TINY).init(key, x, t, train=False))()["params"]


@pytest.fixture(scope="module")
def tiny_params(tiny_init_params: Any) -> Any:
    return _perturb(tiny_init_params)


def test_class_embedding_adds_num_classes_plus_one_rows() -> None:
    base = UNet(**TINY)
    cond = UNet(**TINY, num_classes=10)
    assert count_params(cond, (H, W, C)) - count_params(base, (H, W, C)) == 11 * 4 * TINY["ch"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_is_input_shape_and_float32_with_float32_params(dtype: Any) -> None:
    x, t = _inputs()
    model = UNet(**TINY, dtype=dtype)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), x, t, train=False)
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert out.shape == (B, H, W, C)
    assert out.dtype == jnp.float32


def test_out_channels_overrides_output_channels() -> None:
    x, t = _inputs()
    out, _ = jax.eval_shape(
        lambda: UNet(**TINY, out_channels=2 * C).init_with_output(
            jax.random.key(0), x, t, train=False
        )
    )
    assert out.shape == (B, H, W, 2 * C)


def test_non_square_images_are_supported() -> None:
    x = jnp.zeros((1, 8, 12, 3))
    out, _ = jax.eval_shape(
        lambda: UNet(**TINY).init_with_output(jax.random.key(0), x, jnp.zeros(1), train=False)
    )
    assert out.shape == (1, 8, 12, 3)


def test_initial_output_is_near_zero_because_output_conv_is_zero_initialised(
    tiny_init_params: Any,
) -> None:
    x, t = _inputs()
    out = jax.jit(lambda: UNet(**TINY).apply({"params": tiny_init_params}, x, t, train=False))()
    assert float(jnp.max(jnp.abs(out))) < 1e-3
    assert float(jnp.max(jnp.abs(tiny_init_params["conv_out"]["kernel"]))) < 1e-3
    assert float(jnp.max(jnp.abs(tiny_init_params["mid_block_1"]["conv2"]["kernel"]))) < 1e-3
    assert float(jnp.max(jnp.abs(tiny_init_params["mid_attn_1"]["proj_out"]["kernel"]))) < 1e-3
    assert float(jnp.std(tiny_init_params["mid_block_1"]["conv1"]["kernel"])) > 1e-2


def test_output_depends_on_timestep(tiny_params: Any) -> None:
    x, _ = _inputs()
    model = UNet(**TINY)
    f = jax.jit(lambda t: model.apply({"params": tiny_params}, x, t, train=False))
    a = f(jnp.array([10, 10]))
    b = f(jnp.array([500, 500]))
    assert float(jnp.mean(jnp.abs(a - b))) > 1e-3 * float(jnp.mean(jnp.abs(a)))


def test_integer_and_float_timesteps_give_the_same_embedding_and_output_shape() -> None:
    # t only enters the model through timestep_embedding, so equal embeddings = equal outputs.
    np.testing.assert_array_equal(
        timestep_embedding(jnp.array([3, 700]), 16), timestep_embedding(jnp.array([3.0, 700.0]), 16)
    )
    x, _ = _inputs()
    out, _ = jax.eval_shape(
        lambda: UNet(**TINY).init_with_output(
            jax.random.key(0), x, jnp.array([3.5, 700.25]), train=False
        )
    )
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_timestep_embedding_is_sin_cos_of_geometric_frequencies() -> None:
    emb = timestep_embedding(jnp.array([0, 1, 999]), 8)
    assert emb.shape == (3, 8) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(emb[2, :4], np.sin(999 * freqs), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb[2, 4:], np.cos(999 * freqs), rtol=1e-4, atol=1e-4)


def test_class_labels_change_output_and_null_label_is_accepted(tiny_params: Any) -> None:
    x, t = _inputs()
    model = UNet(**TINY, num_classes=3)
    labels = jnp.array([0, 1])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, labels, train=False))
    assert shapes["params"]["label_emb"]["embedding"].shape == (4, 4 * TINY["ch"])  # 3 + null
    # The conditional model is the unconditional one plus the label embedding.
    emb = jax.random.normal(jax.random.key(3), (4, 4 * TINY["ch"]))
    params = {**tiny_params, "label_emb": {"embedding": emb}}
    same = jax.tree.map(lambda p, s: p.shape == s.shape, params, shapes["params"])
    assert all(jax.tree.leaves(same))
    f = jax.jit(lambda y: model.apply({"params": params}, x, t, y, train=False))
    out_a, out_b, out_null = f(jnp.array([0, 0])), f(jnp.array([2, 2])), f(jnp.array([3, 3]))
    assert bool(jnp.all(jnp.isfinite(out_null)))
    assert float(jnp.mean(jnp.abs(out_a - out_b))) > 1e-4
    assert float(jnp.mean(jnp.abs(out_a - out_null))) > 1e-4


def test_dropout_only_in_training_and_deterministic_given_rng(tiny_params: Any) -> None:
    x, t = _inputs()
    model = UNet(**{**TINY, "dropout": 0.3})  # dropout adds no parameters
    v = {"params": tiny_params}

    @jax.jit
    def apply(rng: jax.Array) -> tuple[Any, Any]:
        return (
            model.apply(v, x, t, train=False),
            model.apply(v, x, t, train=True, rngs={"dropout": rng}),
        )

    eval_a, train_a = apply(jax.random.key(1))
    eval_b, train_b = apply(jax.random.key(2))
    _, train_a2 = apply(jax.random.key(1))
    np.testing.assert_array_equal(eval_a, eval_b)  # no dropout at eval, whatever the rng
    np.testing.assert_array_equal(train_a, train_a2)  # same dropout rng -> same output
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-4  # rng matters in training
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-4  # dropout is active in training


def test_bfloat16_compute_is_close_to_float32(tiny_params: Any) -> None:
    x, t = _inputs()
    out32, out16 = jax.jit(
        lambda: tuple(
            UNet(**TINY, dtype=d).apply({"params": tiny_params}, x, t, train=False)
            for d in (jnp.float32, jnp.bfloat16)
        )
    )()
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel


def test_without_resampling_convs_shapes_still_match() -> None:
    x, t = _inputs()
    out, variables = jax.eval_shape(
        lambda: UNet(**TINY, resamp_with_conv=False).init_with_output(
            jax.random.key(0), x, t, train=False
        )
    )
    assert out.shape == x.shape
    assert not any("sample" in k for k in variables["params"])


def test_model_resolutions_lists_feature_map_heights() -> None:
    assert model_resolutions(32, (1, 2, 2, 2)) == (32, 16, 8, 4)
    assert model_resolutions((8, 12), (1, 2)) == (8, 4)


def test_validate_unet_config_accepts_reference_configs() -> None:
    validate_unet_config(32, 128, (1, 2, 2, 2), (16,))
    validate_unet_config(256, 128, (1, 1, 2, 2, 4, 4), (16,))
    validate_unet_config((8, 12), 16, (1, 2), (4,), num_groups=8, num_classes=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=28), "divisible by 2\\*\\*\\(len\\(ch_mult\\)-1\\) = 8"),
        (dict(image_size=(32, 20)), "cannot be downsampled"),
        (dict(attn_resolutions=(14,)), "choose from \\(32, 16, 8, 4\\)"),
        (dict(ch=100), "num_groups=32"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_validate_unet_config_rejects_bad_configs(kwargs: dict[str, Any], match: str) -> None:
    cfg: dict[str, Any] = dict(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        validate_unet_config(
            cfg.pop("image_size"),
            cfg.pop("ch"),
            cfg.pop("ch_mult"),
            cfg.pop("attn_resolutions"),
            **cfg,
        )


@pytest.mark.parametrize(
    ("model_kwargs", "shape", "labels", "match"),
    [
        ({}, (1, 7, 8, 1), None, "H and W must be divisible by"),
        ({"attn_resolutions": (16,)}, (1, 8, 8, 1), None, "choose from \\(8, 4\\)"),
        ({"ch": 12}, (1, 8, 8, 1), None, "GroupNorm with num_groups=8"),
        ({}, (1, 8, 8, 1), [0], "labels were given but the UNet has num_classes=None"),
        ({"num_classes": 10}, (1, 8, 8, 1), None, "needs labels"),
        ({"num_classes": 10}, (1, 8, 8, 1), [0, 1], "labels must have shape"),
        ({}, (8, 8, 1), None, "NHWC"),
    ],
)
def test_model_raises_clear_value_error_before_compute(
    model_kwargs: dict[str, Any], shape: tuple[int, ...], labels: list[int] | None, match: str
) -> None:
    model = UNet(**{**TINY, **model_kwargs})
    x = jnp.zeros(shape)
    y = None if labels is None else jnp.array(labels)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros(1), y, train=False))


def test_remat_gives_the_same_outputs_and_gradients_with_the_same_parameters() -> None:
    # One level: every residual block (what remat wraps) of the down, middle and up paths, and
    # half the compile time of two levels. Random parameters, not init's: with the
    # zero-initialised output conv most gradients would be zero.
    kwargs = dict(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=8)
    plain, remat = UNet(**kwargs, dropout=0.1), UNet(**kwargs, dropout=0.1, remat=True)
    x, t = _inputs()
    shapes = jax.eval_shape(lambda: plain.init(jax.random.key(1), x, t, train=False))["params"]
    remat_shapes = jax.eval_shape(lambda: remat.init(jax.random.key(1), x, t, train=False))
    assert jax.tree.structure(shapes) == jax.tree.structure(remat_shapes["params"])
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape, dtype=np.float32)), shapes
    )

    def loss(model: UNet, p: Any) -> jax.Array:
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
        return jnp.sum(out**2)

    (l1, g1), (l2, g2) = (
        jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params) for m in (plain, remat)
    )
    assert float(l1) > 0
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        # float32 sums in another order: absolute differences relative to the largest gradient.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    # The signal reaches most of the network, so most gradients compared are far from zero.
    leaf_maxima = [float(np.abs(g).max()) for g in jax.tree.leaves(g1)]
    assert np.mean([m > 1e-3 * scale for m in leaf_maxima]) > 0.8
