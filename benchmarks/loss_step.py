"""Loss-step benchmark: value and gradient of each loss against the memory floor.

    python -m benchmarks.loss_step [--batch=8,32] [--json=FILE] [--baseline=PATH]

For each loss (mse, l1, l2, l3) and batch size B (`--batch` takes a
comma-separated list of ints, an absl list flag), the time of the batch-mean
loss and its gradient with respect to the predictions [B, 264, 264, 13]:

- vertjax: `jax.jit(jax.value_and_grad(...))` of `vertjax.losses.get(name)`;
- vertjax_native: the same with `vertjax.native_loss.batch_mean(name)`, the
  one-sweep CPU kernel (`config.loss_kernel='native'`; CPU only, built on
  first use; `--nonative` skips it);
- numpy: a plain NumPy forward pass and its analytic gradient;
- torch: PyTorch eager with autograd (skipped, with a note, without torch;
  `--notorch` skips it too);
- torch_compile, torch_compile_nchw: the same PyTorch loss and backward
  under `torch.compile` (inductor), on vertjax's [B, H, W, K] layout and on
  PyTorch's own [B, K, H, W], whichever suits inductor better per loss
  (`--notorch_compile` skips them). Each is checked for graph breaks and
  against the NumPy reference before it is timed;
- baseline (with --baseline=PATH): another `losses.py`, e.g. an earlier
  version, loaded from PATH and timed in the same run.

The memory floor is the traffic the step cannot avoid (read targets and
predictions, write the gradient: 3 x B x 264 x 264 x 13 x 4 bytes) at the
bandwidth of a jit elementwise pass `a * 2 + b` over two such arrays into a
third, which moves exactly those bytes; it is measured in the same run.
The compiled contenders (vertjax, baseline, torch_compile*) and the floor
run in alternation after a warm-up, then NumPy and PyTorch eager do; the table gives medians in ms
and the ratios to the floor, to torch and to numpy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS

LOSSES = ("mse", "l1", "l2", "l3")
SIZE = 264
K = 13
HOT_THRESHOLD, HOT_WEIGHT, EMPTY_WEIGHT, BESIDE_WEIGHT = 0.5, 10.0, 5.0, 0.0


def make_inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions and Gaussian targets [B, S, S, K] float32, labeled [B, K] bool.

    Each example has a labelled run of layers with one Gaussian (sigma 3 px)
    each; predictions are the targets plus noise.
    """
    rng = np.random.default_rng(seed)
    labeled = np.zeros((batch, K), bool)
    for b in range(batch):
        first = rng.integers(0, K - 4)
        labeled[b, first : first + rng.integers(4, K - first + 1)] = True
    centre = np.arange(SIZE, dtype=np.float32) + 0.5
    ys = np.sort(rng.uniform(0.1, 0.9, (batch, K)), axis=1).astype(np.float32) * SIZE
    xs = rng.uniform(0.4, 0.6, (batch, K)).astype(np.float32) * SIZE
    gx = np.exp(-((centre[None, :, None] - xs[:, None, :]) ** 2) / 18.0)  # [B, W, K]
    gy = np.exp(-((centre[None, :, None] - ys[:, None, :]) ** 2) / 18.0)  # [B, H, K]
    targets = (gy[:, :, None, :] * gx[:, None, :, :] * labeled[:, None, None, :]).astype(np.float32)
    predictions = targets + rng.normal(0.0, 0.1, targets.shape).astype(np.float32)
    return predictions, targets, labeled


def numpy_base_weight(labeled: np.ndarray, name: str) -> np.ndarray:
    """[B, K] weight of the non-hot pixels of each layer."""
    if name in ("mse", "l1"):
        return np.ones(labeled.shape, np.float32)
    padded = np.pad(labeled, ((0, 0), (1, 1)))
    beside = padded[:, :-2] | padded[:, 2:]
    return np.where(labeled, 1.0, np.where(beside, BESIDE_WEIGHT, EMPTY_WEIGHT)).astype(np.float32)


