"""The command line: `vertjax <command> [flags] [arguments]`.

  vertjax train     --config=configs/l3.py [--workdir=DIR]        train, then test
  vertjax evaluate  --config=configs/l3.py [--split=S] [--checkpoint=C]
  vertjax predict   --out=DIR [--model=NAME | --workdir=RUN | --exported=FILE] INPUT...
  vertjax export    --out=FILE [--model=NAME | --workdir=RUN]
  vertjax report    RUN... --out=DIR
  vertjax compare   --dataset=NAME [--seeds=3]
  vertjax data      build|preview --config=NAME
  vertjax ship      --workdir=RUN --out=FOLDER
  vertjax review    PRED_DIR [--images=DIR] [--host=127.0.0.1] [--port=8765]

`python -m vertjax <command>` is the same; so is `python -m vertjax.<command>`
for the library modules that carry a command (`python -m vertjax.main` is
train and evaluate). Flags are absl flags (`--helpfull` lists them); the
benchmarks use them too. A fault of the input (a bad config, file, folder
or checkpoint) ends with one line, `vertjax: <what is wrong>`, and exit
status 1, not a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags, logging

from tfds_builder.spine_radiographs import aasce, folder
from vertjax import (
    checkpoints,
    compare,
    datasets,
    export,
    exported,
    files,
    imaging,
    inference,
    inputs,
    overlay,
    predict,
    report,
    runs,
    shipped,
)
from vertjax.review import catalog as review_catalog
from vertjax.review import server as review_server

FLAGS = flags.FLAGS

# Faults of the input that deserve one line, not a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # config, checkpoint choice and shipped-model faults among them
    checkpoints.CheckpointError,
    datasets.DataError,
    folder.FolderError,
    aasce.AnnotationError,
    imaging.ImageError,
    exported.ExportedModelError,
    review_catalog.CatalogError,
    FileNotFoundError,
)


def fail(message: str) -> int:
    """Prints the one-line error and returns the exit status 1."""
    print(f"vertjax: {message}", file=sys.stderr)
    return 1


def define_checkpoint_flag(default: str) -> None:
    flags.DEFINE_string("checkpoint", default, "'best', 'latest' or a step number.")


# ------------------------------------------------------------------ predict


def _define_predict() -> None:
    flags.DEFINE_string(
        "workdir", None, "Your own training run's folder (holds checkpoints/); else --model."
    )
    define_checkpoint_flag("best")
    flags.DEFINE_string(
        "model",
        None,
        f"A shipped model ({', '.join(shipped.names()) or 'none'}) or a model folder; "
        f"the default without --workdir is {shipped.DEFAULT_MODEL}.",
    )
    flags.DEFINE_string(
        "exported", None, "An exported model file (vertjax export) instead of a checkpoint."
    )
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer(
        "batch_size", 8, "Images per network call (one compilation).", lower_bound=1
    )
    flags.DEFINE_bool("overlays", True, "Also write <stem>_overlay.png per image.")


def _predict(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("give one or more image files or folders after the flags")
    problem = files.folder_problem(FLAGS.out)
    if problem:
        return fail(f"--out={FLAGS.out}: {problem}")
    paths = inputs.find_inputs(argv[1:])
    if not paths:
        return fail(f"no radiographs found in {' '.join(argv[1:])}")
    if FLAGS.exported:
        if FLAGS.model or FLAGS.workdir:
            return fail("give --exported or --model / --workdir, not both")
        model = inference.ExportedPredictor(exported.load(FLAGS.exported))
    else:
        model = inference.load(FLAGS.model, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    outcome = predict.predict_files(
        model, paths, FLAGS.out, batch_size=FLAGS.batch_size, overlays=FLAGS.overlays
    )
    print(
        f"vertjax: {len(outcome.written)} of {len(paths)} image(s) written to "
        f"{FLAGS.out} ({model.source}, step {model.step}); {len(outcome.failures)} failed",
        file=sys.stderr,
    )
    return 1 if outcome.failures else 0


# ------------------------------------------------------------------- export


def _define_export() -> None:
    flags.DEFINE_string("workdir", None, "Your own training run's folder; else --model.")
    define_checkpoint_flag("best")
    flags.DEFINE_string(
        "model", None, f"A shipped model or model folder (default {shipped.DEFAULT_MODEL})."
    )
    flags.DEFINE_string("out", None, "The file to write, e.g. aasce_fov.vjx.", required=True)
    flags.DEFINE_list("platforms", list(export.PLATFORMS), "Platforms to serialise for.")


def _export(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    out = Path(FLAGS.out)
    problem = "is a folder" if out.is_dir() else files.folder_problem(out.parent)
    if problem:
        return fail(f"--out={FLAGS.out}: {problem}")
    model = inference.load(FLAGS.model, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = export.export_model(model, FLAGS.out, platforms=FLAGS.platforms)
    exported.load(FLAGS.out)  # read back: what is written must verify
    print(
        f"vertjax: wrote {FLAGS.out} ({model.source}, step {model.step}; "
        f"{', '.join(info['platforms'])})",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------- report


def _define_report() -> None:
    flags.DEFINE_string("out", None, "Folder for table.md and the plots.", required=True)
    flags.DEFINE_integer("examples", 3, "Example overlays per group (0 = none).", lower_bound=0)


def _report(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("give one or more run folders: vertjax report RUN... --out=DIR")
    print(report.write_report(argv[1:], FLAGS.out, examples=FLAGS.examples))
    return 0


# ------------------------------------------------------------------ compare


def _define_compare() -> None:
    flags.DEFINE_string("dataset", None, "TFDS config, e.g. aasce_fov.", required=True)
    flags.DEFINE_integer("seeds", 3, "Seeds per loss (0 .. N-1).", lower_bound=1)
    flags.DEFINE_list("losses", list(compare.LOSSES), "Losses to compare.")
    flags.DEFINE_string("root", "runs/compare", "Runs go to ROOT/<dataset>/<loss>/seed<k>.")
    flags.DEFINE_multi_string(
        "config_overrides",
        [],
        "FIELD=VALUE passed to every run as --config.FIELD=VALUE; repeatable.",
    )
    flags.DEFINE_string("manual_dir", "", "Dataset source folder ('' = the dataset's default).")
    flags.DEFINE_string("config_dir", "configs", "Folder of the per-loss config files.")
    flags.DEFINE_integer("examples", 3, "Example overlays per loss in the report.")
    flags.DEFINE_bool("dry_run", False, "Print the commands and exit.")


def _compare(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    same_names = ("dataset", "seeds", "losses", "root", "manual_dir", "config_dir")
    jobs = compare.plan(
        overrides=FLAGS.config_overrides, **{name: FLAGS[name].value for name in same_names}
    )
    if FLAGS.dry_run:
        for job in jobs:
            print(("# done: " if job.done else "") + " ".join(job.command))
        return 0
    _, failed = compare.run_jobs(jobs)
    finished = [job.workdir for job in jobs if job.done]
    if not finished:
        return fail("no run finished; no report")
    out = Path(FLAGS.root) / FLAGS.dataset / "report"
    print(report.write_report(finished, out, examples=FLAGS.examples))
    if failed:
        return fail("failed: " + ", ".join(f"{j.loss} seed {j.seed}" for j in failed))
    return 0


# --------------------------------------------------------------------- data


DATA_COMMANDS: tuple[str, ...] = ("build", "preview")


def _define_data() -> None:
    flags.DEFINE_string("config", "synthetic", "Dataset config (spine_radiographs/<config>).")
    flags.DEFINE_string("manual_dir", None, "Source directory for aasce, aasce_fov and folder.")
    flags.DEFINE_string(
        "data_dir",
        None,
        f"Dataset directory (default ${datasets.DATA_DIR_ENV} or ~/tensorflow_datasets).",
    )
    flags.DEFINE_string("out", None, "preview: PNG file to write.")
    flags.DEFINE_string("split", "train", "preview: split to draw.")
    flags.DEFINE_integer("count", 8, "preview: number of radiographs.")


def _data(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[1] not in DATA_COMMANDS:
        raise app.UsageError(f"usage: vertjax data {{{'|'.join(DATA_COMMANDS)}}} --config=NAME")
    if argv[1] == "preview" and not FLAGS.out:
        return fail("preview needs --out=FILE.png")
    builder = datasets.get_builder(
        FLAGS.config, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, build=True
    )
    if argv[1] == "build":
        mean, std = datasets.pixel_stats(builder)
        print(f"{builder.info.full_name} at {builder.data_dir}")
        for split, n in datasets.split_counts(builder).items():
            print(f"  {split}: {n} radiographs")
        print(f"  train pixel mean {mean:.2f}, std {std:.2f}")
    else:
        path = overlay.write_preview(builder, FLAGS.out, split=FLAGS.split, count=FLAGS.count)
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------- ship


def _define_ship() -> None:
    flags.DEFINE_string("workdir", None, "Training run folder.", required=True)
    define_checkpoint_flag("latest")
    flags.DEFINE_string("out", None, "Model folder to write.", required=True)
    flags.DEFINE_string("description", "", "One line on what the model is for.")
    flags.DEFINE_multi_string("results", [], "results.json files of this checkpoint to record.")


def _ship(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    trained = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
    metrics = {}
    for path in FLAGS.results:
        with open(path) as f:
            record = json.load(f)
        if record.get("steps") != trained.step:
            raise ValueError(
                f"{path}: results of checkpoint {record.get('steps')}, "
                f"not of the shipped step {trained.step}"
            )
        metrics[record["split"]] = record
    out = shipped.write(
        FLAGS.out,
        **trained.network(),
        step=trained.step,
        description=FLAGS.description,
        training_data=f"spine_radiographs/{trained.config.dataset.name}",
        metrics=metrics,
    )
    shipped.load(out)  # read back: what is shipped must verify
    print(f"vertjax: wrote {out} (step {trained.step})", file=sys.stderr)
    return 0


# ------------------------------------------------------------------- review


def _define_review() -> None:
    flags.DEFINE_string(
        "images",
        None,
        "Folder holding the radiographs; annotations.csv and review.json are written at its "
        "top. Default: the deepest folder holding every image predictions.csv names.",
    )
    flags.DEFINE_string(
        "host", "127.0.0.1", "Address to serve on; any but 127.0.0.1 requires the printed token."
    )
    flags.DEFINE_integer("port", 8765, "Port to serve on (0 = any free port).", lower_bound=0)


def _review(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        raise app.UsageError("give one prediction folder: vertjax review PRED_DIR")
    try:
        server = review_server.make_server(
            argv[1], images=FLAGS.images, host=FLAGS.host, port=FLAGS.port
        )
    except OSError as e:
        return fail(f"cannot serve on {FLAGS.host}:{FLAGS.port}: {e.strerror or e}")
    found = server.app.catalog
    print(
        f"vertjax: {len(found.predictions)} radiograph(s) from {found.pred_dir}; corrections "
        f"go to {server.app.store.csv_path}",
        file=sys.stderr,
    )
    if server.app.token:
        print("vertjax: open this address (it carries the access token):", file=sys.stderr)
    print(f"vertjax: review at {server.url}  (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its flags and its body (argv after the flags -> exit status)."""

    help: str
    define_flags: Callable[[], None]
    main: Callable[[Sequence[str]], int]


