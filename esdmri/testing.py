"""Symmetry transforms of fields and equivariance measurements, for tests.

Fields are ``[B, C, V, X, Y, Z]`` tensors: C channels on the V vertices of a
:class:`~esdmri.sphere.HealpixSphere` at every voxel. A roto-reflection R acts
on the voxel grid by ``f'(p) = f(R^T p)`` (about the grid centre) and on the
sphere by ``f'(v) = f(R^T v)``; an equivariant network commutes with both.
Spherical-tensor fields (:mod:`esdmri.nn.pq`) also rotate their components
(:func:`rotate_tensor_field`).
Exact symmetries are the ones that map both grids onto themselves (90-degree
rotations, reflections); random SO(3) rotations of the sphere are measured
(:func:`rotation_equivariance_error`, :func:`filter_equivariance_error`).
"""

import numpy as np
import torch

ROTATE_Z_90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
ROTATE_X_90 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
REFLECT_X = np.diag([-1.0, 1.0, 1.0])

# Relative error under which a symmetry counts as exact in float64.
EXACT = 1e-10


def relative_error(actual, expected):
    """``||actual - expected|| / ||expected||`` (Frobenius), as a float."""
    if isinstance(actual, torch.Tensor):
        actual, expected = actual.detach(), expected.detach()
        return float((actual - expected).norm() / expected.norm())
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def rotate_grid(x, rotation):
    """``f(R^T p)`` on the last three (voxel) axes, about the grid centre.

    Parameters
    ----------
    x : Tensor, shape (..., X, Y, Z)
    rotation : array_like, shape (3, 3)
        A signed permutation matrix (a symmetry of the voxel grid) that maps
        the grid's shape onto itself (e.g. X == Y for a rotation about z).

    Returns
    -------
    Tensor, shape (..., X, Y, Z)
    """
    rotation = np.asarray(rotation, dtype=float)
    shape = np.array(x.shape[-3:])
    if not np.array_equal(np.abs(rotation) @ shape, shape):
        raise ValueError(f"rotation does not map the grid of shape {tuple(shape)} onto itself")
    centre = (shape - 1) / 2
    target = np.indices(shape).reshape(3, -1).T
    source = np.rint((target - centre) @ rotation + centre).astype(int)  # R^T (p - c) + c
    flat = x.reshape(*x.shape[:-3], -1)
    return flat[..., np.ravel_multi_index(source.T, tuple(shape))].reshape(x.shape)


def rotate_sphere(x, sphere, rotation):
    """``f(R^T v)`` on the vertex axis (dim 2) of ``[B, C, V, ...]``.

    ``rotation`` must map the HEALPix grid onto itself
    (:meth:`~esdmri.sphere.HealpixSphere.symmetry_permutation`).
    """
    return x[:, :, torch.as_tensor(sphere.symmetry_permutation(rotation))]


def rotate_tensor_field(x, field, rotation, grid=False):
    """Rotate a spherical-tensor field: its components by ``D(R)``, its grid if asked.

    The fields of :mod:`esdmri.nn.pq` hold, per q-sample or voxel, the
    components of tensors of orders ``l`` on dim 1; a rotation R maps those
    of order l by the Wigner matrix ``D_l(R)`` (e3nn's real basis).

    Parameters
    ----------
    x : Tensor, shape (B, field.dim, ...)
    field : esdmri.nn.tensor_field.TensorFieldType
        The layout of dim 1.
    rotation : array_like, shape (3, 3)
    grid : bool, optional
        Also move the voxels (the last three axes) by :func:`rotate_grid`;
        ``rotation`` must then be a symmetry of the grid.

    Returns
    -------
    Tensor, shape of ``x``
    """
    matrix = field.D_from_matrix(torch.as_tensor(np.asarray(rotation), dtype=x.dtype))
    x = torch.einsum("ij,bj...->bi...", matrix, x)
    return rotate_grid(x, rotation) if grid else x


def transform_field(x, sphere, grid=None, on_sphere=None):
    """Apply ``grid`` to the voxel grid and ``on_sphere`` to the sphere (None: identity)."""
    if grid is not None:
        x = rotate_grid(x, grid)
    if on_sphere is not None:
        x = rotate_sphere(x, sphere, on_sphere)
    return x


def equivariance_error(function, x, transform_in, transform_out=None, function_out=None):
    """Relative error between ``function(T_in x)`` and ``T_out function(x)``.

    Parameters
    ----------
    function : callable
    x : Tensor
    transform_in : callable
        The symmetry acting on the input.
    transform_out : callable, optional
        Its action on the output; the same as ``transform_in`` by default.
    function_out : callable, optional
        Applied to ``T_in x`` instead of ``function``, for maps between two
        spaces (e.g. a hemisphere's layer and the full sphere's, with ``T``
        the extension of even signals).

    Returns
    -------
    error : float
    """
    transform_out = transform_in if transform_out is None else transform_out
    function_out = function if function_out is None else function_out
    with torch.no_grad():
        return relative_error(function_out(transform_in(x)), transform_out(function(x)))


