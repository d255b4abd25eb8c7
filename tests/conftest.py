"""Shared test fixtures: writers for small synthetic image files and run folders, a built dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_dicom():
    """A function writing a small DICOM file; see `vertjax.imaging.write_dicom`."""
    from vertjax import imaging

    return imaging.write_dicom


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding spine_radiographs/synthetic_small, built once per session."""
    path = tmp_path_factory.getbasetemp() / "vertjax_tfds"
    # Built in a child process: the builder's workers must not fork this
    # process, where JAX's threads already run.
    command = [sys.executable, "-m", "vertjax.data", "build", "--config=synthetic_small"]
    done = subprocess.run(
        [*command, f"--data_dir={path}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return str(path)


def _write_constant_run(workdir, config, output_bias, *, step=6, meta=None, metrics=None):
    """Writes a run folder whose network outputs `output_bias[k]` everywhere in heatmap k.

    Shapes come from the real model and values are drawn here (initialising
    the U-Net for real costs tens of seconds of compilation on a busy 2-core
    machine). The output layer, the one 1x1 convolution, gets
    a zero kernel and the given bias, so every heatmap is constant: each
    layer decodes to the centre of model pixel (0, 0) with confidence equal
    to its bias. The checkpoint is written by `vertjax.checkpoints`, as
    training writes it. Returns `workdir`.
    """
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.training import train_state

    from vertjax import checkpoints, runs, vertebrae

    shapes = jax.eval_shape(lambda: runs.create_train_state(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), dict(shapes.params)
    )
    (out_layer,) = [
        k for k, v in params.items() if v.get("kernel", np.zeros(0)).shape[:2] == (1, 1)
    ]
    # K channels, or 4 K for the patch stem's sub-pixel output (one K per pixel of a 2x2 cell).
    cells = params[out_layer]["bias"].shape[0] // vertebrae.K
    params[out_layer] = {
        "kernel": jnp.zeros_like(params[out_layer]["kernel"]),
        "bias": jnp.asarray(
            np.tile(np.broadcast_to(output_bias, (vertebrae.K,)), cells), jnp.float32
        ),
    }
    state = train_state.TrainState.create(
        apply_fn=None, params=params, tx=runs.make_optimizer(config)
    )
    ckpt = checkpoints.Checkpointer(str(Path(workdir) / "checkpoints"), keep=1)
    ckpt.save(
        step,
        state=state,
        data_iterator=iter(grain.MapDataset.range(4).to_iter_dataset()),
        config=config,
        meta={"train_seconds": 1.0, "validation": None, **(meta or {})},
        metrics=metrics or {"id_accuracy": 0.0},
    )
    ckpt.close()
    return workdir


@pytest.fixture(scope="session")
def write_constant_run():
    """A function writing a run folder with constant heatmaps; see `_write_constant_run`."""
    return _write_constant_run