def numpy_value_and_grad(
    name: str, predictions: np.ndarray, targets: np.ndarray, labeled: np.ndarray
) -> tuple[float, np.ndarray]:
    """Batch-mean loss and its gradient w.r.t. predictions, in plain NumPy."""
    error = targets - predictions
    if name == "mse":
        weight = np.float32(1.0)
    else:
        if name == "l3":
            hot = targets.max(axis=-1, keepdims=True) >= HOT_THRESHOLD
        else:
            hot = targets >= HOT_THRESHOLD
        base = numpy_base_weight(labeled, name)[:, None, None, :]
        weight = np.where(hot, np.float32(HOT_WEIGHT), base)
    weighted = weight * error
    scale = np.float32(1.0 / error.size)
    value = float(np.sum(weighted * error, dtype=np.float32) * scale)
    return value, weighted * (-2.0 * scale)


def load_losses(path: str | None):
    """vertjax.losses, or the losses module at `path`."""
    if path is None:
        from vertjax import losses

        return losses
    spec = importlib.util.spec_from_file_location("baseline_losses", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"--baseline={path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch_mean_of(module, name: str) -> Callable[..., Any]:
    """`fn(p, y, lab) -> []`: the batch mean of `module.get(name)`."""
    import jax.numpy as jnp

    loss_fn = module.get(name)
    return lambda p, y, lab: jnp.mean(loss_fn(predictions=p, targets=y, labeled=lab))


def native_batch_mean(name: str) -> Callable[..., Any]:
    """`fn(p, y, lab) -> []`: `vertjax.native_loss.batch_mean(name)`."""
    from vertjax import native_loss

    fn = native_loss.batch_mean(name)
    return lambda p, y, lab: fn(predictions=p, targets=y, labeled=lab)


def jax_contender(batch_mean: Callable[..., Any], predictions, targets, labeled):
    import jax

    step = jax.jit(jax.value_and_grad(batch_mean))
    return lambda: jax.block_until_ready(step(predictions, targets, labeled))


def torch_contender(
    name: str, predictions, targets, labeled, device: str = "cpu"
) -> Callable[[], Any]:
    import torch

    from benchmarks import torch_reference

    p = torch.from_numpy(predictions).to(device).requires_grad_(True)
    y = torch.from_numpy(targets).to(device)
    lab = torch.from_numpy(labeled).to(device)

    def run():
        p.grad = None
        torch_reference.loss(name, p, y, lab).mean().backward()
        common.torch_sync(device)

    return run


TORCH_LAYOUTS = {"torch_compile": 3, "torch_compile_nchw": 1}  # contender -> layer axis


def torch_compile_contender(
    name: str, predictions, targets, labeled, device: str, layer_axis: int
) -> tuple[Callable[[], Any], dict[str, float]]:
    """A compiled PyTorch value-and-gradient step, and its checks.

    The loss and its mean are one compiled graph; its backward is compiled
    by AOTAutograd. The checks: dynamo's graph-break count (0 means one
    fused graph) and the largest relative difference of the value and the
    gradient from `numpy_value_and_grad`.
    """
    import torch

    from benchmarks import torch_reference

    def to_layout(array):
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2)) if layer_axis == 1 else array

    p = torch.from_numpy(to_layout(predictions)).to(device).requires_grad_(True)
    y = torch.from_numpy(to_layout(targets)).to(device)
    lab = torch.from_numpy(labeled).to(device)

    def step(p, y, lab):
        return torch_reference.loss(name, p, y, lab, layer_axis).mean()

    # One static-shape graph per loss, layout and batch size (see run_batch).
    compiled = torch.compile(step, dynamic=False)

    def run():
        p.grad = None
        value = compiled(p, y, lab)
        value.backward()
        common.torch_sync(device)
        return value

    value = float(run().detach())
    grad = p.grad.cpu().numpy()
    if layer_axis == 1:
        grad = grad.transpose(0, 2, 3, 1)
    ref_value, ref_grad = numpy_value_and_grad(name, predictions, targets, labeled)
    rel_diff = max(
        abs(value - ref_value) / abs(ref_value),
        float(np.max(np.abs(grad - ref_grad)) / np.max(np.abs(ref_grad))),
    )
    explained = torch._dynamo.explain(step)(p, y, lab)
    return run, {"graph_breaks": explained.graph_break_count, "max_rel_diff": rel_diff}


