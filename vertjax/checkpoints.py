"""orbax checkpoints of a training run: train state, data position and config.

Each checkpoint step holds four items:
  state   the flax TrainState (params, optimiser state, step), StandardSave
  data    the grain training iterator's position, one JSON file per process
  config  the run's ConfigDict as JSON, for reading a workdir back
  meta    run bookkeeping (seconds trained so far, validation metrics)
Kept: the latest `keep` steps plus the one with the best validation ID
accuracy, so that a long run can both resume and report its best model.
The same directory resumes exactly: restoring state and data position gives
the same batches and the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vertjax import files

BEST_METRIC = "id_accuracy"
_ITEMS = ("state", "data", "config", "meta")


def _best_metric(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


def _with_sharding(leaf: Any) -> jax.ShapeDtypeStruct:
    """A restore target leaf; without a sharding, the first local device."""
    if not hasattr(leaf, "shape"):
        leaf = np.asarray(leaf)  # e.g. TrainState.step as a Python int
    leaf = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(leaf, "sharding", None) is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
    return leaf


def _name(path: tuple[Any, ...]) -> str:
    """'params.Conv_0.kernel'-style name of a pytree path, as orbax names arrays."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; earlier ones are intact."""


class Checkpointer:
    """A CheckpointManager over `directory` keeping the latest N and the best."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
        self.directory = files.as_path(directory)
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=keep),
                checkpoint_managers.BestN(
                    get_metric_fn=_best_metric,
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            best_fn=_best_metric,
            best_mode="max",
            preservation_policy=None if read_only else policy,
            # Synchronous saves: the step after a save never races the writer,
            # and a save that fails raises here, at its own step.
            enable_async_checkpointing=False,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_iterator: grain.DatasetIterator,
        config: ml_collections.ConfigDict,
        meta: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Writes checkpoint `step`; `metrics` (with id_accuracy) rank it for 'best'."""
        ranked = None
        if metrics is not None:
            value = float(metrics[BEST_METRIC])
            # An undefined accuracy (nothing scored) never counts as the best.
            ranked = {BEST_METRIC: value if math.isfinite(value) else -1.0}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                    config=ocp.args.JsonSave(json.loads(config.to_json())),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=ranked,
                force=True,
            )
            self._manager.wait_until_finished()
        except (OSError, ValueError) as e:
            # A full disk shows as OSError from Python writes and as ValueError
            # from tensorstore's array writes. orbax writes into a temporary
            # folder and renames it when done, so the earlier checkpoints stay
            # loadable.
            raise CheckpointError(f"cannot write checkpoint {step} to {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best validation ID accuracy, else the latest."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def resolve(self, which: str | int) -> int:
        """A step from 'best', 'latest' or a step number; ValueError if absent."""
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoints in {self.directory}")
        if which == "best":
            step = self.best_step()
        elif which == "latest":
            step = self.latest_step()
        else:
            try:
                step = int(which)
            except ValueError:
                raise ValueError(
                    f"checkpoint must be 'best', 'latest' or a step number, got {which!r}"
                ) from None
        if step is None or step not in steps:
            raise ValueError(f"checkpoint {which!r} not in {self.directory} (steps {steps})")
        return step

    def restore(
        self,
        step: int,
        *,
        state: Any,
        data_iterator: grain.DatasetIterator | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `step` into the structure (and shardings) of `state`.

        Args:
          step: a saved step.
          state: a TrainState (or its jax.ShapeDtypeStruct tree) giving the
            pytree structure, shapes, dtypes and shardings to restore into.
          data_iterator: if given, set to the saved position in place.

        Returns:
          (restored state, meta dict).
        """
        target = jax.tree.map(_with_sharding, state)
        self._check_shapes(step, target)
        if data_iterator is not None:
            self._check_process_count(step)
        items = {
            "state": ocp.args.StandardRestore(target),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cannot restore checkpoint {step} of {self.directory} into this model "
                f"(damaged, or from a different model or config?): {e}"
            ) from e
        return restored["state"], restored["meta"]

    def _check_shapes(self, step: int, target: Any) -> None:
        """ValueError naming the first array whose saved shape differs from `target`'s.

        Checked from the checkpoint's metadata, before any array is read.
        """
        path = self.directory / str(step) / "state"
        try:
            saved_tree = ocp.StandardCheckpointer().metadata(path).item_metadata
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {step} of {self.directory} is damaged or incomplete: "
                f"cannot read its state ({e})"
            ) from e
        saved = {
            _name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)
        }
        if not saved:
            raise ValueError(
                f"checkpoint {step} of {self.directory} is damaged or incomplete: its state "
                "holds no arrays"
            )
        wanted = {_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
        # Parameters first: their names say most about which model differs.
        for name in sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith("params"), n)):
            if saved.get(name) != wanted.get(name):
                raise ValueError(
                    f"checkpoint {step} of {self.directory} does not fit this model (a different "
                    f"model config?): {name} is {saved.get(name, 'absent')} in the checkpoint and "
                    f"{wanted.get(name, 'absent')} in the model"
                )

    def _check_process_count(self, step: int) -> None:
        """ValueError unless checkpoint `step` holds this process's data position.

        grain saves one position per process ('process_<i>-of-<n>.json'); a
        run with another number of processes cannot continue those streams.
        """
        data_dir = self.directory / str(step) / "data"
        if not data_dir.is_dir():
            return
        written = [p.name for p in data_dir.iterdir() if p.name.startswith("process_")]
        if not written or f"process_{jax.process_index()}-of-{jax.process_count()}.json" in written:
            return
        counts = sorted({n.rsplit("-of-", 1)[-1].removesuffix(".json") for n in written})
        raise ValueError(
            f"checkpoint {step} of {self.directory} was written by {' or '.join(counts)} "
            f"process(es) and this run has {jax.process_count()}: each process's data position "
            f"({data_dir}) cannot be carried over; resume with {counts[0]} process(es) or use a "
            "new workdir (the parameters still restore anywhere for evaluation and prediction)"
        )

    def restore_config(self, step: int) -> dict[str, Any]:
        """The config saved with checkpoint `step`, as a plain dict.

        Raises:
          ValueError: the checkpoint has no readable config item.
        """
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {step} of {self.directory} has no saved config (damaged, or "
                f"not written by vertjax): {e}"
            ) from e
        return restored["config"]

    def close(self) -> None:
        self._manager.close()
