"""`xla.cpu_ynnpack_ops`: the routing reaches XLA:CPU, changes rounding only, bad values are
refused in one line before anything compiles."""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, digits
from diffusion_jax import parallel, train_state
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import xla_options
from diffusion_jax.runner.setup import ModelSetup, jit_train_step
from diffusion_jax.runner.validation import validate_config


def _with_ops(config, value):
    config = copy.deepcopy(config)
    config.xla.cpu_ynnpack_ops = value
    return config


def _ynnpack_roots(compiled_text: str) -> set[str]:
    """The root op kinds of the fusions XLA:CPU handed to YNNPACK in a compiled program."""
    roots = set()
    for called in re.findall(r"kind=kCustom, calls=%([\w.]+).*__ynn_fusion", compiled_text):
        body = compiled_text[compiled_text.index(f"%{called} ") :]
        roots.add(re.search(r"ROOT %\S+ = \S+ ([\w-]+)\(", body[: body.index("\n}")]).group(1))
    return roots


@pytest.mark.parametrize(
    ("value", "ops"),
    [("jax", None), ("", ()), ("dot", ("dot",)), ("reduce,convolution", ("reduce", "convolution"))],
)
def test_the_routing_names_parse_to_op_kinds(value, ops):
    assert xla_options.ynnpack_ops(_with_ops(default.get_config(), value)) == ops


@pytest.mark.parametrize("value", ["conv", "dot,dot", "dot, reduce", "DOT", "none"])
def test_an_unknown_routing_is_refused_in_one_line_naming_the_choices(value):
    with pytest.raises(ConfigError) as error:
        validate_config(_with_ops(digits.get_config(), value), num_devices=1)
    message = str(error.value)
    assert "\n" not in message and "xla.cpu_ynnpack_ops=" in message
    assert "'convolution', 'dot', 'reduce'" in message


def test_a_config_saved_before_the_key_existed_keeps_jaxs_routing():
    config = default.get_config()
    del config["xla"]
    assert xla_options.ynnpack_ops(config) is None
    assert xla_options.compiler_options(config) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", set()), ("dot", {"dot"}), ("reduce", {"reduce"}), ("convolution", {"convolution"})],
)
def test_only_the_named_op_kinds_are_handed_to_ynnpack(value, expected):
    def f(x, k, w):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(jnp.mean(y, axis=(1, 2))) @ w

    x, k, w = jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((32, 32))
    options = xla_options.compiler_options(_with_ops(default.get_config(), value))
    compiled = jax.jit(f, compiler_options=options).lower(x, k, w).compile()
    assert _ynnpack_roots(compiled.as_text()) == expected


@pytest.mark.slow
def test_the_digits_train_step_under_each_routing_computes_the_same_step(tiny_config):
    """One train step of the digits U-Net under jax's routing and the config's: the same
    loss, gradients and parameters up to float32 rounding; the copy-insertion option that
    comes with a routing changes no bit."""
    setup = ModelSetup(tiny_config)
    mesh = parallel.create_mesh()
    step = train_state.make_train_step(
        setup.model, setup.formulation, setup.optimizer, 0.0, 0.99, "ramp"
    )
    model, optimizer, shape = setup.model, setup.optimizer, setup.image_shape
    init = jax.jit(lambda rng: train_state.init_train_state(model, optimizer, rng, shape))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (16, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    routed = xla_options.compiler_options(tiny_config)
    unrouted = xla_options.compiler_options(_with_ops(tiny_config, "jax"))
    without_region_analysis = {k: v for k, v in routed.items() if "region_analysis" not in k}
    assert without_region_analysis != routed
    results = []
    for options in (unrouted, routed, without_region_analysis):
        jitted = jit_train_step(step, mesh, compiler_options=options)
        state, metrics = jitted(init(jax.random.PRNGKey(0)), parallel.global_batch(batch, mesh))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (params_a, metrics_a), (params_b, metrics_b), (params_c, _) = results
    for b, c in zip(jax.tree.leaves(params_b), jax.tree.leaves(params_c), strict=True):
        np.testing.assert_array_equal(b, c)
    assert tiny_config.xla.cpu_ynnpack_ops != "jax"  # the two routings differ
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
