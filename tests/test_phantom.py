"""Tests of the synthetic lateral spine radiograph phantom."""

import numpy as np
import pytest

from tfds_builder.spine_radiographs import phantom
from vertjax import vertebrae

SEED = 7
COUNT = 24  # rendered participants shared by the property tests


@pytest.fixture(scope="module")
def films() -> list[tuple[phantom.Radiograph, phantom.Radiograph]]:
    return [phantom.participant(SEED, i) for i in range(COUNT)]


def _spine(seed: int, index: int):
    """The geometry participant() draws first from the same random stream."""
    return phantom._make_spine(np.random.default_rng(np.random.SeedSequence([seed, index])))


def test_deterministic_and_index_dependent():
    a_up, a_low = phantom.participant(3, 5)
    b_up, b_low = phantom.participant(3, 5)
    for a, b in ((a_up, b_up), (a_low, b_low)):
        assert a.image.tobytes() == b.image.tobytes()
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.labeled, b.labeled)
        assert a.pixel_spacing_mm == b.pixel_spacing_mm
    other_index = phantom.participant(3, 6)[0]
    other_seed = phantom.participant(4, 5)[0]
    for other in (other_index, other_seed):
        assert other.image.shape != a_up.image.shape or not np.array_equal(other.image, a_up.image)
        assert not np.array_equal(other.centroids, a_up.centroids)


def test_shapes_and_dtypes(films):
    for upper, lower in films:
        assert (upper.view, lower.view) == ("upper", "lower")
        np.testing.assert_array_equal(upper.fractured, lower.fractured)
        for r in (upper, lower):
            assert r.image.dtype == np.uint8 and r.image.ndim == 2
            h, w = r.image.shape
            assert max(h, w) >= 1000
            assert 0.4 * h <= w <= h, "portrait film, width 0.4-1.0 of the height"
            assert r.centroids.dtype == np.float32 and r.centroids.shape == (vertebrae.K, 2)
            for field in (r.labeled, r.truth_visible, r.fractured):
                assert field.dtype == bool and field.shape == (vertebrae.K,)
            assert isinstance(r.pixel_spacing_mm, float)
            assert 0.1 <= r.pixel_spacing_mm <= 0.3
            # A film, not a blank: bone bright, air dark, a wide grey range.
            lo, hi = np.percentile(r.image, [2, 98])
            assert hi - lo > 100


def test_labels_split_between_the_two_films(films):
    for upper, lower in films:
        np.testing.assert_array_equal(upper.labeled ^ lower.labeled, np.ones(vertebrae.K, bool))
        split = int(upper.labeled.sum())
        assert 1 <= split < vertebrae.K
        # Upper labels one run from T4 down, lower the rest down to L4.
        assert upper.labeled[:split].all() and not upper.labeled[split:].any()
        assert upper.labeled[vertebrae.index("T4")] and upper.truth_visible[0]
        assert lower.labeled[vertebrae.index("L4")] and lower.truth_visible[-1]


def test_truth_covers_labels_and_lies_inside(films):
    unlabelled_visible = 0
    for pair in films:
        for r in pair:
            assert not (r.labeled & ~r.truth_visible).any()
            h, w = r.image.shape
            xy = r.centroids[r.truth_visible]
            assert ((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)).all()
            np.testing.assert_array_equal(r.centroids[~r.truth_visible], 0)
            unlabelled_visible += int((r.truth_visible & ~r.labeled).sum())
    # The films overlap: some visible vertebrae stay unlabelled, as in the paper.
    assert unlabelled_visible >= COUNT


def test_film_extents_follow_the_protocol(films):
    for upper, lower in films:
        # Upper: top between C7 and T3, bottom between T11 and L1, so T4..T11 show.
        assert upper.truth_visible[: vertebrae.index("T11") + 1].all()
        assert not upper.truth_visible[vertebrae.index("L2") :].any()
        # Lower: top between T9 and T12, bottom between L5 and S1, so T12..L4 show.
        assert lower.truth_visible[vertebrae.index("T12") :].all()
        assert not lower.truth_visible[: vertebrae.index("T9")].any()


def _neighbour_distances(films):
    """Per neighbour pair (T4-T5 .. L3-L4), distances in px and mm over all films."""
    px = [[] for _ in range(vertebrae.K - 1)]
    mm = [[] for _ in range(vertebrae.K - 1)]
    for pair in films:
        for r in pair:
            for k in range(vertebrae.K - 1):
                if r.truth_visible[k] and r.truth_visible[k + 1]:
                    d = float(np.linalg.norm(r.centroids[k + 1] - r.centroids[k]))
                    px[k].append(d)
                    mm[k].append(d * r.pixel_spacing_mm)
    return px, mm