def assert_equivariant(function, x=None, transform_in=None, transform_out=None,
                       function_out=None, tol=None, label="", *, field_in=None, field_out=None,
                       spatial_shape=(), batch=2, n_rotations=4, seed=0, dtype=None):
    """Assert ``function(T_in x) == T_out function(x)`` to a relative ``tol``.

    Two ways to call it:

    - with an input ``x`` and its transforms, as :func:`equivariance_error`
      takes them (``tol`` defaults to :data:`EXACT`);
    - like e3nn's ``assert_equivariant``, with the declared types of the
      input and output fields (``field_in``, ``field_out``): random inputs of
      shape ``(batch, field_in.dim, *spatial_shape)`` are drawn, and rotated
      by :func:`rotate_tensor_field`: ``n_rotations`` random SO(3) rotations
      without a grid (``spatial_shape=()``), or every 90-degree rotation about
      x and z (and their product) that maps the grid of ``spatial_shape``
      onto itself, applied to the voxels too.

    Parameters
    ----------
    function : callable
    x, transform_in, transform_out, function_out
        As in :func:`equivariance_error`; leave them out with ``field_in``.
    tol : float, optional
        Largest relative error accepted (default: :data:`EXACT`, or with
        field types 1e-9 in float64 and 1e-4 in float32).
    label : str, optional
        Names the function in the failure message.
    field_in, field_out : esdmri.nn.tensor_field.TensorFieldType, optional
        Layout of dim 1 of the input and output (``field_out`` defaults to
        ``field_in``).
    spatial_shape : tuple of int, optional
        Trailing (voxel) axes of the input; the last three are the grid.
    batch, n_rotations, seed : int, optional
    dtype : torch.dtype, optional
        Of the random inputs (default: the function's parameters' dtype,
        float64 for a function without parameters).

    Returns
    -------
    error : float
        The largest relative error measured, so that a test can report it.
    """
    if field_in is None:
        if x is None or transform_in is None:
            raise TypeError("assert_equivariant needs x and transform_in, or field_in")
        error = equivariance_error(function, x, transform_in, transform_out, function_out)
        tol = EXACT if tol is None else tol
        assert error < tol, (f"{label or 'function'} is not equivariant: relative error "
                             f"{error:.3g}")
        return error
    if x is not None or transform_in is not None or transform_out is not None:
        raise TypeError("give field_in, or x with its transforms, not both")
    field_out = field_in if field_out is None else field_out
    if dtype is None:
        parameters = list(getattr(function, "parameters", list)())
        dtype = parameters[0].dtype if parameters else torch.float64
    tol = (1e-9 if dtype == torch.float64 else 1e-4) if tol is None else tol
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, field_in.dim, *spatial_shape), generator=generator, dtype=dtype)
    grid = len(spatial_shape) >= 3
    if grid:
        shape = np.array(spatial_shape[-3:])
        rotations = [r for r in (ROTATE_Z_90, ROTATE_X_90, ROTATE_Z_90 @ ROTATE_X_90)
                     if np.array_equal(np.abs(r) @ shape, shape)]
        if not rotations:
            raise ValueError(f"no 90-degree rotation maps the grid {tuple(shape)} onto itself")
    else:
        from scipy.spatial.transform import Rotation

        rotations = Rotation.random(n_rotations, random_state=seed).as_matrix()
    errors = []
    for rotation in rotations:
        error = equivariance_error(
            function, x, lambda f, r=rotation: rotate_tensor_field(f, field_in, r, grid=grid),
            lambda f, r=rotation: rotate_tensor_field(f, field_out, r, grid=grid),
            function_out)
        assert error < tol, (f"{label or 'function'} is not equivariant from {field_in} to "
                             f"{field_out}: relative error {error:.3g} under the rotation "
                             f"{np.round(rotation, 3).tolist()}")
        errors.append(error)
    return max(errors)


