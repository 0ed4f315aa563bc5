"""Layers of esdmri.nn against brute-force references (float64)."""

import healpy as hp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esdmri.nn import e3so3
from esdmri.nn import (ChebyshevOperator, E3SO3Conv, NeighbourhoodConcat, NeighbourhoodSums,
                       Pool, SpatialConv, SphericalConv, Unpool)
from esdmri.sphere import HealpixSphere


pytestmark = pytest.mark.usefixtures("float64")  # tests/conftest.py


@pytest.fixture(scope="module")
def sphere():
    return HealpixSphere(2, hemisphere=True)


def conv3d_reference(x, kernel, circular):
    """conv3d of x [N, C, X, Y, Z] with kernel (O, C, m, m, m) and 'same' padding."""
    half = kernel.shape[-1] // 2
    if circular:
        return F.conv3d(F.pad(x, (half,) * 6, mode="circular"), kernel)
    return F.conv3d(x, kernel, padding=half)


def mixed_reference(x, weight_sphere, spatial_kernel, basis, circular=False):
    """Published E(3) x SO(3) conv: T_k x on every voxel, then conv3d with A[o,i,k] B[o,i,d]."""
    b, n_in, v = x.shape[:3]
    grid = x.shape[3:]
    terms = torch.einsum("kuv,bivxyz->buikxyz", torch.as_tensor(basis), x)
    terms = terms.reshape(b * v, -1, *grid)
    kernel = weight_sphere[:, :, :, None, None, None] * spatial_kernel[:, :, None]
    out = conv3d_reference(terms, kernel.reshape(kernel.shape[0], -1, *kernel.shape[-3:]),
                           circular)
    return out.reshape(b, v, -1, *grid).transpose(1, 2)


# --- neighbourhood sums ---------------------------------------------------------------------

@pytest.mark.parametrize("spatial_kernel_size, isotropic, n_classes", [(3, True, 4), (5, True, 10),
                                                                (3, False, 27)])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_neighbourhood_sums_match_conv3d(spatial_kernel_size, isotropic, n_classes, padding):
    sums = NeighbourhoodSums(spatial_kernel_size, isotropic=isotropic, padding=padding)
    assert sums.n_classes == n_classes
    x = torch.randn(2, 3, 4, 5, 4, 6)
    out = sums.forward(x)
    # Brute force: one conv3d per class with a 0/1 kernel built from the distances.
    half = spatial_kernel_size // 2
    offsets = np.arange(-half, half + 1)
    dist = np.sqrt(sum(np.square(axis) for axis in np.meshgrid(offsets, offsets, offsets,
                                                               indexing="ij")))
    fields = x.reshape(-1, 1, 5, 4, 6)
    for r in range(n_classes):
        if isotropic:
            mask = np.isclose(dist, sums.distances[r])
        else:
            mask = np.zeros(spatial_kernel_size**3, bool)
            mask[r] = True
            mask = mask.reshape((spatial_kernel_size,) * 3)
        kernel = torch.as_tensor(mask, dtype=x.dtype)[None, None]
        expected = conv3d_reference(fields, kernel, padding == "circular").reshape(x.shape)
        torch.testing.assert_close(out[:, :, r], expected, rtol=0, atol=1e-12)
    if isotropic and spatial_kernel_size == 3:
        np.testing.assert_allclose(sums.distances, [0, 1, np.sqrt(2), np.sqrt(3)])


@pytest.mark.parametrize("isotropic", [True, False])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_neighbourhood_sums_adjoint(isotropic, padding):
    sums = NeighbourhoodSums(5, isotropic=isotropic, padding=padding)
    x = torch.randn(1, 2, 3, 4, 3, 5)
    g = torch.randn(1, 2, sums.n_classes, 3, 4, 3, 5)
    assert torch.isclose((sums.forward(x) * g).sum(), (x * sums.adjoint(g)).sum(), rtol=1e-12)


