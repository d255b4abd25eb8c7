"""Which model made an output: stamped on every prediction and results file.

A prediction or a metric is only traceable when it names the model (a
shipped name or a run folder), the checkpoint step, the vertjax version and
a hash of the full config, so that two files from different settings can
never be mistaken for one another.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from typing import Any

import ml_collections


def vertjax_version() -> str:
    """The installed vertjax version ('unknown' when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version("vertjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def config_sha256(config: ml_collections.ConfigDict | None) -> str | None:
    """sha256 of the config as sorted JSON: equal hashes mean equal settings."""
    if config is None:
        return None
    return hashlib.sha256(config.to_json(sort_keys=True).encode("utf-8")).hexdigest()


def stamp(
    *, model: str, step: int | None, config: ml_collections.ConfigDict | None
) -> dict[str, Any]:
    """The provenance fields: model, checkpoint_step, vertjax_version, config_sha256."""
    return {
        "model": model,
        "checkpoint_step": None if step is None else int(step),
        "vertjax_version": vertjax_version(),
        "config_sha256": config_sha256(config),
    }
