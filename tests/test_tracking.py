import numpy as np
import pytest
from dipy.data import default_sphere

from esdmri.shm import descoteaux_to_legacy, sh_matrix
from esdmri.tracking import sh_peak_amplitude, track

SH_ORDER = 8


def lobe(direction, kappa=60.0):
    """Legacy descoteaux07 SH (C,) of one sharp lobe along ``direction``."""
    vertices = default_sphere.vertices
    values = np.exp(-kappa * (1 - (vertices @ np.asarray(direction, float))**2))
    coeffs, *_ = np.linalg.lstsq(sh_matrix(SH_ORDER, vertices), values, rcond=None)
    return descoteaux_to_legacy(coeffs, SH_ORDER)


@pytest.fixture(scope="module")
def fibre_along_x():
    shape = (12, 3, 3)
    return np.broadcast_to(lobe([1.0, 0.0, 0.0]), shape + (45,)).copy(), np.ones(shape)


@pytest.mark.parametrize("tracker", ["det", "prob"])
def test_track_follows_a_straight_fibre(fibre_along_x, tracker):
    shm_coeff, stop_map = fibre_along_x
    seeds = np.zeros(stop_map.shape, bool)
    seeds[6, 1, 1] = True
    streamlines = track(shm_coeff, np.eye(4), stop_map, threshold=0.5, seed_mask=seeds,
                        tracker=tracker, min_length=1.0)
    assert len(streamlines) == 1
    points = streamlines[0]
    # From one end of the grid to the other, along x (within half a voxel:
    # the trackers step along directions of DIPY's default sphere).
    assert points[:, 0].min() < 0.5 and points[:, 0].max() > 10.5
    np.testing.assert_allclose(points[:, 1:], 1.0, atol=0.5)
    assert len(track(shm_coeff, np.eye(4), stop_map, threshold=0.5, seed_mask=seeds,
                     min_length=20.0)) == 0


def test_track_seeds_where_the_stop_map_exceeds_the_threshold(fibre_along_x):
    shm_coeff, stop_map = fibre_along_x
    stop_map = np.zeros_like(stop_map)
    stop_map[:, 1, 1] = 1.0
    streamlines = track(shm_coeff, np.eye(4), stop_map, threshold=0.5, min_length=1.0)
    assert len(streamlines) == 12
    with pytest.raises(ValueError, match="no seed voxel"):
        track(shm_coeff, np.eye(4), stop_map, threshold=2.0)


@pytest.mark.parametrize("options, message", [
    ({"tracker": "eudx"}, "tracker must be one of det, prob"),
    ({"step_size": 0}, "step_size must be > 0"),
    ({"max_angle": 120}, r"max_angle must be in \(0, 90\]"),
    ({"min_length": 5.0, "max_length": 5.0}, "min_length < max_length"),
    ({"stop_map": np.ones((2, 2, 2))}, "the stopping map has shape"),
    ({"seed_mask": np.ones((2, 2, 2), bool)}, "the seed mask has shape"),
    ({"seed_mask": np.zeros((12, 3, 3), bool)}, "no seed voxel"),
])
def test_track_refuses_bad_input(fibre_along_x, options, message):
    shm_coeff, stop_map = fibre_along_x
    options = {"stop_map": stop_map, **options}
    with pytest.raises(ValueError, match=message):
        track(shm_coeff, np.eye(4), **options)


def test_peak_amplitude_is_relative_to_the_bright_voxels():
    shm_coeff = np.broadcast_to(lobe([0.0, 0.0, 1.0]), (10, 2, 2, 45)).copy()
    shm_coeff[5:] *= 0.05
    shm_coeff[9] *= -1  # no positive fODF value: amplitude 0
    amplitude = sh_peak_amplitude(shm_coeff)
    np.testing.assert_allclose(amplitude[:5], 1.0, rtol=1e-6)
    np.testing.assert_allclose(amplitude[5:9], 0.05, rtol=1e-6)
    assert np.all(amplitude[9] >= 0) and np.all(amplitude[9] < 0.05)
    np.testing.assert_array_equal(sh_peak_amplitude(np.zeros((2, 2, 2, 45))), 0)