@pytest.mark.parametrize("spatial_kernel_size, isotropic", [(3, True), (5, True), (3, False)])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("thickness", [1, 2])
def test_neighbourhood_sums_by_slabs_equal_whole_grid(spatial_kernel_size, isotropic, padding,
                                                      thickness):
    sums = NeighbourhoodSums(spatial_kernel_size, isotropic=isotropic, padding=padding)
    x = torch.randn(1, 2, 3, 5, 4, 3, dtype=torch.float64)
    g = torch.randn(1, 2, sums.n_classes, 3, 5, 4, 3, dtype=torch.float64)
    whole, whole_adjoint = sums.forward(x), sums.adjoint(g)
    adjoint = torch.full_like(x, 0.5)  # accumulates onto what is there
    for start in range(0, 5, thickness):
        rows = slice(start, min(start + thickness, 5))
        outs = torch.empty_like(whole[:, :, :, :, rows]).unbind(2)
        sums.sums_into(x, outs, start=start)
        torch.testing.assert_close(torch.stack(outs, 2), whole[:, :, :, :, rows],
                                   rtol=0, atol=1e-12)
        sums.adjoint_into(g[:, :, :, :, rows].unbind(2), adjoint, start=start,
                          accumulate=True)
    torch.testing.assert_close(adjoint, whole_adjoint + 0.5, rtol=0, atol=1e-12)


def test_neighbourhood_concat_holds_shifted_neighbours():
    concat = NeighbourhoodConcat(3)
    x = torch.randn(1, 2, 3, 4, 4, 4)
    out = concat(x)
    assert out.shape == (1, 2 * 27, 3, 4, 4, 4)
    # Channel c * 27 + j holds channel c of the voxel at offset j (x fastest).
    j = np.ravel_multi_index((2, 1, 0), (3, 3, 3))  # offset (+1, 0, -1)
    torch.testing.assert_close(out[:, 27 + j, :, 1, 2, 3], x[:, 1, :, 2, 2, 2])
    assert torch.all(out[:, j, :, :, :, 0] == 0)  # z - 1 falls outside


# --- Chebyshev operator and spherical conv --------------------------------------------------

@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_chebyshev_operator_products(sphere, layout):
    basis = sphere.chebyshev_basis(4)
    operator = ChebyshevOperator(basis, layout=layout)
    v = sphere.n_vertices
    z = torch.randn(3, 4 * v, 600)  # 600 columns: the blocked sparse path
    expected = torch.einsum("kuv,nkvp->nup", torch.as_tensor(basis), z.view(3, 4, v, 600))
    torch.testing.assert_close(operator.synthesize(z), expected)
    x = torch.randn(3, v, 7)
    expected = torch.einsum("kuv,nvp->nkup", torch.as_tensor(basis), x).reshape(3, 4 * v, 7)
    torch.testing.assert_close(operator.analyze(x), expected)


def test_chebyshev_operator_gradients(sphere):
    operator = ChebyshevOperator(sphere.chebyshev_basis(3))
    x = torch.randn(2, sphere.n_vertices, 3, requires_grad=True)
    assert torch.autograd.gradcheck(operator.analyze, (x,))
    z = torch.randn(2, 3 * sphere.n_vertices, 3, requires_grad=True)
    assert torch.autograd.gradcheck(operator.synthesize, (z,))


@pytest.mark.parametrize("channels", [(2, 5), (5, 2)])
def test_spherical_conv_matches_chebyshev_sum(sphere, channels):
    basis = sphere.chebyshev_basis(3)
    conv = SphericalConv(*channels, basis)
    x = torch.randn(2, channels[0], sphere.n_vertices, 2, 3, 1, requires_grad=True)
    expected = torch.einsum("oik,kuv,bivxyz->bouxyz", conv.weight, torch.as_tensor(basis), x)
    expected = expected + conv.bias.view(1, -1, 1, 1, 1, 1)
    torch.testing.assert_close(conv(x), expected)
    assert torch.autograd.gradcheck(conv, (x[:1, :, :, :1, :2].detach().requires_grad_(),))


