"""Tests for the spine_radiographs TFDS builder, its sources and vertjax.data."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_builder.spine_radiographs import aasce, fov, records
from tfds_builder.spine_radiographs import folder as folder_source
from tfds_builder.spine_radiographs import spine_radiographs_dataset_builder as sr
from vertjax import datasets, vertebrae

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "tfds_builder" / "spine_radiographs" / "dummy_data"
AASCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "aasce"
K = vertebrae.K
SPEC = {
    "image": ((264, 264, 1), np.uint8),
    "centroids": ((K, 2), np.float32),
    "labeled": ((K,), np.bool_),
    "truth_centroids": ((K, 2), np.float32),
    "truth_visible": ((K,), np.bool_),
    "original_size": ((2,), np.int32),
    "pixel_spacing_mm": ((2,), np.float32),
}


def _records(builder) -> dict[str, list[dict]]:
    return {
        split: [builder.as_data_source(split)[i] for i in range(info.num_examples)]
        for split, info in builder.info.splits.items()
    }


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_schema(record: dict) -> None:
    for key, (shape, dtype) in SPEC.items():
        value = np.asarray(record[key])
        assert value.shape == shape, key
        # TFDS hands scalars back as Python floats; the stored dtype is checked on the spec.
        assert value.dtype == dtype or shape == (), key
    assert _text(record["participant_id"]) and _text(record["image_id"])
    for key, mask in (("centroids", "labeled"), ("truth_centroids", "truth_visible")):
        points = np.asarray(record[key])[np.asarray(record[mask])]
        assert np.all((points >= 0) & (points <= 1)), key
    assert np.all(np.asarray(record["centroids"])[~np.asarray(record["labeled"])] == 0)


def _check_participants(by_split: dict[str, list[dict]], *, once_per=None) -> None:
    """No participant in two splits; truth_visible covers labeled.

    With `once_per` (record -> group key), also: each of T4..L4 is labelled at
    most once per group (a participant's film pair).
    """
    owner: dict[str, str] = {}
    counts: dict[tuple[str, str], np.ndarray] = {}
    for split, recs in by_split.items():
        # validation_wide cuts the validation images again.
        group = "validation" if split == sr.WIDE_VALIDATION else split
        for r in recs:
            pid = _text(r["participant_id"])
            assert owner.setdefault(pid, group) == group, pid
            assert np.all(np.asarray(r["truth_visible"]) >= np.asarray(r["labeled"]))
            if once_per is not None:
                key = (split, once_per(r))
                counts[key] = counts.get(key, 0) + np.asarray(r["labeled"], int)
    assert all(c.max() <= 1 for c in counts.values())


def _source_image(record: dict) -> str:
    """aasce_fov: the image and draw a crop pair was cut from.

    '<image id>-upper' -> '<image id>-0', '<image id>-lower-3' -> '<image id>-3'.
    """
    image, view, draw = re.fullmatch(
        r"(.*)-(upper|lower)(?:-(\d+))?", _text(record["image_id"])
    ).groups()
    return f"{image}-{draw or 0}"


def _fov_counts(by_split: dict[str, list[dict]], draws: int) -> dict[str, int]:
    """Records per split that aasce_fov must make from the images of `by_split`."""
    images = {
        split: len({_source_image(r).rsplit("-", 1)[0] for r in recs})
        for split, recs in by_split.items()
    }
    return {split: n * 2 * (draws if split == "train" else 1) for split, n in images.items()}


def _leftovers(data_dir: Path, config: str) -> list[str]:
    """Dataset or temporary directories of `config` left in data_dir."""
    root = data_dir / "spine_radiographs"
    return [str(p) for p in root.rglob("*") if config in str(p) or "incomplete" in p.name]


# --- split rule, pixel statistics --------------------------------------------------------


def test_split_rule_is_stable_and_80_10_10():
    ids = [f"participant-{i}" for i in range(4000)]
    splits = [records.split_of(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in records.SPLITS}
    assert share["train"] == pytest.approx(0.8, abs=0.03)
    assert share["validation"] == pytest.approx(0.1, abs=0.02)
    # sha256-based, not Python's salted hash: the same in every process.
    digest = hashlib.sha256(b"synthetic-00000").digest()
    assert records.split_fraction("synthetic-00000") == int.from_bytes(digest[:8], "big") / 2**64
    assert splits == [records.split_of(i) for i in ids]
    two = [records.split_of(i, ("train", "validation")) for i in ids]
    assert set(two) == {"train", "validation"}
    assert two.count("train") / len(ids) == pytest.approx(8 / 9, abs=0.03)


def test_pixel_stats_exact():
    stats = records.PixelStats()
    a = np.array([0, 255], np.uint8)
    b = np.array([[10, 20, 30]], np.uint8)
    stats.add(a)
    stats.add(b)
    values = np.array([0, 255, 10, 20, 30], float)
    assert stats.result() == pytest.approx((values.mean(), values.std()))
    with pytest.raises(ValueError, match="no training images"):
        records.PixelStats().result()


# --- AASCE label checks (synthetic arrays) -------------------------------------------------


def _p2(spacing: float = 40.0) -> np.ndarray:
    """A clean [68, 2] p2: 17 axis-aligned vertebrae, TL, TR, BL, BR each."""
    quads = []
    for k in range(17):
        cy = 100 + spacing * k
        quads.append([[90, cy - 12], [130, cy - 12], [90, cy + 12], [130, cy + 12]])
    return np.asarray(quads, float).reshape(68, 2)


def test_aasce_clean_labels_pass_unchanged():
    centroids, corners, fixes = aasce.check_points(_p2(), width=300, height=900, name="f.mat")
    assert fixes == ()
    np.testing.assert_allclose(centroids[:, 1], 100 + 40.0 * np.arange(17))
    np.testing.assert_allclose(corners.reshape(68, 2), _p2())


def test_aasce_rotated_groups_and_swapped_corners_are_fixed():
    p2 = _p2().reshape(17, 4, 2)
    rotated = np.concatenate([p2[1:], p2[:1]])  # topmost vertebra stored last
    rotated[4] = rotated[4][[3, 2, 1, 0]]  # corners in reverse order
    centroids, _, fixes = aasce.check_points(
        rotated.reshape(68, 2), width=300, height=900, name="f.mat"
    )
    assert set(fixes) == {"groups rotated", "corners reordered"}
    np.testing.assert_allclose(centroids[:, 1], 100 + 40.0 * np.arange(17))


def test_aasce_tilted_vertebra_corners_are_not_reordered():
    quad = np.array([[0.0, 0.0], [40.0, 15.0], [-6.0, 24.0], [34.0, 39.0]])  # 20 degree tilt
    np.testing.assert_array_equal(aasce.sort_corners(quad), quad)
    np.testing.assert_array_equal(aasce.sort_corners(quad[[2, 0, 3, 1]]), quad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.__setitem__((20, 0), np.nan), "f.mat: p2 row 20 is not finite"),
        (lambda p: p.__setitem__(slice(24, 28), p[20:24] + 2), "groups 5 and 6 coincide"),
        (
            lambda p: p.__setitem__(slice(0, 8), np.concatenate([p[4:8], p[0:4]])),
            "f.mat: vertebrae out of order",
        ),
        (lambda p: p.__setitem__(slice(64, 68), p[64:68] + [0, 500]), "outside the 300 x 900"),
    ],
    ids=["nan", "duplicate", "swapped", "outside"],
)
def test_aasce_faulty_labels_are_rejected(change, message):
    p2 = _p2()
    change(p2)
    with pytest.raises(aasce.AnnotationError, match=message):
        aasce.check_points(p2, width=300, height=900, name="f.mat")


def test_aasce_wrong_shape_rejected():
    with pytest.raises(aasce.AnnotationError, match=r"f.mat: p2 has shape \(64, 2\)"):
        aasce.check_points(_p2()[:64], width=300, height=900, name="f.mat")


def test_aasce_participant_groups_films_of_one_patient():
    assert aasce.participant_of("sunhl-1th-02-Jan-2017-162 A AP") == "aasce-162"
    assert aasce.participant_of("sunhl-1th-03-Jan-2017-162 B AP") == "aasce-162"
    assert aasce.participant_of("sunhl-1th-20-Jul-2016-coronal6") == (
        "aasce-sunhl-1th-20-Jul-2016-coronal6"
    )


# --- field-of-view protocol ----------------------------------------------------------------


def test_fov_crops_follow_the_protocol():
    centroids = np.stack([150 + 5 * np.sin(np.arange(17)), 80 + 60.0 * np.arange(17)], axis=1)
    overlaps = set()
    for i in range(60):
        upper, lower = fov.split_fov(centroids, width=300, height=1200, seed=3, image_id=f"im{i}")
        assert np.array_equal(upper.labeled ^ lower.labeled, np.ones(K, bool))
        assert not np.any(upper.labeled & lower.labeled)
        for crop in (upper, lower):
            x0, y0, x1, y1 = crop.box
            assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 1200
            assert np.all(crop.truth_visible >= crop.labeled)
            inside = (centroids[3:16, 1] >= y0) & (centroids[3:16, 1] < y1)
            np.testing.assert_array_equal(crop.truth_visible, inside)
        both = upper.truth_visible & lower.truth_visible
        overlaps.add(int(both.sum()))
        # The upper film shows T4 and ends between T11 and L1.
        last = int(np.flatnonzero(upper.truth_visible).max())
        assert upper.truth_visible[0] and vertebrae.index("T11") <= last <= vertebrae.index("L1")
        assert lower.truth_visible[-1]
    assert overlaps <= {2, 3, 4} and len(overlaps) >= 2
    again = fov.split_fov(centroids, width=300, height=1200, seed=3, image_id="im0")
    first = fov.split_fov(centroids, width=300, height=1200, seed=3, image_id="im0")
    other = fov.split_fov(centroids, width=300, height=1200, seed=4, image_id="im0")
    assert again[0].box == first[0].box and again[1].box == first[1].box
    assert (other[0].box, other[1].box) != (first[0].box, first[1].box)


def test_wide_fov_crops_reach_the_image_edges_and_keep_the_labels():
    centroids = np.stack([150 + 5 * np.sin(np.arange(17)), 300 + 50.0 * np.arange(17)], axis=1)
    t3_y, l5_y = centroids[2, 1], centroids[16, 1]
    tops, bottoms, paper_tops = [], [], []
    for i in range(80):
        kwargs = dict(width=300, height=1600, seed=3, image_id=f"im{i}")
        upper, lower = fov.split_fov(centroids, draw=1, wide=True, **kwargs)
        assert np.array_equal(upper.labeled ^ lower.labeled, np.ones(K, bool))
        assert upper.truth_visible[0] and lower.truth_visible[-1]
        tops.append(upper.box[1])
        bottoms.append(lower.box[3])
        paper_tops.append(fov.split_fov(centroids, **kwargs)[0].box[1])
        assert 0 <= upper.box[1] <= t3_y and l5_y < lower.box[3] <= 1600
        different = fov.split_fov(centroids, draw=2, wide=True, **kwargs)
        assert different[0].box != upper.box or different[1].box != lower.box
    # The paper's tops start at most one spacing above T1; the wide ones anywhere.
    assert min(paper_tops) >= centroids[0, 1] - 50 - 1
    assert min(tops) < 0.2 * centroids[0, 1] and max(tops) > centroids[0, 1]
    assert max(bottoms) > 1600 - 0.2 * (1600 - l5_y)


# --- folder source --------------------------------------------------------------------------

FIELDS = ["image", "participant", "vertebra", "x", "y", "split"]


def _write_csv(root: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _make_folder(root: Path, write_dicom) -> list[dict]:
    """PNG, 16-bit TIFF, DICOM MONOCHROME1 and MONOCHROME2, and one unlabelled PNG."""
    rng = np.random.default_rng(0)
    (root / "scans").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (120, 60), dtype=np.uint8)).save(root / "a_upper.png")
    Image.fromarray(rng.integers(0, 4000, (100, 50), dtype=np.uint16)).save(root / "a_lower.tif")
    raw = rng.integers(0, 4000, (90, 70)).astype(np.uint16)
    write_dicom(root / "scans" / "b1.dcm", raw, photometric="MONOCHROME1", slope=2.0, intercept=-5)
    write_dicom(root / "scans" / "b2.dcm", raw, spacing=(0.15, 0.3))
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "negative.png")
    rows = [
        {"image": "a_upper.png", "participant": "a", "vertebra": "T4", "x": 30, "y": 10},
        {"image": "a_upper.png", "participant": "a", "vertebra": "T5", "x": 31.5, "y": 40},
        {"image": "a_lower.tif", "participant": "a", "vertebra": "L4", "x": 25, "y": 90},
        {"image": "scans/b1.dcm", "participant": "b", "vertebra": "t12", "x": 35, "y": 45},
        {"image": "scans/b2.dcm", "participant": "b", "vertebra": "L1", "x": 70, "y": 90},
    ]
    for row in rows:
        row["split"] = "train" if row["participant"] == "a" else "validation"
    _write_csv(root, rows)
    return rows


def test_folder_reader_and_build(tmp_path, write_dicom):
    manual = tmp_path / "folder"
    _make_folder(manual, write_dicom)
    images = {i.image_id: i for i in folder_source.read_folder(str(manual))}
    assert sorted(images) == [
        "a_lower.tif",
        "a_upper.png",
        "negative.png",
        "scans/b1.dcm",
        "scans/b2.dcm",
    ]
    assert images["negative.png"].labeled.sum() == 0
    assert images["scans/b1.dcm"].size == (90, 70)

    builder = datasets.get_builder(
        "folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)
    )
    spec = builder.info.features
    for key, (shape, dtype) in SPEC.items():
        assert spec[key].shape == shape and spec[key].np_dtype == dtype, key
    assert builder.info.file_format.value == "array_record"
    by_split = _records(builder)
    assert len(by_split["train"]) == 2 and len(by_split["validation"]) == 2
    found = {_text(r["image_id"]): r for recs in by_split.values() for r in recs}
    assert set(found) == set(images)
    for r in found.values():
        _check_schema(r)
    _check_participants(by_split)
    upper = found["a_upper.png"]
    np.testing.assert_array_equal(upper["original_size"], [120, 60])
    np.testing.assert_allclose(upper["centroids"][:2], [[30 / 60, 10 / 120], [31.5 / 60, 40 / 120]])
    assert upper["labeled"].tolist() == [True, True] + [False] * 11
    np.testing.assert_array_equal(upper["truth_visible"], upper["labeled"])
    b1, b2 = found["scans/b1.dcm"], found["scans/b2.dcm"]
    assert b1["labeled"][vertebrae.index("T12")]
    np.testing.assert_allclose(b1["pixel_spacing_mm"], [0.2, 0.2])
    np.testing.assert_allclose(b2["pixel_spacing_mm"], [0.15, 0.3])  # (row, column)
    # Same raw pixels: MONOCHROME1 is the inverse of MONOCHROME2 (rescale is linear),
    # up to the two roundings of the bilinear resize of this 90 x 70 film.
    diff = b1["image"].astype(int) + b2["image"].astype(int) - 255
    assert np.abs(diff).max() <= 2 and np.mean(diff == 0) > 0.5
    assert found["negative.png"]["labeled"].sum() == 0
    np.testing.assert_array_equal(found["a_upper.png"]["pixel_spacing_mm"], [0, 0])
    # Statistics: exactly the train split's pixels, persisted and reloaded.
    train = np.concatenate([np.asarray(r["image"], float).ravel() for r in by_split["train"]])
    reloaded = tfds.builder("spine_radiographs/folder", data_dir=str(tmp_path / "tfds"))
    assert datasets.pixel_stats(reloaded) == pytest.approx((train.mean(), train.std()))
    metadata = json.loads((Path(builder.data_dir) / "metadata.json").read_text())
    assert set(metadata) == {"pixel_mean", "pixel_std"}


def _good_rows() -> list[dict]:
    return [
        {"image": "a.png", "participant": "p", "vertebra": "T4", "x": 10, "y": 10},
        {"image": "a.png", "participant": "p", "vertebra": "T5", "x": 12, "y": 30},
        {"image": "b.png", "participant": "q", "vertebra": "L1", "x": 20, "y": 50},
    ]


def _bad_folder(root: Path, case: str) -> str:
    """A folder with one fault; returns the text the error must contain."""
    root.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((80, 40), 100, np.uint8)).save(root / name)
    rows = _good_rows()
    csv_name = f"{root / 'annotations.csv'}"
    if case == "unreadable image":
        (root / "b.png").write_bytes(b"not a png file")
        _write_csv(root, rows)
        return f"{root / 'b.png'}: unreadable image"
    if case == "empty image":
        (root / "b.png").write_bytes(b"")
        _write_csv(root, rows)
        return f"{root / 'b.png'}: empty file (referenced on {csv_name} row 4)"
    if case == "unknown vertebra":
        rows[1]["vertebra"] = "T2"
        _write_csv(root, rows)
        return f"{csv_name} row 3: unknown vertebra 'T2'"
    if case == "duplicate":
        rows.append(dict(rows[0], x=11))
        _write_csv(root, rows)
        return f"{csv_name} row 5: duplicate vertebra T4 for image 'a.png' (first on row 2)"
    if case == "outside":
        rows[2]["y"] = 80.5
        _write_csv(root, rows)
        return f"{csv_name} row 4: point (20, 80.5) of L1 lies outside image 'b.png' of 40 x 80"
    if case == "missing file":
        rows[2]["image"] = "c.png"
        _write_csv(root, rows)
        return f"{csv_name} row 4: image file 'c.png' not found"
    if case == "leaves folder":
        shutil.copy(root / "a.png", root.parent / "outside.png")
        rows[2]["image"] = "../outside.png"
        _write_csv(root, rows)
        return f"{csv_name} row 4: image path '../outside.png' leaves the folder"
    if case == "not finite":
        rows[1]["x"] = "inf"
        _write_csv(root, rows)
        return f"{csv_name} row 3: column 'x' is not finite: 'inf'"
    if case == "not a number":
        rows[0]["y"] = "12,5"
        _write_csv(root, rows)
        return f"{csv_name} row 2: column 'y' is not a number: '12,5'"
    if case == "missing columns":
        _write_csv(root, rows, fields=["image", "participant", "vertebra", "x"])
        return f"{csv_name}: missing column(s) y"
    if case == "empty csv":
        (root / "annotations.csv").write_text("")
        return f"{csv_name}: empty file, expected a header row"
    if case == "no csv":
        return f"{csv_name}: annotations file not found"
    raise AssertionError(case)


BAD_CASES = [
    "unreadable image",
    "empty image",
    "unknown vertebra",
    "duplicate",
    "outside",
    "missing file",
    "leaves folder",
    "not finite",
    "not a number",
    "missing columns",
    "empty csv",
    "no csv",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_folder_bad_input_names_file_row_and_fault(tmp_path, case):
    manual = tmp_path / "in" / "folder"
    expected = _bad_folder(manual, case)
    data_dir = tmp_path / "tfds"
    with pytest.raises(folder_source.FolderError) as info:
        datasets.get_builder("folder", data_dir=str(data_dir), manual_dir=str(manual))
    assert expected in str(info.value)
    assert _leftovers(data_dir, "folder") == []
    assert not (data_dir / "spine_radiographs").exists()


NEGATIVE_FIELDS = [*FIELDS, "negative"]


def _listed_folder(root: Path) -> list[dict]:
    """a.png labelled, b.png listed as a negative, c.png in the tree but not listed."""
    root.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((80, 40), 100, np.uint8)).save(root / name)
    return [
        {"image": "a.png", "participant": "p", "vertebra": "T4", "x": 10, "y": 10, "negative": ""},
        {"image": "a.png", "participant": "p", "vertebra": "T5", "x": 12, "y": 30, "negative": 0},
        {"image": "b.png", "participant": "q", "vertebra": "", "x": "", "y": "", "negative": 1},
    ]


def test_folder_negative_column_takes_only_listed_images(tmp_path):
    root = tmp_path / "folder"
    rows = _listed_folder(root)
    _write_csv(root, rows, NEGATIVE_FIELDS)
    images = {i.image_id: i for i in folder_source.read_folder(str(root))}
    assert sorted(images) == ["a.png", "b.png"]  # c.png is left out, not a negative
    assert images["a.png"].labeled.tolist() == [True, True] + [False] * 11
    assert images["b.png"].labeled.sum() == 0 and images["b.png"].participant_id == "q"
    # Without the column, the unlisted image is a negative, as before.
    _write_csv(root, rows[:2], FIELDS)
    assert sorted(i.image_id for i in folder_source.read_folder(str(root))) == [
        "a.png",
        "b.png",
        "c.png",
    ]


@pytest.mark.parametrize(
    "case, change, expected",
    [
        ("flag", {"negative": "yes"}, "row 4: column 'negative' must be 1, 0 or empty, not 'yes'"),
        ("point", {"vertebra": "T6"}, "row 4: a row with negative=1 must leave vertebra, x and y"),
        ("both", {"image": "a.png", "participant": "p"}, "row 4: image 'a.png' is marked negative"),
    ],
)
def test_folder_negative_rows_are_checked(tmp_path, case, change, expected):
    root = tmp_path / "folder"
    rows = _listed_folder(root)
    rows[2].update(change)
    _write_csv(root, rows, NEGATIVE_FIELDS)
    with pytest.raises(folder_source.FolderError, match=re.escape(expected)):
        folder_source.read_folder(str(root))


def test_failure_while_writing_leaves_no_dataset(tmp_path):
    """An image whose header reads but whose pixels do not fails mid-build, atomically."""
    manual = tmp_path / "folder"
    manual.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200), np.uint8)).save(
            manual / name
        )
    blob = (manual / "b.png").read_bytes()
    (manual / "b.png").write_bytes(blob[: len(blob) // 2])
    rows = [
        {
            "image": "a.png",
            "participant": "p",
            "vertebra": "T4",
            "x": 10,
            "y": 10,
            "split": "train",
        },
        {
            "image": "b.png",
            "participant": "p",
            "vertebra": "T5",
            "x": 10,
            "y": 30,
            "split": "train",
        },
    ]
    _write_csv(manual, rows)
    data_dir = tmp_path / "tfds"
    with pytest.raises(Exception, match=r"b.png: unreadable image"):
        datasets.get_builder("folder", data_dir=str(data_dir), manual_dir=str(manual))
    assert _leftovers(data_dir, "folder") == []
    assert not (data_dir / "spine_radiographs" / "folder").exists()


def test_cli_build_preview_and_error(tmp_path):
    data_dir = tmp_path / "tfds"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "vertjax.data"]
    manual = f"--manual_dir={DUMMY / 'folder'}"
    built = subprocess.run(
        [*base, "build", "--config=folder", manual, f"--data_dir={data_dir}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert built.returncode == 0, built.stderr
    assert "spine_radiographs/folder/1.2.0" in built.stdout
    assert "train: 3 radiographs" in built.stdout  # 2 labelled + the negative (by hash)
    assert "validation: 1 radiographs" in built.stdout
    out = tmp_path / "preview.png"
    shown = subprocess.run(
        [*base, "preview", "--config=folder", f"--data_dir={data_dir}", f"--out={out}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert shown.returncode == 0, shown.stderr
    assert Image.open(out).size[0] > 300
    bad = tmp_path / "bad"
    _bad_folder(bad, "unknown vertebra")
    failed = subprocess.run(
        [*base, "build", "--config=folder", f"--manual_dir={bad}", f"--data_dir={data_dir}2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert f"vertjax: {bad / 'annotations.csv'} row 3: unknown vertebra 'T2'" in failed.stderr


# --- synthetic and AASCE builds ---------------------------------------------------------------


def _tiny_synthetic(data_dir: Path, participants: int = 10) -> tfds.core.DatasetBuilder:
    config = sr.SpineConfig(
        name="synthetic_tiny", source="synthetic", num_participants=participants, workers=1
    )
    builder = sr.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def _shards(builder) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in Path(builder.data_dir).iterdir() if "array_record" in p.name
    }


def test_synthetic_build_schema_splits_and_determinism(tmp_path):
    first = _tiny_synthetic(tmp_path / "one")
    by_split = _records(first)
    assert sum(len(v) for v in by_split.values()) == 20
    assert {"train", "validation"} <= set(by_split)
    for recs in by_split.values():
        for r in recs:
            _check_schema(r)
            assert np.all(r["pixel_spacing_mm"] > 0)
            assert r["pixel_spacing_mm"][0] == r["pixel_spacing_mm"][1]  # square film pixels
    _check_participants(by_split, once_per=lambda r: _text(r["participant_id"]))
    # Two films per participant; together they label every one of T4..L4 once.
    labels: dict[str, np.ndarray] = {}
    for recs in by_split.values():
        for r in recs:
            pid = _text(r["participant_id"])
            labels[pid] = labels.get(pid, 0) + np.asarray(r["labeled"], int)
    assert len(labels) == 10 and all(np.all(v == 1) for v in labels.values())
    second = _tiny_synthetic(tmp_path / "two")
    assert _shards(first) == _shards(second) and _shards(first)
    mean, std = datasets.pixel_stats(first)
    assert 0 < mean < 255 and std > 0
    assert datasets.pixel_stats(second) == (mean, std)


def test_synthetic_pool_matches_single_process():
    one = list(sr.synthetic.generate(seed=0, indices=[3, 4], image_size=64))
    with sr.synthetic.worker_pool(2, sr.synthetic.MIN_PARALLEL) as pool:
        assert pool is not None
        many = list(sr.synthetic.generate(seed=0, indices=[1, 2, 3, 4], image_size=64, pool=pool))
    assert [k for k, _ in one] == [k for k, _ in many[4:]]
    for (_, a), (_, b) in zip(one, many[4:], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["truth_centroids"], b["truth_centroids"])


def _aasce_manual_dir(tmp_path):
    """The flat placeholder films and labels laid out as an AASCE manual directory."""
    manual = tmp_path / "aasce"
    for kind, sub in (("images", "data"), ("labels", "labels")):
        shutil.copytree(DUMMY / "aasce" / kind, manual / "boostnet_labeldata" / sub / "training")
    return manual


@pytest.mark.parametrize("config", ["aasce", "aasce_fov"])
def test_aasce_build_on_dummy_data(tmp_path, config):
    manual = _aasce_manual_dir(tmp_path)
    builder = datasets.get_builder(config, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    by_split = _records(builder)
    assert "test" not in by_split  # no data/test in the manual dir
    flat = [r for recs in by_split.values() for r in recs]
    for r in flat:
        _check_schema(r)
    # A patient may have several films; the protocol pairs crops of one film.
    _check_participants(by_split, once_per=None if config == "aasce" else _source_image)
    if config == "aasce":
        assert len(flat) == 4
        assert all(r["labeled"].all() for r in flat)
        return
    assert {s: len(r) for s, r in by_split.items()} == _fov_counts(
        by_split, builder.builder_config.train_draws
    )
    assert sorted(by_split) in (["train", "validation", "validation_wide"], ["train"])
    for split, recs in by_split.items():
        views = [re.search(r"-(upper|lower)", _text(r["image_id"])).group(1) for r in recs]
        assert views.count("upper") == views.count("lower") == len(recs) // 2, split
    assert any((r["truth_visible"] & ~r["labeled"]).any() for r in flat)


def test_aasce_official_test_part_becomes_test_split(tmp_path):
    manual = _aasce_manual_dir(tmp_path)
    root = manual / "boostnet_labeldata"
    for kind in ("data", "labels"):
        (root / kind / "test").mkdir()
    for name in ("dummy-3 A AP.jpg", "dummy-3 A AP.jpg.mat"):
        kind = "labels" if name.endswith(".mat") else "data"
        shutil.move(root / kind / "training" / name, root / kind / "test" / name)
    # 'dummy-1 B' goes to test too, so patient 1's other film 'dummy-1 A' must leave training.
    for name in ("dummy-1 B AP.jpg", "dummy-1 B AP.jpg.mat"):
        kind = "labels" if name.endswith(".mat") else "data"
        shutil.move(root / kind / "training" / name, root / kind / "test" / name)
    builder = datasets.get_builder("aasce", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    by_split = _records(builder)
    test = sorted(_text(r["image_id"]) for r in by_split["test"])
    assert test == ["dummy-1 B AP", "dummy-3 A AP"]
    rest = sorted(
        _text(r["image_id"]) for s in ("train", "validation") for r in by_split.get(s, [])
    )
    assert rest == ["dummy-2 A AP"]
    _check_participants(by_split)


def test_reading_needs_no_tensorflow(tmp_path):
    """Build and read in a fresh interpreter, with TensorFlow not installed."""
    code = f"""
import importlib.util
import sys

# The project must not depend on TensorFlow: it is not installed at all.
assert importlib.util.find_spec("tensorflow") is None, "tensorflow is installed"
from vertjax import datasets
builder = datasets.get_builder("aasce_fov", data_dir={str(tmp_path)!r},
                           manual_dir={str(_aasce_manual_dir(tmp_path))!r})
source = builder.as_data_source("train")
record = source[0]
assert record["image"].shape == (264, 264, 1), record["image"].shape
assert datasets.pixel_stats(builder)[1] > 0
import tensorflow_datasets as tfds
again = tfds.data_source("spine_radiographs/aasce_fov", split="train", data_dir={str(tmp_path)!r})
assert len(again) > 0 and again[0]["labeled"].shape == (13,)
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print("ok", len(source))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok ")


@pytest.mark.skipif(not AASCE_DIR.is_dir(), reason="../shared/data/aasce not present")
def test_aasce_reader_on_real_files(tmp_path):
    names = [
        "sunhl-1th-02-Jan-2017-162 A AP",
        "sunhl-1th-02-Jan-2017-162 B AP",
        "sunhl-1th-03-Jan-2017-163 A AP",
        "sunhl-1th-03-Jan-2017-163 B AP",  # corners out of order: fixed
        "sunhl-1th-11-Jan-2017-255 B AP",  # topmost vertebra stored last: fixed
        "sunhl-1th-25-Jul-2016-15 B AP",  # L5 annotated on top of L4: rejected
        "sunhl-1th-26-Jul-2016-76 C AP",  # T1 and T2 swapped and overlapping: rejected
        "sunhl-1th-20-Jul-2016-coronal6",
    ]
    src = AASCE_DIR / "boostnet_labeldata"
    manual = tmp_path / "aasce" / "boostnet_labeldata"
    for kind, suffix in (("data", ".jpg"), ("labels", ".jpg.mat")):
        (manual / kind / "training").mkdir(parents=True)
        for name in names:
            target = src / kind / "training" / (name + suffix)
            (manual / kind / "training" / (name + suffix)).symlink_to(target)
    entries, counts = aasce.read_part(str(tmp_path / "aasce"), "training")
    assert counts["rejected"] == 2 and counts["accepted"] == 6
    assert counts["groups rotated"] == 1 and counts["corners reordered"] >= 1
    for entry in entries:
        assert np.all(np.diff(entry.centroids[:, 1]) > 0)
    assert {e.participant_id for e in entries} >= {"aasce-162", "aasce-163", "aasce-255"}
    builder = datasets.get_builder(
        "aasce_fov", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "aasce")
    )
    by_split = _records(builder)
    assert {s: len(r) for s, r in by_split.items()} == _fov_counts(
        by_split, builder.builder_config.train_draws
    )
    assert sum(len(v) for v in by_split.values()) >= 6 * 4
    _check_participants(by_split, once_per=_source_image)
    for recs in by_split.values():
        for r in recs:
            _check_schema(r)


