"""Training: the jit train step and the training loop.

One `jax.jit` step augments the batch on device (`vertjax.augment`),
renders the Gaussian targets from the batch centroids, runs the U-Net,
applies the configured loss (`losses.get`, or with loss_kernel='native' the
one-sweep CPU kernel of `native_loss`) and an optax Adam update with
warm-up and decay. Everything runs on a `jax.sharding.Mesh` with one 'data'
axis: the batch is split along it, parameters and optimiser state follow
config.mesh.param_sharding. The loop (`train`) validates every
`eval_every` steps, checkpoints state + data position + config with orbax,
logs to TensorBoard and `metrics.jsonl`, and resumes from the workdir.
The state, the optimiser and the dataset come from `vertjax.runs`.

Shapes: S = config.image_size, K = 13, B = global batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vertjax import (
    augment,
    checkpoints,
    config_checks,
    datasets,
    evaluate,
    files,
    heatmaps,
    inference,
    input_pipeline,
    losses,
    native_loss,
    overlay,
    run_log,
    runs,
    sharding,
)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def warm_start(state: runs.TrainState, params: Any) -> runs.TrainState:
    """`state` with `params` (from `runs.trained_params`) as parameters and as their average."""
    params = jax.tree.map(jnp.asarray, params)
    if isinstance(state, runs.EmaTrainState):
        return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    return state.replace(params=params)


def sigma_at(step: jax.Array, *, sigma: float, sigma_start: float, decay_steps: int) -> jax.Array:
    """Target width at `step`: linear from sigma_start to sigma over decay_steps."""
    if decay_steps <= 0:
        return jnp.asarray(sigma, jnp.float32)
    frac = jnp.clip(step.astype(jnp.float32) / decay_steps, 0.0, 1.0)
    return jnp.asarray(sigma_start + (sigma - sigma_start) * frac, jnp.float32)


def train_step(
    state: runs.TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    batch_loss: Callable[..., jax.Array],
    image_size: int,
    sigma: float,
    sigma_start: float,
    sigma_decay_steps: int,
    learning_rate_fn: optax.Schedule,
    aug: augment.Augment | None,
    ema_decay: float = 0.0,
) -> tuple[runs.TrainState, dict[str, jax.Array]]:
    """One optimiser step.

    Args:
      state: TrainState (donated by the jitted wrapper).
      batch: image [B, S, S, 1] float32, centroids [B, K, 2] normalised,
        labeled [B, K] bool (other fields are ignored).
      rng: base PRNG key; folded with the step for this step's augmentation.
      batch_loss, image_size, sigma, sigma_start, sigma_decay_steps,
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
        return batch_loss(
            predictions=predictions.astype(jnp.float32), targets=targets, labeled=labeled
        )

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


