import healpy as hp
import numpy as np
import pytest
from dipy.core.sphere import HemiSphere, Sphere

from esdmri.sphere import HealpixSphere

ROTATE_Z_90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def even_test_function(vertices):
    """Two fibre-like lobes: an even, smooth, non-trivial spherical function."""
    axis = np.array([0.3, 0.5, 0.81]) / np.linalg.norm([0.3, 0.5, 0.81])
    return np.exp(3 * (vertices @ axis) ** 2) + np.exp(5 * vertices[:, 0] ** 2)


@pytest.mark.parametrize("hemisphere", [False, True])
@pytest.mark.parametrize("nside", [1, 2, 4, 8])
def test_vertices_are_healpix_nested_centres(nside, hemisphere):
    sphere = HealpixSphere(nside, hemisphere)
    assert sphere.n_vertices == 12 * nside**2 // (2 if hemisphere else 1)
    np.testing.assert_allclose(np.linalg.norm(sphere.vertices, axis=1), 1, atol=1e-12)
    np.testing.assert_array_equal(
        hp.vec2pix(nside, *sphere.vertices.T, nest=True), sphere.pixels)


@pytest.mark.parametrize("nside", [1, 2, 4, 8])
def test_hemisphere_keeps_one_vertex_per_antipodal_pair(nside):
    sphere = HealpixSphere(nside, hemisphere=True)
    antipodes = hp.vec2pix(nside, *(-sphere.vertices.T), nest=True)
    assert not np.isin(antipodes, sphere.pixels).any()
    everything = np.union1d(sphere.pixels, antipodes)
    np.testing.assert_array_equal(everything, np.arange(12 * nside**2))


def test_to_dipy_types_and_vertices():
    full, half = HealpixSphere(4), HealpixSphere(4, hemisphere=True)
    assert type(full.to_dipy()) is Sphere
    assert isinstance(half.to_dipy(), HemiSphere)
    np.testing.assert_allclose(full.to_dipy().vertices, full.vertices, atol=1e-12)


@pytest.mark.parametrize("hemisphere", [False, True])
def test_adjacency_matches_healpy_neighbours(hemisphere):
    sphere = HealpixSphere(4, hemisphere)
    adjacency = sphere.adjacency().toarray()
    np.testing.assert_allclose(adjacency, adjacency.T)
    assert (adjacency >= 0).all() and (np.diag(adjacency) == 0).all()
    full = HealpixSphere(4)
    full_adjacency = full.adjacency().toarray()
    for pixel in [0, 17, 100, 191]:
        neighbours = hp.get_all_neighbours(4, pixel, nest=True)
        linked = np.flatnonzero(full_adjacency[pixel])
        np.testing.assert_array_equal(linked, np.unique(neighbours[neighbours >= 0]))


@pytest.mark.parametrize("hemisphere", [False, True])
@pytest.mark.parametrize("nside", [2, 4, 8])
def test_laplacian_symmetric_with_spectrum_in_unit_interval(nside, hemisphere):
    sphere = HealpixSphere(nside, hemisphere)
    laplacian = sphere.laplacian()
    np.testing.assert_allclose(laplacian, laplacian.T, atol=1e-14)
    np.testing.assert_allclose(sphere.laplacian(sparse=True).toarray(), laplacian)
    eigenvalues = np.linalg.eigvalsh(laplacian)
    assert eigenvalues.min() >= -1 - 1e-10 and eigenvalues.max() <= 1 + 1e-10
    # The constant function is in the kernel of the normalised Laplacian only
    # after degree weighting: its smallest eigenvalue maps to exactly -1.
    assert eigenvalues.min() == pytest.approx(-1, abs=1e-10)
    if not hemisphere:
        assert eigenvalues.max() == pytest.approx(1, abs=1e-10)