def test_neighbour_spacing_grows_down_the_spine(films):
    _, mm = _neighbour_distances(films)
    means = np.array([np.mean(m) for m in mm])
    # T4-T5 about 22 mm, L3-L4 about 37 mm (body heights and discs grow).
    assert 18 < means[0] < 27 and 32 < means[-1] < 44
    assert np.polyfit(np.arange(means.size), means, 1)[0] > 0.8
    assert (np.diff(means) > -1.5).all()


def test_mean_neighbour_distance_in_pixels(films):
    px, mm = _neighbour_distances(films)
    mean_px = np.mean(np.concatenate(px))
    mean_mm = np.mean(np.concatenate(mm))
    # 0.2-0.26 mm pixels: ~27-31 mm apart is 105-155 px (the paper's 0.1 mm
    # films give 326 px); same distance relative to the film height.
    assert 27 < mean_mm < 32
    assert 100 < mean_px < 160


def test_centroids_sit_on_bright_bodies_between_dark_discs(films):
    hits = total = 0
    for pair in films[:8]:
        for r in pair:
            img = r.image.astype(np.float32)
            vis = np.nonzero(r.truth_visible)[0]
            for k in vis[:-1]:
                if not r.truth_visible[k + 1]:
                    continue
                a, b = r.centroids[k], r.centroids[k + 1]
                mid = (a + b) / 2  # the middle of the disc between them
                ax, ay = int(a[0]), int(a[1])
                mx, my = int(mid[0]), int(mid[1])
                body = img[max(ay - 4, 0) : ay + 5, max(ax - 4, 0) : ax + 5].mean()
                disc = img[max(my - 4, 0) : my + 5, max(mx - 4, 0) : mx + 5].mean()
                hits += body > disc
                total += 1
    assert total > 50 and hits / total > 0.9


def test_about_a_quarter_of_participants_fractured():
    spines = [_spine(1, i) for i in range(400)]
    counts = np.array([s.fractured.sum() for s in spines])
    assert 0.17 < np.mean(counts > 0) < 0.33
    assert counts.max() <= 3
    first = phantom._FIRST
    assert not any(
        s.fractured[:first].any() or s.fractured[first + vertebrae.K :].any() for s in spines
    )
    # Every fracture loses 20 to over 40 % of its height somewhere: anterior
    # (wedge), middle (biconcave) or everywhere (crush); intact bodies lose none.
    for s in spines:
        mid = (s.h_post + s.h_ant) / 2 - s.concave_top - s.concave_bot
        loss = np.max(
            [
                1 - s.h_ant / s.intact_ant,
                1 - s.h_post / s.intact_post,
                1 - mid / ((s.intact_ant + s.intact_post) / 2),
            ],
            axis=0,
        )
        assert (loss[s.fractured] > 0.19).all() and (loss[s.fractured] < 0.5).all()
        intact = ~s.fractured
        np.testing.assert_array_equal(s.h_ant[intact], s.intact_ant[intact])
        np.testing.assert_array_equal(s.h_post[intact], s.intact_post[intact])
    losses = [1 - s.h_ant[s.fractured] / s.intact_ant[s.fractured] for s in spines]
    assert np.max(np.concatenate(losses)) > 0.4


def test_participant_fracture_flags_match_its_geometry():
    for i in range(3):
        upper, _ = phantom.participant(1, i)
        first = phantom._FIRST
        np.testing.assert_array_equal(
            upper.fractured, _spine(1, i).fractured[first : first + vertebrae.K]
        )


def test_centroid_is_that_of_the_deformed_body():
    """Slow reference: rasterise each body on a 0.05 mm grid and average."""
    spine = next(s for s in (_spine(2, i) for i in range(200)) if s.fractured.any())
    for i in np.nonzero(spine.fractured)[0]:
        d, hp, ha = spine.depth[i], spine.h_post[i], spine.h_ant[i]
        x, y = np.meshgrid(
            np.arange(-d / 2, d / 2, 0.05) + 0.025,
            np.arange(-max(hp, ha) / 2 - 1, max(hp, ha) / 2 + 1, 0.05) + 0.025,
        )
        top, bot = phantom._body_profile(d, hp, ha, spine.concave_top[i], spine.concave_bot[i], x)
        inside = (y >= top) & (y <= bot)
        a = spine.alpha[i]
        n = np.array([np.cos(a), -np.sin(a)])
        t = np.array([np.sin(a), np.cos(a)])
        ref = spine.center[i] + x[inside].mean() * n + y[inside].mean() * t
        np.testing.assert_allclose(spine.centroid[i], ref, atol=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed and index must be >= 0"):
        phantom.participant(-1, 0)
    with pytest.raises(ValueError, match="seed and index must be >= 0"):
        phantom.participant(0, -3)
    with pytest.raises(TypeError, match="must be integers"):
        phantom.participant(0, 1.5)
