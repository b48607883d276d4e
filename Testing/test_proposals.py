import numpy as np
import pytest

from progidiff.proposals import (CONSENSUS_MIN_AGREEMENT, REVIEW_AGREEMENT, consensus, engine_consensus, pairwise_dice,
                                 rank, uncertainty, volumes_ml, vote_corrected)


def _masks():
    base = np.zeros((4, 10, 10, 10), bool)
    base[:, 2:8, 2:8, 2:8] = True
    base[3] = False
    base[3, 0:3, 0:3, 0:3] = True  # the outlier
    return base


def test_rank_puts_the_outlier_last_and_flags_review():
    m = _masks()
    r = rank(m)
    assert r.order[-1] == 3 and r.order[:3] == [0, 1, 2]
    assert r.scores[0] > r.scores[3]
    assert r.agreement < REVIEW_AGREEMENT and r.review


def test_identical_proposals_agree():
    m = np.repeat(_masks()[:1], 3, 0)
    r = rank(m)
    assert r.agreement == 1.0 and not r.review
    assert np.allclose(pairwise_dice(m), 1.0)


def test_consensus_and_uncertainty():
    m = _masks()
    c = consensus(m)
    assert c[5, 5, 5] and not c[0, 0, 0]
    u = uncertainty(m)
    assert u[5, 5, 5] == np.float32(4 * 0.75 * 0.25) and u[9, 9, 9] == 0 and u.dtype == np.float32
    even = np.array([[True], [False]])
    assert uncertainty(even)[0] == 1.0


def test_engine_consensus_falls_back_to_the_ranked_first_where_proposals_scatter():
    # four proposals in four places, the first (ranked-first) larger: the vote keeps nothing
    scattered = np.zeros((4, 10, 10, 10), bool)
    for k in range(4):
        scattered[k, 2 * k:2 * k + 2, 2:8, 2:8] = True
    scattered[0, 0:2] = True
    r = rank(scattered)
    ranked = scattered[r.order]
    assert r.agreement < CONSENSUS_MIN_AGREEMENT and not consensus(ranked).any()
    fused, rule = engine_consensus(ranked, r.agreement)
    assert rule == "ranked-first" and np.array_equal(fused, ranked[0]) and fused is not ranked[0]
    # five alike and one outlier: the vote-corrected ranked-first, which here is the shared cube
    m = np.concatenate([np.repeat(_masks()[:1], 5, 0), _masks()[3:]])
    r = rank(m)
    assert r.agreement >= CONSENSUS_MIN_AGREEMENT
    fused, rule = engine_consensus(m[r.order], r.agreement)
    assert rule == "vote-corrected" and np.array_equal(fused, m[0]) and not fused[1, 1, 1]


def test_vote_corrected_keeps_what_a_quarter_holds_and_adds_what_three_quarters_hold():
    ranked = np.zeros((8, 1, 1, 6), bool)
    ranked[0, 0, 0, :3] = True          # the ranked-first proposal holds voxels 0, 1, 2
    ranked[1, 0, 0, 1] = True           # voxel 1: 2 of 8 (a quarter), kept
    ranked[1:3, 0, 0, 2] = True         # voxel 2: 3 of 8, kept; voxel 0: only the ranked-first, dropped
    ranked[1:6, 0, 0, 3] = True         # voxel 3: 5 of 8 (a majority), not the ranked-first's: not added
    ranked[1:7, 0, 0, 4] = True         # voxel 4: 6 of 8 (three quarters), added
    ranked[1:8, 0, 0, 5] = True         # voxel 5: 7 of 8, added
    assert vote_corrected(ranked)[0, 0].tolist() == [False, True, True, False, True, True]
    assert consensus(ranked)[0, 0].tolist() == [False, False, False, True, True, True]
    # three proposals or fewer: the ranked-first proposal's own vote is a third, so nothing changes
    three = ranked[[0, 6, 7]]
    assert np.array_equal(vote_corrected(three), three[0])


def test_volumes():
    m = _masks()
    assert volumes_ml(m, 0.5) == [108.0, 108.0, 108.0, 13.5]


def test_largest_diameter_of_a_box_in_world_mm():
    import SimpleITK as sitk

    from progidiff.proposals import kji_to_world, largest_diameter_mm

    img = sitk.Image(20, 30, 10, sitk.sitkUInt8)
    img.SetSpacing((2.0, 1.0, 3.0))
    img.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))  # permuted and flipped axes
    mask = np.zeros((10, 30, 20), bool)
    mask[2:5, 3:13, 4:9] = True  # k 2..4 (3 mm), j 3..12 (1 mm), i 4..8 (2 mm)
    expected = np.sqrt((2 * 3) ** 2 + (9 * 1) ** 2 + (4 * 2) ** 2)
    assert abs(largest_diameter_mm(mask, kji_to_world(img)) - expected) < 1e-6
    assert largest_diameter_mm(np.zeros_like(mask), kji_to_world(img)) == 0.0


def test_largest_diameter_from_row_ends_is_that_of_every_voxel():
    """Only the first and last voxel of each row go into the hull: the same diameter as every
    voxel's, on irregular blobs with holes."""
    from itertools import combinations

    import SimpleITK as sitk
    from scipy import ndimage

    from progidiff.proposals import kji_to_world, largest_diameter_mm

    img = sitk.Image(18, 16, 12, sitk.sitkUInt8)
    img.SetSpacing((0.8, 1.3, 2.5))
    img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    m = kji_to_world(img)
    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = ndimage.binary_opening(rng.random((12, 16, 18)) > 0.55)
        pts = np.argwhere(mask) @ m[:3, :3].T
        brute = max(np.linalg.norm(a - b) for a, b in combinations(pts, 2))
        assert largest_diameter_mm(mask, m) == pytest.approx(brute, abs=1e-9)