def _fresh_torch_compile_cache() -> None:
    """Forgets earlier compiled graphs and lifts dynamo's recompile limit.

    Each (loss, layout) is a separate compile of the same `step` code; past
    dynamo's limit (8) it would silently fall back to eager.
    """
    import torch

    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 64


def check_agreement(batch_mean_of_name, predictions, targets, labeled) -> dict[str, float]:
    """Max relative difference of a batch-mean loss's value and gradient from NumPy's, per loss.

    `batch_mean_of_name(name)` gives `fn(p, y, lab) -> []`.
    """
    import jax

    out = {}
    for name in LOSSES:
        value, grad = jax.jit(jax.value_and_grad(batch_mean_of_name(name)))(
            predictions, targets, labeled
        )
        ref_value, ref_grad = numpy_value_and_grad(name, predictions, targets, labeled)
        scale = np.max(np.abs(ref_grad))
        out[name] = max(
            abs(float(value) - ref_value) / abs(ref_value),
            float(np.max(np.abs(np.asarray(grad) - ref_grad)) / scale),
        )
    return out


def run_batch(
    batch: int,
    *,
    repeats: int,
    with_numpy: bool,
    torch_device: str | None,
    torch_compile: bool,
    native: bool,
    baseline,
) -> dict[str, Any]:
    """Times every contender at batch size `batch` (PyTorch on `torch_device`, if any)."""
    import jax
    import jax.numpy as jnp

    from vertjax import losses, native_loss

    native_note = None
    if native:
        try:
            native_loss.register()
        except native_loss.NativeLossError as e:
            native, native_note = False, str(e)
    np_inputs = make_inputs(batch)
    predictions, targets, labeled = (jnp.asarray(a) for a in np_inputs)
    floor_fn = jax.jit(lambda a, b: a * 2.0 + b)
    # Two groups, each timed in alternation: the compiled contenders with the
    # floor, then NumPy with PyTorch eager. Their many large temporaries would
    # otherwise evict the compiled contenders' inputs from the cache between calls.
    jit_group: dict[str, Callable[[], Any]] = {
        "floor": lambda: floor_fn(predictions, targets).block_until_ready()
    }
    eager_group: dict[str, Callable[[], Any]] = {}
    compile_checks: dict[str, dict[str, Any]] = {}
    if torch_device is not None and torch_compile:
        _fresh_torch_compile_cache()
    for name in LOSSES:
        jit_group[f"{name}/vertjax"] = jax_contender(
            batch_mean_of(losses, name), predictions, targets, labeled
        )
        if native:
            jit_group[f"{name}/vertjax_native"] = jax_contender(
                native_batch_mean(name), predictions, targets, labeled
            )
        if baseline is not None:
            jit_group[f"{name}/baseline"] = jax_contender(
                batch_mean_of(baseline, name), predictions, targets, labeled
            )
        if with_numpy:
            eager_group[f"{name}/numpy"] = lambda name=name: numpy_value_and_grad(name, *np_inputs)
        if torch_device is not None:
            eager_group[f"{name}/torch"] = torch_contender(name, *np_inputs, torch_device)
        if torch_device is not None and torch_compile:
            for impl, layer_axis in TORCH_LAYOUTS.items():
                run, checks = torch_compile_contender(name, *np_inputs, torch_device, layer_axis)
                jit_group[f"{name}/{impl}"] = run
                compile_checks.setdefault(name, {})[impl] = checks
    samples = common.time_interleaved(jit_group, repeats=repeats, warmup=2)
    if eager_group:
        samples |= common.time_interleaved(eager_group, repeats=repeats, warmup=2)
    floor = common.stats(samples.pop("floor"))
    bytes_moved = 3 * predictions.size * 4
    result: dict[str, Any] = {
        "batch": batch,
        "floor": {**floor, "bytes": bytes_moved, "GB_per_s": bytes_moved / floor["median_s"] / 1e9},
        "agreement_max_rel_diff": check_agreement(
            lambda name: batch_mean_of(losses, name), predictions, targets, labeled
        ),
        "native_agreement_max_rel_diff": (
            check_agreement(native_batch_mean, predictions, targets, labeled) if native else None
        ),
        "native_skipped": native_note,
        "torch_compile_checks": compile_checks,
        "losses": {},
    }
    for key, times in samples.items():
        name, impl = key.split("/")
        result["losses"].setdefault(name, {})[impl] = common.stats(times)
    return result


