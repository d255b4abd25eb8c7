"""Tests for benchmarks.training_curve: earlier runs drawn beside new ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import training_curve

RECORDED = Path(__file__).resolve().parents[1] / "docs/results/aasce_fov_recipe/training_curve.json"


def test_earlier_runs_keep_their_figures_and_are_labelled(tmp_path):
    runs = training_curve.earlier_runs(str(RECORDED))
    assert [r["run"] for r in runs] == [
        "runs/aasce_fov_seed0 (earlier)",
        "runs/aasce_fov_seed1 (earlier)",
    ]
    assert runs[0]["curve"][-1] == {
        "minutes": 97.4,
        "step": 2400,
        "id_accuracy": pytest.approx(0.631, abs=1e-3),
    }
    assert training_curve._reached(runs[0], 0.8) == "not reached"
    assert training_curve._reached(runs[0], 0.5) == "-"  # a mark that output did not look for
    plot = tmp_path / "curve.png"
    training_curve.plot(runs, str(plot), (0.8, 0.9))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_already_labelled_earlier_are_not_labelled_twice(tmp_path):
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"runs": training_curve.earlier_runs(str(RECORDED))}))
    assert [r["run"] for r in training_curve.earlier_runs(str(again))] == [
        "runs/aasce_fov_seed0 (earlier)",
        "runs/aasce_fov_seed1 (earlier)",
    ]


def test_a_file_that_is_not_a_curve_output_is_named(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="other.json: not a training_curve --json output"):
        training_curve.earlier_runs(str(bad))
