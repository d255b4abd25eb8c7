"""The heatmap regressor: a flax.linen U-Net, [B, H, W, 1] -> [B, H, W, K].

A classic U-Net (Ronneberger et al. 2015): per level two 3x3 convolutions
with normalisation and an activation, 2x2 max pooling down, up-sampling
(resize + conv or a transposed conv) and skip concatenation up, and a
linear 1x1 output layer. There are no BatchNorm layers, so the train state
has no mutable collections.

Counting vertebrae needs a receptive field of most of the image: a 3-pooling
net sees only about +-50 px of a 264 image. Besides `depth` (up to 6, with
`max_features` capping the channel growth), the bottleneck can carry
residual dilated convolutions (`bottleneck_dilations`) and a global-context
block (`global_context`: the pooled bottleneck features, passed through a
dense layer, added back at every position).

The full-resolution level is the costliest per parameter on a CPU (every
activation of its two blocks is S x S). `stem='patch'` replaces it: the
encoder starts with a 2x2, stride-2 convolution (each 2x2 patch to
`features` channels) and the decoder ends with a sub-pixel output (a 1x1
convolution to 4 K channels, shuffled into the 2x2 pixels of each cell),
so no convolution runs at full resolution. `depth` still counts every
halving, the patch step included, so the bottleneck sees the same grid.

Inputs of any height and width are zero-padded at the bottom and right to a
multiple of 2**depth and the output is cropped back. Zeros, not reflection:
a mirrored border would show the network mirrored vertebrae to count.

Speed: pooling, up-sampling, the transposed convolution and group
normalisation come from `vertjax.layers`, which computes what flax's and
jax's own layers compute with cheaper HLO and keeps their parameter names.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vertjax import layers, vertebrae

NORMS = ("group", "layer", "none")
UPSAMPLES = ("resize", "transpose")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}
MAX_DEPTH = 6
STEMS = ("conv", "patch")


class ConvBlock(nn.Module):
    """Two (3x3 conv, norm, activation) layers: [B, H, W, C] -> [B, H, W, features]."""

    features: int
    norm: str = "group"
    activation: str = "relu"
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for _ in range(2):
            # The conv bias is redundant in front of a normalisation layer.
            x = nn.Conv(
                self.features,
                (3, 3),
                kernel_dilation=self.dilation,
                use_bias=self.norm == "none",
                dtype=self.dtype,
            )(x)
            x = _normalise(x, self.norm, self.dtype)
            x = act(x)
        return x


def _normalise(x: jax.Array, norm: str, dtype) -> jax.Array:
    """GroupNorm (up to 8 groups), channel LayerNorm, or nothing."""
    if norm == "group":
        return layers.GroupNorm(num_groups=math.gcd(x.shape[-1], 8), dtype=dtype)(x)
    if norm == "layer":
        return nn.LayerNorm(dtype=dtype)(x)
    return x


class UNet(nn.Module):
    """U-Net heatmap regressor.

    Attributes:
      num_outputs: heatmap layers K.
      features: channels of the first level; doubled per level.
      depth: number of poolings (1..6); inputs are padded to a multiple of 2**depth.
      norm: 'group' | 'layer' | 'none'.
      upsample: 'resize' (nearest x2 + 3x3 conv) | 'transpose' (2x2 transposed conv).
      output_bias_init: initial bias of the output layer.
      zero_init_output: zero the output kernel, so the first output is the bias.
      dtype: computation dtype; parameters and the output stay float32.
      max_features: cap on the channels of any level (None: no cap).
      activation: one of ACTIVATIONS.
      bottleneck_dilations: dilation rates of residual conv blocks after the
        bottleneck, e.g. (2, 4, 8), to widen the receptive field.
      global_context: add a global-average-pooled context vector at the bottleneck.
      coord_channels: append the pixel's row and column (each from -1 to 1
        across the image) to the input channels, so naming can use position.
      stem: 'conv' (a conv block at full resolution, the classic U-Net) |
        'patch' (a 2x2 stride-2 patch convolution in, a sub-pixel output
        out: nothing convolves at full resolution).
    """

    num_outputs: int = vertebrae.K
    features: int = 16
    depth: int = 4
    norm: str = "group"
    upsample: str = "resize"
    output_bias_init: float = 0.0
    zero_init_output: bool = False
    dtype: jnp.dtype = jnp.float32
    max_features: int | None = None
    activation: str = "relu"
    bottleneck_dilations: tuple[int, ...] = ()
    global_context: bool = False
    coord_channels: bool = False
    stem: str = "conv"

    def _width(self, level: int) -> int:
        width = self.features * 2**level
        return width if self.max_features is None else min(width, self.max_features)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Maps images [B, H, W, 1] to linear heatmaps [B, H, W, num_outputs] (float32).

        `train` is accepted for the trainer's convenience; no layer behaves
        differently in training.
        """
        del train
        if images.ndim != 4:
            raise ValueError(f"images {images.shape} must be [B, H, W, C]")
        height, width = images.shape[1:3]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        x = images.astype(self.dtype)
        if self.coord_channels:
            rows, cols = jnp.meshgrid(
                jnp.linspace(-1, 1, height), jnp.linspace(-1, 1, width), indexing="ij"
            )
            coords = jnp.broadcast_to(jnp.stack([rows, cols], -1), (x.shape[0], height, width, 2))
            x = jnp.concatenate([x, coords.astype(self.dtype)], axis=-1)
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))

        if self.stem not in STEMS:
            raise ValueError(f"stem {self.stem!r} must be one of {STEMS}")
        patch = self.stem == "patch"
        act = ACTIVATIONS[self.activation]
        block = dict(norm=self.norm, activation=self.activation, dtype=self.dtype)
        skips = []
        if patch:
            x = nn.Conv(
                self._width(0),
                (2, 2),
                strides=(2, 2),
                use_bias=self.norm == "none",
                dtype=self.dtype,
                name="PatchStem",
            )(x)
            x = act(_normalise(x, self.norm, self.dtype))
        for level in range(1 if patch else 0, self.depth):
            x = ConvBlock(self._width(level), **block)(x)
            skips.append(x)
            x = layers.max_pool_2x2(x)
        x = ConvBlock(self._width(self.depth), **block)(x)
        for rate in self.bottleneck_dilations:
            x = x + ConvBlock(self._width(self.depth), dilation=rate, **block)(x)
        if self.global_context:
            context = jnp.mean(x, axis=(1, 2), keepdims=True)
            context = ACTIVATIONS[self.activation](nn.Dense(x.shape[-1], dtype=self.dtype)(context))
            x = x + nn.Dense(x.shape[-1], dtype=self.dtype)(context)

        for level in reversed(range(1 if patch else 0, self.depth)):
            channels = self._width(level)
            if self.upsample == "transpose":
                # Named as nn.ConvTranspose's layers were: checkpoints stay loadable.
                x = layers.ConvTranspose2x2(
                    channels, dtype=self.dtype, name=f"ConvTranspose_{self.depth - 1 - level}"
                )(x)
            else:
                x = nn.Conv(channels, (3, 3), dtype=self.dtype)(layers.upsample_2x(x))
            x = jnp.concatenate([x, skips[level - patch]], axis=-1)
            x = ConvBlock(channels, **block)(x)

        kernel_init = (
            nn.initializers.zeros if self.zero_init_output else nn.linear.default_kernel_init
        )
        cells = 4 if patch else 1  # sub-pixel output: a 2x2 block of heatmap pixels per cell
        x = nn.Conv(
            self.num_outputs * cells,
            (1, 1),
            dtype=self.dtype,
            kernel_init=kernel_init,
            bias_init=nn.initializers.constant(self.output_bias_init),
        )(x)
        if patch:
            b, h, w, _ = x.shape
            x = x.reshape(b, h, w, 2, 2, self.num_outputs).transpose(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, 2 * h, 2 * w, self.num_outputs)
        return x[:, :height, :width, :].astype(jnp.float32)


