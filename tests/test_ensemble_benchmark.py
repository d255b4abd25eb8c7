"""Tests for benchmarks.ensemble: the members' heatmaps are averaged, not picked or summed."""

import pytest

from benchmarks import ensemble
from configs import test as test_config


@pytest.fixture
def constant_run(tmp_path, data_dir, write_constant_run):
    """A function writing run folder `name` whose every heatmap is `level`.

    Each vertebra's confidence is exactly `level`: present alone when >= 0.5.
    """

    def write(name, level, *, features=4):
        config = test_config.get_config()
        config.dataset.data_dir = data_dir
        config.model.features = features
        return str(write_constant_run(tmp_path / name, config, level))

    return write


def _recall(rows, weights):
    (row,) = [r for r in rows if r["weights"] == weights]
    return row["presence_recall"]


def test_the_ensemble_averages_the_members_heatmaps(constant_run):
    high, low = constant_run("a", 0.9), constant_run("b", 0.3)
    rows = ensemble.evaluate_ensemble([high, low], "latest", ["validation"])
    # 0.9 alone is present, 0.3 alone is not; their mean, 0.6, is.
    assert (_recall(rows, "0"), _recall(rows, "1"), _recall(rows, "ensemble")) == (1.0, 0.0, 1.0)

    mid, lower = constant_run("c", 0.6), constant_run("d", 0.2)
    rows = ensemble.evaluate_ensemble([mid, lower], "latest", ["validation"])
    # 0.6 alone is present; the mean 0.4 is not (a maximum or a sum would be).
    assert (_recall(rows, "0"), _recall(rows, "ensemble")) == (1.0, 0.0)
    assert {r["split"] for r in rows} == {"validation"} and len(rows) == 3


def test_runs_of_another_shape_are_refused_by_name(constant_run):
    a = constant_run("a", 0.9)
    wider = constant_run("wider", 0.9, features=8)
    with pytest.raises(ValueError, match=r"wider: config.model differs"):
        ensemble.evaluate_ensemble([a, wider], "latest", ["validation"])
