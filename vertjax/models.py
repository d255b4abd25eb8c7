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

Inputs of any height and width are zero-padded at the bottom and right to a
multiple of 2**depth and the output is cropped back. Zeros, not reflection:
a mirrored border would show the network mirrored vertebrae to count.

Speed (XLA:CPU; figures in benchmarks/RESULTS.md): four layers are written
out rather than taken from flax/jax. They compute the same function with
cheaper HLO and keep flax's parameter names and shapes. `GroupNorm` takes
its statistics from per-channel sums over (H, W), a reduction that keeps
the channel axis minor, instead of reducing a [B, H, W, G, C/G] view.
`max_pool_2x2` is a reshape + max whose gradient goes to the first maximum
of each window, as `nn.max_pool`'s does, without the four int32 index
arrays that XLA's reduce-window gradient builds.
`upsample_2x` repeats pixels with a broadcast and sums 2x2 blocks in its
gradient, where `jax.image.resize(method='nearest')` uses a gather and a
scatter-add. `ConvTranspose2x2` is a matrix product and a pixel shuffle,
where `nn.ConvTranspose` convolves a zero-dilated input.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("group", "layer", "none")
UPSAMPLES = ("resize", "transpose")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}
MAX_DEPTH = 6


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even).

    The same values and gradient as `nn.max_pool(x, (2, 2), strides=(2, 2))`,
    ties included: the gradient of each window goes to its first maximum in
    row-major order.
    """
    if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"max_pool_2x2 needs [B, H, W, C] with even H and W, got {x.shape}")
    return _max_pool_2x2(x)


def _pool_windows(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, 2, W/2, 2, C], a free reshape."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_2x2_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array]:
    x, y = residuals
    windows = _pool_windows(x)
    is_max = windows == y[:, :, None, :, None, :]
    # Window order (0,0), (0,1), (1,0), (1,1): an element takes the gradient if
    # it is a maximum and no earlier element of its window is one.
    m00, m01, m10 = is_max[:, :, :1, :, :1], is_max[:, :, :1, :, 1:], is_max[:, :, 1:, :, :1]
    earlier = jnp.concatenate(
        [
            jnp.concatenate([jnp.zeros_like(m00), m00], axis=4),
            jnp.concatenate([m00 | m01, m00 | m01 | m10], axis=4),
        ],
        axis=2,
    )
    grad = jnp.where(is_max & ~earlier, dy[:, :, None, :, None, :], 0.0)
    return (grad.reshape(x.shape).astype(x.dtype),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def upsample_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 up-sampling: [B, H, W, C] -> [B, 2H, 2W, C].

    Equal to `jax.image.resize(x, (B, 2H, 2W, C), 'nearest')`, gradient included.
    """
    return _upsample_2x(x)


