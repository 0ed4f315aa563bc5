"""Equivariance of the spatio-spherical layers and the U-Net (float64).

Exact symmetries (asserted to 1e-10): voxel-grid translations (circular
padding), 90-degree rotations about z applied to the grid and, through the
HEALPix vertex permutation, to the sphere, grid reflections (isotropic
kernels), and the antipodal consistency of the hemispherical graphs.

Measured symmetry: random SO(3) rotations of the sphere, which HEALPix does
not preserve. :func:`rotation_equivariance_error` is also used by
``benchmarks/bench_layers.py`` to report the error in docs/benchmarks.md.
"""

import numpy as np
import pytest
import torch
from e3nn import o3

from esdmri.nn import E3SO3Conv, SphericalConv, UNet
from esdmri.sphere import HealpixSphere

EXACT = 1e-10
ROTATION_Z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

# Bound on the relative error of the spherical Chebyshev conv (K = 3) under random SO(3)
# rotations, measured at 0.06 to 0.16 for nside 4 to 16 (docs/benchmarks.md). The
# graph Laplacian's part of the filter is the anisotropic one; a filter that ignored
# the geometry of the sphere (or a scrambled vertex order) is off by order 1.
SO3_ERROR_BOUND = 0.25


@pytest.fixture(autouse=True)
def float64():
    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
    torch.set_num_threads(threads)


def rotate_grid(x):
    """Rotate the voxel grid of [B, C, V, X, Y, Z] by ROTATION_Z about the grid centre.

    The voxel at p moves to R (p - c) + c, i.e. new[a, b, z] = old[b, n - 1 - a, z].
    """
    return x.flip(-2).transpose(-3, -2)


def rotate_sphere(x, sphere):
    perm = torch.as_tensor(sphere.symmetry_permutation(ROTATION_Z))
    return x[:, :, perm]