def batch_loss(config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
    """`fn(*, predictions, targets, labeled) -> []`: the batch-mean loss the step differentiates."""
    if config.loss_kernel == "native":
        return native_loss.batch_mean(config.loss)
    per_example = losses.get(config.loss)
    return lambda **inputs: losses.mean(per_example(**inputs))


def make_train_step(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, state_shardings: Any = None
) -> Callable[
    [runs.TrainState, dict[str, jax.Array], jax.Array], tuple[runs.TrainState, dict[str, jax.Array]]
]:
    """The jitted train step for `config` on `mesh` (state donated).

    The batch is split over the data axis; the state keeps `state_shardings`
    (a NamedSharding per array, the tree of the state that will be passed:
    `jax.tree.map(lambda x: x.sharding, state)`), default replicated. Metrics
    come back replicated: the loss is the mean over the global batch.
    """
    step = functools.partial(
        train_step,
        batch_loss=batch_loss(config),
        image_size=int(config.image_size),
        sigma=float(config.sigma),
        sigma_start=float(config.sigma_start),
        sigma_decay_steps=int(config.sigma_decay_steps),
        learning_rate_fn=runs.make_learning_rate(config),
        aug=augment.Augment.from_config(config),
        ema_decay=float(config.get("ema_decay", 0.0)),
    )
    rep, shard = sharding.replicated(mesh), sharding.data_sharded(mesh)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, then evaluates one of its checkpoints.

    Returns the `results.json` record of `config.eval_checkpoint` ('best' by
    validation ID accuracy, or 'latest') on `config.eval_split`; see `train`
    and `evaluate.evaluate_checkpoint`.
    """
    train(config, workdir)
    return evaluate.evaluate_checkpoint(
        config, workdir, split=config.eval_split, checkpoint=config.eval_checkpoint
    )


@dataclasses.dataclass
class _Data:
    """The opened dataset of a run: sources and pixel statistics."""

    train: Any
    validation: Any
    mean: float
    std: float


def _open_data(config: ml_collections.ConfigDict) -> _Data:
    builder = runs.open_dataset(config)
    mean, std = datasets.pixel_stats(builder)
    data = _Data(
        train=builder.as_data_source("train"),
        validation=builder.as_data_source(config.val_split),
        mean=mean,
        std=std,
    )
    logging.info(
        "dataset %s: %d train, %d %s records; pixel mean %.2f std %.2f",
        config.dataset.name,
        len(data.train),
        len(data.validation),
        config.val_split,
        mean,
        std,
    )
    return data


def _restore_or_init(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    ckpt: checkpoints.Checkpointer,
    train_iter: Any,
    warm: Any,
) -> tuple[runs.TrainState, dict[str, Any]]:
    """The latest checkpoint's state and meta (restoring the data position too),
    or a fresh state (from `warm` parameters when given) with empty meta."""
    start = ckpt.latest_step()
    if start is None:
        state = runs.create_train_state(config, runs.init_key(config.seed))
        if warm is not None:
            state = warm_start(state, warm)
            logging.info("initial parameters from %s", config.init_from)
        return jax.device_put(state, runs.state_sharding(config, mesh, state)), {}
    for line in config_checks.differences(ckpt.restore_config(start), config):
        logging.warning("config differs from the checkpoint: %s", line)
    state, meta = ckpt.restore(
        start, state=runs.abstract_train_state(config, mesh), data_iterator=train_iter
    )
    logging.info("resumed from %s at step %d", ckpt.directory, start)
    return state, meta


@dataclasses.dataclass
class _Book:
    """What the loop carries between steps and saves with each checkpoint."""

    train_seconds: float = 0.0
    validation: dict[str, Any] | None = None
    # Losses since the last log line; saved with checkpoints so that a resumed
    # run logs the same means as an uninterrupted one.
    window: list[float] = dataclasses.field(default_factory=list)
    pending: list[tuple[int, dict[str, jax.Array]]] = dataclasses.field(default_factory=list)
    clock: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> _Book:
        return cls(
            train_seconds=float(meta.get("train_seconds", 0.0)),
            validation=meta.get("validation"),
            window=[float(x) for x in meta.get("loss_window", [])],
        )

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """The pending step metrics, checked finite; adds their time and losses."""
        fetched = _check_finite(self.pending)
        self.pending = []
        self.window += [m["loss"] for _, m in fetched]
        now = time.perf_counter()
        self.train_seconds += now - self.clock
        self.clock = now
        return fetched

    def meta(self, mean: float, std: float) -> dict[str, Any]:
        return {
            "train_seconds": self.train_seconds,
            "validation": self.validation,
            "loss_window": self.window,
            # Inference needs these, and need not open the dataset for them.
            "pixel_mean": mean,
            "pixel_std": std,
        }


@dataclasses.dataclass
class _Examples:
    """A few validation radiographs drawn into TensorBoard at each validation.

    One predictor made at the start, whose parameters are swapped at each
    validation, so that its compiled network is reused.
    """

    records: list[dict[str, Any]]
    predictor: inference.Predictor

    @classmethod
    def make(cls, config, data: _Data, state, prior, workdir: str) -> _Examples | None:
        count = min(int(config.tensorboard_examples), len(data.validation))
        # Multi-host parameters are not all on process 0, which alone writes.
        if count <= 0 or jax.process_count() > 1:
            return None
        trained = runs.Trained(
            config=config,
            params=runs.inference_params(state),
            pixel_mean=data.mean,
            pixel_std=data.std,
            prior=prior,
            step=None,
            source=workdir,
        )
        records = [data.validation[i] for i in range(count)]
        return cls(records=records, predictor=inference.from_trained(trained))

    def figures(self, step: int, state) -> list[Any]:
        predictor = dataclasses.replace(
            self.predictor, variables={"params": runs.inference_params(state)}
        )
        points, confidence = inference.predict_records(predictor, self.records)
        return [
            overlay.draw_record(
                record,
                points[i],
                confidence[i],
                image_size=predictor.image_size,
                threshold=predictor.presence_threshold,
                title=f"step {step}: {overlay.text(record['image_id'])}",
            )
            for i, record in enumerate(self.records)
        ]


@dataclasses.dataclass
class _Loop:
    """What the loop's bookkeeping (logging, validation, checkpoints) works with."""

    config: ml_collections.ConfigDict
    data: _Data
    train_iter: Any
    evaluator: evaluate.Evaluator
    ckpt: checkpoints.Checkpointer
    writer: run_log.MetricWriter
    progress: run_log.Progress
    book: _Book
    examples: _Examples | None = None

    def after_step(self, step: int, state: runs.TrainState) -> None:
        """Logs, validates and checkpoints when `step` is due for it (and at the end)."""
        c = self.config
        last = step == c.train_steps
        do_log = step % c.log_every == 0 or last
        do_eval = step % c.eval_every == 0 or last
        do_save = step % c.checkpoint_every == 0 or last
        if not (do_log or do_eval or do_save):
            return
        book = self.book
        fetched = book.fetch()
        if do_log:
            rate = self.progress.report(step)
            mean_loss = float(np.mean(book.window))
            self.writer.write(step, "train", {**fetched[-1][1], "loss": mean_loss, **rate})
            book.window = []
        fresh = self.validate(step, state) if do_eval else None
        if do_save:
            self.ckpt.save(
                step,
                state=state,
                data_iterator=self.train_iter,
                config=c,
                meta=book.meta(self.data.mean, self.data.std),
                metrics=fresh,
            )
        book.clock = time.perf_counter()

    def validate(self, step: int, state: runs.TrainState) -> dict[str, Any]:
        """Validation metrics of `state` (with per-vertebra figures, for the checkpointer)."""
        fresh = self.evaluator.run(
            runs.inference_params(state),
            self.data.validation,
            max_batches=self.config.val_max_batches,
        )
        self.book.validation = {k: v for k, v in fresh.items() if k != "per_vertebra"}
        self.writer.write(step, "validation", self.book.validation)
        if self.examples is not None:
            self.writer.write_figures(
                step, "validation/examples", self.examples.figures(step, state)
            )
        logging.info(
            "step %d validation: id_accuracy %.4f, rmse_px %.2f",
            step,
            fresh["id_accuracy"],
            fresh["rmse_px"],
        )
        return fresh


def _train_iterator(config: ml_collections.ConfigDict, data: _Data) -> Any:
    fields = ("batch_size", "seed", "image_size", "num_workers", "read_threads")
    return iter(
        input_pipeline.train_dataset(
            data.train, mean=data.mean, std=data.std, **{f: config[f] for f in fields}
        )
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Validates on `config.val_split` every `eval_every` steps and at the end,
    checkpoints every `checkpoint_every` steps and at the end, and logs to
    `<workdir>/tensorboard` and `<workdir>/metrics.jsonl`.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; names the step.
      ValueError: a config that cannot work (batch size vs devices, names).
    """
    workdir = files.as_path(workdir)
    mesh = config_checks.checked_mesh(config)
    data = _open_data(config)
    train_iter = _train_iterator(config, data)
    # Read and checked before the workdir is made, like the config and data.
    warm = None
    if config.init_from:
        like = runs.abstract_train_state(config, mesh).params
        warm = runs.trained_params(
            config.init_from, like, where=f"config.init_from={config.init_from}"
        )
    # Made only now: a config or dataset fault leaves no workdir behind.
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    state, meta = _restore_or_init(config, mesh, ckpt, train_iter, warm)
    start = int(jax.device_get(state.step))
    logging.info(
        "model: %d parameters", sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    )
    evaluator = evaluate.Evaluator(
        config,
        mesh,
        apply_fn=state.apply_fn,
        mean=data.mean,
        std=data.std,
        train_source=data.train,
        param_sharding=jax.tree.map(lambda x: x.sharding, state.params),
    )
    step_fn = make_train_step(config, mesh, jax.tree.map(lambda x: x.sharding, state))
    # Augmentation keys: threefry, which gives the same numbers however the
    # batch is partitioned; folded with the step inside the train step.
    step_rng = sharding.replicated_key(config.seed + 1, mesh)
    writer = run_log.MetricWriter(workdir)
    writer.drop_after(start)
    loop = _Loop(
        config,
        data,
        train_iter,
        evaluator,
        ckpt,
        writer,
        run_log.Progress(config.train_steps),
        _Book.from_meta(meta),
        _Examples.make(config, data, state, evaluator.prior, workdir),
    )
    if start < config.train_steps:
        logging.info("training steps %d to %d", start + 1, config.train_steps)
    try:
        for step in range(start + 1, config.train_steps + 1):
            batch = input_pipeline.put_batch(next(train_iter), mesh)
            state, metrics = step_fn(state, batch, step_rng)
            loop.book.pending.append((step, metrics))
            loop.after_step(step, state)
    finally:
        writer.close()
    result = TrainResult(
        step=int(jax.device_get(state.step)),
        train_seconds=loop.book.train_seconds,
        best_step=ckpt.best_step(),
        last_validation=loop.book.validation,
    )
    ckpt.close()
    return result