def filter_equivariance_error(laplacian, vertices, kernel_size, max_degree=8, n_filters=32,
                              seed=0):
    """Non-equivariant part of random Chebyshev filters on band-limited functions.

    A filter ``H = sum_k w_k T_k(L~)`` (random normal ``w``) is rotation
    equivariant on spherical harmonics of degree ``l <= max_degree`` iff it
    maps ``Y_lm`` to ``c_l Y_lm`` (Schur's lemma). With ``Y`` the real SH
    sampled at the vertices (all degrees, full sphere) and ``M = Y^+ H Y``,
    the equivariant part is ``E = diag(c_l)``, ``c_l`` the mean of the
    degree-l diagonal of M.

    Parameters
    ----------
    laplacian : scipy.sparse matrix, shape (V, V)
        Rescaled Laplacian ``L~`` of a full-sphere graph.
    vertices : ndarray, shape (V, 3)
    kernel_size : int
        K.
    max_degree, n_filters, seed : int, optional

    Returns
    -------
    dict
        ``in_band``: mean over filters of ``||M - E|| / ||M||`` (mixing within
        the band); ``total``: of ``||H Y - Y E|| / ||H Y||`` (also counting
        what leaks out of the band).
    """
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_descoteaux

    _, theta, phi = cart2sphere(*np.asarray(vertices).T)
    basis, _, degree = real_sh_descoteaux(max_degree, theta, phi, full_basis=True,
                                          legacy=False)
    terms = [basis, laplacian @ basis]
    for _ in range(2, kernel_size):
        terms.append(2 * (laplacian @ terms[-1]) - terms[-2])
    terms = np.stack(terms[:kernel_size])
    projector = np.linalg.pinv(basis)
    blocks = [degree == ell for ell in range(max_degree + 1)]
    rng = np.random.default_rng(seed)
    in_band, total = [], []
    for _ in range(n_filters):
        filtered = np.tensordot(rng.standard_normal(kernel_size), terms, axes=1)
        matrix = projector @ filtered
        diagonal = np.diag(matrix)
        scalars = np.zeros(degree.shape)
        for block in blocks:
            scalars[block] = diagonal[block].mean()
        in_band.append(np.linalg.norm(matrix - np.diag(scalars)) / np.linalg.norm(matrix))
        total.append(np.linalg.norm(filtered - basis * scalars) / np.linalg.norm(filtered))
    return dict(in_band=float(np.mean(in_band)), total=float(np.mean(total)))


def _even_irreps(order):
    from e3nn import o3

    return o3.Irreps([(1, (ell, 1)) for ell in range(0, order + 1, 2)])


def rotation_equivariance_error(nside, n_rotations=4, input_order=4, fit_order=None, seed=0,
                                kernel_size=3, hemisphere=True, laplacian=None):
    """Error of a spherical Chebyshev conv under random rotations.

    A band-limited even input ``f = sum c_lm Y_lm`` (e3nn real SH, orders up
    to ``input_order``) and its rotation ``f(R^T v)`` (coefficients rotated
    with e3nn's Wigner-D) go through one random layer (1 -> 4 channels); the
    output of the original is fitted by least squares with even SH up to
    ``fit_order`` on the vertices, rotated with Wigner-D and evaluated on the
    grid (the interpolation), and compared with the output of the rotated
    input. ``fit_order`` defaults to the largest even order (at most 12,
    e3nn's limit) with at most V / 2 coefficients (V of the hemisphere), so
    that the fit is well posed.

    Parameters
    ----------
    nside : int
    n_rotations, input_order, fit_order, seed : int, optional
    kernel_size : int, optional
        Chebyshev K of the layer.
    hemisphere : bool, optional
        Vertices of ``HealpixSphere(nside, hemisphere)``.
    laplacian : array_like or sparse matrix, shape (V, V), optional
        Rescaled Laplacian of another graph on the same vertices (default:
        the sphere's own), e.g. to compare graph constructions.

    Returns
    -------
    dict
        ``n_vertices``; ``mean`` and ``max`` relative L2 errors over the
        rotations; ``floor``, the same comparison for the identity rotation
        (what the SH interpolation alone costs).
    """
    from e3nn import o3

    from esdmri.nn import SphericalConv
    from esdmri.sphere import HealpixSphere

    dtype = torch.float64
    sphere = HealpixSphere(nside, hemisphere=hemisphere)
    if laplacian is None:
        basis = sphere.chebyshev_basis(kernel_size)
    else:
        scaled = np.asarray(laplacian.toarray() if hasattr(laplacian, "toarray") else laplacian)
        basis = [np.eye(sphere.n_vertices), scaled]
        for _ in range(2, kernel_size):
            basis.append(2 * scaled @ basis[-1] - basis[-2])
        basis = np.stack(basis[:kernel_size])
    vertices = torch.as_tensor(sphere.vertices, dtype=dtype)
    if fit_order is None:
        n_even = 6 * nside**2
        fit_order = max(order for order in range(0, 13, 2)
                        if (order + 1) * (order + 2) // 2 <= n_even // 2)
    irreps_in, irreps_fit = _even_irreps(input_order), _even_irreps(fit_order)
    basis_in = o3.spherical_harmonics(irreps_in, vertices, normalize=True)
    basis_fit = o3.spherical_harmonics(irreps_fit, vertices, normalize=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = SphericalConv(1, 4, basis, bias=False).to(dtype)
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
        errors.append(relative_error(actual, expected))
    floor = relative_error(basis_fit @ fit, output)
    return dict(n_vertices=sphere.n_vertices, fit_order=fit_order, mean=float(np.mean(errors)),
                max=max(errors), floor=floor)
