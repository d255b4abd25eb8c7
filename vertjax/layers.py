"""Layers written out for speed: 2x2 max pooling, 2x up-sampling, a 2x2
transposed convolution and group normalisation, all over [B, H, W, C].

Each computes what a flax or jax built-in computes, with cheaper HLO on
XLA:CPU, and keeps that built-in's parameter names, shapes and initial
values, so checkpoints carry over (figures in benchmarks/RESULTS.md):

- `max_pool_2x2` is a reshape + max whose gradient goes to the first maximum
  of each window, as `nn.max_pool`'s does, without the four int32 index
  arrays that XLA's reduce-window gradient builds. Values and gradients are
  bit-identical to `nn.max_pool`'s, ties included.
- `upsample_2x` repeats pixels with a broadcast and sums 2x2 blocks in its
  gradient, where `jax.image.resize(method='nearest')` uses a gather and a
  scatter-add. Values are bit-identical; the gradient adds the same four
  terms in another order.
- `ConvTranspose2x2` is a matrix product and a pixel shuffle, where
  `nn.ConvTranspose` convolves a zero-dilated input; equal up to float
  rounding.
- `GroupNorm` takes its statistics from per-channel sums over (H, W), a
  reduction that keeps the channel axis minor, instead of reducing a
  [B, H, W, G, C/G] view; equal to `nn.GroupNorm` up to float rounding.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


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
