"""Evaluation: the jit eval step, one pass over a split, and the results files.

The eval step runs the U-Net, decodes each heatmap layer to a point (or
applies the anatomical-order post-processing when configured) and returns
the sums and counts of `metrics.batch_sums`; the host adds them over the
batches and divides once (`metrics.summarize`). Padded examples of the last
batch carry mask False and count nowhere.

Outputs in the workdir: `results.json` (config, loss, dataset, split,
checkpoint step, steps, train_seconds and every metric) and `results.md`
(the same as tables, one row per vertebra).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from vertjax import (
    config_checks,
    datasets,
    files,
    input_pipeline,
    metrics,
    models,
    postprocess,
    provenance,
    runs,
)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def eval_step(
    params: Any,
    batch: dict[str, jax.Array],
    prior: Any,
    *,
    apply_fn: Callable[..., jax.Array],
    image_size: int,
    threshold: float,
    top_m: int,
    min_confidence: float,
    use_postprocess: bool,
    fallback_spacing_px: float | None,
    flip: bool = False,
) -> dict[str, jax.Array]:
    """Metric sums and counts for one batch.

    Args:
      params: model parameters.
      batch: image [B, S, S, 1], centroids [B, K, 2], labeled [B, K],
        truth_centroids [B, K, 2], truth_visible [B, K], original_size [B, 2],
        pixel_spacing_mm [B, 2], mask [B].
      prior: `postprocess.fit_prior` output, or None without post-processing.
      apply_fn, image_size, threshold, top_m, min_confidence, use_postprocess,
        fallback_spacing_px, flip: plain values bound with functools.partial
        (flip: test-time mirror averaging, `models.heatmaps_of`).

    Returns:
      `metrics.batch_sums` of the batch (arrays of sums and counts).
    """
    predicted = models.heatmaps_of(
        functools.partial(apply_fn, train=False), {"params": params}, batch["image"], flip=flip
    )
    points, confidence = postprocess.locate(
        predicted, prior, enabled=use_postprocess, top_m=top_m, min_confidence=min_confidence
    )
    return metrics.batch_sums(
        points=points,
        confidence=confidence,
        mask=batch["mask"],
        **{field: batch[field] for field in input_pipeline.FIELDS if field != "image"},
        image_size=image_size,
        threshold=threshold,
        fallback_spacing_px=fallback_spacing_px,
    )


class Evaluator:
    """Evaluates parameters on a split with one jit-compiled eval step.

    Args:
      config: the run config (read here, never inside traced code).
      mesh: the device mesh; batches are split along its 'data' axis.
      apply_fn: the model's apply function.
      mean, std: the training split's pixel statistics.
      train_source: records to fit the post-processing prior on (needed only
        when config.postprocess.enabled and no `prior` is given).
      prior: a fitted post-processing prior (e.g. a shipped model's).
      param_sharding: the parameters' shardings (a tree like the params, or
        one sharding for all); default replicated over `mesh`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        *,
        apply_fn: Callable[..., jax.Array],
        mean: float,
        std: float,
        train_source: Sequence[Any] | None = None,
        param_sharding: Any = None,
        prior: postprocess.SpacingPrior | None = None,
    ):
        self.mesh = mesh
        self.image_size = int(config.image_size)
        # How `run` reads a split: eval_batches' settings.
        self.batching = {
            "batch_size": int(config.eval_batch_size),
            "mean": float(mean),
            "std": float(std),
            "image_size": self.image_size,
            "read_threads": int(config.read_threads),
        }
        use_postprocess = bool(config.postprocess.enabled)
        self.prior = None
        if use_postprocess and prior is not None:
            self.prior = prior
        elif use_postprocess:
            if train_source is None:
                raise ValueError(
                    "config.postprocess.enabled needs the training split for its prior"
                )
            self.prior = runs.fit_prior(train_source, self.image_size)
        step = functools.partial(
            eval_step,
            apply_fn=apply_fn,
            image_size=self.image_size,
            threshold=float(config.presence_threshold),
            top_m=int(config.postprocess.top_m),
            min_confidence=float(config.postprocess.min_confidence),
            use_postprocess=use_postprocess,
            fallback_spacing_px=float(config.fallback_spacing_px) or None,
            flip=bool(config.get("test_time_flip", False)),
        )
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        params = rep if param_sharding is None else param_sharding
        # Sums and counts come back replicated: XLA adds them across devices.
        self._step = jax.jit(step, in_shardings=(params, data, rep), out_shardings=rep)

    def run(self, params: Any, source: Sequence[Any], *, max_batches: int = 0) -> dict[str, Any]:
        """`metrics.summarize` over `source` (the first `max_batches` batches if > 0)."""
        total = None
        batches = input_pipeline.eval_batches(source, max_batches=max_batches, **self.batching)
        for batch in batches:
            sums = self._step(params, input_pipeline.put_batch(batch, self.mesh), self.prior)
            total = metrics.accumulate(total, jax.device_get(sums))
        if total is None:
            raise ValueError("the split gave no batches to evaluate")
        return metrics.summarize(total)


