"""Train-step benchmark: the vertjax U-Net step against the same network in PyTorch.

    python -m benchmarks.train_step [--features=16,32] [--batch=8] [--json=FILE]

One step = forward, loss, backward and an Adam update on a batch of
[B, 264, 264, 1] images with [B, 264, 264, 13] targets, for each base width
in `--features` (a comma-separated list of ints, an absl list flag). The
network is the one `configs/default.py` trains (depth, norm, up-sampling,
channel cap); `--depth`, `--norm`, `--upsample` and `--max_features`
override it. vertjax: `jax.jit` of `vertjax.models.UNet` +
`vertjax.losses.get(loss)` + `optax.adam`, with the train state donated.
PyTorch: `torch_reference.UNet` (same layers and parameter count,
channels_last, same up-sampling), eager, `torch.optim.Adam` (`--notorch`
skips it). Both sides are timed in alternation. A second table gives each
loss's train-step time and its overhead over mse (same network, the first
base width; `--noloss_table` skips it). A third gives each stem's
(`vertjax.models.STEMS`) train-step time, images per second and speed-up
over the classic full-resolution conv stem (`--nostem_table` skips it). With `--baseline=DIR`, the
models.py and losses.py in DIR (e.g. an earlier version of vertjax's) are
timed alongside as a third contender.

The targets are fixed Gaussians rendered once (`vertjax.heatmaps.render`):
the step measured here is the network + loss + optimiser, not the input
pipeline or on-device augmentation (see benchmarks/input_pipeline.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks import common
from configs import default as default_config

FLAGS = flags.FLAGS

K = 13


def make_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images [B, S, S, 1], centroids [B, K, 2] (model px), labeled [B, K]."""
    rng = np.random.default_rng(seed)
    ys = np.sort(rng.uniform(0.1, 0.9, (batch, K)), axis=1) * size
    xs = rng.uniform(0.4, 0.6, (batch, K)) * size
    labeled = np.zeros((batch, K), bool)
    for b in range(batch):
        first = rng.integers(0, K - 4)
        labeled[b, first : first + rng.integers(4, K - first + 1)] = True
    return {
        "image": rng.standard_normal((batch, size, size, 1)).astype(np.float32),
        "centroids": np.stack([xs, ys], axis=-1).astype(np.float32),
        "labeled": labeled,
    }


