import numpy as np
import pytest
from dipy.core.sphere import sphere2cart
from dipy.data import get_sphere
from dipy.reconst.shm import sf_to_sh
from dipy.sims.voxel import multi_tensor_odf
from scipy.spatial.transform import Rotation
from scipy.stats import entropy

from esdmri.metrics import (
    angular_errors,
    average_precision,
    count_directions,
    crossing_angles,
    dice,
    evaluate_fractions,
    evaluate_peaks,
    fraction_absolute_errors,
    fraction_kl_divergence,
    match_peaks,
    roc_auc,
    score_tractogram,
    threshold_sweep,
)
from esdmri.heldout_phantom import make_heldout_phantom

NAN = [np.nan] * 3


def in_plane(degrees):
    """Unit vector in the xy-plane at an azimuth in degrees."""
    r = np.radians(degrees)
    return [np.cos(r), np.sin(r), 0.0]


def padded(*voxels, length):
    """Stack per-voxel direction lists into a NaN-padded (n, length, 3) array."""
    return np.array([list(v) + [NAN] * (length - len(v)) for v in voxels], dtype=float)


def test_peak_ten_degrees_off_gives_ten_in_any_orientation():
    rotation = Rotation.from_euler("xyz", [33, -71, 12], degrees=True).as_matrix()
    true = padded([in_plane(0)], length=3) @ rotation.T
    pred = padded([in_plane(10)], length=5) @ rotation.T
    np.testing.assert_allclose(angular_errors(pred, true), [10.0], atol=1e-9)


def test_antipodal_peaks_are_the_same_fibre():
    true = padded([in_plane(20), [0, 0, 1]], length=3)
    pred = padded([-np.array(in_plane(20)), [0, 0, -1]], length=5)
    np.testing.assert_allclose(angular_errors(pred, true), [0.0], atol=1e-6)
    match = match_peaks(pred, true)
    assert match["tp"][0] == 2 and match["fp"][0] == 0 and match["fn"][0] == 0
    assert match["success"][0]
    # 170 degrees apart as vectors is 10 degrees apart as axes.
    np.testing.assert_allclose(
        angular_errors(padded([in_plane(170)], length=1), padded([in_plane(0)], length=1)),
        [10.0])


def test_angular_error_is_mean_over_true_fibres_of_nearest_peak():
    true = padded([in_plane(0), in_plane(60)], length=3)
    pred = padded([in_plane(5), in_plane(200), in_plane(75)], length=5)
    # Fibre 0: nearest peak 5 deg (200 is 20 as an axis); fibre 60: 75 -> 15.
    np.testing.assert_allclose(angular_errors(pred, true), [(5 + 15) / 2])


def test_missing_fibre_is_a_false_negative():
    true = padded([in_plane(0), in_plane(90)], length=3)
    pred = padded([in_plane(3)], length=5)
    match = match_peaks(pred, true)
    assert (match["tp"][0], match["fp"][0], match["fn"][0]) == (1, 0, 1)
    assert not match["success"][0]
    np.testing.assert_allclose(angular_errors(pred, true), [(3 + 87) / 2])


def test_extra_peak_is_a_false_positive():
    true = padded([in_plane(0)], length=3)
    pred = padded([in_plane(2), in_plane(60)], length=5)
    match = match_peaks(pred, true)
    assert (match["tp"][0], match["fp"][0], match["fn"][0]) == (1, 1, 0)
    assert not match["success"][0]
    np.testing.assert_allclose(angular_errors(pred, true), [2.0])


def test_matching_is_one_to_one():
    # Two peaks near one fibre: one of them is a false positive.
    true = padded([in_plane(0), in_plane(90)], length=2)
    pred = padded([in_plane(2), in_plane(-4)], length=2)
    match = match_peaks(pred, true)
    assert (match["tp"][0], match["fp"][0], match["fn"][0]) == (1, 1, 1)


def test_matching_maximises_pairs_where_greedy_nearest_would_not():
    # Peak at 20 is 20 deg from both fibres, peak at -22 only reaches fibre 0:
    # pairing the nearest first (20 with 0) would leave fibre 40 unmatched.
    true = padded([in_plane(0), in_plane(40)], length=3)
    pred = padded([in_plane(20), in_plane(-22)], length=5)
    match = match_peaks(pred, true)
    assert match["tp"][0] == 2 and match["success"][0]


