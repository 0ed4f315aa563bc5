import numpy as np
import pytest
from dipy.data import get_3shell_gtab
from dipy.sims.voxel import single_tensor
from scipy.integrate import quad

from esdmri.heldout_phantom import make_heldout_phantom, watson_axes
from esdmri.sims import default_gtab

SHAPE = (24, 24, 24)


@pytest.fixture(scope="module")
def phantom():
    return make_heldout_phantom(SHAPE, snr=20, seed=1, geometry_seed=3)


def axis_angle(a, b):
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=-1)), 0, 1)))


@pytest.mark.parametrize("kappa", [2.0, 8.0, 30.0])
def test_watson_sampler_matches_the_density(kappa):
    # E[(mu . n)^2] of a Watson distribution, by quadrature of exp(kappa t^2).
    weight = quad(lambda t: np.exp(kappa * (t * t - 1)), 0, 1)[0]
    expected = quad(lambda t: t * t * np.exp(kappa * (t * t - 1)), 0, 1)[0] / weight
    rng = np.random.default_rng(0)
    mean = np.tile([[0.0, 0.6, 0.8]], (200, 1))
    axes = watson_axes(mean, np.full(200, kappa), 100, rng)
    np.testing.assert_allclose(np.linalg.norm(axes, axis=-1), 1, atol=1e-12)
    cosine2 = np.einsum("vnk,vk->vn", axes, mean) ** 2
    assert abs(cosine2.mean() - expected) < 0.01
    # Uniform azimuth: the mean resultant of the perpendicular parts vanishes.
    perpendicular = axes - np.einsum("vn,vk->vnk", np.einsum("vnk,vk->vn", axes, mean), mean)
    assert np.linalg.norm(perpendicular.mean(axis=(0, 1))) < 0.02


def test_ground_truth_is_consistent(phantom):
    wm = phantom.tissue_fractions[..., 0] > 0
    np.testing.assert_allclose(phantom.tissue_fractions[phantom.mask].sum(-1), 1, atol=1e-9)
    assert np.all(phantom.tissue_fractions >= 0)
    np.testing.assert_allclose(phantom.fibre_fractions[wm].sum(-1), 1, atol=1e-9)
    np.testing.assert_array_equal(phantom.n_fibres > 0, wm)
    counts = np.bincount(phantom.n_fibres.ravel(), minlength=4)
    assert counts[2] > 50 and counts[3] > 5, counts
    # Populations closer than the smallest crossing angle are merged.
    angles = phantom.crossing_angle[np.isfinite(phantom.crossing_angle)]
    assert angles.min() >= 30 and angles.max() > 75
    dirs = phantom.fibre_dirs[wm][:, 0]
    # Through-plane fibres as well as in-plane ones.
    assert np.mean(np.abs(dirs[:, 2]) > 0.7) > 0.05 and np.mean(np.abs(dirs[:, 2]) < 0.3) > 0.1
    axial, radial = phantom.wm_axial[wm], phantom.wm_radial[wm]
    assert 1.4e-3 <= axial.min() and axial.max() <= 2.1e-3 and np.ptp(axial) > 0.2e-3
    assert 0.2e-3 <= radial.min() and radial.max() <= 0.6e-3 and np.ptp(radial) > 0.1e-3
    assert any(bundle.fan_angle > 0 for bundle in phantom.bundles)
    assert phantom.data.shape == SHAPE + (len(default_gtab().bvals),)
    assert phantom.data.dtype == np.float32 and phantom.response is None


def test_streamlines_follow_the_fibres(phantom):
    # Ground-truth streamlines run along their bundle's fibres, fans included:
    # where their bundle is the only population, each step is within a few
    # degrees of the true direction, and both ends lie in the end regions.
    for bundle in phantom.bundles:
        starts, ends = bundle.end_regions
        errors = []
        for line in bundle.streamlines:
            first, last = np.round(line[[0, -1]]).astype(int)
            assert starts[tuple(first)] and ends[tuple(last)]
            steps = np.diff(line, axis=0)
            steps /= np.linalg.norm(steps, axis=1, keepdims=True)
            voxels = np.round((line[:-1] + line[1:]) / 2).astype(int)
            inside = bundle.mask[tuple(voxels.T)] & (phantom.n_fibres[tuple(voxels.T)] == 1)
            truth = phantom.fibre_dirs[tuple(voxels[inside].T)][:, 0]
            errors.append(axis_angle(steps[inside], truth))
        errors = np.concatenate(errors)
        assert errors.size > 100
        assert np.median(errors) < 3 and np.percentile(errors, 95) < 10, bundle.fan_angle


