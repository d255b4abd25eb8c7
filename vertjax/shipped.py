"""Trained models that ship with vertjax: written once, read and verified on use.

A shipped model is a folder, `vertjax/shipped_models/<name>/` for the ones in
the package, holding
- `params.msgpack`: the network's parameters, flax.serialization's msgpack
  (plain arrays, no pickle);
- `model.json`: the run config the network is built from, the training
  split's pixel statistics, the post-processing spacing prior, the training
  step, the validation metrics, what it was trained on, the vertebra names and
  the SHA-256 of `params.msgpack`.

`load` checks the checksum, the config and every parameter's shape before
anything runs, so a damaged or mismatched file is a clear error, not a
silently wrong prediction. `main` writes one from a training run:

  python -m vertjax.shipped --workdir=runs/aasce_fov_seed0 --checkpoint=latest \
      --out=vertjax/shipped_models/aasce_fov --description="..."
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from vertjax import models, postprocess, vertebrae

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_models"
DEFAULT_MODEL = "aasce_fov"
PARAMS_FILE = "params.msgpack"
INFO_FILE = "model.json"
FORMAT = 1


class ShippedModelError(ValueError):
    """A shipped model that cannot be used; the message names the file and the fault."""


@dataclasses.dataclass(frozen=True)
class Shipped:
    """A verified shipped model.

    Attributes:
      name: its folder name.
      folder: where it was read from.
      config: the run config it was trained with.
      params: the network parameters (numpy arrays).
      pixel_mean, pixel_std: the training split's pixel statistics.
      prior: the post-processing spacing prior, or None.
      info: everything else `model.json` says (step, validation, training data).
    """

    name: str
    folder: Path
    config: ml_collections.ConfigDict
    params: Any
    pixel_mean: float
    pixel_std: float
    prior: postprocess.SpacingPrior | None
    info: dict[str, Any]


def names() -> list[str]:
    """The shipped models' names."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / INFO_FILE).is_file())


def locate(name_or_folder: str | os.PathLike) -> Path:
    """The folder of a shipped model name, or `name_or_folder` itself if it is a model folder."""
    path = Path(name_or_folder)
    if (path / INFO_FILE).is_file():
        return path
    if str(name_or_folder) in names():
        return SHIPPED_DIR / str(name_or_folder)
    known = ", ".join(names()) or "none"
    raise ShippedModelError(
        f"unknown model {str(name_or_folder)!r}: the shipped models are {known} "
        f"(or give a folder holding {INFO_FILE} and {PARAMS_FILE})"
    )


def is_model(name_or_folder: str | os.PathLike) -> bool:
    try:
        locate(name_or_folder)
    except ShippedModelError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def param_shapes(config: Any) -> Any:
    """The parameter tree of `config`'s network as ShapeDtypeStructs (no initialisation)."""
    s = int(config["image_size"])
    net = models.from_config(config)
    shapes = jax.eval_shape(
        lambda: net.init(jax.random.key(0), jnp.zeros((1, s, s, 1), jnp.float32), train=False)
    )
    return shapes["params"]


def check_params(params: Any, expected: Any, *, where: str) -> None:
    """ShippedModelError naming the first parameter whose path or shape differs."""
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in _leaves(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in _leaves(expected)}
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise ShippedModelError(
                f"{where}: parameter {key} is {have.get(key, 'absent')} there but "
                f"{want.get(key, 'absent')} in the configured network (a different model config?)"
            )


def _leaves(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_leaves_with_path(tree)


def load(name_or_folder: str | os.PathLike = DEFAULT_MODEL) -> Shipped:
    """Reads and verifies a shipped model (a name from `names()` or a model folder).

    Raises:
      ShippedModelError: unknown name, missing or damaged file, checksum or
        shape mismatch; the message names the file.
    """
    folder = locate(name_or_folder)
    info_path, params_path = folder / INFO_FILE, folder / PARAMS_FILE
    try:
        info = json.loads(info_path.read_text())
        config = ml_collections.ConfigDict(info["config"])
        expected_sha = info["sha256"]
        mean, std = float(info["pixel_mean"]), float(info["pixel_std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShippedModelError(f"{info_path}: unreadable model description ({e!r})") from e
    if info.get("format") != FORMAT:
        raise ShippedModelError(
            f"{info_path}: format {info.get('format')!r}, this vertjax reads format {FORMAT}"
        )
    if not params_path.is_file():
        raise ShippedModelError(f"{params_path}: missing")
    actual_sha = _sha256(params_path)
    if actual_sha != expected_sha:
        raise ShippedModelError(
            f"{params_path}: checksum {actual_sha[:12]}... differs from {expected_sha[:12]}... "
            f"recorded in {INFO_FILE}: the file is damaged or was replaced"
        )
    try:
        params = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as e:  # msgpack raises several types for damaged input
        raise ShippedModelError(f"{params_path}: unreadable parameters ({e!r})") from e
    try:
        expected = param_shapes(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ShippedModelError(
            f"{info_path}: its config does not describe a network ({e!r})"
        ) from e
    check_params(params, expected, where=str(params_path))
    prior = None
    if info.get("prior") is not None:
        prior = postprocess.SpacingPrior(
            **{k: np.asarray(v, np.float32) for k, v in info["prior"].items()}
        )
    elif config.postprocess.enabled:
        raise ShippedModelError(f"{info_path}: post-processing is on but no prior is recorded")
    return Shipped(
        name=folder.name,
        folder=folder,
        config=config,
        params=params,
        pixel_mean=mean,
        pixel_std=std,
        prior=prior,
        info=info,
    )


def write(
    folder: str | os.PathLike,
    *,
    config: ml_collections.ConfigDict,
    params: Any,
    pixel_mean: float,
    pixel_std: float,
    prior: postprocess.SpacingPrior | None,
    **info: Any,
) -> Path:
    """Writes a model folder whole or not at all; returns it.

    `info` adds fields to `model.json` (step, validation, description,
    training_data, ...). An existing folder is replaced only once the new one
    is complete.
    """
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(params)))
    record = {
        "format": FORMAT,
        "name": folder.name,
        "vertebrae": list(vertebrae.NAMES),
        **info,
        "pixel_mean": float(pixel_mean),
        "pixel_std": float(pixel_std),
        "prior": None
        if prior is None
        else {k: np.asarray(v).tolist() for k, v in prior._asdict().items()},
        "config": json.loads(config.to_json()),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide a package's model from other users
        (staging / PARAMS_FILE).write_bytes(blob)
        (staging / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
