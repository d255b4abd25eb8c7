"""Shared benchmark plumbing: machine description, interleaved timing, tables, JSON.

Every benchmark times its contenders in alternation (A, B, C, A, B, C, ...)
after a warm-up, so that a neighbour's load on a shared machine hits all of
them alike, and reports the median and the minimum of the samples.

Large buffers and page faults: glibc serves allocations above its mmap
threshold with fresh mmap()s and unmaps them on free, so each jit call that
returns a new [8, 264, 264, 13] float32 array (29 MB) faults in ~7,000 fresh
zeroed 4 KiB pages; on this VM that costs more than the memory traffic
itself (a jit `a * 2 + b` takes 9-20 ms instead of ~2 ms). XLA:CPU, NumPy
and PyTorch all allocate through glibc, so `ensure_malloc_tuning()`
re-executes the benchmark with MALLOC_TUNABLES: one arena, no mmap, no trim
(freed buffers stay in the heap and are reused) and transparent huge pages
for the heap. Faults per call drop from thousands to a handful for every
contender alike; `--nomalloc_tuning` measures the untuned process. The
same variable speeds up training (see RESULTS.md).

Flags are absl flags, as in `vertjax`. Each benchmark defines its flags in
a `define_flags()` that runs only when it is the program, so that two
benchmarks can be imported into one process (benchmarks/gpu.sh does); the
flags several benchmarks share are defined here, by the `define_*`
functions, and listed in the benchmark's own `--help`. Several values are
written as a comma-separated list, `--batch=8,32` (`define_list_flag`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS

MALLOC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"
)


def define_json_flag() -> None:
    flags.DEFINE_string("json", None, "Write the results to this JSON file.")
    _list_in_help("json")


def define_repeats_flag(default: int, *, lower_bound: int = 1) -> None:
    flags.DEFINE_integer(
        "repeats",
        default,
        "Timed rounds of each contender, after two warm-up rounds.",
        lower_bound=lower_bound,
    )
    _list_in_help("repeats")


def define_batch_flag(help: str) -> None:
    flags.DEFINE_integer("batch", 8, help, lower_bound=1)
    _list_in_help("batch")


def define_list_flag(name: str, default: Sequence[float], help: str, *, kind: type = int) -> None:
    """A comma-separated list flag, `--name=8,32`, whose items must parse as `kind`.

    Read it with `list_value(name, kind)`.
    """
    flags.DEFINE_list(name, [str(v) for v in default], help)
    flags.register_validator(
        name,
        functools.partial(_all_parse, kind),
        message=f"--{name} takes comma-separated {kind.__name__}s, "
        f"e.g. --{name}={','.join(map(str, default))}",
    )
    _list_in_help(name)


def _all_parse(kind: type, values: Sequence[str]) -> bool:
    try:
        [kind(v) for v in values]
    except ValueError:
        return False
    return bool(values)


def list_value(name: str, kind: type = int) -> list:
    """The items of list flag `name` as `kind`."""
    return [kind(v) for v in FLAGS[name].value]


def define_timing_flags(*, torch: bool = False) -> None:
    """`--json` and `--[no]malloc_tuning`; with `torch`, `--[no]torch` and `--torch_device`."""
    define_json_flag()
    flags.DEFINE_bool(
        "malloc_tuning", True, "Run under MALLOC_TUNABLES (see benchmarks/common.py)."
    )
    _list_in_help("malloc_tuning")
    if torch:
        flags.DEFINE_bool(
            "torch", True, "Time PyTorch alongside (skipped when it is not installed)."
        )
        flags.DEFINE_string("torch_device", None, "default: cuda on a GPU, else cpu")
        _list_in_help("torch", "torch_device")


def _list_in_help(*names: str) -> None:
    """Lists flags defined here in the running benchmark's `--help`.

    absl's `--help` shows the key flags of the main module, which absl names
    by `sys.argv[0]`; a flag is key only to the module that defines it.
    """
    for name in names:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def flag_values() -> dict[str, Any]:
    """The running benchmark's flags (its own and those defined here) and their values."""
    return {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.argv[0])}


def start_timing(argv: Sequence[str]) -> dict[str, Any]:
    """First thing in a timing benchmark's `main`: checks, re-executes, describes.

    Rejects arguments left after the flags, re-executes under
    MALLOC_TUNABLES (`ensure_malloc_tuning`), prints the machine line and
    returns `machine_info()`.
    """
    no_arguments(argv)
    ensure_malloc_tuning()
    info = machine_info()
    print(describe(info))
    return info


def no_arguments(argv: Sequence[str]) -> None:
    """Raises a usage error for arguments left after the flags (e.g. `--batch 8 32`)."""
    if len(argv) > 1:
        raise app.UsageError(
            f"unexpected arguments: {' '.join(argv[1:])} (a list flag takes commas: --batch=8,32)"
        )


def torch_device(info: Mapping[str, Any]) -> str | None:
    """The device to time PyTorch on, or None to skip it (`--notorch`, or no torch)."""
    if not FLAGS.torch:
        return None
    if info.get("torch") is None:
        print("note: torch is not installed; the PyTorch column is skipped (pip install .[bench])")
        return None
    return FLAGS.torch_device or default_torch_device()


def ensure_malloc_tuning() -> None:
    """Re-executes this process with MALLOC_TUNABLES unless they are set or `--nomalloc_tuning`.

    Call it first thing in `main()`, before jax, numpy or torch allocate the
    buffers that are timed.
    """
    if not FLAGS.malloc_tuning or MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    module = sys.modules["__main__"].__spec__
    args = ["-m", module.name] if module is not None else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *args, *sys.argv[1:]], env)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform), e.g. 'AMD EPYC'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine_info() -> dict[str, Any]:
    """Device, CPU, core count, library versions and the flags that change timings."""
    import jax

    devices = jax.devices()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": f"{len(devices)} x {devices[0].device_kind}",
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    for module in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        info[module] = _version(module)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def describe(info: Mapping[str, Any]) -> str:
    """One line naming the machine and versions, for the top of a table."""
    versions = ", ".join(
        f"{k} {info[k]}" for k in ("jax", "jaxlib", "flax", "numpy", "torch") if info.get(k)
    )
    return (
        f"device: {info['jax_devices']} ({info['jax_backend']}); CPU: {info['cpu']}, "
        f"{info['cpu_cores']} cores; {versions}; GLIBC_TUNABLES={info['GLIBC_TUNABLES'] or '-'}; "
        f"XLA_FLAGS={info['XLA_FLAGS'] or '-'}"
    )


def default_torch_device() -> str:
    """'cuda' when jax runs on a GPU and torch sees one, else 'cpu'."""
    import jax

    if jax.default_backend() != "gpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(device: str) -> None:
    """Waits for queued CUDA work, so that a timed torch step has finished."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_interleaved(
    contenders: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each contender, calls alternating between contenders.

    Each callable must finish its work before returning (block on jax arrays).
    The first `warmup` rounds (compilation, allocator warm-up) are discarded.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                samples[name].append(elapsed)
    return samples


def stats(samples: Sequence[float]) -> dict[str, float]:
    """Median, minimum and count of timing samples (seconds)."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "n": len(samples)}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(
            v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(row)
        )
        lines.append(line.rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Writes `payload` as indented JSON to `path`."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