def test_end_regions_lie_at_the_bundle_ends(phantom):
    for bundle in phantom.bundles:
        starts, ends = bundle.end_regions
        assert starts.any() and ends.any() and not (starts & ends).any()
        line = bundle.centreline
        for region, outer in ((starts, slice(None, len(line) * 35 // 100 + 2)),
                              (ends, slice(len(line) * 65 // 100 - 2, None))):
            voxels = np.argwhere(region)
            nearest = np.linalg.norm(voxels[:, None] - line[None], axis=-1).argmin(axis=1)
            assert np.all(np.isin(nearest, np.arange(len(line))[outer]))
            # Near the brain surface: the region reaches no deeper than the
            # cortex plus a few voxels of WM.
            assert phantom.mask[tuple(voxels.T)].all()


@pytest.mark.parametrize("wm_model", ["tensor", "stick_zeppelin"])
def test_noise_free_single_fibre_signal_is_the_kernel(wm_model):
    # Without dispersion, a pure single-population voxel carries the chosen
    # kernel along the true direction with its local diffusivities (DIPY's
    # single_tensor for the tensor, the analytic stick + zeppelin otherwise),
    # on a gradient table that is not the package's.
    gtab = get_3shell_gtab()
    phantom = make_heldout_phantom((16, 16, 16), gtab=gtab, snr=None, n_bundles=2,
                                   kappa_range=(1e9, 1e9), wm_model=wm_model)
    one_bundle = np.sum(phantom.bundle_masks, axis=0) == 1
    pure = np.argwhere(one_bundle & (phantom.tissue_fractions[..., 0] > 0.999))
    assert len(pure) > 20
    for voxel in map(tuple, pure[:20]):
        direction = phantom.fibre_dirs[voxel][0]
        axial, radial = phantom.wm_axial[voxel], phantom.wm_radial[voxel]
        if wm_model == "tensor":
            helper = np.cross(direction, [1.0, 0, 0] if abs(direction[0]) < 0.9 else [0, 1.0, 0])
            helper /= np.linalg.norm(helper)
            evecs = np.stack([direction, helper, np.cross(direction, helper)], axis=1)
            expected = single_tensor(gtab, 100.0, evals=[axial, radial, radial], evecs=evecs)
        else:
            intra = 1 - radial / axial
            cosine2 = (gtab.bvecs @ direction) ** 2
            expected = 100 * (intra * np.exp(-gtab.bvals * axial * cosine2)
                              + (1 - intra) * np.exp(-gtab.bvals * (radial + (axial - radial)
                                                                     * cosine2)))
        np.testing.assert_allclose(phantom.data[voxel], expected, rtol=2e-4, atol=1e-3)


def test_dispersion_and_noise():
    clean = make_heldout_phantom((16, 16, 16), snr=None, n_bundles=2)
    noisy = make_heldout_phantom((16, 16, 16), snr=10, n_bundles=2)
    sharp = make_heldout_phantom((16, 16, 16), snr=None, n_bundles=2, kappa_range=(1e9, 1e9))
    # Same geometry and ground truth whatever the noise and dispersion.
    np.testing.assert_array_equal(clean.fibre_dirs, noisy.fibre_dirs)
    np.testing.assert_array_equal(clean.fibre_dirs, sharp.fibre_dirs)
    b0 = clean.gtab.b0s_mask
    background = ~clean.mask
    sigma = noisy.data[background][:, b0]
    # Rayleigh background: mean sigma sqrt(pi / 2) with sigma = 100 / 10.
    assert abs(sigma.mean() - 10 * np.sqrt(np.pi / 2)) < 0.5
    # Dispersion lowers the anisotropy: the signal of a pure voxel varies less.
    pure = (clean.n_fibres == 1) & (clean.tissue_fractions[..., 0] > 0.999)
    dwi = ~b0
    assert np.std(clean.data[pure][:, dwi], axis=1).mean() < np.std(
        sharp.data[pure][:, dwi], axis=1).mean()


def test_geometry_seed_changes_the_layout():
    a = make_heldout_phantom((16, 16, 16), snr=None, geometry_seed=0, n_bundles=3)
    b = make_heldout_phantom((16, 16, 16), snr=None, geometry_seed=1, n_bundles=3)
    overlap = np.sum((a.n_fibres > 0) & (b.n_fibres > 0)) / np.sum(a.n_fibres > 0)
    assert overlap < 0.9
    assert not np.allclose(a.bundles[0].centreline[0], b.bundles[0].centreline[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"wm_model": "ball"}, "wm_model"),
    ({"n_bundles": 0}, "n_bundles"),
    ({"crossing_angles": (60, 30)}, "crossing_angles"),
    ({"radial_range": (0.2e-3, 1.5e-3)}, "radial_range"),
    ({"max_fan_angle": 50}, "max_fan_angle"),
    ({"snr": -1}, "snr"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_heldout_phantom((16, 16, 16), **kwargs)
