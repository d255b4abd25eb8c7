"""Input-pipeline benchmark: how fast datasets build and how fast grain serves them.

Measures, in one run on this machine:
  * build rate (radiographs/s) of the synthetic phantom and of the real
    AASCE images (when ../shared/data/aasce is present), wall time of
    `download_and_prepare` into a fresh directory, worker start-up included;
  * read rate of the training stream (grain over the array_record data
    source, batches of 8, normalised), in images/s;
  * what one train step of the default model consumes (images/s), so the
    read rate can be stated as a multiple of the trainer's demand.

  python -m benchmarks.input_pipeline [--participants=150] [--json=FILE]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

from benchmarks import common
from vertjax import datasets, runs, sharding

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_integer("participants", 150, "phantom participants to build (2 radiographs each)")
    flags.DEFINE_integer("batches", 100, "training batches to read")
    flags.DEFINE_integer("steps", 5, "timed train steps of the default model")
    common.define_json_flag()
    flags.DEFINE_string(
        "aasce_dir",
        os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "aasce"),
        "AASCE manual directory (skipped when absent)",
    )


def _build_rate(config, manual_dir: str | None) -> dict:
    """Builds `config` into a temporary data_dir; radiographs/s and bytes per record."""
    import tensorflow_datasets as tfds

    from tfds_builder.spine_radiographs import spine_radiographs_dataset_builder as sr

    data_dir = tempfile.mkdtemp(prefix="vertjax_bench_")
    try:
        builder = sr.Builder(config=config, data_dir=data_dir)
        start = time.perf_counter()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format="array_record",
        )
        seconds = time.perf_counter() - start
        count = sum(int(s.num_examples) for s in builder.info.splits.values())
        size = sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(data_dir)
            for name in names
            if "array_record" in name
        )
        return {
            "config": config.name,
            "radiographs": count,
            "seconds": seconds,
            "radiographs_per_s": count / seconds,
            "kib_per_radiograph": size / count / 1024,
            "builder": builder,
            "data_dir": data_dir,
        }
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise


def _read_rate(builder, batches: int) -> dict:
    """Images/s of the training stream, batches of 8, after one warm-up batch."""
    from vertjax import input_pipeline

    mean, std = datasets.pixel_stats(builder)
    source = builder.as_data_source("train")
    stream = iter(input_pipeline.train_dataset(source, batch_size=8, seed=0, mean=mean, std=std))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (8, 264, 264, 1)
    return {"batches": batches, "seconds": seconds, "images_per_s": 8 * batches / seconds}


def _train_demand(steps: int) -> dict:
    """Images/s one jit train step of configs/default.py consumes (batch 8)."""
    import jax
    import numpy as np

    from configs import default
    from vertjax import train

    config = default.get_config()
    mesh = sharding.make_mesh(1)
    state = runs.create_train_state(config, runs.init_key(0))
    step = train.make_train_step(config, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 264, 264, 1)).astype(np.float32),
        "centroids": rng.uniform(0.2, 0.8, size=(8, 13, 2)).astype(np.float32),
        "labeled": rng.uniform(size=(8, 13)) < 0.6,
    }
    key = jax.random.key(0)
    state, metrics = step(state, batch, key)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return {"step_seconds": seconds, "images_per_s": 8 / seconds}


def main(argv: Sequence[str]) -> None:
    common.no_arguments(argv)
    from tfds_builder.spine_radiographs import spine_radiographs_dataset_builder as sr

    builds = [
        _build_rate(
            sr.SpineConfig(
                name="synthetic_bench", source="synthetic", num_participants=FLAGS.participants
            ),
            None,
        )
    ]
    if os.path.isdir(FLAGS.aasce_dir):
        aasce_dir = os.path.abspath(FLAGS.aasce_dir)
        builds.append(_build_rate(sr.SpineConfig(name="aasce_bench", source="aasce"), aasce_dir))
    else:
        print(f"AASCE data not found at {FLAGS.aasce_dir}: skipping its build rate")
    try:
        read = _read_rate(builds[0]["builder"], FLAGS.batches)
        demand = _train_demand(FLAGS.steps)
    finally:
        for build in builds:
            shutil.rmtree(build.pop("data_dir"), ignore_errors=True)
            build.pop("builder")

    info = common.machine_info()
    print(common.describe(info))
    print(
        common.format_table(
            ["build", "radiographs", "seconds", "radiographs/s", "KiB/record"],
            [
                [
                    b["config"],
                    b["radiographs"],
                    b["seconds"],
                    b["radiographs_per_s"],
                    b["kib_per_radiograph"],
                ]
                for b in builds
            ],
        )
    )
    ratio = read["images_per_s"] / demand["images_per_s"]
    print(
        common.format_table(
            ["read (grain, batch 8)", "images/s", "train step images/s", "read / demand"],
            [["train split", read["images_per_s"], demand["images_per_s"], ratio]],
        )
    )
    if FLAGS.json:
        common.write_json(
            FLAGS.json,
            {
                "machine": info,
                "builds": builds,
                "read": read,
                "train_demand": demand,
                "read_over_demand": ratio,
            },
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
