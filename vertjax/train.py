"""Training: the jit train step and the training loop.

One `jax.jit` step augments the batch on device (`vertjax.augment`),
renders the Gaussian targets from the batch centroids, runs the U-Net,
applies the configured loss (`losses.get`) and an optax Adam update with
warm-up and decay. Everything runs on a `jax.sharding.Mesh` with one 'data'
axis: the batch is split along it, parameters and optimiser state are
replicated. The loop validates every
`eval_every` steps, checkpoints state + data position + config with orbax,
logs to TensorBoard and `metrics.jsonl`, and resumes from the workdir.

Shapes: S = config.image_size, K = 13, B = global batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from vertjax import (
    augment,
    checkpoints,
    config_checks,
    data,
    evaluate,
    heatmaps,
    input_pipeline,
    losses,
    models,
    run_log,
    sharding,
    shipped,
)

TrainState = train_state.TrainState


class EmaTrainState(train_state.TrainState):
    """flax's TrainState plus a moving average of the parameters (config.ema_decay > 0).

    A separate class rather than an optional field: runs without the average
    keep flax's TrainState, and so the checkpoint layout they always had.
    """

    ema_params: Any = None


def inference_params(state: TrainState) -> Any:
    """The parameters to validate and predict with: the moving average when kept."""
    ema = getattr(state, "ema_params", None)
    return state.params if ema is None else ema


DATA_AXIS = sharding.DATA_AXIS


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# The mesh and its shardings live in vertjax.sharding; these names stay here
# for the callers that reach them through the trainer.
make_mesh = sharding.make_mesh
check_batch_size = sharding.check_batch_size
replicated = sharding.replicated
data_sharded = sharding.data_sharded


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


def make_learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine, linear or no decay to the end."""
    o = config.optimizer
    peak = o.learning_rate
    end = peak * o.end_learning_rate_factor
    warmup = min(o.warmup_steps, config.train_steps)
    rest = max(config.train_steps - warmup, 1)
    if o.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest, alpha=o.end_learning_rate_factor)
    elif o.decay == "linear":
        decay = optax.linear_schedule(peak, end, rest)
    elif o.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"config.optimizer.decay={o.decay!r}: expected one of 'cosine', 'linear', 'constant'"
        )
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


def init_key(seed: int) -> jax.Array:
    """The parameter-initialisation key of a seed.

    The 'rbg' generator: XLA on CPU compiles the U-Net's initialisers in
    about 30 s with the default threefry generator, in about 6 s with rbg.
    Parameters are drawn once on one device, so rbg's dependence on
    partitioning does not matter here.
    """
    return jax.random.key(seed, impl="rbg")


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


def initial_params(source: str, like: Any) -> Any:
    """Trained parameters to start from: a shipped model's, or a run's latest checkpoint's.

    Args:
      source: a shipped model name or folder (`vertjax.shipped`), or a
        training run's folder (its latest checkpoint; the moving average
        where the run kept one).
      like: the configured network's parameters (or their shapes).

    Returns:
      Host arrays with the structure and dtypes of `like`.

    Raises:
      ValueError: `source` is neither or cannot be read, or its network
        differs from the configured one (naming the first parameter).
    """
    params = jax.device_get(_trained_params(source))
    shipped.check_params(params, like, where=f"config.init_from={source}")
    return jax.tree.map(lambda new, old: np.asarray(new, old.dtype), params, like)