# --- E(3) x SO(3) conv -----------------------------------------------------------------------

@pytest.mark.parametrize("channels", [(3, 2), (1, 7)])
@pytest.mark.parametrize("spatial_kernel_size, isotropic, padding", [(3, True, "zeros"),
                                                             (5, True, "circular"),
                                                             (3, False, "circular")])
# One x-row per slab / the whole grid in one slab, and one vertex per chunk of
# neighbourhood sums (the chunked path of large inputs).
@pytest.mark.parametrize("slab_columns, chunk_elements", [(1, 1 << 22), (512, 1 << 22),
                                                          (512, 1)])
def test_mixed_conv_matches_published_formulation(sphere, channels, spatial_kernel_size, isotropic,
                                                  padding, slab_columns, chunk_elements,
                                                  monkeypatch):
    monkeypatch.setattr(e3so3, "_SLAB_COLUMNS", slab_columns)
    monkeypatch.setattr(e3so3, "_CHUNK_ELEMENTS", chunk_elements)
    basis = sphere.chebyshev_basis(3)
    conv = E3SO3Conv(*channels, basis, spatial_kernel_size=spatial_kernel_size, isotropic=isotropic,
                     padding=padding)
    x = torch.randn(2, channels[0], sphere.n_vertices, 4, 3, 5, requires_grad=True)
    spatial = conv.weight_spatial
    if isotropic:
        spatial = spatial[:, :, torch.as_tensor(conv.sums.class_index)]
    expected = mixed_reference(x, conv.weight_sphere, spatial, basis, padding == "circular")
    expected = expected + conv.bias.view(1, -1, 1, 1, 1, 1)
    y = conv(x)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    params = [x, conv.weight_sphere, conv.weight_spatial, conv.bias]
    for ours, reference in zip(torch.autograd.grad(y, params, grad),
                               torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(ours, reference)


def test_mixed_conv_gradcheck(sphere):
    conv = E3SO3Conv(1, 2, sphere.chebyshev_basis(2), padding="circular")
    x = torch.randn(1, 1, sphere.n_vertices, 3, 2, 1, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))


def test_spatial_conv_matches_conv3d():
    conv = SpatialConv(2, 3, n_vertices=4, spatial_kernel_size=3)
    x = torch.randn(2, 2, 4, 3, 4, 5, requires_grad=True)
    kernel = conv.weight[:, :, torch.as_tensor(conv.sums.class_index)]
    expected = conv3d_reference(x.reshape(2, 8, 3, 4, 5), kernel, circular=False)
    expected = expected.reshape(2, 3, 4, 3, 4, 5) + conv.bias.view(1, -1, 1, 1, 1, 1)
    y = conv(x)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    for ours, reference in zip(torch.autograd.grad(y, [x, conv.weight], grad),
                               torch.autograd.grad(expected, [x, conv.weight], grad)):
        torch.testing.assert_close(ours, reference)


# --- pooling ---------------------------------------------------------------------------------

