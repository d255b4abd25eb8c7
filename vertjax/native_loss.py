"""The batch-mean loss and its gradient in one sweep: a CPU kernel through jax.ffi.

`losses.get` compiles to two sweeps over the [B, H, W, K] arrays on XLA:CPU,
one for the value and one for the gradient, because XLA does not fuse a
reduction with an elementwise output of another shape
(benchmarks/RESULTS.md, "Loss step"). `native/weighted_mse.cc` does both in
one: it reads targets and predictions once, writes the gradient and sums the
value as it goes. The rules and weights are those of `losses` (the per-layer
base weights come from `losses.base_weights`), and
`losses.reference` stays the definition: tests/test_native_loss.py checks
the kernel against it.

`batch_mean(name)` is the batch mean (optionally masked) as a
`jax.custom_vjp`: its forward calls the kernel, which writes the gradient
for a unit cotangent; the backward only scales it, and jit folds that scale
away when the loss is what `jax.value_and_grad` differentiates.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`,
else `c++`, as torch.compile does for its CPU kernels) against the XLA FFI
headers that jaxlib ships, for this CPU (`-march=native`), and cached in
`$VERTJAX_CACHE` (default `~/.cache/vertjax`) under a hash of the source,
the compiler, jaxlib and the CPU. It runs on the CPU backend only; under a
mesh of several devices XLA would gather the batch around it, so
`config_checks` accepts `loss_kernel='native'` only on one CPU device.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from vertjax import losses

SOURCE = Path(__file__).resolve().parent / "native" / "weighted_mse.cc"
TARGET = "vertjax_weighted_mse"
SYMBOL = "VertjaxWeightedMse"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")

_lock = threading.Lock()
_registered = False


class NativeLossError(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why and what to do."""


def _compiler() -> str:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(shlex.split(compiler)[0]) is None:
        raise NativeLossError(
            f"loss_kernel='native' needs a C++ compiler: {compiler!r} was not found "
            "(install g++ or clang++, or set $CXX; loss_kernel='xla' needs none)"
        )
    return compiler


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def library_path() -> Path:
    """The compiled kernel, built into the cache first if it is not there."""
    compiler = _compiler()
    version = subprocess.run(
        [*shlex.split(compiler), "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), compiler, version, jaxlib.__version__, " ".join(FLAGS)]
            + [_cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("VERTJAX_CACHE", Path.home() / ".cache" / "vertjax"))
    path = cache / "native" / f"weighted_mse-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build
    # never leaves a partial library under the final name.
    fd, tmp = tempfile.mkstemp(prefix=".weighted_mse-", suffix=".so", dir=path.parent)
    os.close(fd)
    command = [
        *shlex.split(compiler),
        *FLAGS,
        f"-I{jax.ffi.include_dir()}",
        os.fspath(SOURCE),
        "-o",
        tmp,
    ]
    try:
        built = subprocess.run(command, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            raise NativeLossError(
                f"building {SOURCE.name} failed ({shlex.join(command)}):\n{built.stderr[-2000:]}"
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def register() -> None:
    """Builds (once, cached) and registers the kernel with XLA's CPU backend."""
    global _registered
    with _lock:
        if _registered:
            return
        library = ctypes.cdll.LoadLibrary(os.fspath(library_path()))
        jax.ffi.register_ffi_target(
            TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)), platform="cpu"
        )
        _registered = True


def _sweep(predictions, targets, base, coef, rule: losses.Rule):
    """(value [], gradient for a unit cotangent [B, H, W, K]) from the kernel."""
    call = jax.ffi.ffi_call(
        TARGET,
        (
            jax.ShapeDtypeStruct((), jnp.float32),
            jax.ShapeDtypeStruct(predictions.shape, jnp.float32),
        ),
    )
    return call(
        predictions,
        targets,
        base,
        coef,
        hot_weight=np.float32(rule.hot_weight),
        over_all_layers=rule.hot_over_all_layers,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_loss(predictions, targets, base, coef, rule):
    return _sweep(predictions, targets, base, coef, rule)[0]


def _batch_loss_fwd(predictions, targets, base, coef, rule):
    return _sweep(predictions, targets, base, coef, rule)  # (value, residual gradient)


def _batch_loss_bwd(rule, grad, cotangent):
    grad = cotangent * grad
    # The weights are piecewise constant in y, so d/dy = -d/dp.
    return grad, -grad, None, None


_batch_loss.defvjp(_batch_loss_fwd, _batch_loss_bwd)


def _mean(
    *,
    predictions: jax.Array,
    targets: jax.Array,
    labeled: jax.Array,
    mask: jax.Array | None = None,
    rule: losses.Rule,
) -> jax.Array:
    register()
    predictions, targets, labeled = losses.checked(predictions, targets, labeled)
    base = losses.base_weights(rule, labeled)
    if mask is None:
        coef = jnp.full(labeled.shape[:1], 1.0 / labeled.shape[0], jnp.float32)
    else:
        mask = mask.astype(jnp.float32)
        coef = mask / jnp.maximum(jnp.sum(mask), 1.0)
    return _batch_loss(predictions, targets, base, coef, rule)


def batch_mean(name: str):
    """`fn(*, predictions, targets, labeled, mask=None) -> []`, the kernel's batch mean.

    Equal to `losses.mean(losses.get(name)(...), mask)` (tests check it
    against `losses.reference`); CPU only; reverse-mode differentiation only.
    Raises NativeLossError on first call when the kernel cannot be built.
    """
    return functools.partial(_mean, rule=losses.rule_for(name))