def print_batch(result: dict[str, Any], repeats: int) -> None:
    floor = result["floor"]
    if result["native_skipped"]:
        print(f"vertjax_native skipped: {result['native_skipped']}")
    print(
        f"\nloss value_and_grad, [{result['batch']}, {SIZE}, {SIZE}, {K}] float32, "
        f"median of {repeats} (ms); floor = {floor['bytes'] / 1e6:.0f} MB at "
        f"{floor['GB_per_s']:.1f} GB/s = {floor['median_s'] * 1e3:.2f} ms"
    )
    rows = []
    for name, impls in result["losses"].items():
        ms = {impl: s["median_s"] * 1e3 for impl, s in impls.items()}
        vj = ms["vertjax"]
        nat = ms.get("vertjax_native")
        compiled = [ms[impl] for impl in TORCH_LAYOUTS if impl in ms]
        native_diff = (result["native_agreement_max_rel_diff"] or {}).get(name)
        checks = result["torch_compile_checks"].get(name, {})
        rows.append(
            [
                name,
                vj,
                impls["vertjax"]["min_s"] * 1e3,
                nat,
                ms.get("baseline"),
                ms.get("numpy"),
                ms.get("torch"),
                ms.get("torch_compile"),
                ms.get("torch_compile_nchw"),
                vj / (floor["median_s"] * 1e3),
                nat / (floor["median_s"] * 1e3) if nat else None,
                ms["torch"] / vj if "torch" in ms else None,
                min(compiled) / vj if compiled else None,
                min(compiled) / nat if compiled and nat else None,
                ms["numpy"] / vj if "numpy" in ms else None,
                ms["baseline"] / vj if "baseline" in ms else None,
                result["agreement_max_rel_diff"][name],
                native_diff,
                max((c["max_rel_diff"] for c in checks.values()), default=None),
                sum(c["graph_breaks"] for c in checks.values()) if checks else None,
            ]
        )
    print(
        common.format_table(
            [
                "loss",
                "vertjax",
                "(min)",
                "native",
                "baseline",
                "numpy",
                "torch",
                "compile",
                "compile nchw",
                "vs floor",
                "native vs floor",
                "torch/vj",
                "best compile/vj",
                "best compile/native",
                "numpy/vj",
                "base/vj",
                "vj rel diff",
                "native rel diff",
                "compile rel diff",
                "graph breaks",
            ],
            rows,
        )
    )


def define_flags() -> None:
    common.define_list_flag("batch", [8], "Batch sizes B, comma-separated: --batch=8,32.")
    common.define_repeats_flag(15, lower_bound=10)
    flags.DEFINE_string("baseline", None, "another losses.py to time alongside")
    flags.DEFINE_bool("numpy", True, "Time the NumPy reference alongside.")
    flags.DEFINE_bool("native", True, "Time vertjax's one-sweep CPU kernel (CPU only).")
    flags.DEFINE_bool(
        "torch_compile", True, "Time torch.compile (inductor) alongside PyTorch eager."
    )
    common.define_timing_flags(torch=True)


def main(argv: Sequence[str]) -> None:
    info = common.start_timing(argv)
    import jax

    torch_device = common.torch_device(info)
    baseline = load_losses(FLAGS.baseline) if FLAGS.baseline else None
    batches = common.list_value("batch")
    settings = {**common.flag_values(), "batch": batches, "torch_device": torch_device}
    results: dict[str, Any] = {"machine": info, "args": settings, "batches": []}
    for batch in batches:
        result = run_batch(
            batch,
            repeats=FLAGS.repeats,
            with_numpy=FLAGS.numpy,
            torch_device=torch_device,
            torch_compile=FLAGS.torch_compile,
            native=FLAGS.native and jax.default_backend() == "cpu",
            baseline=baseline,
        )
        print_batch(result, FLAGS.repeats)
        results["batches"].append(result)
    if FLAGS.json:
        common.write_json(FLAGS.json, results)


if __name__ == "__main__":
    define_flags()
    app.run(main)
