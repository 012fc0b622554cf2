"""The DDPM U-Net of Ho et al. 2020 in flax.linen (NHWC throughout).

Architecture (same structure and parameter count as the reference TF model):

  * time embedding: sinusoidal(t, ch) -> Dense(4ch) -> swish -> Dense(4ch); an optional
    class embedding ``Embed(num_classes + 1, 4ch)`` is added to it (the last row is the
    "null" class used for classifier-free guidance);
  * ``conv_in`` (3x3, ch), then for each level ``num_res_blocks`` ResNet blocks (with
    self-attention where the feature map height is in ``attn_resolutions``) and a downsample
    (except after the last level); every intermediate activation is kept as a skip;
  * middle: ResNet block -> attention -> ResNet block;
  * up path: per level ``num_res_blocks + 1`` ResNet blocks, each fed the concatenation of the
    running activation and one popped skip, then an upsample (except at the top level);
  * GroupNorm -> swish -> conv3x3 to ``out_channels``.

The last conv of every ResNet block, the attention output projection and the output conv are
initialised (almost) to zero as in the reference, so every block starts as the identity and the
initial model output is ~0.

Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters are always
float32. GroupNorm statistics, the sinusoidal embedding and the attention softmax are computed
in float32, and the output is returned as float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "AttnBlock",
    "Downsample",
    "ResnetBlock",
    "UNet",
    "Upsample",
    "count_params",
    "model_resolutions",
    "timestep_embedding",
    "validate_unet_config",
]

Dtype = Any


def _default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Glorot-style uniform init (fan_avg); ``scale=0`` means a tiny (1e-10) scale as in the
    reference, which keeps the weights non-degenerate while making the layer output ~0."""
    return nn.initializers.variance_scaling(
        1e-10 if scale == 0 else scale, mode="fan_avg", distribution="uniform"
    )


# --------------------------------------------------------------------------------------------
# Configuration checks (pure Python: usable before any tracing / compilation).
# --------------------------------------------------------------------------------------------


def _as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}.")
    return hw[0], hw[1]


