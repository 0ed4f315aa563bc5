import warnings

import healpy as hp
import numpy as np
import pytest
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.core.sphere import Sphere
from dipy.data import get_3shell_gtab, get_isbi2013_2shell_gtab
from dipy.reconst.csdeconv import forward_sdeconv_mat
from dipy.reconst.shm import real_sh_tournier, sf_to_sh, sh_to_sf, sph_harm_ind_list
from dipy.sims.voxel import single_tensor
from scipy.special import eval_legendre

from esdmri.shm import (ShellInterpolator, convolve_sh, count_unique_axes,
                        descoteaux_to_tournier, group_shells, n_coeffs, sh_matrix,
                        sh_order_for_directions, tournier_to_descoteaux)


def healpix_vertices(nside):
    return np.stack(hp.pix2vec(nside, np.arange(12 * nside**2), nest=True), axis=1)


@pytest.fixture(scope="module")
def gtab_3shell():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_3shell_gtab()


@pytest.fixture(scope="module")
def gtab_isbi():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_isbi2013_2shell_gtab()


def test_coefficient_counts():
    assert [n_coeffs(order) for order in (0, 2, 4, 6, 8, 20)] == [1, 6, 15, 28, 45, 231]
    assert sh_order_for_directions(5) == 0
    assert sh_order_for_directions(6) == 2
    assert sh_order_for_directions(27) == 4
    assert sh_order_for_directions(28) == 6
    assert sh_order_for_directions(64) == 8
    assert sh_order_for_directions(64, cap=12) == 8
    assert sh_order_for_directions(300, cap=12) == 12
    with pytest.raises(ValueError, match="sh_order_max"):
        n_coeffs(3)
    with pytest.raises(ValueError, match="n_directions"):
        sh_order_for_directions(0)


def test_unique_axes_ignore_antipodes_and_repeats():
    axes = np.eye(3)
    directions = np.vstack([axes, -axes, axes * 2.0, [[1.0, 1.0, 0.0]]])
    assert count_unique_axes(directions) == 4


@pytest.mark.parametrize("nside", [4, 16])
def test_sh_matrix_matches_dipy_and_is_orthonormal_on_healpix(nside):
    vertices = healpix_vertices(nside)
    coeffs = np.random.default_rng(0).normal(size=(3, n_coeffs(8)))
    samples = coeffs @ sh_matrix(8, vertices).T
    sphere = Sphere(xyz=vertices)
    np.testing.assert_allclose(
        samples, sh_to_sf(coeffs, sphere, sh_order_max=8, basis_type="descoteaux07",
                          legacy=False), atol=1e-12)
    refit = sf_to_sh(samples, sphere, sh_order_max=8, basis_type="descoteaux07", legacy=False)
    np.testing.assert_allclose(refit, coeffs, atol=1e-10)
    if nside == 16:
        # Equal-area HEALPix pixels integrate band-limited products well:
        # the Gram matrix of an orthonormal basis is the identity.
        basis = sh_matrix(8, vertices)
        gram = 4 * np.pi / len(vertices) * basis.T @ basis
        np.testing.assert_allclose(gram, np.eye(n_coeffs(8)), atol=2e-2)


def test_sh_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="basis"):
        sh_matrix(4, np.eye(3), basis="mrtrix")
    with pytest.raises(ValueError, match="vertices"):
        sh_matrix(4, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="vertices"):
        sh_matrix(4, np.ones((2, 2)))
    with pytest.raises(TypeError, match="sh_order_max"):
        sh_matrix(4.0, np.eye(3))


def test_group_shells_on_dipy_tables(gtab_3shell, gtab_isbi):
    shell_bvals, shell_index = group_shells(gtab_3shell)
    np.testing.assert_allclose(shell_bvals, [0, 1000, 2000, 3500], atol=1e-2)
    np.testing.assert_array_equal(np.bincount(shell_index), [1, 64, 64, 64])
    np.testing.assert_allclose(shell_bvals[shell_index], gtab_3shell.bvals, atol=1e-2)
    shell_bvals, shell_index = group_shells(gtab_isbi)
    np.testing.assert_allclose(shell_bvals, [0, 1500, 2500])
    np.testing.assert_array_equal(np.bincount(shell_index), [1, 27, 36])


