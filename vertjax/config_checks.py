"""Checks of a training config before any work: field types, names and ranges.

`check(config)` raises ValueError naming the field (`config.model.norm`) and
the fault, so that a typo in a config file ends with one line at start-up
rather than a traceback minutes into a run or, worse, a silently wrong run
(a zero target width trains on empty targets). Types are compared with
`configs/default.py`, which defines every field: a field it lacks is a typo
(`config.los = 'l2'` would otherwise train with the default loss).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import jax
import ml_collections

from configs import default
from vertjax import losses, models, runs, sharding

LOSS_KERNELS: tuple[str, ...] = ("xla", "native")


def check(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first field of `config` with a wrong type or value."""
    check_types(config, default.get_config())
    check_values(config)


def checked_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """Checks `config`, then makes its device mesh and checks the batch sizes against it."""
    check(config)
    mesh = sharding.make_mesh(config.mesh.data)
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    if config.loss_kernel == "native" and (mesh.size > 1 or jax.default_backend() != "cpu"):
        raise ValueError(
            "config.loss_kernel='native' runs on one CPU device; this run has "
            f"{mesh.size} {jax.default_backend()} device(s): use loss_kernel='xla'"
        )
    return mesh


def _kind(reference: Any) -> str:
    if isinstance(reference, bool):
        return "bool"
    if isinstance(reference, int):
        return "int"
    if isinstance(reference, float):
        return "a number"
    if isinstance(reference, (tuple, list)):
        return "a tuple"
    return type(reference).__name__


def _fits(value: Any, reference: Any) -> bool:
    """Whether `value` may stand where the default holds `reference`."""
    if reference is None:
        return True
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if isinstance(reference, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(reference, float):
        # An int is a fine float (`learning_rate = 1`); a bool is not.
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(reference, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(reference))


def check_types(
    config: ml_collections.ConfigDict,
    reference: ml_collections.ConfigDict,
    prefix: str = "config",
) -> None:
    """ValueError for the first field that `reference` lacks or whose type differs.

    Args:
      config: the config to check.
      reference: a config of the same fields with values of the right types.
      prefix: the name of `config` in messages.
    """
    for key in config.keys():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
            raise ValueError(f"{prefix}.{key} is not a config field{hint}")
    for key, expected in reference.items():
        if key not in config:
            continue
        value = config[key]
        where = f"{prefix}.{key}"
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(
                    f"{where} is {type(value).__name__} {value!r} but must be a group of fields"
                )
            check_types(value, expected, where)
        elif not _fits(value, expected):
            raise ValueError(
                f"{where} is {type(value).__name__} {value!r} but must be {_kind(expected)}"
            )


def _choice(where: str, value: str, valid, kind: str) -> None:
    if value not in valid:
        raise ValueError(
            f"{where}: unknown {kind} {value!r}: expected one of {', '.join(sorted(valid))}"
        )


def _positive(where: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where} must be positive, got {value}")


def check_values(config: ml_collections.ConfigDict) -> None:
    """ValueError for names that pick nothing and numbers out of their range."""
    try:
        losses.get(config.loss)
    except ValueError as e:
        raise ValueError(f"config.loss: {e}") from None
    _choice("config.loss_kernel", config.loss_kernel, LOSS_KERNELS, "loss kernel")
    m = config.model
    _choice("config.model.norm", m.norm, models.NORMS, "norm")
    _choice("config.model.upsample", m.upsample, models.UPSAMPLES, "upsample")
    _choice("config.model.activation", m.activation, models.ACTIVATIONS, "activation")
    _choice("config.model.stem", m.get("stem", "conv"), models.STEMS, "stem")
    if not 1 <= m.depth <= models.MAX_DEPTH:
        raise ValueError(
            f"config.model.depth must be between 1 and {models.MAX_DEPTH}, got {m.depth}"
        )
    if m.features < 1:
        raise ValueError(f"config.model.features must be at least 1, got {m.features}")
    _choice("config.model.dtype", m.dtype, models.DTYPES, "dtype")
    _choice("config.optimizer.decay", config.optimizer.decay, runs.DECAYS, "decay")
    sharding.check_param_rule(config.mesh.param_sharding)
    for name in ("train_steps", "log_every", "eval_every", "checkpoint_every", "image_size"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    _positive("config.optimizer.learning_rate", config.optimizer.learning_rate)
    # A zero or negative width renders empty (or NaN) targets: training would
    # run and learn nothing.
    _positive("config.sigma", config.sigma)
    if config.sigma_decay_steps > 0:
        _positive("config.sigma_start", config.sigma_start)


def differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> current' for each field where `config` differs from a saved config."""
    current = config.to_dict()

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for key in sorted(set(a) | set(b)):
                out += walk(a.get(key), b.get(key), f"{prefix}{key}.")
            return out
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]

    return walk(saved, current, "")