def rel_error(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_grid_rotation_helper_moves_voxels_as_the_matrix_says():
    n = 4
    x = torch.zeros(1, 1, 1, n, n, n)
    x[0, 0, 0, 3, 1, 2] = 1.0
    c = (n - 1) / 2
    target = ROTATION_Z @ (np.array([3, 1, 2]) - c) + c
    assert rotate_grid(x)[0, 0, 0, int(target[0]), int(target[1]), int(target[2])] == 1.0


# --- mixed conv ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sphere4():
    return HealpixSphere(4, hemisphere=True)


def mixed_conv(sphere, isotropic=True, padding="circular", channels=(3, 4)):
    return E3SO3Conv(*channels, sphere.chebyshev_basis(3), isotropic=isotropic, padding=padding)


@pytest.mark.parametrize("channels", [(3, 4), (1, 9)])
def test_mixed_conv_translation_equivariance(sphere4, channels):
    conv = mixed_conv(sphere4, channels=channels)
    x = torch.randn(1, channels[0], sphere4.n_vertices, 5, 4, 6)
    shift = dict(shifts=(2, -1, 3), dims=(3, 4, 5))
    assert rel_error(conv(torch.roll(x, **shift)), torch.roll(conv(x), **shift)) < EXACT


def test_mixed_conv_translation_equivariance_interior_with_zero_padding(sphere4):
    conv = mixed_conv(sphere4, padding="zeros")
    x = torch.randn(1, 3, sphere4.n_vertices, 8, 6, 6)
    shifted = torch.roll(x, shifts=1, dims=3)
    # Away from the boundary (one voxel of kernel reach) the zero padding is invisible.
    y, y_shifted = conv(x), conv(shifted)
    assert rel_error(y_shifted[..., 2:7, 1:-1, 1:-1], y[..., 1:6, 1:-1, 1:-1]) < EXACT


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_mixed_conv_rotation_equivariance(sphere4, padding):
    conv = mixed_conv(sphere4, padding=padding)
    x = torch.randn(1, 3, sphere4.n_vertices, 4, 4, 3)
    y = conv(x)
    # Jointly, and (isotropic kernel, graph filter) each factor on its own.
    joint = conv(rotate_sphere(rotate_grid(x), sphere4))
    assert rel_error(joint, rotate_sphere(rotate_grid(y), sphere4)) < EXACT
    assert rel_error(conv(rotate_grid(x)), rotate_grid(y)) < EXACT
    assert rel_error(conv(rotate_sphere(x, sphere4)), rotate_sphere(y, sphere4)) < EXACT


@pytest.mark.parametrize("dim", [3, 4, 5])
def test_mixed_conv_reflection_equivariance(sphere4, dim):
    conv = mixed_conv(sphere4, padding="zeros")
    x = torch.randn(1, 3, sphere4.n_vertices, 4, 3, 5)
    assert rel_error(conv(x.flip(dim)), conv(x).flip(dim)) < EXACT


def test_full_spatial_kernel_is_not_rotation_equivariant(sphere4):
    # The same checks detect a kernel that does not share weights by distance.
    conv = mixed_conv(sphere4, isotropic=False)
    x = torch.randn(1, 3, sphere4.n_vertices, 4, 4, 3)
    assert rel_error(conv(rotate_grid(x)), rotate_grid(conv(x))) > 1e-2
    assert rel_error(conv(x.flip(3)), conv(x).flip(3)) > 1e-2
    shift = dict(shifts=1, dims=4)
    assert rel_error(conv(torch.roll(x, **shift)), torch.roll(conv(x), **shift)) < EXACT


# --- U-Net -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sphere8():
    return HealpixSphere(8, hemisphere=True)


@pytest.mark.parametrize("pooling_mode", ["average", "max"])
def test_unet_equivariance(sphere4, pooling_mode):
    torch.manual_seed(1)
    net = UNet(2, 2, sphere4, depth=3, filter_start=2, conv="mixed", padding="circular",
               pooling_mode=pooling_mode).eval()
    x = torch.randn(1, 2, sphere4.n_vertices, 8, 8, 4)
    y = net(x)
    shift = dict(shifts=(4, -4), dims=(3, 5))  # multiples of 2**(depth - 1)
    assert rel_error(net(torch.roll(x, **shift)), torch.roll(y, **shift)) < EXACT
    joint = net(rotate_sphere(rotate_grid(x), sphere4))
    assert rel_error(joint, rotate_sphere(rotate_grid(y), sphere4)) < EXACT
    assert rel_error(net(x.flip(4)), y.flip(4)) < EXACT


def test_unet_training_mode_is_equivariant(sphere4):
    # Batch statistics are pooled over vertices and voxels: symmetric too.
    net = UNet(2, 1, sphere4, depth=2, filter_start=2, conv="mixed", padding="circular")
    x = torch.randn(2, 2, sphere4.n_vertices, 4, 4, 4)
    y = net.train()(x)
    joint = net(rotate_sphere(rotate_grid(x), sphere4))
    assert rel_error(joint, rotate_sphere(rotate_grid(y), sphere4)) < EXACT


# --- antipodal consistency -----------------------------------------------------------------

def full_to_hemisphere_rows(full, hemi):
    rows = np.full(full.n_vertices, -1)
    rows[hemi.pixels] = np.arange(hemi.n_vertices)
    antipode_pixels = full.symmetry_permutation(-np.eye(3))  # f(-v) = f[perm]
    dropped = rows < 0
    rows[dropped] = rows[antipode_pixels[dropped]]
    return torch.as_tensor(rows)


@pytest.mark.parametrize("build", [
    lambda s: E3SO3Conv(2, 3, s.chebyshev_basis(3)),
    lambda s: SphericalConv(2, 3, s.chebyshev_basis(4)),
    lambda s: UNet(2, 2, s, depth=3, filter_start=2, conv="mixed"),
    lambda s: UNet(2, 2, s, depth=3, filter_start=2, conv="spherical", pooling_mode="max"),
], ids=["mixed", "spherical", "unet-mixed", "unet-spherical-max"])
def test_hemisphere_matches_full_sphere_on_even_signals(build):
    full, hemi = HealpixSphere(4), HealpixSphere(4, hemisphere=True)
    torch.manual_seed(2)
    full_layer = build(full)
    hemi_layer = build(hemi)
    hemi_layer.load_state_dict(full_layer.state_dict())  # sphere-independent state
    rows = full_to_hemisphere_rows(full, hemi)
    x_hemi = torch.randn(1, 2, hemi.n_vertices, 4, 4, 4)
    y_full = full_layer(x_hemi[:, :, rows])  # an even signal on the full sphere
    y_hemi = hemi_layer(x_hemi)
    assert rel_error(y_hemi, y_full[:, :, torch.as_tensor(hemi.pixels)]) < EXACT
    assert rel_error(y_full, y_full[:, :, full.symmetry_permutation(-np.eye(3))]) < EXACT


# --- random SO(3) rotations, measured ---------------------------------------------------------

def _even_irreps(order):
    return o3.Irreps([(1, (ell, 1)) for ell in range(0, order + 1, 2)])


def rotation_equivariance_error(nside, n_rotations=4, input_order=4, fit_order=None, seed=0):
    """Error of the spherical Chebyshev conv (K = 3) under random rotations.

    A band-limited even input ``f = sum c_lm Y_lm`` (e3nn real SH, orders up
    to ``input_order``) and its rotation ``f(R^T v)`` (coefficients rotated
    with e3nn's Wigner-D) go through one layer; the output of the original is
    fitted by least squares with even SH up to ``fit_order`` on the
    hemisphere's vertices, rotated with Wigner-D and evaluated on the grid
    (the interpolation), and compared with the output of the rotated input.
    ``fit_order`` defaults to the largest even order (at most 12, e3nn's
    limit) with at most V / 2 coefficients, so that the fit is well posed.

    Returns
    -------
    dict
        ``n_vertices``; ``mean`` and ``max`` relative L2 errors over the
        rotations; ``floor``, the same comparison for the identity rotation
        (what the SH interpolation alone costs).
    """
    dtype = torch.float64
    sphere = HealpixSphere(nside, hemisphere=True)
    vertices = torch.as_tensor(sphere.vertices, dtype=dtype)
    if fit_order is None:
        fit_order = max(order for order in range(0, 13, 2)
                        if (order + 1) * (order + 2) // 2 <= sphere.n_vertices // 2)
    irreps_in, irreps_fit = _even_irreps(input_order), _even_irreps(fit_order)
    basis_in = o3.spherical_harmonics(irreps_in, vertices, normalize=True)
    basis_fit = o3.spherical_harmonics(irreps_fit, vertices, normalize=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = SphericalConv(1, 4, sphere.chebyshev_basis(3), bias=False).to(dtype)
        coefficients = torch.randn(irreps_in.dim, dtype=dtype)
        rotations = o3.rand_matrix(n_rotations, dtype=dtype)

    def run(values):
        with torch.no_grad():
            return layer(values.view(1, 1, -1, 1, 1, 1))[0, :, :, 0, 0, 0].T  # (V, C)

    def rotated(basis, irreps, coeffs, rotation):
        # f(R^T v) = Y(R^T v) c = Y(v) D(R) c in e3nn's convention.
        return basis @ (irreps.D_from_matrix(rotation) @ coeffs)

    output = run(basis_in @ coefficients)
    fit = torch.linalg.lstsq(basis_fit, output).solution  # (n_fit, C)
    errors = []
    for rotation in rotations:
        expected = rotated(basis_fit, irreps_fit, fit, rotation)
        actual = run(rotated(basis_in, irreps_in, coefficients, rotation))
        errors.append(rel_error(actual, expected))
    floor = rel_error(basis_fit @ fit, output)
    return dict(n_vertices=sphere.n_vertices, fit_order=fit_order, mean=float(np.mean(errors)),
                max=max(errors), floor=floor)


def test_wigner_d_convention_matches_direct_evaluation():
    irreps = _even_irreps(4)
    rotation = o3.rand_matrix(dtype=torch.float64)
    v = torch.as_tensor(HealpixSphere(2).vertices)
    direct = o3.spherical_harmonics(irreps, v @ rotation, normalize=True)  # Y(R^T v)
    via_d = o3.spherical_harmonics(irreps, v, normalize=True) @ irreps.D_from_matrix(rotation)
    torch.testing.assert_close(direct, via_d, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nside", [4, 8])
def test_random_rotation_error_is_small(nside):
    result = rotation_equivariance_error(nside, n_rotations=3)
    assert result["max"] < SO3_ERROR_BOUND
    # Meaningful only if the interpolation itself is accurate.
    assert result["floor"] < result["max"]