def test_group_shells_with_jittered_bvals_and_b0_threshold():
    rng = np.random.default_rng(1)
    bvals = np.concatenate([[0, 5, 40], 1000 + rng.uniform(-8, 8, 20),
                            2500 + rng.uniform(-8, 8, 20)])
    order = rng.permutation(len(bvals))
    bvals = bvals[order]
    bvecs = rng.normal(size=(len(bvals), 3))
    gtab = gradient_table(bvals, bvecs=bvecs / np.linalg.norm(bvecs, axis=1)[:, None],
                          b0_threshold=50)
    shell_bvals, shell_index = group_shells(gtab)
    expected_index = np.digitize(bvals, [50, 1500])
    np.testing.assert_array_equal(shell_index, expected_index)
    np.testing.assert_allclose(shell_bvals, [np.mean(bvals[expected_index == s])
                                             for s in range(3)])
    # DIPY's own clustering of the weighted volumes finds the same shells.
    assert len(unique_bvals_tolerance(bvals[bvals > 50])) == 2
    # A lower b0 threshold turns b = 40 into its own shell.
    shell_bvals, shell_index = group_shells(gtab, b0_threshold=10)
    np.testing.assert_allclose(shell_bvals[:2], [2.5, 40])
    assert len(shell_bvals) == 4


def band_limited_signal(gtab, shell_index, shell_orders, rng):
    """Signal whose shell s is a random even SH function of order shell_orders[s]."""
    coeffs = [rng.normal(size=n_coeffs(order)) for order in shell_orders]
    signal = np.empty(len(gtab.bvals))
    for shell, order in enumerate(shell_orders):
        volumes = shell_index == shell
        if shell == 0:
            signal[volumes] = coeffs[0][0]
        else:
            signal[volumes] = sh_matrix(order, gtab.bvecs[volumes]) @ coeffs[shell]
    return signal, coeffs


@pytest.mark.parametrize("name", ["3shell", "isbi"])
def test_interpolator_is_exact_for_band_limited_shells(name, gtab_3shell, gtab_isbi):
    gtab = {"3shell": gtab_3shell, "isbi": gtab_isbi}[name]
    vertices = healpix_vertices(8)
    interpolator = ShellInterpolator(gtab, vertices)
    expected_orders = {"3shell": [0, 8, 8, 8], "isbi": [0, 4, 6]}[name]
    np.testing.assert_array_equal(interpolator.shell_sh_orders, expected_orders)
    assert interpolator.operator.shape == (len(expected_orders), len(vertices),
                                           len(gtab.bvals))
    signal, coeffs = band_limited_signal(gtab, interpolator.shell_index, expected_orders,
                                         np.random.default_rng(2))
    grid = interpolator(signal)
    assert grid.shape == (len(expected_orders), len(vertices))
    np.testing.assert_allclose(grid[0], coeffs[0][0], atol=1e-12)
    for shell, order in enumerate(expected_orders[1:], start=1):
        np.testing.assert_allclose(grid[shell], sh_matrix(order, vertices) @ coeffs[shell],
                                   atol=1e-9)


def test_interpolator_matches_dipy_fit_of_tensor_signal(gtab_3shell):
    """A non band-limited signal: same as DIPY's sf_to_sh + sh_to_sf per shell."""
    evecs = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    signal = single_tensor(gtab_3shell, 100.0, evals=np.array([1.7e-3, 0.3e-3, 0.2e-3]),
                           evecs=evecs)
    vertices = healpix_vertices(4)
    target = Sphere(xyz=vertices)
    interpolator = ShellInterpolator(gtab_3shell, vertices, sh_order_cap=6)
    grid = interpolator(np.stack([signal, 2 * signal]))
    shell_bvals, shell_index = group_shells(gtab_3shell)
    for shell in range(1, len(shell_bvals)):
        volumes = shell_index == shell
        coeffs = sf_to_sh(signal[volumes], Sphere(xyz=gtab_3shell.bvecs[volumes]),
                          sh_order_max=6, basis_type="descoteaux07", legacy=False)
        reference = sh_to_sf(coeffs, target, sh_order_max=6, basis_type="descoteaux07",
                             legacy=False)
        np.testing.assert_allclose(grid[0, shell], reference, rtol=1e-9)
        np.testing.assert_allclose(grid[1, shell], 2 * reference, rtol=1e-9)
    np.testing.assert_allclose(grid[:, 0], np.broadcast_to([[100.0], [200.0]], (2, 192)))