COMMANDS: dict[str, Command] = {
    "predict": Command("named points for radiographs", _define_predict, _predict),
    "export": Command("one self-contained model file (jax.export)", _define_export, _export),
    "report": Command("Table 1 and plots over trained runs", _define_report, _report),
    "compare": Command("the four losses x seeds, then the report", _define_compare, _compare),
    "data": Command("build or preview a dataset", _define_data, _data),
    "ship": Command("package a run as a shipped model", _define_ship, _ship),
    "review": Command("check and correct predictions in the browser", _define_review, _review),
}
# Training and evaluation are vertjax.main's flags (config files).
TRAINING_COMMANDS: tuple[str, ...] = ("train", "evaluate")


def _guarded(command: Command) -> Callable[[Sequence[str]], int]:
    def body(argv: Sequence[str]) -> int:
        if not FLAGS["verbosity"].present:
            # orbax and JAX log at INFO on every restore; a user wants the
            # per-file errors and the summary. -v 0 brings them back.
            logging.set_verbosity(logging.WARNING)
        try:
            return command.main(argv)
        except EXPECTED_ERRORS as e:
            return fail(str(e))

    return body


def run_command(name: str, argv: Sequence[str] | None = None) -> None:
    """Runs subcommand `name` with `argv` (program name first; default sys.argv)."""
    argv = list(sys.argv if argv is None else argv)
    if name in TRAINING_COMMANDS:
        from vertjax import main  # defines the training flags

        if name == "evaluate":
            argv.insert(1, "--mode=evaluate")
        app.run(main.main, argv=argv, flags_parser=main.parse_flags)
        return
    command = COMMANDS[name]
    command.define_flags()
    app.run(_guarded(command), argv=argv)


def usage() -> str:
    lines = ["usage: vertjax <command> [flags] [arguments]", "", "commands:"]
    lines.append(f"  {'train':9} train a config, then test it (vertjax.main)")
    lines.append(f"  {'evaluate':9} evaluate a checkpoint of a run (vertjax.main --mode=evaluate)")
    lines += [f"  {name:9} {c.help}" for name, c in COMMANDS.items()]
    lines.append("\n`vertjax <command> --help` lists a command's flags.")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
    """`vertjax <command> ...`: the console script and `python -m vertjax`."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in (*TRAINING_COMMANDS, *COMMANDS):
        print(usage(), file=sys.stderr)
        raise SystemExit(0 if len(argv) > 1 and argv[1] in ("-h", "--help", "help") else 1)
    name = argv[1]
    run_command(name, [f"vertjax {name}", *argv[2:]])
