"""Tests for vertjax.report: Table 1 over fake run folders, grouping, plots."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from vertjax import inference, report, vertebrae


def _write_run(
    path, *, loss, seed, id_accuracy, rmse_px, dataset="aasce_fov", steps=100, level_slip=None
):
    """A finished run folder as evaluation and training leave it (level_slip None: an older
    results.json, written before the level-slip share existed)."""
    path.mkdir(parents=True)
    per_vertebra = {
        name: {"id_accuracy": id_accuracy - 0.01 * k, "rmse_px": rmse_px, "n": 10}
        for k, name in enumerate(vertebrae.NAMES)
    }
    results = {
        "config": loss,
        "loss": loss,
        "dataset": dataset,
        "split": "test",
        "steps": steps,
        "train_seconds": 12.5,
        "postprocess": False,
        "id_accuracy": id_accuracy,
        "rmse_px": rmse_px,
        "mean_error_px": 2 * rmse_px if rmse_px is not None else 30.0,
        "mean_error_mm": None,
        "id_rate": id_accuracy,
        "presence_precision": 0.8,
        "presence_recall": 0.7,
        "unlabelled_visible_recall": 0.5,
        "all_correct_share": 0.25,
        "n_labelled": 130,
        "n_images": 10,
        "per_vertebra": per_vertebra,
        "seed": seed,
    }
    if level_slip is not None:
        results["level_slip_share"] = level_slip
    (path / "results.json").write_text(json.dumps(results))
    events = [
        {"step": 10, "kind": "train", "loss": 0.01},
        {"step": 20, "kind": "train", "loss": 0.005},
        {"step": 20, "kind": "validation", "id_accuracy": id_accuracy / 2},
        {"step": 40, "kind": "train", "loss": 0.002},
        {"step": 40, "kind": "validation", "id_accuracy": id_accuracy},
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def _row(markdown, loss):
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {loss} | {loss} |")]
    assert len(rows) == 1, markdown
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_mean_sd_is_the_sample_sd_over_finite_values():
    mean, sd, n = report.mean_sd([1.0, 2.0, 6.0, math.nan])
    assert (mean, n) == (3.0, 3)
    # Sample variance: ((1-3)^2 + (2-3)^2 + (6-3)^2) / (3 - 1) = 7.
    assert sd == pytest.approx(math.sqrt(7.0))
    assert math.isnan(report.mean_sd([5.0])[1])
    assert report.mean_sd([])[2] == 0


def test_format_cell():
    assert report.format_cell([0.90, 0.94], percent=True, decimals=1) == "92.0 ± 2.8 %"
    assert report.format_cell([10.0], percent=False, decimals=2) == "10.00"
    assert report.format_cell([10.0, math.nan], percent=False, decimals=2) == "10.00 (n=1)"
    assert report.format_cell([math.nan], percent=False, decimals=2) == "-"


def test_report_on_two_fake_runs_gives_mean_and_sd(tmp_path):
    a = _write_run(
        tmp_path / "l2_s0", loss="l2", seed=0, id_accuracy=0.90, rmse_px=10.0, level_slip=0.06
    )
    b = _write_run(
        tmp_path / "l2_s1", loss="l2", seed=1, id_accuracy=0.94, rmse_px=12.0, level_slip=0.02
    )
    c = _write_run(tmp_path / "mse_s0", loss="mse", seed=0, id_accuracy=0.50, rmse_px=None)
    out = tmp_path / "report"
    markdown = report.write_report([c, a, b], out, examples=2)

    assert (out / "table.md").read_text() == markdown
    l2 = _row(markdown, "l2")
    assert l2[2] == "aasce_fov (test)"
    assert l2[3] == "2 (0, 1)"
    assert l2[4] == "92.0 ± 2.8 %"  # ID accuracy: mean 92, sd sqrt(8) = 2.83
    assert l2[5] == "4.0 ± 2.8 %"  # named one level off
    assert l2[6] == "11.00 ± 1.41"  # RMSE px
    assert l2[7] == "22.00 ± 2.83"  # mean error px
    assert l2[8] == "-"  # no spacing, no mm
    assert l2[9] == "80.0 ± 0.0 %"
    assert l2[13:] == ["130", "100"]  # labelled vertebrae, checkpoint step
    mse = _row(markdown, "mse")
    assert mse[3] == "1 (0)"
    assert mse[4] == "50.0 %"
    assert mse[5] == "-"  # an older results.json: no level-slip share
    assert mse[6] == "-"  # RMSE null: nothing identified
    # Groups in the paper's order, the paper's numbers beside as reference.
    assert markdown.index("| mse | mse |") < markdown.index("| l2 | l2 |")
    assert "| UNet-L2 | l2 | 95.9 % | 17.08 |" in markdown
    assert "| UNet-Base | mse | 89.6 % | 20.28 |" in markdown
    assert "not comparable" in markdown

    for name in ("per_vertebra_id_accuracy.png", "training_curves.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
        assert f"]({name})" in markdown
    # Fake runs have no checkpoints: the report still completes, without examples.
    assert not (out / "examples").exists()
    assert not list(out.glob(".*.tmp"))


def test_per_vertebra_plot_draws_mean_over_seeds(tmp_path):
    runs = [
        report.load_run(
            _write_run(tmp_path / f"s{s}", loss="l1", seed=s, id_accuracy=acc, rmse_px=5.0)
        )
        for s, acc in ((0, 0.8), (1, 1.0))
    ]
    fig = report.plot_per_vertebra(report.group_runs(runs))
    (container,) = fig.axes[0].containers  # one errorbar per group
    line = container.lines[0]
    expected = [100 * (0.9 - 0.01 * k) for k in range(vertebrae.K)]
    np.testing.assert_allclose(line.get_ydata(), expected)


def test_grouping_separates_datasets(tmp_path):
    a = report.load_run(_write_run(tmp_path / "a", loss="l3", seed=0, id_accuracy=0.5, rmse_px=1.0))
    b = report.load_run(
        _write_run(tmp_path / "b", loss="l3", seed=0, id_accuracy=0.5, rmse_px=1.0, dataset="aasce")
    )
    groups = report.group_runs([a, b])
    assert list(groups) == [("l3", "l3", "aasce"), ("l3", "l3", "aasce_fov")]


def test_bad_run_folders_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"empty[/\\]results.json: missing"):
        (tmp_path / "empty").mkdir()
        report.load_run(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken[/\\]results.json: not readable JSON"):
        report.load_run(broken)
    (broken / "results.json").write_text('{"loss": "l2"}')
    with pytest.raises(ValueError, match="no 'id_accuracy' field"):
        report.load_run(broken)
    run = _write_run(tmp_path / "ok", loss="l2", seed=0, id_accuracy=0.9, rmse_px=1.0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("oops\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 6"):
        report.load_run(run)


def test_example_overlays_show_predictions_and_truth_in_original_pixels(tmp_path, monkeypatch):
    """Examples from a run's test records, with the model and dataset stubbed.

    The stand-in network returns its input image as every heatmap, so each
    vertebra is predicted at the record's bright pixel; the drawing must put
    it (and the ground truth) at that place in original pixels.
    """
    import jax.numpy as jnp
    import ml_collections

    from vertjax import datasets

    size, width, height = 264, 800, 2000
    run = _write_run(tmp_path / "run", loss="l3", seed=0, id_accuracy=0.9, rmse_px=5.0)
    (run / "checkpoints").mkdir()
    config = ml_collections.ConfigDict(
        {"dataset": {"name": "fake", "data_dir": "", "manual_dir": ""}, "eval_split": "test"}
    )
    model = inference.Predictor(
        apply=lambda variables, x: jnp.repeat(x, vertebrae.K, axis=-1),
        variables={},
        image_size=size,
        pixel_mean=0.0,
        pixel_std=255.0,
        presence_threshold=0.5,
        step=7,
        config=config,
    )
    image = np.zeros((size, size, 1), np.uint8)
    image[50, 100] = 255  # model pixel centre (100.5, 50.5)
    record = {
        "image": image,
        "original_size": np.array([height, width], np.int32),
        "centroids": np.tile([[100.5 / size, 50.5 / size]], (vertebrae.K, 1)).astype(np.float32),
        "labeled": np.arange(vertebrae.K) < 5,
        "image_id": b"case-1",
    }

    class Builder:
        def as_data_source(self, split):
            assert split == "test"
            return [record, record, record]

    monkeypatch.setattr(inference, "load", lambda workdir, checkpoint: model)
    monkeypatch.setattr(datasets, "get_builder", lambda name, **kwargs: Builder())
    (fig,) = report.example_figures(run, 1)
    ax = fig.axes[0]
    truth, predicted = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    expected = [100.5 * width / size, 50.5 * height / size]
    np.testing.assert_allclose(predicted, [expected] * vertebrae.K, atol=1e-3)
    np.testing.assert_allclose(truth, [expected] * 5, atol=1e-3)
    assert ax.get_images()[0].get_extent() == [0.0, width, height, 0.0]
    assert "case-1" in ax.get_title()

    markdown = report.write_report([run], tmp_path / "out", examples=2)
    assert sorted(p.name for p in (tmp_path / "out" / "examples").iterdir()) == [
        "l3_aasce_fov_0.png",
        "l3_aasce_fov_1.png",
    ]
    assert "](examples/l3_aasce_fov_0.png)" in markdown