def test_laplacian_of_large_sphere_uses_iterative_eigensolver_consistently():
    sphere = HealpixSphere(16, hemisphere=True)
    eigenvalues = np.linalg.eigvalsh(sphere.laplacian())
    assert eigenvalues.min() == pytest.approx(-1, abs=1e-8)
    assert eigenvalues.max() <= 1 + 1e-8


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_chebyshev_basis_equals_polynomial_of_laplacian(kernel_size):
    sphere = HealpixSphere(2, hemisphere=True)
    basis = sphere.chebyshev_basis(kernel_size)
    assert basis.shape == (kernel_size, sphere.n_vertices, sphere.n_vertices)
    eigenvalues, eigenvectors = np.linalg.eigh(sphere.laplacian())
    for k in range(kernel_size):
        # T_k(cos t) = cos(k t): an independent route through the spectrum.
        spectral = eigenvectors @ np.diag(np.cos(k * np.arccos(np.clip(eigenvalues, -1, 1)))) \
            @ eigenvectors.T
        np.testing.assert_allclose(basis[k], spectral, atol=1e-10)


@pytest.mark.parametrize("nside", [1, 2, 4, 8])
def test_hemisphere_filters_equal_full_sphere_filters_on_even_signals(nside):
    full, half = HealpixSphere(nside), HealpixSphere(nside, hemisphere=True)
    signal = even_test_function(full.vertices)
    on_full = np.einsum("kuv,v->ku", full.chebyshev_basis(4), signal)[:, half.pixels]
    on_half = np.einsum("kuv,v->ku", half.chebyshev_basis(4), signal[half.pixels])
    np.testing.assert_allclose(on_half, on_full, atol=1e-10)


@pytest.mark.parametrize("hemisphere", [False, True])
def test_pooling_groups_children_under_their_healpy_parent(hemisphere):
    fine = HealpixSphere(8, hemisphere)
    coarse = fine.coarser()
    parents = fine.parent_index()
    # healpy: the parent of a NESTED pixel p at nside 2n is p // 4 at nside n.
    parent_pixel_by_healpy = hp.vec2pix(4, *fine.vertices.T, nest=True)
    np.testing.assert_array_equal(coarse.pixels[parents], parent_pixel_by_healpy)
    np.testing.assert_array_equal(parents.reshape(-1, 4), np.repeat(
        np.arange(coarse.n_vertices)[:, None], 4, axis=1))


def test_hemisphere_pooling_is_antipodally_consistent():
    fine_full, fine_half = HealpixSphere(8), HealpixSphere(8, hemisphere=True)
    signal = even_test_function(fine_full.vertices)
    pooled_full = signal.reshape(-1, 4).mean(axis=1)
    pooled_half = signal[fine_half.pixels].reshape(-1, 4).mean(axis=1)
    coarse_half = fine_half.coarser()
    np.testing.assert_allclose(pooled_half, pooled_full[coarse_half.pixels], atol=1e-14)
    # The pooled full-sphere signal is still even: pooling commutes with x -> -x.
    antipodes = hp.vec2pix(4, *(-HealpixSphere(4).vertices.T), nest=True)
    np.testing.assert_allclose(pooled_full, pooled_full[antipodes], atol=1e-14)


def test_pyramid_levels():
    levels = HealpixSphere(16, hemisphere=True).pyramid(5)
    assert [level.nside for level in levels] == [16, 8, 4, 2, 1]
    assert all(level.hemisphere for level in levels)


@pytest.mark.parametrize("hemisphere", [False, True])
def test_symmetry_permutation_rotates_functions(hemisphere):
    sphere = HealpixSphere(4, hemisphere)
    perm = sphere.symmetry_permutation(ROTATE_Z_90)
    signal = even_test_function(sphere.vertices)
    rotated_by_formula = even_test_function(sphere.vertices @ ROTATE_Z_90)  # f(R^T x)
    np.testing.assert_allclose(signal[perm], rotated_by_formula, atol=1e-12)
    laplacian = sphere.laplacian()
    np.testing.assert_allclose(laplacian[np.ix_(perm, perm)], laplacian, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="nside must be a power of 2"):
        HealpixSphere(6)
    with pytest.raises(TypeError, match="nside"):
        HealpixSphere(4.0)
    with pytest.raises(ValueError, match="coarsest"):
        HealpixSphere(1, hemisphere=True).coarser()
    with pytest.raises(ValueError, match="depth=4 needs nside >= 8"):
        HealpixSphere(4).pyramid(4)
    with pytest.raises(ValueError, match="kernel_size"):
        HealpixSphere(2).chebyshev_basis(0)
    tilt = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    with pytest.raises(ValueError, match="does not map this HEALPix grid"):
        HealpixSphere(4).symmetry_permutation(tilt)