def _trained_params(source: str) -> Any:
    if shipped.is_model(source):
        return shipped.load(source).params
    ckpt_dir = os.path.join(os.path.abspath(source), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(
            f"config.init_from={source!r} is neither a shipped model "
            f"({', '.join(shipped.names()) or 'none'}) nor a training run folder"
        )
    ckpt = checkpoints.Checkpointer(ckpt_dir, read_only=True)
    try:
        step = ckpt.resolve("latest")
        saved = ml_collections.ConfigDict(ckpt.restore_config(step))
        state, _ = ckpt.restore(step, state=abstract_train_state(saved, make_mesh(1)))
    finally:
        ckpt.close()
    return inference_params(state)


def warm_start(state: TrainState, params: Any) -> TrainState:
    """`state` with `params` (from `initial_params`) as parameters and as their average."""
    params = jax.tree.map(jnp.asarray, params)
    if isinstance(state, EmaTrainState):
        return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    return state.replace(params=params)


def sigma_at(step: jax.Array, *, sigma: float, sigma_start: float, decay_steps: int) -> jax.Array:
    """Target width at `step`: linear from sigma_start to sigma over decay_steps."""
    if decay_steps <= 0:
        return jnp.asarray(sigma, jnp.float32)
    frac = jnp.clip(step.astype(jnp.float32) / decay_steps, 0.0, 1.0)
    return jnp.asarray(sigma_start + (sigma - sigma_start) * frac, jnp.float32)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    loss_fn: losses.LossFn,
    image_size: int,
    sigma: float,
    sigma_start: float,
    sigma_decay_steps: int,
    learning_rate_fn: optax.Schedule,
    aug: augment.Augment | None,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step.

    Args:
      state: TrainState (donated by the jitted wrapper).
      batch: image [B, S, S, 1] float32, centroids [B, K, 2] normalised,
        labeled [B, K] bool (other fields are ignored).
      rng: base PRNG key; folded with the step for this step's augmentation.
      loss_fn, image_size, sigma, sigma_start, sigma_decay_steps,
        learning_rate_fn, aug, ema_decay: plain values bound with functools.partial.

    Returns:
      (new state, metrics: loss, grad_norm, learning_rate, sigma; scalars).
    """
    images = batch["image"]
    points = batch["centroids"] * image_size
    labeled = batch["labeled"]
    if aug is not None:
        images, points, labeled = augment.augment(
            jax.random.fold_in(rng, state.step), images, points, labeled, aug
        )
    width = sigma_at(
        state.step, sigma=sigma, sigma_start=sigma_start, decay_steps=sigma_decay_steps
    )
    targets = heatmaps.render(points, labeled, height=image_size, width=image_size, sigma=width)

    def loss_of(params):
        predictions = state.apply_fn({"params": params}, images, train=True)
        per_example = loss_fn(
            predictions=predictions.astype(jnp.float32), targets=targets, labeled=labeled
        )
        return losses.mean(per_example)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_fn(state.step),
        "sigma": width,
    }
    new_state = state.apply_gradients(grads=grads)
    if ema_decay > 0:
        # The usual warm-up: early averages forget the random start quickly.
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        new_state = new_state.replace(
            ema_params=jax.tree.map(
                lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_state.params
            )
        )
    return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, state_shardings: Any = None
) -> Callable[
    [TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]
]:
    """The jitted train step for `config` on `mesh` (state donated).

    The batch is split over the data axis; the state keeps `state_shardings`
    (a NamedSharding per array, the tree of the state that will be passed:
    `jax.tree.map(lambda x: x.sharding, state)`), default replicated. Metrics
    come back replicated: the loss is the mean over the global batch.
    """
    step = functools.partial(
        train_step,
        loss_fn=losses.get(config.loss),
        image_size=int(config.image_size),
        sigma=float(config.sigma),
        sigma_start=float(config.sigma_start),
        sigma_decay_steps=int(config.sigma_decay_steps),
        learning_rate_fn=make_learning_rate(config),
        aug=augment.Augment.from_config(config),
        ema_decay=float(config.get("ema_decay", 0.0)),
    )
    rep, shard = replicated(mesh), data_sharded(mesh)
    kept = rep if state_shardings is None else state_shardings
    return jax.jit(
        step, in_shardings=(kept, shard, rep), out_shardings=(kept, rep), donate_argnums=0
    )


@dataclasses.dataclass
class TrainResult:
    """What a finished (or already complete) training run leaves behind."""

    step: int
    train_seconds: float
    best_step: int | None
    last_validation: dict[str, Any] | None


def _check_finite(
    pending: list[tuple[int, dict[str, jax.Array]]],
) -> list[tuple[int, dict[str, float]]]:
    """Fetches the pending step metrics; NonFiniteLossError names the first bad step.

    The gradient norm counts too: a finite loss with non-finite gradients
    leaves NaN parameters after the update, which must not be saved either.
    """
    fetched = [(step, jax.device_get(m)) for step, m in pending]
    for step, m in fetched:
        for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            if key in m and not np.isfinite(m[key]):
                raise NonFiniteLossError(
                    f"non-finite {what} {float(m[key])} at step {step}; the last "
                    "checkpoint before it is kept and this state is not saved"
                )
    return [(step, {k: float(v) for k, v in m.items()}) for step, m in fetched]


def _config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
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


def open_dataset(config: ml_collections.ConfigDict) -> Any:
    """The configured TFDS builder, built on first use."""
    d = config.dataset
    # Several processes never build: they would all write the same files.
    return data.get_builder(
        d.name,
        data_dir=d.data_dir or None,
        manual_dir=d.manual_dir or None,
        build=jax.process_count() == 1,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, then evaluates one of its checkpoints.

    Returns the `results.json` record of `config.eval_checkpoint` ('best' by
    validation ID accuracy, or 'latest') on `config.eval_split`; see `train`
    and `evaluate_checkpoint`.
    """
    train(config, workdir)
    return evaluate_checkpoint(
        config, workdir, split=config.eval_split, checkpoint=config.eval_checkpoint
    )


def _check_config(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """Fails fast on config faults; returns the device mesh."""
    config_checks.check(config)
    sharding.check_param_rule(config.mesh.param_sharding)
    for name in ("train_steps", "log_every", "eval_every", "checkpoint_every", "image_size"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    mesh = make_mesh(config.mesh.data)
    check_batch_size(config.batch_size, mesh)
    check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    return mesh


def _evaluator(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    *,
    mean: float,
    std: float,
    train_source: Any,
) -> evaluate.Evaluator:
    """The evaluator of `state`'s network, with the parameters sharded as in `state`."""
    return evaluate.Evaluator(
        config,
        mesh,
        apply_fn=state.apply_fn,
        mean=mean,
        std=std,
        train_source=train_source,
        param_sharding=jax.tree.map(lambda x: x.sharding, state.params),
    )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    split: str,
    checkpoint: str | int = "best",
) -> dict[str, Any]:
    """Evaluates a checkpoint of `workdir` on `split`; writes results.json/.md.

    Args:
      config: the run config (the model must match the checkpoint's).
      workdir: the training run's directory.
      split: dataset split, e.g. 'test'.
      checkpoint: 'best' (validation ID accuracy), 'latest' or a step number.

    Returns:
      The results record (as written to `<workdir>/results.json`).
    """
    workdir = os.path.abspath(workdir)
    mesh = _check_config(config)
    builder = open_dataset(config)
    mean, std = data.pixel_stats(builder)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{workdir} has no checkpoints directory; train first (--mode=train)")
    ckpt = checkpoints.Checkpointer(ckpt_dir, read_only=True)
    try:
        step = ckpt.resolve(checkpoint)
        state, meta = ckpt.restore(step, state=abstract_train_state(config, mesh))
    finally:
        ckpt.close()
    train_source = builder.as_data_source("train") if config.postprocess.enabled else None
    evaluator = _evaluator(config, mesh, state, mean=mean, std=std, train_source=train_source)
    summary = evaluator.run(inference_params(state), builder.as_data_source(split))
    record = evaluate.results_record(
        summary,
        config=config,
        split=split,
        checkpoint_step=step,
        train_seconds=float(meta.get("train_seconds", 0.0)),
    )
    evaluate.write_results(workdir, record)
    logging.info(
        "checkpoint %d on %s: id_accuracy %s, rmse_px %s (%s)",
        step,
        split,
        record.get("id_accuracy"),
        record.get("rmse_px"),
        os.path.join(workdir, evaluate.RESULTS_JSON),
    )
    return record


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Validates on `config.val_split` every `eval_every` steps and at the end,
    checkpoints every `checkpoint_every` steps and at the end, and logs to
    `<workdir>/tensorboard` and `<workdir>/metrics.jsonl`.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; names the step.
      ValueError: a config that cannot work (batch size vs devices, names).
    """
    workdir = os.path.abspath(workdir)
    mesh = _check_config(config)

    builder = open_dataset(config)
    mean, std = data.pixel_stats(builder)
    train_source = builder.as_data_source("train")
    val_source = builder.as_data_source(config.val_split)
    logging.info(
        "dataset %s: %d train, %d %s records; pixel mean %.2f std %.2f",
        config.dataset.name,
        len(train_source),
        len(val_source),
        config.val_split,
        mean,
        std,
    )

    train_data = input_pipeline.train_dataset(
        train_source,
        batch_size=config.batch_size,
        seed=config.seed,
        mean=mean,
        std=std,
        image_size=config.image_size,
        num_workers=config.num_workers,
        read_threads=config.read_threads,
    )
    train_iter = iter(train_data)
    # Augmentation keys: threefry, which gives the same numbers however the
    # batch is partitioned; folded with the step inside the train step.
    step_rng = sharding.replicated_key(config.seed + 1, mesh)

    # Read and checked before the workdir is made, like the config and data.
    warm = None
    if config.init_from:
        like = abstract_train_state(config, mesh).params
        warm = initial_params(config.init_from, like)

    # Made only now: a config or dataset fault leaves no workdir behind.
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    meta: dict[str, Any] = {"train_seconds": 0.0, "validation": None}
    start = ckpt.latest_step()
    if start is None:
        state = create_train_state(config, init_key(config.seed))
        if warm is not None:
            state = warm_start(state, warm)
            logging.info("initial parameters from %s", config.init_from)
        state = jax.device_put(state, state_sharding(config, mesh, state))
    else:
        for line in _config_differences(ckpt.restore_config(start), config):
            logging.warning("config differs from the checkpoint: %s", line)
        state, meta = ckpt.restore(
            start, state=abstract_train_state(config, mesh), data_iterator=train_iter
        )
        logging.info("resumed from %s at step %d", ckpt.directory, start)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("model: %d parameters", n_params)
    start = int(jax.device_get(state.step))

    shardings = jax.tree.map(lambda x: x.sharding, state)
    evaluator = _evaluator(config, mesh, state, mean=mean, std=std, train_source=train_source)
    writer = run_log.MetricWriter(workdir)
    writer.drop_after(start)
    progress = run_log.Progress(config.train_steps)
    step_fn = make_train_step(config, mesh, shardings)
    train_seconds = float(meta.get("train_seconds", 0.0))
    validation = meta.get("validation")
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    # Losses since the last log line; saved with checkpoints so that a resumed
    # run logs the same means as an uninterrupted one.
    window = [float(x) for x in meta.get("loss_window", [])]
    if start < config.train_steps:
        logging.info("training steps %d to %d", start + 1, config.train_steps)
    t_last = time.perf_counter()
    try:
        for step in range(start + 1, config.train_steps + 1):
            batch = input_pipeline.put_batch(next(train_iter), mesh)
            state, metrics = step_fn(state, batch, step_rng)
            pending.append((step, metrics))
            last = step == config.train_steps
            do_log = step % config.log_every == 0 or last
            do_eval = step % config.eval_every == 0 or last
            do_save = step % config.checkpoint_every == 0 or last
            if not (do_log or do_eval or do_save):
                continue
            fetched = _check_finite(pending)
            pending = []
            window += [m["loss"] for _, m in fetched]
            now = time.perf_counter()
            train_seconds += now - t_last
            t_last = now
            if do_log:
                rate = progress.report(step)
                mean_loss = float(np.mean(window))
                window = []
                writer.write(step, "train", {**fetched[-1][1], "loss": mean_loss, **rate})
            fresh = None
            if do_eval:
                fresh = evaluator.run(
                    inference_params(state), val_source, max_batches=config.val_max_batches
                )
                validation = {k: v for k, v in fresh.items() if k != "per_vertebra"}
                writer.write(step, "validation", validation)
                logging.info(
                    "step %d validation: id_accuracy %.4f, rmse_px %.2f",
                    step,
                    fresh["id_accuracy"],
                    fresh["rmse_px"],
                )
            if do_save:
                meta = {
                    "train_seconds": train_seconds,
                    "validation": validation,
                    "loss_window": window,
                    # Inference needs these, and need not open the dataset for them.
                    "pixel_mean": mean,
                    "pixel_std": std,
                }
                ckpt.save(
                    step,
                    state=state,
                    data_iterator=train_iter,
                    config=config,
                    meta=meta,
                    metrics=fresh,
                )
            t_last = time.perf_counter()
    finally:
        writer.close()
    result = TrainResult(
        step=int(jax.device_get(state.step)),
        train_seconds=train_seconds,
        best_step=ckpt.best_step(),
        last_validation=validation,
    )
    ckpt.close()
    return result