def test_success_rules():
    true = padded([in_plane(0), in_plane(70)], [in_plane(0), in_plane(70)],
                  [in_plane(0), in_plane(70)], [in_plane(0)], [in_plane(0)], [], length=3)
    pred = padded([in_plane(24), in_plane(50)],    # both within 25: success
                  [in_plane(3), in_plane(100)],    # second 30 off: fail
                  [in_plane(3), in_plane(70), in_plane(130)],  # extra peak: fail
                  [in_plane(24.9)],                # just inside the threshold: success
                  [in_plane(25.1)],                # just outside: fail
                  [],                              # no fibre, no peak: success
                  length=5)
    match = match_peaks(pred, true, threshold_deg=25)
    np.testing.assert_array_equal(match["success"], [True, False, False, True, False, True])
    np.testing.assert_array_equal(match["tp"], [2, 1, 2, 1, 0, 0])
    np.testing.assert_array_equal(match["fn"], [0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(match["fp"], [0, 1, 1, 0, 1, 0])
    # A stricter threshold turns the first voxel into a failure.
    assert not match_peaks(pred, true, threshold_deg=20)["success"][0]


def test_nan_and_zero_padding_and_empty_voxels():
    true = padded([in_plane(0)], [], [in_plane(0), in_plane(90)], length=3).reshape(3, 1, 3, 3)
    pred = np.zeros((3, 1, 4, 3))  # DIPY's zero padding
    pred[0, 0, 0] = in_plane(10)
    pred[2, 0, 1] = in_plane(80)
    pred[2, 0, 2] = [np.nan] * 3
    errors = angular_errors(pred, true)
    assert errors.shape == (3, 1)
    np.testing.assert_allclose(errors[0], [10.0])
    assert np.isnan(errors[1, 0])  # no ground-truth fibre
    np.testing.assert_allclose(errors[2], [(80 + 10) / 2])
    np.testing.assert_array_equal(count_directions(pred)[:, 0], [1, 0, 1])
    np.testing.assert_array_equal(count_directions(true)[:, 0], [1, 0, 2])
    # A voxel with fibres and no peak scores the worst angle.
    np.testing.assert_allclose(angular_errors(np.full((1, 2, 3), np.nan),
                                              padded([in_plane(0)], length=2)), [90.0])


def test_crossing_angles():
    true = padded([in_plane(0), in_plane(50), in_plane(130)], [in_plane(0), in_plane(100)],
                  [in_plane(0)], length=3)
    angles = crossing_angles(true)
    np.testing.assert_allclose(angles[:2], [50, 80])
    assert np.isnan(angles[2])


def test_evaluate_peaks_splits_by_fibre_count_and_angle():
    true = padded([in_plane(0)], [in_plane(0), in_plane(40)], [in_plane(0), in_plane(80)],
                  [in_plane(0)], length=3)
    pred = padded([in_plane(4)], [in_plane(10)], [in_plane(6), in_plane(80)],
                  [in_plane(2)], length=5)
    mask = np.array([True, True, True, False])
    result = evaluate_peaks(pred, true, mask=mask)
    overall = result["all"]
    assert overall["n_voxels"] == 3
    errors = [4, (10 + 30) / 2, 3]
    np.testing.assert_allclose(overall["angular_error"], np.mean(errors))
    np.testing.assert_allclose(overall["angular_error_median"], np.median(errors))
    np.testing.assert_allclose(overall["success_rate"], 2 / 3)
    assert (overall["tp"], overall["fp"], overall["fn"]) == (4, 0, 1)
    np.testing.assert_allclose(overall["fn_rate"], 1 / 5)
    np.testing.assert_allclose(overall["fp_rate"], 0.0)
    assert set(result["by_n_fibres"]) == {1, 2}
    assert result["by_n_fibres"][1]["n_voxels"] == 1
    np.testing.assert_allclose(result["crossing"]["angular_error"], (20 + 3) / 2)
    bins = result["by_crossing_angle"]
    assert bins[(30.0, 45.0)]["n_voxels"] == 1 and bins[(75.0, 90.0)]["n_voxels"] == 1
    assert bins[(30.0, 45.0)]["success_rate"] == 0 and bins[(75.0, 90.0)]["success_rate"] == 1
    assert bins[(45.0, 60.0)]["n_voxels"] == 0 and np.isnan(bins[(45.0, 60.0)]["angular_error"])


def test_threshold_sweep_on_known_two_fibre_fodfs():
    sphere = get_sphere(name="repulsion724")
    evals = np.array([[1.7e-3, 0.2e-3, 0.2e-3]] * 2)
    angles = [(90, 0), (90, 75)]
    odf = multi_tensor_odf(sphere.vertices, evals, angles, [70, 30])
    coeffs = sf_to_sh(odf, sphere, sh_order_max=8, basis_type="descoteaux07", legacy=False)
    coeffs = np.tile(coeffs, (2, 3, 1))
    true_dirs = np.tile(np.array([[sphere2cart(1, np.radians(t), np.radians(p))
                                   for t, p in angles] + [NAN]]), (2, 3, 1, 1))
    sweep = threshold_sweep(coeffs, true_dirs, thresholds=[0.1, 0.3, 0.95])
    success = [r["all"]["success_rate"] for r in sweep["results"]]
    fn = [r["all"]["fn"] for r in sweep["results"]]
    # Low thresholds keep the 30% fibre, 0.95 drops it in every voxel.
    assert success == [1.0, 1.0, 0.0] and fn == [0, 0, 6]
    assert sweep["best_threshold"] in (0.1, 0.3)
    assert sweep["results"][0]["all"]["angular_error"] < 3
    with pytest.raises(ValueError, match="mask"):
        threshold_sweep(coeffs, true_dirs, mask=np.ones(6, bool))


def test_fraction_metrics_against_hand_and_scipy():
    true = np.array([[0.6, 0.3, 0.1], [0.0, 0.5, 0.5]])
    pred = np.array([[0.5, 0.4, 0.1], [0.1, 0.4, 0.5]])
    np.testing.assert_allclose(fraction_absolute_errors(pred, true),
                               [[0.1, 0.1, 0.0], [0.1, 0.1, 0.0]])
    kl = fraction_kl_divergence(pred, true, eps=1e-12)
    np.testing.assert_allclose(kl[0], entropy(true[0], pred[0]))
    np.testing.assert_allclose(kl[1], entropy(true[1], pred[1]), atol=1e-9)
    np.testing.assert_allclose(fraction_kl_divergence(true, true), 0, atol=1e-12)
    summary = evaluate_fractions(pred, true, mask=np.array([True, False]))
    np.testing.assert_allclose(summary["mae"], 0.2 / 3)
    np.testing.assert_allclose([summary["mae_wm"], summary["mae_gm"], summary["mae_csf"]],
                               [0.1, 0.1, 0.0])
    np.testing.assert_allclose(summary["kl"], entropy(true[0], pred[0]))
    with pytest.raises(ValueError, match="pred_fractions and true_fractions"):
        fraction_absolute_errors(pred[:, :2], true)
    with pytest.raises(ValueError, match="tissues"):
        evaluate_fractions(pred, true, tissues=("wm", "gm"))


def test_roc_auc_and_average_precision_against_hand_computation():
    rng = np.random.default_rng(0)
    labels = rng.random((6, 7)) < 0.3
    scores = np.round(rng.random((6, 7)) + 0.4 * labels, 1)  # rounded: ties happen
    positives, negatives = scores[labels], scores[~labels]
    pairs = positives[:, None] - negatives[None, :]
    expected_auc = np.mean((pairs > 0) + 0.5 * (pairs == 0))
    np.testing.assert_allclose(roc_auc(scores, labels), expected_auc)

    # Ranked 0.9 (+), 0.8 (-), 0.7 (+), 0.6 (-): precision 1 at recall 1/2,
    # 2/3 at recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3.
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(ap, 0.5 + 0.5 * 2 / 3)
    # The mask drops the negative at 0.8: perfect ranking.
    mask = np.array([True, False, True, True])
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]),
                             mask=mask) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="labels must be binary"):
        roc_auc(np.ones(3), np.array([0, 1, 2]))