def test_spherical_average_pool_matches_healpy_degrade():
    fine = HealpixSphere(4)
    x = torch.randn(1, 2, fine.n_vertices, 1, 1, 1)
    pooled, indices = Pool("spherical", "average")(x)
    assert indices is None
    expected = hp.ud_grade(x[0, 1, :, 0, 0, 0].numpy(), 2, order_in="NESTED", order_out="NESTED")
    np.testing.assert_allclose(pooled[0, 1, :, 0, 0, 0].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("hemisphere", [False, True])
def test_spherical_max_pool_takes_max_over_children(hemisphere):
    fine = HealpixSphere(4, hemisphere=hemisphere)
    coarse = fine.coarser()
    x = torch.randn(1, 1, fine.n_vertices, 2, 1, 1)
    pooled, indices = Pool("spherical", "max")(x)
    # Parent of each fine vertex from its direction (independent of the reshape).
    parent_pixels = hp.vec2pix(2, *fine.vertices.T, nest=True)
    row_of = {pixel: row for row, pixel in enumerate(coarse.pixels)}
    parents = np.array([row_of[p] for p in parent_pixels])
    expected = np.full((coarse.n_vertices, 2), -np.inf)
    np.maximum.at(expected, parents, x[0, 0, :, :, 0, 0].numpy())
    np.testing.assert_allclose(pooled[0, 0, :, :, 0, 0].numpy(), expected)
    restored = Unpool("spherical", "max")(pooled, indices)
    is_max = x == pooled.repeat_interleave(4, dim=2)
    torch.testing.assert_close(restored, torch.where(is_max, x, torch.zeros_like(x)))


def test_spatial_and_mixed_pooling():
    x = torch.randn(2, 3, 48, 4, 6, 2)
    pooled, _ = Pool("spatial", "average")(x)
    expected = x.reshape(2, 3, 48, 2, 2, 3, 2, 1, 2).mean(dim=(4, 6, 8))
    torch.testing.assert_close(pooled, expected)
    mixed, indices = Pool("both", "max")(x)
    expected = x.reshape(2, 3, 12, 4, 2, 2, 3, 2, 1, 2).amax(dim=(3, 5, 7, 9))
    torch.testing.assert_close(mixed, expected)
    restored = Unpool("both", "max")(mixed, indices)
    assert restored.shape == x.shape
    assert torch.count_nonzero(restored) == mixed.numel()
    torch.testing.assert_close(restored.amax(dim=(2, 3, 4, 5)), x.amax(dim=(2, 3, 4, 5)))
    up = Unpool("both", "average")(mixed)
    torch.testing.assert_close(up[:, :, 5, 3, 1, 0], mixed[:, :, 1, 1, 0, 0])


# --- bad input -------------------------------------------------------------------------------

def test_bad_input_messages(sphere):
    basis = sphere.chebyshev_basis(3)
    conv = E3SO3Conv(2, 3, basis)
    with pytest.raises(ValueError, match=r"x must have 6 dimensions"):
        conv(torch.randn(2, sphere.n_vertices, 4, 4, 4))
    with pytest.raises(ValueError, match=rf"x must have {sphere.n_vertices} vertices"):
        conv(torch.randn(1, 2, sphere.n_vertices + 4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"x must have 2 channels"):
        SphericalConv(2, 3, basis)(torch.randn(1, 3, sphere.n_vertices, 1, 1, 1))
    with pytest.raises(ValueError, match=r"spatial_kernel_size must be odd .* got 4"):
        E3SO3Conv(2, 3, basis, spatial_kernel_size=4)
    with pytest.raises(TypeError, match=r"spatial_kernel_size must be an odd positive int"):
        NeighbourhoodSums(3.0)
    with pytest.raises(ValueError, match=r"padding must be one of"):
        SpatialConv(1, 1, 1, padding="reflect")
    with pytest.raises(ValueError, match=r"chebyshev_basis must have shape \(K, V, V\)"):
        SphericalConv(1, 1, basis[0])
    with pytest.raises(ValueError, match=r"layout must be one of"):
        ChebyshevOperator(basis, layout="coo")
    with pytest.raises(ValueError, match=r"spatial pooling needs even grid sizes"):
        Pool("both")(torch.randn(1, 1, 8, 3, 2, 2))
    with pytest.raises(ValueError, match=r"vertex count divisible by 4"):
        Pool("spherical")(torch.randn(1, 1, 6, 2, 2, 2))
    with pytest.raises(ValueError, match=r"kind must be one of"):
        Pool("temporal")
    with pytest.raises(ValueError, match=r"indices from Pool"):
        Unpool("spherical", "max")(torch.randn(1, 1, 6, 1, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_on_cuda_match_cpu(sphere):
    conv = E3SO3Conv(3, 4, sphere.chebyshev_basis(3))
    x = torch.randn(1, 3, sphere.n_vertices, 4, 4, 4)
    expected = conv(x)
    torch.testing.assert_close(conv.to("cuda")(x.to("cuda")).cpu(), expected)
