"""Datasets, networks and trained runs, as the rest of the library reaches them.

One place answers the questions every part of vertjax asks of a config or a
run folder:
- which dataset, built on first use, with which pixel statistics
  (`open_dataset`, `datasets.pixel_stats`);
- which network and train state: the optimiser, the optional parameter
  average, the state's shapes and shardings (`create_train_state`,
  `abstract_train_state`);
- which trained parameters: a run's checkpoint (`restore`, `load_run`), a
  shipped model (`load_shipped`), or either by name (`trained_params`, for
  `config.init_from`).

train, evaluate, predict, report, ship and the benchmarks all come here;
nothing here reads a command line.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from vertjax import checkpoints, datasets, files, models, postprocess, sharding, shipped

TrainState = train_state.TrainState


class EmaTrainState(train_state.TrainState):
    """flax's TrainState plus a moving average of the parameters (config.ema_decay > 0).

    A separate class rather than an optional field: runs without the average
    keep flax's TrainState, and so the checkpoint layout they always had.
    """

    ema_params: Any = None


# ---------------------------------------------------------------- datasets


def open_dataset(config: ml_collections.ConfigDict, *, build: bool | None = None) -> Any:
    """The TFDS builder of `config.dataset`, built on first use.

    Args:
      config: a run config.
      build: build a missing dataset; None = only in a single-process run
        (several processes would all write the same files).

    Raises:
      datasets.DataError: the dataset is missing (and not to be built) or
        cannot be built.
    """
    d = config.dataset
    return datasets.get_builder(
        d.name,
        data_dir=d.data_dir or None,
        manual_dir=d.manual_dir or None,
        build=jax.process_count() == 1 if build is None else build,
    )


def fit_prior(source: Any, image_size: int) -> postprocess.SpacingPrior:
    """The post-processing prior from the labelled centroids of a (training) split."""
    records = [source[i] for i in range(len(source))]
    centroids = np.stack([np.asarray(r["centroids"], np.float32) for r in records])
    labeled = np.stack([np.asarray(r["labeled"], bool) for r in records])
    return postprocess.fit_prior(centroids * image_size, labeled)


# ------------------------------------------------------ networks and state


def init_key(seed: int) -> jax.Array:
    """The parameter-initialisation key of a seed.

    The 'rbg' generator: XLA on CPU compiles the U-Net's initialisers in
    about 30 s with the default threefry generator, in about 6 s with rbg.
    Parameters are drawn once on one device, so rbg's dependence on
    partitioning does not matter here.
    """
    return jax.random.key(seed, impl="rbg")


# config.optimizer.decay: the schedule after the warm-up, from the peak
# learning rate over the remaining steps to factor x peak.
_DECAY_SCHEDULES: dict[str, Callable[[float, int, float], optax.Schedule]] = {
    "cosine": lambda peak, steps, factor: optax.cosine_decay_schedule(peak, steps, alpha=factor),
    "linear": lambda peak, steps, factor: optax.linear_schedule(peak, peak * factor, steps),
    "constant": lambda peak, steps, factor: optax.constant_schedule(peak),
}
DECAYS: tuple[str, ...] = tuple(_DECAY_SCHEDULES)


def make_learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine, linear or no decay to the end."""
    o = config.optimizer
    peak = o.learning_rate
    warmup = min(o.warmup_steps, config.train_steps)
    rest = max(config.train_steps - warmup, 1)
    decay = _DECAY_SCHEDULES[o.decay](peak, rest, o.end_learning_rate_factor)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam on the learning-rate schedule, after optional global-norm clipping."""
    o = config.optimizer
    adam = optax.adam(make_learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps)
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adam)
    return adam


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    """A fresh TrainState (params from `rng`, step 0) on the default device."""
    model = models.from_config(config)
    s = config.image_size
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros((1, s, s, 1), jnp.float32))
    if set(variables) != {"params"}:
        raise ValueError(
            f"the model has mutable collections {sorted(set(variables) - {'params'})}; "
            "TrainState here carries params only"
        )
    params, tx = variables["params"], make_optimizer(config)
    if config.get("ema_decay", 0.0) > 0:
        # A copy, not the same buffers: the train step donates the whole state.
        state = EmaTrainState.create(
            apply_fn=model.apply, params=params, tx=tx, ema_params=jax.tree.map(jnp.copy, params)
        )
    else:
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    # A strongly typed int32 step: the first call then has the same signature
    # as all later ones, so the jitted step compiles once.
    return state.replace(step=jnp.zeros((), jnp.int32))


def state_sharding(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, state: Any) -> Any:
    """A NamedSharding per array of `state` (or its shapes) under config.mesh.param_sharding.

    Configs saved before that field existed mean 'replicated'.
    """
    m = config.mesh
    return sharding.state_shardings(
        state,
        mesh,
        rule=m.get("param_sharding", "replicated"),
        min_size=int(m.get("fsdp_min_size", 2**14)),
    )


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """The TrainState's structure as ShapeDtypeStructs on `mesh`, to restore into.

    Shardings follow `state_sharding`. Costs no initialisation: shapes come
    from `jax.eval_shape`.
    """
    shapes = jax.eval_shape(functools.partial(create_train_state, config), init_key(0))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        state_sharding(config, mesh, shapes),
    )


def inference_params(state: TrainState) -> Any:
    """The parameters to validate and predict with: the moving average when kept."""
    ema = getattr(state, "ema_params", None)
    return state.params if ema is None else ema


# ------------------------------------------------------------ trained runs


@dataclasses.dataclass(frozen=True)
class Restored:
    """One checkpoint of a run: its state, step, saved meta and config."""

    state: TrainState
    step: int
    meta: dict[str, Any]
    config: ml_collections.ConfigDict


def restore(
    workdir: str | os.PathLike,
    checkpoint: str | int = "best",
    *,
    config: ml_collections.ConfigDict | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Restored:
    """Restores a checkpoint of `workdir` ('best', 'latest' or a step number).

    Args:
      workdir: the training run's folder (holding checkpoints/).
      checkpoint: which checkpoint.
      config: the network's config; default the one saved with the checkpoint.
      mesh: where the state goes; default one device (inference runs unsharded).

    Raises:
      ValueError: no checkpoints folder, or an unknown checkpoint
        (checkpoints.CheckpointError, a ValueError).
    """
    ckpt_dir = files.as_path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ValueError(
            f"{workdir}: no checkpoints folder (is it a training workdir? train first)"
        )
    ckpt = checkpoints.Checkpointer(ckpt_dir, read_only=True)
    try:
        step = ckpt.resolve(checkpoint)
        if config is None:
            config = ml_collections.ConfigDict(ckpt.restore_config(step))
        # Shapes only: no weights initialised just to be overwritten.
        template = abstract_train_state(config, mesh or sharding.make_mesh(1))
        state, meta = ckpt.restore(step, state=template)
    finally:
        ckpt.close()
    return Restored(state=state, step=step, meta=meta or {}, config=config)


@dataclasses.dataclass(frozen=True)
class Trained:
    """Everything inference needs from a trained network, wherever it came from.

    Attributes:
      config: the run's config (network, input size, post-processing, ...).
      params: the parameters to predict with.
      pixel_mean, pixel_std: the training split's pixel statistics (uint8 scale).
      prior: the post-processing spacing prior, where post-processing is on.
      step: the training step of the weights.
      source: where they came from: 'model NAME' or the workdir.
    """

    config: ml_collections.ConfigDict
    params: Any
    pixel_mean: float
    pixel_std: float
    prior: postprocess.SpacingPrior | None
    step: int | None
    source: str

    def network(self) -> dict[str, Any]:
        """What `shipped.write` takes of it: config, params, statistics and prior."""
        fields = ("config", "params", "pixel_mean", "pixel_std", "prior")
        return {name: getattr(self, name) for name in fields}


def load_run(workdir: str | os.PathLike, checkpoint: str | int = "best") -> Trained:
    """The trained network of a run folder.

    The pixel statistics come from the checkpoint's meta where saved, else
    from the run's TFDS dataset; the post-processing prior (when the config
    enables it) is fitted on that dataset's training split. A dataset needed
    here must be built on this machine already.

    Raises:
      ValueError: no checkpoints, an unknown checkpoint, or the run's
        dataset is not available.
    """
    run = restore(workdir, checkpoint)
    mean, std, prior = _run_statistics(run.config, run.meta)
    logging.info("%s: checkpoint %d (%s)", workdir, run.step, checkpoint)
    return Trained(
        config=run.config,
        params=inference_params(run.state),
        pixel_mean=mean,
        pixel_std=std,
        prior=prior,
        step=run.step,
        source=str(workdir),
    )


def load_shipped(name: str | os.PathLike = shipped.DEFAULT_MODEL) -> Trained:
    """A shipped model (`vertjax.shipped.names()`, or a model folder).

    Raises:
      shipped.ShippedModelError (a ValueError): unknown, damaged or mismatched.
    """
    found = shipped.load(name)
    return Trained(
        config=found.config,
        params=found.params,
        pixel_mean=found.pixel_mean,
        pixel_std=found.pixel_std,
        prior=found.prior,
        step=found.info.get("step"),
        source=f"model {found.name}",
    )


def _run_statistics(
    config: ml_collections.ConfigDict, meta: dict[str, Any]
) -> tuple[float, float, postprocess.SpacingPrior | None]:
    """(pixel mean, pixel std, post-processing prior or None) of a run's training split."""
    mean, std = meta.get("pixel_mean"), meta.get("pixel_std")
    if mean is not None and std is not None and not config.postprocess.enabled:
        return float(mean), float(std), None
    try:
        builder = open_dataset(config, build=False)
        if mean is None or std is None:
            mean, std = datasets.pixel_stats(builder)
        prior = None
        if config.postprocess.enabled:
            prior = fit_prior(builder.as_data_source("train"), int(config.image_size))
    except datasets.DataError as e:
        needed = "pixel statistics"
        if config.postprocess.enabled:
            needed += " and post-processing prior"
        raise ValueError(
            f"the run's dataset {config.dataset.name!r} is not available here; "
            f"its {needed} are needed: {e}"
        ) from e
    return float(mean), float(std), prior


def trained_params(source: str, like: Any, *, where: str) -> Any:
    """Trained parameters shaped like `like`: a shipped model's, or a run's latest.

    Args:
      source: a shipped model name or folder, or a training run's folder
        (its latest checkpoint; the moving average where the run kept one).
      like: the configured network's parameters (or their shapes).
      where: what asked, for the messages (e.g. 'config.init_from=...').

    Returns:
      Host arrays with the structure and dtypes of `like`.

    Raises:
      ValueError: `source` is neither or cannot be read, or its network
        differs from the configured one (naming the first parameter).
    """
    if shipped.is_model(source):
        params = shipped.load(source).params
    elif (files.as_path(source) / "checkpoints").is_dir():
        params = inference_params(restore(source, "latest").state)
    else:
        raise ValueError(
            f"{where}: {source!r} is neither a shipped model "
            f"({', '.join(shipped.names()) or 'none'}) nor a training run folder"
        )
    params = jax.device_get(params)
    shipped.check_params(params, like, where=where)
    return jax.tree.map(lambda new, old: np.asarray(new, old.dtype), params, like)