def test_dice_known_values():
    prediction = np.zeros(10, bool)
    truth = np.zeros(10, bool)
    prediction[[1, 2, 3]] = True
    truth[[2, 3, 4, 5]] = True
    np.testing.assert_allclose(dice(prediction, truth), 2 * 2 / 7)
    assert dice(truth, truth) == 1.0
    assert dice(prediction, ~prediction) == 0.0
    assert dice(np.zeros(4), np.zeros(4)) == 1.0
    np.testing.assert_allclose(dice(prediction, truth, mask=np.arange(10) < 4), 2 * 2 / 5)
    with pytest.raises(ValueError, match="prediction and truth"):
        dice(prediction, truth[:5])
    with pytest.raises(ValueError, match="prediction must be binary"):
        dice(np.full(10, 0.5), truth)


def test_bad_direction_input_names_the_argument():
    with pytest.raises(ValueError, match="pred_dirs"):
        angular_errors(np.zeros((4, 2)), np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match="same voxels"):
        match_peaks(np.zeros((4, 5, 3)), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="threshold_deg"):
        match_peaks(np.zeros((4, 5, 3)), np.zeros((4, 3, 3)), threshold_deg=0)
    with pytest.raises(ValueError, match="crossing_angle_edges"):
        evaluate_peaks(np.zeros((4, 5, 3)), np.zeros((4, 3, 3)), crossing_angle_edges=[30, 0])