def load_modules(directory: str | None) -> tuple[Any, Any]:
    """(models, losses): vertjax's, or the models.py and losses.py in `directory`."""
    if directory is None:
        from vertjax import losses, models

        return models, losses
    loaded = []
    for name in ("models", "losses"):
        path = os.path.join(directory, f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        if spec is None or spec.loader is None or not os.path.exists(path):
            raise FileNotFoundError(f"--baseline={directory}: no {name}.py there")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


def vertjax_step(
    features: int,
    loss_name: str,
    data: dict[str, np.ndarray],
    model_kwargs: dict,
    modules: tuple[Any, Any] | None = None,
):
    """(step() that runs one donated jit train step and blocks, parameter count)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from vertjax import heatmaps

    models, losses = modules or load_modules(None)

    size = data["image"].shape[1]
    model = models.UNet(features=features, **model_kwargs)
    images = jnp.asarray(data["image"])
    labeled = jnp.asarray(data["labeled"])
    targets = heatmaps.render(
        jnp.asarray(data["centroids"]), labeled, height=size, width=size, sigma=3.0
    )
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    loss_fn = losses.get(loss_name)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, images, targets, labeled):
        def loss_of(params):
            predictions = state.apply_fn({"params": params}, images, train=True)
            return jnp.mean(loss_fn(predictions=predictions, targets=targets, labeled=labeled))

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        return state.apply_gradients(grads=grads), loss

    holder = {"state": state}

    def run():
        holder["state"], loss = step(holder["state"], images, targets, labeled)
        loss.block_until_ready()

    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    return run, count


def torch_step(
    features: int,
    loss_name: str,
    data: dict[str, np.ndarray],
    model_kwargs: dict,
    device: str = "cpu",
):
    """(step() that runs one eager PyTorch train step, parameter count)."""
    import torch

    from benchmarks import torch_reference

    size = data["image"].shape[1]
    model = torch_reference.UNet(features=features, **model_kwargs).to(
        device=device, memory_format=torch.channels_last
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = (
        torch.from_numpy(data["image"])
        .permute(0, 3, 1, 2)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
    )
    targets = torch.from_numpy(_numpy_targets(data, size)).to(device)
    labeled = torch.from_numpy(data["labeled"]).to(device)

    def run():
        optimizer.zero_grad(set_to_none=True)
        # NCHW in channels_last memory permuted to [B, H, W, K] is a free view
        # with K minor, the layout the vertjax loss sees.
        predictions = model(images).permute(0, 2, 3, 1)
        loss = torch_reference.loss(loss_name, predictions, targets, labeled).mean()
        loss.backward()
        optimizer.step()
        common.torch_sync(device)

    return run, torch_reference.parameter_count(model)


def _numpy_targets(data: dict[str, np.ndarray], size: int, sigma: float = 3.0) -> np.ndarray:
    """The Gaussian targets [B, S, S, K] of `heatmaps.render`, in NumPy."""
    centre = np.arange(size, dtype=np.float32) + 0.5
    x = data["centroids"][..., 0][:, None, None, :]
    y = data["centroids"][..., 1][:, None, None, :]
    g = np.exp(
        -((centre[None, None, :, None] - x) ** 2 + (centre[None, :, None, None] - y) ** 2)
        / (2 * sigma**2)
    )
    return (g * data["labeled"][:, None, None, :]).astype(np.float32)


def define_flags() -> None:
    common.define_list_flag("features", [16, 32], "Base widths, comma-separated: --features=16,32.")
    common.define_batch_flag("Images per train step.")
    flags.DEFINE_integer("size", 264, "Image side in pixels.")
    flags.DEFINE_string("loss", "l2", "loss of the vertjax-vs-PyTorch table")
    recipe = default_config.get_config().model
    flags.DEFINE_integer("depth", recipe.depth, "U-Net depth.")
    flags.DEFINE_string("norm", recipe.norm, "U-Net normalisation.")
    flags.DEFINE_string("upsample", recipe.upsample, "U-Net up-sampling.")
    flags.DEFINE_integer("max_features", recipe.max_features, "channel cap (0: none)")
    common.define_repeats_flag(5)
    flags.DEFINE_integer("loss_repeats", 10, "Timed rounds of the per-loss table.", lower_bound=1)
    flags.DEFINE_string("baseline", None, "dir with models.py, losses.py to time too")
    flags.DEFINE_bool("loss_table", True, "Also time the train step with each loss.")
    flags.DEFINE_bool("stem_table", True, "Also time the train step with each model stem.")
    common.define_timing_flags(torch=True)


def time_networks(
    features_list: list[int], data: dict, model_kwargs: dict, torch_device: str | None
) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The network table: vertjax (and baseline, PyTorch) per base width; (rows, records)."""
    rows, records = [], []
    for features in features_list:
        contenders = {}
        jax_run, jax_params = vertjax_step(features, FLAGS.loss, data, model_kwargs)
        contenders["vertjax"] = jax_run
        if FLAGS.baseline:
            contenders["baseline"] = vertjax_step(
                features, FLAGS.loss, data, model_kwargs, load_modules(FLAGS.baseline)
            )[0]
        torch_params = None
        if torch_device is not None:
            torch_run, torch_params = torch_step(
                features, FLAGS.loss, data, model_kwargs, torch_device
            )
            contenders["torch"] = torch_run
        samples = common.time_interleaved(contenders, repeats=FLAGS.repeats, warmup=2)
        jax_s = common.stats(samples["vertjax"])
        torch_s = common.stats(samples["torch"]) if torch_device else None
        base_s = common.stats(samples["baseline"]) if FLAGS.baseline else None
        speedup = torch_s["median_s"] / jax_s["median_s"] if torch_s else None
        rows.append(
            [
                features,
                jax_params,
                torch_params,
                jax_s["median_s"],
                jax_s["min_s"],
                torch_s and torch_s["median_s"],
                torch_s and torch_s["min_s"],
                base_s and base_s["median_s"],
                speedup,
                base_s and base_s["median_s"] / jax_s["median_s"],
            ]
        )
        records.append(
            {
                "features": features,
                "params_vertjax": jax_params,
                "params_torch": torch_params,
                "vertjax": jax_s,
                "torch": torch_s,
                "baseline": base_s,
                "torch_over_vertjax": speedup,
            }
        )
    return rows, records


def time_losses(features: int, data: dict, model_kwargs: dict) -> list[dict[str, Any]]:
    """The per-loss table: the vertjax train step with each loss; prints it, returns records."""
    contenders = {
        name: vertjax_step(features, name, data, model_kwargs)[0]
        for name in ("mse", "l1", "l2", "l3")
    }
    samples = common.time_interleaved(contenders, repeats=FLAGS.loss_repeats, warmup=2)
    base = common.stats(samples["mse"])["median_s"]
    rows, records = [], []
    for name, times in samples.items():
        s = common.stats(times)
        overhead = 100.0 * (s["median_s"] / base - 1.0)
        rows.append([name, s["median_s"], s["min_s"], overhead])
        records.append({"loss": name, **s, "overhead_over_mse_pct": overhead})
    print(f"\nvertjax train step per loss, features {features}, median of {FLAGS.loss_repeats} (s)")
    print(common.format_table(["loss", "step s", "(min)", "over mse %"], rows))
    return records


def time_stems(features: int, data: dict, model_kwargs: dict) -> list[dict[str, Any]]:
    """The per-stem table: the vertjax train step with each stem; prints it, returns records."""
    from vertjax import models

    contenders = {
        stem: vertjax_step(features, FLAGS.loss, data, {**model_kwargs, "stem": stem})[0]
        for stem in models.STEMS
    }
    samples = common.time_interleaved(contenders, repeats=FLAGS.loss_repeats, warmup=2)
    base = common.stats(samples["conv"])["median_s"]
    rows, records = [], []
    for stem, times in samples.items():
        s = common.stats(times)
        images_per_s = FLAGS.batch / s["median_s"]
        speedup = base / s["median_s"]
        rows.append([stem, s["median_s"], s["min_s"], images_per_s, speedup])
        records.append(
            {"stem": stem, **s, "images_per_s": images_per_s, "speedup_over_conv": speedup}
        )
    print(
        f"\nvertjax train step per stem, features {features}, loss {FLAGS.loss}, "
        f"median of {FLAGS.loss_repeats} (s)"
    )
    print(common.format_table(["stem", "step s", "(min)", "images/s", "conv/stem"], rows))
    return records


NETWORK_COLUMNS = [
    "features",
    "params vertjax",
    "params torch",
    "vertjax s",
    "(min)",
    "torch s",
    "(min)",
    "baseline s",
    "torch/vertjax",
    "baseline/vertjax",
]


def main(argv: Sequence[str]) -> None:
    info = common.start_timing(argv)
    model_kwargs = dict(
        depth=FLAGS.depth,
        norm=FLAGS.norm,
        upsample=FLAGS.upsample,
        max_features=FLAGS.max_features or None,
    )
    data = make_batch(FLAGS.batch, FLAGS.size)
    torch_device = common.torch_device(info)
    features_list = common.list_value("features")
    settings = {**common.flag_values(), "features": features_list, "torch_device": torch_device}
    rows, network = time_networks(features_list, data, model_kwargs, torch_device)
    print(
        f"\ntrain step, batch {FLAGS.batch} x {FLAGS.size}^2, loss {FLAGS.loss}, "
        f"UNet(depth={FLAGS.depth}, norm={FLAGS.norm}, upsample={FLAGS.upsample}, "
        f"max_features={FLAGS.max_features or None}), "
        f"median of {FLAGS.repeats} (s)"
    )
    print(common.format_table(NETWORK_COLUMNS, rows))
    per_loss = time_losses(features_list[0], data, model_kwargs) if FLAGS.loss_table else []
    per_stem = time_stems(features_list[0], data, model_kwargs) if FLAGS.stem_table else []
    if FLAGS.json:
        results = {
            "machine": info,
            "args": settings,
            "network": network,
            "losses": per_loss,
            "stems": per_stem,
        }
        common.write_json(FLAGS.json, results)


if __name__ == "__main__":
    define_flags()
    app.run(main)