def test_get_builder_refusals(tmp_path):
    with pytest.raises(datasets.DataError, match="is not built"):
        datasets.get_builder("synthetic_small", data_dir=str(tmp_path), build=False)
    with pytest.raises(datasets.DataError, match="unknown dataset config 'nope'"):
        datasets.get_builder("nope", data_dir=str(tmp_path))
    with pytest.raises(datasets.DataError, match="missing: manual directory not found"):
        datasets.get_builder("folder", data_dir=str(tmp_path), manual_dir=str(tmp_path / "missing"))
    with pytest.raises(datasets.DataError, match="needs --manual_dir"):
        datasets.get_builder("folder", data_dir=str(tmp_path))
    assert not (tmp_path / "spine_radiographs").exists()


def test_builder_registered_with_docs():
    builder = tfds.builder("spine_radiographs", data_dir="/nonexistent")
    assert builder.builder_config.name == "synthetic"
    assert "BoostNet" in builder.info.citation and "Tailoring Loss" in builder.info.citation
    assert [c.name for c in sr.Builder.BUILDER_CONFIGS] == [
        "synthetic",
        "synthetic_small",
        "aasce",
        "aasce_fov",
        "folder",
    ]
    assert sr.Builder.BUILDER_CONFIGS[1].num_participants * 2 <= 200