@jax.custom_vjp
def _upsample_2x(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def _upsample_2x_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return _upsample_2x(x), None


def _upsample_2x_bwd(_, dy: jax.Array) -> tuple[jax.Array]:
    # The gradient sums each 2x2 block. As a sum of four strided slices it is
    # one elementwise loop; as a reduce over the window axes of a 6-D view
    # XLA:CPU emits a slow generic reduction.
    return (dy[:, 0::2, 0::2] + dy[:, 0::2, 1::2] + dy[:, 1::2, 0::2] + dy[:, 1::2, 1::2],)


_upsample_2x.defvjp(_upsample_2x_fwd, _upsample_2x_bwd)


class ConvTranspose2x2(nn.Module):
    """2x2 transposed convolution, stride 2: [B, H, W, C] -> [B, 2H, 2W, features].

    The function and parameters (`kernel` [2, 2, C, features], `bias`) of
    `nn.ConvTranspose(features, (2, 2), strides=(2, 2))`. With stride equal to
    the kernel size, the output windows do not overlap: each input pixel
    writes its own 2x2 block, so the layer is one matrix product
    [B*H*W, C] x [C, 2*2*features] and a pixel shuffle. XLA:CPU compiles
    `lax.conv_transpose` to a convolution over the zero-dilated input, which
    does four times the multiplications and has a slow gradient.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, channels = x.shape
        kernel = self.param(
            "kernel", nn.linear.default_kernel_init, (2, 2, channels, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        # flax's ConvTranspose applies the kernel flipped in both spatial axes.
        kernel = kernel[::-1, ::-1].astype(self.dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel)
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """Group normalisation of [B, H, W, C] over (H, W, channels of a group).

    The function and parameters (`scale`, `bias` [C]) of flax's
    `nn.GroupNorm(num_groups)` with its defaults (epsilon 1e-6, variance as
    E[x^2] - E[x]^2, statistics in float32); the statistics come from
    per-channel sums over (H, W), which XLA:CPU reduces far faster than
    flax's reduction over a [B, H, W, G, C/G] view.
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if x.ndim != 4 or channels % self.num_groups:
            raise ValueError(
                f"GroupNorm needs [B, H, W, C] with C divisible by {self.num_groups}, got {x.shape}"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        group_size = channels // self.num_groups
        count = x.shape[1] * x.shape[2] * group_size
        x32 = x.astype(jnp.float32)
        sums = jnp.sum(x32, axis=(1, 2))  # [B, C]
        squares = jnp.sum(jnp.square(x32), axis=(1, 2))

        def per_group(s: jax.Array) -> jax.Array:  # [B, C] -> [B, G] means, repeated to [B, C]
            means = jnp.sum(s.reshape(-1, self.num_groups, group_size), axis=-1) / count
            return jnp.repeat(means, group_size, axis=-1)

        mean = per_group(sums)
        var = jnp.maximum(per_group(squares) - jnp.square(mean), 0.0)
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        shift = bias - mean * mul
        return (x32 * mul[:, None, None, :] + shift[:, None, None, :]).astype(self.dtype)


def _check_choice(kind: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}: expected one of {', '.join(valid)}")


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
        return GroupNorm(num_groups=math.gcd(x.shape[-1], 8), dtype=dtype)(x)
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
    """

    num_outputs: int = 13
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
        _check_choice("norm", self.norm, NORMS)
        _check_choice("upsample", self.upsample, UPSAMPLES)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth {self.depth} must be between 1 and {MAX_DEPTH}")
        if images.ndim != 4:
            raise ValueError(f"images {images.shape} must be [B, H, W, C]")
        height, width = images.shape[1:3]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        x = jnp.pad(images.astype(self.dtype), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))

        block = dict(norm=self.norm, activation=self.activation, dtype=self.dtype)
        skips = []
        for level in range(self.depth):
            x = ConvBlock(self._width(level), **block)(x)
            skips.append(x)
            x = max_pool_2x2(x)
        x = ConvBlock(self._width(self.depth), **block)(x)
        for rate in self.bottleneck_dilations:
            x = x + ConvBlock(self._width(self.depth), dilation=rate, **block)(x)
        if self.global_context:
            context = jnp.mean(x, axis=(1, 2), keepdims=True)
            context = ACTIVATIONS[self.activation](nn.Dense(x.shape[-1], dtype=self.dtype)(context))
            x = x + nn.Dense(x.shape[-1], dtype=self.dtype)(context)

        for level in reversed(range(self.depth)):
            channels = self._width(level)
            if self.upsample == "transpose":
                # Named as nn.ConvTranspose's layers were: checkpoints stay loadable.
                x = ConvTranspose2x2(
                    channels, dtype=self.dtype, name=f"ConvTranspose_{self.depth - 1 - level}"
                )(x)
            else:
                x = nn.Conv(channels, (3, 3), dtype=self.dtype)(upsample_2x(x))
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = ConvBlock(channels, **block)(x)

        kernel_init = (
            nn.initializers.zeros if self.zero_init_output else nn.linear.default_kernel_init
        )
        x = nn.Conv(
            self.num_outputs,
            (1, 1),
            dtype=self.dtype,
            kernel_init=kernel_init,
            bias_init=nn.initializers.constant(self.output_bias_init),
        )(x)
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
    if m["dtype"] not in DTYPES:
        raise ValueError(f"config.model.dtype={m['dtype']!r}: expected one of {sorted(DTYPES)}")
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
    )