# -- tractography scores ------------------------------------------------------

def _line(*corners, step=0.5):
    """Polyline through the corners, sampled every ``step`` voxels."""
    corners = np.asarray(corners, dtype=float)
    pieces = [a + np.linspace(0, 1, max(2, int(np.linalg.norm(b - a) / step) + 1))[:-1, None]
              * (b - a) for a, b in zip(corners[:-1], corners[1:])]
    return np.concatenate(pieces + [corners[-1:]])


@pytest.fixture(scope="module")
def two_bundles():
    """Bundle 0 along x (3 x 3 section), bundle 1 along y, with their end regions."""
    shape = (20, 10, 10)
    masks = np.zeros((2,) + shape, dtype=bool)
    masks[0, 2:18, 3:6, 3:6] = True
    masks[1, 8:11, 1:9, 6:9] = True
    regions = np.zeros((2, 2) + shape, dtype=bool)
    regions[0, 0, 2:4, 3:6, 3:6] = regions[0, 1, 16:18, 3:6, 3:6] = True
    regions[1, 0, 8:11, 1:3, 6:9] = regions[1, 1, 8:11, 7:9, 6:9] = True
    dirs = np.full(shape + (2, 3), np.nan)
    dirs[masks[0], 0] = [1.0, 0, 0]
    dirs[masks[1], 0] = [0, 1.0, 0]
    return masks, regions, dirs


def test_score_tractogram_counts_connections_overlap_and_overreach(two_bundles):
    masks, regions, dirs = two_bundles
    straight = _line((2, 4, 4), (17, 4, 4))                     # VC of bundle 0
    backwards = _line((17, 3, 3), (2, 3, 3))                    # VC, other direction
    jump = _line((2, 4, 4), (9, 4, 4), (9, 4, 7), (9, 8, 7))    # bundle 0 -> bundle 1: IC
    stops = _line((2, 5, 5), (9, 5, 5))                         # ends mid-bundle: NC
    # VC that leaves the bundle (z 6 and 7) for 9 voxels on its way.
    detour = _line((2, 4, 4), (6, 4, 4), (6, 4, 7), (12, 4, 7), (12, 4, 4), (17, 4, 4))
    lines = [straight, backwards, jump, stops, detour]
    pairs = [(r[0], r[1]) for r in regions]
    scores = score_tractogram(lines, pairs, bundle_masks=masks, fibre_dirs=dirs)
    assert (scores["vc"], scores["ic"], scores["nc"]) == (3, 1, 1)
    assert scores["vc_rate"] == pytest.approx(0.6)
    assert (scores["valid_bundles"], scores["invalid_bundles"]) == (1, 1)
    size = masks[0].sum()
    first = scores["per_bundle"][0]
    assert first["vc"] == 3
    assert first["overlap"] == pytest.approx(34 / size)
    assert first["overreach"] == pytest.approx(9 / size)
    assert scores["per_bundle"][1] == {"vc": 0, "overlap": 0.0, "overreach": 0.0}
    assert scores["overlap"] == pytest.approx(17 / size)

    # The same in world coordinates, through an affine.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 1]
    world = [line @ affine[:3, :3].T + affine[:3, 3] for line in lines]
    moved = score_tractogram(world, pairs, bundle_masks=masks, fibre_dirs=dirs, affine=affine)
    for key in ("vc", "ic", "nc", "overlap", "overreach", "steps_along_fibres"):
        assert moved[key] == pytest.approx(scores[key])


