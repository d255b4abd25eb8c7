"""Tests for vertjax.input_pipeline on tiny in-memory record lists."""

import numpy as np
import pytest

from vertjax import input_pipeline

S = 8


def _record(i: int) -> dict:
    """A record whose image is filled with its own index, so batches show order."""
    return {
        "image": np.full((S, S, 1), i, np.uint8),
        "centroids": np.full((13, 2), i / 100.0, np.float32),
        "labeled": np.arange(13) % 2 == 0,
        "truth_centroids": np.zeros((13, 2), np.float32),
        "truth_visible": np.ones(13, bool),
        "original_size": np.array([100, 50], np.int32),
        "pixel_spacing_mm": np.full(2, 0.1, np.float32),
        "participant_id": f"p{i}".encode(),
        "image_id": f"img{i}".encode(),
    }


SOURCE = [_record(i) for i in range(12)]


def _ids(batch: dict) -> list[int]:
    return [int(round(v)) for v in batch["image"][:, 0, 0, 0]]


def _train(seed=0, batch_size=4, source=SOURCE, **kw):
    ds = input_pipeline.train_dataset(
        source, batch_size=batch_size, seed=seed, mean=0.0, std=1.0, read_threads=1, **kw
    )
    return iter(ds)


def test_train_batch_fields_dtypes_and_normalisation():
    ds = input_pipeline.train_dataset(
        SOURCE, batch_size=4, seed=0, mean=10.0, std=2.0, image_size=S, read_threads=1
    )
    batch = next(iter(ds))
    assert set(batch) == set(input_pipeline.FIELDS)  # strings dropped, no mask
    assert batch["image"].shape == (4, S, S, 1) and batch["image"].dtype == np.float32
    ids = (batch["image"][:, 0, 0, 0] * 2.0 + 10.0).round().astype(int)
    np.testing.assert_allclose(batch["centroids"][:, 0, 0], ids / 100.0, rtol=1e-6)
    assert batch["labeled"].dtype == bool and batch["labeled"].shape == (4, 13)
    assert batch["original_size"].dtype == np.int32
    assert batch["pixel_spacing_mm"].shape == (4, 2)


def test_train_order_is_a_function_of_the_seed():
    first = [_ids(next(it)) for it in [_train(seed=3)] for _ in range(6)]
    again = [_ids(next(it)) for it in [_train(seed=3)] for _ in range(6)]
    other = [_ids(next(it)) for it in [_train(seed=4)] for _ in range(6)]
    assert first == again
    assert first != other


def test_each_epoch_covers_every_record_once_in_a_new_order():
    it = _train(seed=0)
    epochs = [sum((_ids(next(it)) for _ in range(3)), []) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_processes_read_disjoint_shares():
    seen = []
    for index in range(2):
        it = _train(seed=0, batch_size=4, process_index=index, process_count=2)
        batches = [next(it) for _ in range(3)]  # one epoch of 6 records each
        assert all(b["image"].shape[0] == 2 for b in batches)
        seen.append(sorted(sum((_ids(b) for b in batches), [])))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_iterator_state_round_trip_continues_at_the_next_batch():
    it = _train(seed=1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [_ids(next(it)) for _ in range(4)]
    resumed = _train(seed=1)
    resumed.set_state(state)
    assert [_ids(next(resumed)) for _ in range(4)] == expected


def test_eval_batches_are_padded_and_masked():
    source = SOURCE[:10]
    batches = list(
        input_pipeline.eval_batches(source, batch_size=4, mean=0.0, std=1.0, read_threads=1)
    )
    assert len(batches) == 3
    assert all(b["image"].shape == (4, S, S, 1) for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    ids = sum((_ids(b) for b in batches), [])
    assert masks.tolist() == [True] * 10 + [False] * 2
    assert [i for i, m in zip(ids, masks, strict=True) if m] == list(range(10))


def test_eval_batches_split_over_processes_cover_the_split_once():
    source = SOURCE[:7]
    real, counts = [], []
    for index in range(2):
        batches = list(
            input_pipeline.eval_batches(
                source,
                batch_size=4,
                mean=0.0,
                std=1.0,
                read_threads=1,
                process_index=index,
                process_count=2,
            )
        )
        counts.append(len(batches))
        for b in batches:
            real += [i for i, m in zip(_ids(b), b["mask"], strict=True) if m]
    assert counts[0] == counts[1] == input_pipeline.num_eval_batches(7, 4, process_count=2)
    assert sorted(real) == list(range(7))


def test_eval_max_batches_stops_early():
    batches = list(
        input_pipeline.eval_batches(
            SOURCE, batch_size=4, mean=0.0, std=1.0, max_batches=2, read_threads=1
        )
    )
    assert len(batches) == 2 and all(b["mask"].all() for b in batches)


def test_batch_size_must_divide_over_processes():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        _train(batch_size=3, process_index=0, process_count=2)


def test_image_size_mismatch_is_a_clear_error():
    ds = input_pipeline.train_dataset(
        SOURCE, batch_size=2, seed=0, mean=0.0, std=1.0, image_size=16, read_threads=1
    )
    with pytest.raises(ValueError, match=r"8x8 but config.image_size is 16"):
        next(iter(ds))


def test_missing_field_names_the_field():
    broken = [{k: v for k, v in _record(i).items() if k != "labeled"} for i in range(4)]
    ds = input_pipeline.train_dataset(broken, batch_size=2, seed=0, mean=0.0, std=1.0)
    with pytest.raises(KeyError, match="labeled"):
        next(iter(ds))


def test_too_few_records_for_a_batch():
    with pytest.raises(ValueError, match="too few"):
        _train(batch_size=4, source=SOURCE[:3])