def test_interpolator_b0_channel_is_b0_mean_and_keeps_float32(gtab_isbi):
    bvals = np.concatenate([[0, 0, 0], gtab_isbi.bvals[1:]])
    bvecs = np.concatenate([np.zeros((3, 3)), gtab_isbi.bvecs[1:]])
    gtab = gradient_table(bvals, bvecs=bvecs)
    interpolator = ShellInterpolator(gtab, healpix_vertices(2))
    data = np.random.default_rng(4).uniform(size=(2, 3, len(bvals))).astype(np.float32)
    grid = interpolator(data)
    assert grid.dtype == np.float32 and grid.shape == (2, 3, 3, 48)
    np.testing.assert_allclose(grid[..., 0, :], np.repeat(data[..., :3].mean(-1)[..., None],
                                                          48, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(grid, interpolator(data.astype(np.float64)), rtol=1e-4,
                               atol=1e-5)


def test_interpolator_rejects_bad_input(gtab_isbi):
    with pytest.raises(ValueError, match="only 27"):
        ShellInterpolator(gtab_isbi, healpix_vertices(2), sh_order_max=6)
    interpolator = ShellInterpolator(gtab_isbi, healpix_vertices(2), sh_order_max=4)
    np.testing.assert_array_equal(interpolator.shell_sh_orders, [0, 4, 4])
    with pytest.raises(ValueError, match=r"data must have shape \(\.\.\., 64\)"):
        interpolator(np.zeros((5, 63)))


def test_ill_conditioned_shell_gets_regularised():
    # Directions crowded around the pole: plain least squares at order 4
    # would be hopelessly ill-conditioned.
    rng = np.random.default_rng(5)
    bvecs = np.array([0.0, 0.0, 1.0]) + 0.15 * rng.normal(size=(20, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1)[:, None]
    gtab = gradient_table(np.concatenate([[0], np.full(20, 1000.0)]),
                          bvecs=np.vstack([[0, 0, 0], bvecs]))
    interpolator = ShellInterpolator(gtab, healpix_vertices(2))
    assert interpolator.shell_sh_orders[1] == 4
    assert interpolator.shell_smooth[1] > 0
    assert np.abs(interpolator.operator).max() < 1e3


def test_convolution_matches_dipy_kernel_and_funk_hecke():
    rng = np.random.default_rng(6)
    zonal = np.array([3.0, -1.2, 0.4, -0.1])  # l = 0, 2, 4, 6
    coeffs = rng.normal(size=(4, n_coeffs(8)))
    _, l_values = sph_harm_ind_list(8)
    # DIPY's CSD kernel: r_rh = r_l / Y_l0(z) on the diagonal.
    r_rh = zonal / np.sqrt((2 * np.arange(0, 7, 2) + 1) / (4 * np.pi))
    dipy_kernel = forward_sdeconv_mat(np.append(r_rh, 0.0), l_values)
    np.testing.assert_allclose(convolve_sh(coeffs, zonal, 8), coeffs @ dipy_kernel.T,
                               atol=1e-12)
    # Funk-Hecke: a delta along u convolves to sum_l r_l sqrt((2l+1)/4pi) P_l(u.v).
    u = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    vertices = healpix_vertices(4)
    delta = sh_matrix(8, u[None, :])[0]
    values = convolve_sh(delta, zonal, 8) @ sh_matrix(8, vertices).T
    cosines = vertices @ u
    expected = sum(r * np.sqrt((4 * k + 1) / (4 * np.pi)) * eval_legendre(2 * k, cosines)
                   for k, r in enumerate(zonal))
    np.testing.assert_allclose(values, expected, atol=1e-12)
    # Per-shell kernels broadcast over a shell axis.
    kernels = np.stack([zonal, 2 * zonal])
    np.testing.assert_allclose(convolve_sh(coeffs[:, None, :], kernels, 8)[:, 1],
                               2 * convolve_sh(coeffs, zonal, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 45\)"):
        convolve_sh(coeffs[:, :44], zonal, 8)


@pytest.mark.parametrize("sh_order_max", [2, 8, 12])
def test_basis_conversion_preserves_the_function(sh_order_max):
    vertices = healpix_vertices(4)
    coeffs = np.random.default_rng(7).normal(size=(5, n_coeffs(sh_order_max)))
    tournier = descoteaux_to_tournier(coeffs, sh_order_max)
    theta = np.arccos(vertices[:, 2])
    phi = np.arctan2(vertices[:, 1], vertices[:, 0])
    tournier_basis, _, _ = real_sh_tournier(sh_order_max, theta, phi, legacy=False)
    np.testing.assert_allclose(tournier @ tournier_basis.T,
                               coeffs @ sh_matrix(sh_order_max, vertices).T, atol=1e-10)
    np.testing.assert_allclose(tournier_to_descoteaux(tournier, sh_order_max), coeffs,
                               atol=1e-12)
    m_values, _ = sph_harm_ind_list(sh_order_max)
    # Zonal coefficients are shared by both bases; the others really move.
    np.testing.assert_array_equal(tournier[:, m_values == 0], coeffs[:, m_values == 0])
    assert not np.allclose(tournier, coeffs)


def test_descoteaux_to_legacy_matches_dipy_default_basis():
    from dipy.data import default_sphere
    from dipy.reconst.shm import sh_to_sf

    from esdmri.shm import descoteaux_to_legacy

    coeffs = np.random.default_rng(7).normal(size=(4, 45))
    expected = coeffs @ sh_matrix(8, default_sphere.vertices).T
    # DIPY's sh_to_sf with default arguments reads the legacy basis.
    with np.testing.suppress_warnings() as sup:
        sup.filter(PendingDeprecationWarning)
        got = sh_to_sf(descoteaux_to_legacy(coeffs, 8), default_sphere, sh_order_max=8)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert not np.allclose(descoteaux_to_legacy(coeffs, 8), coeffs)
