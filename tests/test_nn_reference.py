"""Spherical and spatio-spherical layers against brute-force formulas (float64)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esdmri.nn.chebyshev import SphericalConv
from esdmri.nn.e3so3 import E3SO3Conv
from esdmri.nn.pooling import Pool, Unpool
from esdmri.nn.unet import UNet
from esdmri.sphere import DEEPSPHERE_KERNEL_WIDTHS, HealpixSphere, nearest_neighbour_adjacency

GOLDEN = Path(__file__).parent / "data" / "rtesd_published_graph.npz"


@pytest.fixture(scope="module")
def sphere():
    return HealpixSphere(2, hemisphere=True)


def reference_chebyshev(x, weight, basis):
    """y_o(v) = sum_{i,k} W[o,i,k] (T_k x_i)(v), directly from the (K, V, V) basis."""
    return torch.einsum("oik,kuv,bivxyz->bouxyz", weight, basis, x)


@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize("channels", [(3, 5), (5, 3)])
def test_spherical_conv_is_a_chebyshev_filter(sphere, layout, channels):
    basis = torch.as_tensor(sphere.chebyshev_basis(4))
    torch.manual_seed(0)
    conv = SphericalConv(*channels, sphere.chebyshev_basis(4), bias=False, layout=layout).double()
    x = torch.randn(2, channels[0], sphere.n_vertices, 3, 2, 2, dtype=torch.float64)
    expected = reference_chebyshev(x, conv.weight.detach(), basis)
    # Matrices are stored in float32, hence the tolerance.
    torch.testing.assert_close(conv(x), expected, rtol=1e-6, atol=1e-6)


def test_e3so3_conv_is_chebyshev_times_isotropic_kernel(sphere):
    basis = torch.as_tensor(sphere.chebyshev_basis(3))
    torch.manual_seed(1)
    conv = E3SO3Conv(2, 3, sphere.chebyshev_basis(3), spatial_kernel_size=3, bias=False).double()
    x = torch.randn(1, 2, sphere.n_vertices, 5, 4, 6, dtype=torch.float64)
    # Brute force: a full 27-tap kernel whose weight depends on |d| only,
    # W[o, i, k, d] = A[o, i, k] B[o, i, |d|], with |d|^2 in {0, 1, 2, 3}.
    offsets = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1)
    distance_class = torch.as_tensor((offsets**2).sum(-1))  # (3, 3, 3)
    spatial = conv.weight_spatial.detach()[..., distance_class]  # (O, I, 3, 3, 3)
    sphere_filtered = torch.einsum("kuv,bivxyz->bikuxyz", basis, x)
    b, i, k, v = sphere_filtered.shape[:4]
    stacked = sphere_filtered.permute(0, 3, 1, 2, 4, 5, 6).reshape(b * v, i * k, 5, 4, 6)
    kernel = (conv.weight_sphere.detach()[..., None, None, None]
              * spatial[:, :, None]).reshape(3, i * k, 3, 3, 3)
    expected = F.conv3d(stacked, kernel, padding=1).reshape(b, v, 3, 5, 4, 6)
    torch.testing.assert_close(conv(x), expected.permute(0, 2, 1, 3, 4, 5), rtol=1e-6, atol=1e-6)


def test_e3so3_conv_reproduces_the_published_layer_on_the_published_graph():
    # One forward of the published SO3SE3Conv at nside 4 (full sphere, K = 3, 3x3x3
    # isotropic kernel, zero padding), computed with the published code; the stored
    # input is the corner 3^3 voxels, the output the 2^3 voxels whose neighbourhoods
    # lie inside it. Weights are stored in esdmri's (O, I, K) / (O, I, R) layout.
    golden = np.load(GOLDEN)
    sphere = HealpixSphere(4)
    adjacency = nearest_neighbour_adjacency(sphere.vertices, 8, DEEPSPHERE_KERNEL_WIDTHS[4],
                                            ties="arbitrary").toarray()
    degree = adjacency.sum(axis=1)
    identity = np.eye(sphere.n_vertices)
    laplacian = identity - adjacency / np.sqrt(np.outer(degree, degree))
    # The published rescaling (1.01 x an inexact lambda_max), read off the diagonal.
    published_lambda_max = 2 / (1 + float(golden["nside4_values"][golden["nside4_rows"]
                                                                  == golden["nside4_cols"]][0]))
    scaled = 2 / published_lambda_max * laplacian - identity
    basis = np.stack([identity, scaled, 2 * scaled @ scaled - identity])
    conv = E3SO3Conv(3, 5, basis, spatial_kernel_size=3, padding="zeros").double()
    with torch.no_grad():
        conv.weight_sphere.copy_(torch.as_tensor(golden["layer_weight_sphere"]))
        conv.weight_spatial.copy_(torch.as_tensor(golden["layer_weight_spatial"]))
        conv.bias.copy_(torch.as_tensor(golden["layer_bias"]))
        output = conv(torch.as_tensor(golden["layer_input"]))[..., :2, :2, :2]
    # Matrices are stored in float32, hence the tolerance.
    torch.testing.assert_close(output, torch.as_tensor(golden["layer_output"]), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("mode,reduce", [("average", "mean"), ("max", "amax")])
def test_spherical_pooling_reduces_groups_of_four_children(sphere, mode, reduce):
    x = torch.randn(1, 2, sphere.n_vertices, 2, 2, 2, dtype=torch.float64)
    pooled, indices = Pool("spherical", mode)(x)
    expected = getattr(x.reshape(1, 2, -1, 4, 2, 2, 2), reduce)(dim=3)
    torch.testing.assert_close(pooled, expected)
    restored = Unpool("spherical", mode)(pooled, indices)
    assert restored.shape == x.shape
    if mode == "average":  # unpooling copies the parent to its four children
        torch.testing.assert_close(restored, pooled.repeat_interleave(4, dim=2))


def test_spatial_pooling_averages_2x2x2_blocks(sphere):
    x = torch.randn(1, 2, sphere.n_vertices, 4, 2, 6, dtype=torch.float64)
    pooled, _ = Pool("spatial", "average")(x)
    expected = x.reshape(1, 2, -1, 2, 2, 1, 2, 3, 2).mean(dim=(4, 6, 8))
    torch.testing.assert_close(pooled, expected)


def test_unet_output_is_non_negative_with_the_requested_shape(sphere):
    torch.manual_seed(0)
    net = UNet(3, 2, HealpixSphere(4, hemisphere=True), depth=3, filter_start=4,
               conv="e3so3").eval()
    x = torch.randn(1, 3, 96, 4, 4, 4)
    y = net(x)
    assert y.shape == (1, 2, 96, 4, 4, 4) and (y >= 0).all()


def test_bad_input_names_the_argument(sphere):
    conv = SphericalConv(2, 3, sphere.chebyshev_basis(3))
    with pytest.raises(ValueError, match="vertices|n_vertices|12"):
        conv(torch.randn(1, 2, sphere.n_vertices + 1, 1, 1, 1))
    with pytest.raises(ValueError, match="6"):
        conv(torch.randn(1, 2, sphere.n_vertices, 1, 1))
    with pytest.raises(ValueError, match="spatial_kernel_size"):
        E3SO3Conv(2, 3, sphere.chebyshev_basis(3), spatial_kernel_size=4)
    with pytest.raises(ValueError, match="conv must be one of"):
        UNet(2, 1, sphere, depth=1, conv="nonsense")
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(2, 1, sphere, depth=2, conv="e3so3")(torch.randn(1, 2, sphere.n_vertices, 3, 3, 3))