def tiny(**overrides) -> UNet:
    """A small U-Net for tests (4 base features, 2 poolings)."""
    return UNet(**{"features": 4, "depth": 2, **overrides})


def heatmaps_of(
    apply: Callable[[Any, jax.Array], jax.Array], variables: Any, images: jax.Array, *, flip: bool
) -> jax.Array:
    """float32 heatmaps [B, S, S, K] of `images` [B, S, S, 1] through `apply(variables, x)`.

    With `flip`, the mean of the image's heatmaps and of its left-right
    mirror's heatmaps mirrored back (test-time augmentation): a mirrored
    spine is still a spine with the same names, top to bottom.
    """
    out = apply(variables, images).astype(jnp.float32)
    if flip:
        mirrored = apply(variables, images[:, :, ::-1]).astype(jnp.float32)
        out = 0.5 * (out + mirrored[:, :, ::-1])
    return out


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(config: Any) -> UNet:
    """The U-Net that `config.model` describes (a run config, ConfigDict or dict)."""
    m = config["model"]
    return UNet(
        features=m["features"],
        depth=m["depth"],
        norm=m["norm"],
        upsample=m["upsample"],
        output_bias_init=m["output_bias_init"],
        zero_init_output=m["zero_init_output"],
        dtype=DTYPES[m["dtype"]],
        max_features=m["max_features"] or None,
        activation=m["activation"],
        bottleneck_dilations=tuple(m["bottleneck_dilations"]),
        global_context=m["global_context"],
        # Configs saved before the option existed have no such field.
        coord_channels=m.get("coord_channels", False),
        stem=m.get("stem", "conv"),
    )