def model_resolutions(image_size: int | Sequence[int], ch_mult: Sequence[int]) -> tuple[int, ...]:
    """Feature-map heights of the U-Net levels: (H, H/2, ..., H/2**(len(ch_mult)-1)).

    These are the values ``attn_resolutions`` may contain (resolution = feature-map height).
    """
    h, _ = _as_hw(image_size)
    return tuple(h // 2**i for i in range(len(ch_mult)))


def validate_unet_config(
    image_size: int | Sequence[int],
    ch: int,
    ch_mult: Sequence[int],
    attn_resolutions: Sequence[int],
    *,
    num_res_blocks: int = 2,
    dropout: float = 0.0,
    num_classes: int | None = None,
    out_channels: int | None = None,
    num_groups: int = 32,
) -> None:
    """Raise ValueError (one line naming the fix) if the U-Net cannot run on this config.

    image_size: H (square images) or (H, W). Pure Python, no JAX compute: call it from a runner
    to reject a config before compiling anything. ``UNet`` runs the same checks on its input.
    """
    h, w = _as_hw(image_size)
    mults = tuple(ch_mult)
    if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
        raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {ch_mult!r}.")
    if not isinstance(ch, int) or ch < 1:
        raise ValueError(f"ch must be a positive int, got {ch!r}.")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
    bad = [c for c in (ch, *(ch * m for m in mults)) if c % num_groups]
    if bad:
        raise ValueError(
            f"GroupNorm with num_groups={num_groups} needs every channel count divisible by it, "
            f"but ch={ch}, ch_mult={mults} give {bad}; choose ch (and ch*ch_mult) as multiples "
            f"of {num_groups} or set num_groups to a divisor of them."
        )
    if num_res_blocks < 0:
        raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    factor = 2 ** (len(mults) - 1)
    if h < 1 or w < 1 or h % factor or w % factor:
        raise ValueError(
            f"Image size {h}x{w} cannot be downsampled {len(mults) - 1} times: H and W must be "
            f"divisible by 2**(len(ch_mult)-1) = {factor}; resize/pad the images or use a shorter "
            f"ch_mult."
        )
    resolutions = model_resolutions((h, w), mults)
    missing = [r for r in attn_resolutions if r not in resolutions]
    if missing:
        raise ValueError(
            f"attn_resolutions {tuple(attn_resolutions)} contains {missing}, which are not "
            f"feature-map heights of this model; for {h}x{w} images and ch_mult={mults} choose "
            f"from {resolutions}."
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or >= 1, got {num_classes}.")
    if out_channels is not None and out_channels < 1:
        raise ValueError(f"out_channels must be None or >= 1, got {out_channels}.")


def count_params(model: nn.Module, image_shape: Sequence[int], *, batch_size: int = 1) -> int:
    """Number of parameters of ``model`` for images of shape (H, W, C), via ``jax.eval_shape``
    (no parameter is materialised, so this is cheap even for large models)."""
    b = batch_size
    x = jax.ShapeDtypeStruct((b, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    has_labels = getattr(model, "num_classes", None) is not None
    labels = jax.ShapeDtypeStruct((b,), jnp.int32) if has_labels else None

    def init(x: jax.Array, t: jax.Array, labels: jax.Array | None) -> Any:
        return model.init(jax.random.key(0), x, t, labels, train=False)["params"]

    shapes = jax.eval_shape(init, x, t, labels)
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (tensor2tensor layout: [sin | cos]).

    t: (B,) int or float timesteps -> (B, dim) float32. Always float32: bf16 cannot resolve
    t * freq for t ~ 1000.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class _Norm(nn.Module):
    """GroupNorm computed in float32, result cast back to the compute dtype."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6, dtype=jnp.float32, name="gn")(
            x.astype(jnp.float32)
        )
        return y.astype(self.dtype)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> +Dense(swish(temb)) -> GN -> swish -> dropout -> conv3x3 (~0 init),
    plus a 1x1 (or 3x3 with ``conv_shortcut``) projection of the input when channels change.

    x: (B, H, W, C), temb: (B, E) -> (B, H, W, out_ch).
    """

    out_ch: int | None = None
    dropout: float = 0.0
    conv_shortcut: bool = False
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        conv = lambda k, name, scale=1.0: nn.Conv(
            out_ch, (k, k), dtype=self.dtype, kernel_init=_default_init(scale), name=name
        )
        h = nn.swish(_Norm(self.num_groups, self.dtype, name="norm1")(x))
        h = conv(3, "conv1")(h)
        temb_proj = nn.Dense(
            out_ch, dtype=self.dtype, kernel_init=_default_init(), name="temb_proj"
        )(nn.swish(temb))
        h = h + temb_proj[:, None, None, :]
        h = nn.swish(_Norm(self.num_groups, self.dtype, name="norm2")(h))
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(3, "conv2", 0.0)(h)
        if c != out_ch:
            x = conv(3, "conv_shortcut")(x) if self.conv_shortcut else conv(1, "nin_shortcut")(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection.

    x: (B, H, W, C) -> (B, H, W, C). Logits and softmax are computed in float32.
    """

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        dense = lambda name, scale=1.0: nn.Dense(
            c, dtype=self.dtype, kernel_init=_default_init(scale), name=name
        )
        h = _Norm(self.num_groups, self.dtype, name="norm")(x)
        q, k, v = (dense(n)(h).reshape(b, height * width, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c**-0.5), axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, height, width, c)
        h = dense("proj_out", 0.0)(h)
        return x.astype(self.dtype) + h


class Downsample(nn.Module):
    """Halve H and W: stride-2 conv3x3 (``with_conv``) or 2x2 average pooling."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return nn.Conv(
                x.shape[-1],
                (3, 3),
                strides=(2, 2),
                dtype=self.dtype,
                kernel_init=_default_init(),
                name="conv",
            )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, optionally followed by conv3x3."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = nn.Conv(
                x.shape[-1], (3, 3), dtype=self.dtype, kernel_init=_default_init(), name="conv"
            )(x)
        return x


# --------------------------------------------------------------------------------------------
# U-Net
# --------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020). See the module docstring for the architecture.

    Call: ``model.apply({'params': p}, x, t, labels, train=..., rngs={'dropout': key})``
      x: (B, H, W, C) float images; t: (B,) int or float timesteps (a scalar is broadcast);
      labels: (B,) int class ids in [0, num_classes] (num_classes = the "null" class), required
      iff ``num_classes`` is set. Returns (B, H, W, out_channels) float32, or with
      ``learn_sigma`` (B, H, W, 2 * out_channels): the prediction, then the per-pixel variance
      interpolation values of Improved DDPM (``diffusion.p_mean_variance`` 'learned_range').
    ``out_channels`` defaults to C, the input's channels.
    Dropout (train=True, dropout > 0) draws from the 'dropout' rng collection.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int | None = None
    out_channels: int | None = None
    learn_sigma: bool = False
    # Recompute each residual block's activations in the backward pass instead of keeping them:
    # less memory for big models and batches, about 1/3 more compute (same outputs, same params).
    remat: bool = False
    dtype: Dtype = jnp.float32
    resamp_with_conv: bool = True
    num_groups: int = 32  # GroupNorm groups; 32 as in the reference

    def validate(self, image_size: int | Sequence[int]) -> None:
        """Raise ValueError if this model cannot run on images of size H or (H, W)."""
        validate_unet_config(
            image_size,
            self.ch,
            self.ch_mult,
            self.attn_resolutions,
            num_res_blocks=self.num_res_blocks,
            dropout=self.dropout,
            num_classes=self.num_classes,
            out_channels=self.out_channels,
            num_groups=self.num_groups,
        )

    def _check_inputs(self, x: jax.Array, t: jax.Array, labels: jax.Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (B, H, W, C), got shape {x.shape}.")
        self.validate((x.shape[1], x.shape[2]))
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {t.shape}.")
        if self.num_classes is None and labels is not None:
            raise ValueError(
                "labels were given but the UNet has num_classes=None; set num_classes to build "
                "the class embedding, or call the model without labels."
            )
        if self.num_classes is not None:
            if labels is None:
                raise ValueError(
                    f"UNet(num_classes={self.num_classes}) needs labels (B,) int; pass "
                    f"labels=jnp.full((B,), {self.num_classes}) for the unconditional (null) class."
                )
            if labels.shape != (x.shape[0],):
                raise ValueError(
                    f"labels must have shape (B,) = ({x.shape[0]},), got {labels.shape}."
                )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        labels: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        x = jnp.asarray(x)
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (x.shape[0],))
        if labels is not None:
            labels = jnp.asarray(labels)
        self._check_inputs(x, t, labels)

        ch, dt, groups = self.ch, self.dtype, self.num_groups
        num_levels = len(self.ch_mult)
        out_ch = (self.out_channels or x.shape[-1]) * (2 if self.learn_sigma else 1)

        # static_argnums counts self as 0: `train` (a Python bool) stays static under remat.
        block_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock

        def resblock(h: jax.Array, out: int | None, name: str) -> jax.Array:
            return block_cls(out, self.dropout, num_groups=groups, dtype=dt, name=name)(
                h, temb, train
            )

        def attn(h: jax.Array, name: str) -> jax.Array:
            return AttnBlock(groups, dt, name=name)(h)

        # Time (and class) embedding: (B, 4ch).
        temb = timestep_embedding(t, ch)
        temb = nn.Dense(4 * ch, dtype=dt, kernel_init=_default_init(), name="temb_dense0")(temb)
        temb = nn.Dense(4 * ch, dtype=dt, kernel_init=_default_init(), name="temb_dense1")(
            nn.swish(temb)
        )
        if self.num_classes is not None:
            assert labels is not None  # checked above
            temb = temb + nn.Embed(self.num_classes + 1, 4 * ch, dtype=dt, name="label_emb")(
                labels.astype(jnp.int32)
            )

        # Down path; every activation is kept as a skip for the up path.
        hs = [nn.Conv(ch, (3, 3), dtype=dt, kernel_init=_default_init(), name="conv_in")(x)]
        for i in range(num_levels):
            for j in range(self.num_res_blocks):
                h = resblock(hs[-1], ch * self.ch_mult[i], f"down_{i}_block_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h, f"down_{i}_attn_{j}")
                hs.append(h)
            if i != num_levels - 1:
                down = Downsample(self.resamp_with_conv, dt, name=f"down_{i}_downsample")
                hs.append(down(hs[-1]))

        # Middle.
        h = hs[-1]
        h = resblock(h, None, "mid_block_1")
        h = attn(h, "mid_attn_1")
        h = resblock(h, None, "mid_block_2")

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        for i in reversed(range(num_levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = resblock(h, ch * self.ch_mult[i], f"up_{i}_block_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h, f"up_{i}_attn_{j}")
            if i != 0:
                h = Upsample(self.resamp_with_conv, dt, name=f"up_{i}_upsample")(h)
        assert not hs

        h = nn.swish(_Norm(groups, dt, name="norm_out")(h))
        h = nn.Conv(out_ch, (3, 3), dtype=dt, kernel_init=_default_init(0.0), name="conv_out")(h)
        return h.astype(jnp.float32)
