#!/usr/bin/env bash
# GPU check and timings for vertjax, unattended, in a few minutes on one H100.
#
#   bash benchmarks/gpu.sh [OUTDIR]            (default OUTDIR: ${OUT:-/tmp}/vertjax_gpu)
#   PYTHON=/path/to/python bash benchmarks/gpu.sh OUTDIR
#
# Needs a Python whose jax has a CUDA backend (jax[cuda12]) and can import
# this repository's requirements (flax, optax, ...); torch with CUDA is
# optional (its columns are skipped without it). Nothing is downloaded. The
# interpreter is $PYTHON, else .venv/bin/python, else python3.
#
# 1. correctness: each loss's value and gradient on fixed random inputs, and
#    one U-Net train step's loss and gradients, computed on the GPU and on the
#    CPU (jax's CPU backend in the same process), must agree within float32
#    tolerance (matmul precision 'highest', so no TF32 in the comparison);
# 2. timings: benchmarks.loss_step (B = 8, 32; the floor is an elementwise
#    pass of the same bytes, i.e. the card's achievable HBM bandwidth) and
#    benchmarks.train_step (the configs/default.py network at base 16 and 32
#    against PyTorch CUDA; each framework's default precision) and
#    benchmarks.predict (64 radiograph-sized PNGs, random weights).
# Output: OUTDIR/{env.txt, check.txt, loss_step.txt, loss_step.json,
# train_step.txt, train_step.json, predict.txt, predict.json}. Exit status 1
# if the check fails, 2 if jax sees no GPU.
#
#   bash benchmarks/gpu.sh --cpu-dry-run OUTDIR
# runs the same steps on the CPU with the CPU standing in for the GPU and
# shortened timings, to test the script itself on a machine without a GPU.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  DRY_RUN=1
  shift
fi
export GPU_SH_DRY_RUN=$DRY_RUN

cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-/tmp}/vertjax_gpu}"
mkdir -p "$OUTDIR"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave room for torch in the same run

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
EOF
} | tee "$OUTDIR/env.txt"

if [[ "$DRY_RUN" == 0 && "$("$PY" -c 'import jax; print(jax.default_backend())')" != "gpu" ]]; then
  echo "jax has no GPU backend under $PY: install jax[cuda12] or set PYTHON" >&2
  exit 2
fi

echo "== correctness: GPU vs CPU" | tee "$OUTDIR/check.txt"
set +e
"$PY" - <<'EOF' 2>&1 | tee -a "$OUTDIR/check.txt"
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import loss_step, train_step
from configs import default
from vertjax import heatmaps, losses, models

cpu = jax.devices("cpu")[0]
gpu = cpu if os.environ.get("GPU_SH_DRY_RUN") == "1" else jax.devices("gpu")[0]
failed = []


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def on(device, fn, *args):
    return jax.device_get(jax.jit(fn)(*jax.device_put(args, device)))


with jax.default_matmul_precision("highest"):
    predictions, targets, labeled = loss_step.make_inputs(4)
    for name in losses.NAMES:
        fn = losses.get(name)
        step = jax.value_and_grad(
            lambda p, y, lab, fn=fn: jnp.mean(fn(predictions=p, targets=y, labeled=lab))
        )
        (v_gpu, g_gpu), (v_cpu, g_cpu) = (
            on(d, step, predictions, targets, labeled) for d in (gpu, cpu)
        )
        dv, dg = rel(v_gpu, v_cpu), rel(g_gpu, g_cpu)
        ok = dv < 1e-5 and dg < 1e-5
        failed += [] if ok else [name]
        print(f"loss {name}: value rel diff {dv:.2e}, grad rel diff {dg:.2e} {'ok' if ok else 'FAIL'}")

    data = train_step.make_batch(2, 264)
    model = models.from_config(default.get_config())
    images = jnp.asarray(data["image"])
    lab = jnp.asarray(data["labeled"])
    targets = heatmaps.render(jnp.asarray(data["centroids"]), lab, height=264, width=264, sigma=3.0)
    params = jax.device_get(model.init(jax.random.PRNGKey(0), images[:1])["params"])
    loss_fn = losses.get("l2")

    def value_and_grad(params, images, targets, lab):
        def loss_of(params):
            out = model.apply({"params": params}, images, train=True)
            return jnp.mean(loss_fn(predictions=out, targets=targets, labeled=lab))

        return jax.value_and_grad(loss_of)(params)

    (l_gpu, g_gpu), (l_cpu, g_cpu) = (
        on(d, value_and_grad, params, images, targets, lab) for d in (gpu, cpu)
    )
    flat_gpu = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g_gpu)])
    flat_cpu = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g_cpu)])
    dl = rel(l_gpu, l_cpu)
    dg = float(np.linalg.norm(flat_gpu - flat_cpu) / np.linalg.norm(flat_cpu))
    ok = dl < 1e-4 and dg < 1e-3
    failed += [] if ok else ["train step"]
    print(
        f"train step (configs/default.py UNet, l2, batch 2): loss rel diff {dl:.2e}, "
        f"grad rel L2 diff {dg:.2e} {'ok' if ok else 'FAIL'}"
    )

print("check:", "FAILED " + ", ".join(failed) if failed else "passed")
sys.exit(1 if failed else 0)
EOF
check_status=${PIPESTATUS[0]}
set -e

if [[ "$DRY_RUN" == 1 ]]; then
  loss_args=(--batch=8 --repeats=10 --nonumpy)
  train_args=(--features=16 --repeats=1 --loss_repeats=1)
  predict_args=(--files=4 --batch=2 --width=300 --height=800)
else
  loss_args=(--batch=8,32 --repeats=20 --nonumpy)
  train_args=(--features=16,32 --repeats=10)
  predict_args=(--files=64 --batch=8)
fi
echo "== timings" | tee "$OUTDIR/loss_step.txt"
"$PY" -m benchmarks.loss_step "${loss_args[@]}" \
  --json="$OUTDIR/loss_step.json" 2>&1 | tee -a "$OUTDIR/loss_step.txt"
"$PY" -m benchmarks.train_step "${train_args[@]}" \
  --json="$OUTDIR/train_step.json" 2>&1 | tee "$OUTDIR/train_step.txt"
"$PY" -m benchmarks.predict "${predict_args[@]}" \
  --json="$OUTDIR/predict.json" 2>&1 | tee "$OUTDIR/predict.txt"

if [[ "$check_status" != 0 ]]; then
  echo "GPU check FAILED (see $OUTDIR/check.txt)" >&2
  exit 1
fi
echo "done: $OUTDIR"