def results_record(
    summary: dict[str, Any],
    *,
    config: ml_collections.ConfigDict,
    split: str,
    checkpoint_step: int,
    train_seconds: float,
    workdir: str,
) -> dict[str, Any]:
    """The `results.json` content: run identity first, then every metric.

    `provenance` names the run folder, the checkpoint step, the vertjax
    version and the config's hash (`vertjax.provenance`).

    Non-finite numbers (e.g. an RMSE with nothing correct) become null.
    """
    record = {
        "config": config.name,
        "loss": config.loss,
        "dataset": config.dataset.name,
        "split": split,
        "steps": int(checkpoint_step),
        "train_seconds": float(train_seconds),
        "postprocess": bool(config.postprocess.enabled),
        "provenance": provenance.stamp(model=workdir, step=checkpoint_step, config=config),
    }
    record.update(summary)
    return files.plain(record)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _provenance_line(stamp: dict[str, Any] | None) -> str:
    if not stamp:
        return ""
    return (
        f"Model {stamp['model']}, vertjax {stamp['vertjax_version']}, "
        f"config sha256 {(stamp['config_sha256'] or '-')[:16]}."
    )


def results_markdown(record: dict[str, Any]) -> str:
    """A human-readable page: the run, the overall metrics, one row per vertebra."""
    lines = [
        f"# Results: {record['config']} ({record['loss']} loss) on {record['dataset']}/{record['split']}",
        "",
        f"Checkpoint step {record['steps']}, {record['train_seconds']:.0f} s of training, "
        f"post-processing {'on' if record['postprocess'] else 'off'}.",
        _provenance_line(record.get("provenance")),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    skip = {
        "config",
        "loss",
        "dataset",
        "split",
        "steps",
        "train_seconds",
        "postprocess",
        "per_vertebra",
    }
    for key, value in record.items():
        if key not in skip and not isinstance(value, (dict, list)):
            lines.append(f"| {key} | {_cell(value)} |")
    per_vertebra = record.get("per_vertebra") or {}
    if per_vertebra:
        columns: list[str] = []
        for row in per_vertebra.values():
            columns += [c for c in row if c not in columns]
        lines += ["", "## Per vertebra", "", "| vertebra | " + " | ".join(columns) + " |"]
        lines.append("|---" * (len(columns) + 1) + "|")
        for name, row in per_vertebra.items():
            lines.append(f"| {name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str, record: dict[str, Any]) -> None:
    """Writes `results.json` and `results.md` into `workdir` (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir = files.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_json(workdir / RESULTS_JSON, record)
    files.write_atomic(workdir / RESULTS_MD, results_markdown(record))


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
    workdir = files.as_path(workdir)
    mesh = config_checks.checked_mesh(config)
    builder = runs.open_dataset(config)
    mean, std = datasets.pixel_stats(builder)
    run = runs.restore(workdir, checkpoint, config=config, mesh=mesh)
    evaluator = Evaluator(
        config,
        mesh,
        apply_fn=run.state.apply_fn,
        mean=mean,
        std=std,
        train_source=builder.as_data_source("train") if config.postprocess.enabled else None,
        param_sharding=jax.tree.map(lambda x: x.sharding, run.state.params),
    )
    summary = evaluator.run(runs.inference_params(run.state), builder.as_data_source(split))
    record = results_record(
        summary,
        config=config,
        split=split,
        checkpoint_step=run.step,
        train_seconds=float(run.meta.get("train_seconds", 0.0)),
        workdir=workdir,
    )
    write_results(workdir, record)
    logging.info(
        "checkpoint %d on %s: id_accuracy %s, rmse_px %s (%s)",
        run.step,
        split,
        record.get("id_accuracy"),
        record.get("rmse_px"),
        workdir / RESULTS_JSON,
    )
    return record