@pytest.mark.parametrize("angle, expected", [(0, 1.0), (20, 1.0), (30, 0.0), (90, 0.0)])
def test_score_tractogram_local_directions(two_bundles, angle, expected):
    masks, regions, dirs = two_bundles
    tilt = np.radians(angle)
    start = np.array([10.0, 4.0, 4.0])
    line = _line(start, start + 1.0 * np.array([np.cos(tilt), np.sin(tilt), 0]), step=0.1)
    scores = score_tractogram([line], [(r[0], r[1]) for r in regions], fibre_dirs=dirs)
    assert scores["steps_along_fibres"] == expected
    assert scores["steps_off_fibres"] == 0.0
    assert scores["nc"] == 1 and np.isnan(scores["overlap"])
    # Outside every bundle no step has a fibre.
    away = score_tractogram([line + [0, 5, 0]], [(r[0], r[1]) for r in regions],
                            fibre_dirs=dirs)
    assert away["steps_off_fibres"] == 1.0 and np.isnan(away["steps_along_fibres"])


def test_score_tractogram_on_the_heldout_phantom():
    # The phantom's own streamlines are all valid; streamlines that jump from
    # one bundle to another are invalid.
    phantom = make_heldout_phantom((24, 24, 24), snr=None, n_bundles=4)
    truth = score_tractogram(phantom.streamlines, phantom.end_regions,
                             bundle_masks=phantom.bundle_masks, fibre_dirs=phantom.fibre_dirs)
    assert truth["vc_rate"] == 1.0 and truth["valid_bundles"] == 4
    assert truth["invalid_bundles"] == 0
    assert min(b["overlap"] for b in truth["per_bundle"]) > 0.3
    assert truth["overreach"] < 0.35
    assert truth["steps_along_fibres"] > 0.9

    jumps = []
    for a, first in enumerate(phantom.bundles):
        for b, second in enumerate(phantom.bundles):
            if a == b:
                continue
            start, end = first.streamlines[0][0], second.streamlines[0][-1]
            # Only jumps whose ends no single bundle joins.
            start_voxel, end_voxel = tuple(np.round(start).astype(int)), tuple(
                np.round(end).astype(int))
            if any(s[start_voxel] and e[end_voxel] or e[start_voxel] and s[end_voxel]
                   for s, e in phantom.end_regions):
                continue
            jumps.append(np.concatenate([first.streamlines[0][:len(first.streamlines[0]) // 2],
                                         second.streamlines[0][len(second.streamlines[0]) // 2:]]))
    assert len(jumps) >= 6
    jumped = score_tractogram(jumps, phantom.end_regions)
    assert jumped["ic"] == len(jumps) and jumped["vc"] == 0


def test_score_tractogram_bad_input(two_bundles):
    masks, regions, _ = two_bundles
    pairs = [(r[0], r[1]) for r in regions]
    with pytest.raises(ValueError, match="one \\(start, end\\) pair"):
        score_tractogram([], [regions[0, 0]])
    with pytest.raises(ValueError, match="bundle_masks must be 2 binary volumes"):
        score_tractogram([], pairs, bundle_masks=masks[:1])
    with pytest.raises(ValueError, match="streamlines must be arrays of shape"):
        score_tractogram([np.zeros((4, 2))], pairs)
    with pytest.raises(ValueError, match="angle_deg"):
        score_tractogram([], pairs, angle_deg=0)
    empty = score_tractogram([], pairs)
    assert empty["n_streamlines"] == 0 and np.isnan(empty["vc_rate"])
