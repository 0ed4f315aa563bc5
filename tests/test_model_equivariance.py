"""Exact symmetries of the deconvolution networks (float64).

A roto-reflection R that maps both the voxel grid and the HEALPix grid onto
themselves acts on a field by ``f'(p, v) = f(R^T p, R^T v)``; the networks must
commute with it, and with grid translations.
"""

import numpy as np
import pytest
import torch

from esdmri.reconst.network import build_unet
from esdmri.reconst.tiling import receptive_radius
from esdmri.sphere import HealpixSphere
from esdmri.testing import (REFLECT_X, ROTATE_X_90, ROTATE_Z_90, assert_equivariant,
                            equivariance_error, transform_field)

SIZE = 7


def network(kind, sphere, seed=0):
    torch.manual_seed(seed)
    net = build_unet(kind, sphere, 3, 2, depth=2, filter_start=4, kernel_size=3,
                     spatial_kernel_size=3, spatial_layers=2).double()
    # Random batch-norm statistics, so eval mode is not a near-identity.
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


# (grid transform, sphere transform): HEALPix maps onto itself under 90-degree
# rotations about z and under reflections, the voxel grid under all 48 cube
# symmetries; E(3) x SO(3) lets the two act jointly or independently.
SYMMETRIES = {
    "rot_z_90 both": (ROTATE_Z_90, ROTATE_Z_90),
    "reflect_x both": (REFLECT_X, REFLECT_X),
    "rot_x_90 grid only": (ROTATE_X_90, np.eye(3)),
    "rot_z_90 grid only": (ROTATE_Z_90, np.eye(3)),
    "rot_z_90 sphere only": (np.eye(3), ROTATE_Z_90),
    "reflect_x sphere only": (np.eye(3), REFLECT_X),
}


@pytest.mark.parametrize("kind", ["e3so3-stem", "spherical", "concat"])
@pytest.mark.parametrize("symmetry", SYMMETRIES)
def test_networks_commute_with_grid_and_sphere_symmetries(kind, symmetry):
    grid, on_sphere = SYMMETRIES[symmetry]
    sphere = HealpixSphere(2, hemisphere=True)
    net = network(kind, sphere)
    field = torch.rand(1, 3, sphere.n_vertices, SIZE, SIZE, SIZE, dtype=torch.float64)

    def act(f):
        return transform_field(f, sphere, grid, on_sphere)

    if kind == "concat" and not np.allclose(grid, np.eye(3)):
        # C-ESD stacks the neighbours as ordered channels: it is a baseline
        # without grid rotation equivariance, and the check must see that.
        assert equivariance_error(net, field, act) > 1e-3
    else:
        assert_equivariant(net, field, act, label=f"{kind} network under {symmetry}")


def test_a_vertex_shuffle_is_not_a_symmetry():
    sphere = HealpixSphere(2, hemisphere=True)
    net = network("e3so3-stem", sphere)
    field = torch.rand(1, 3, sphere.n_vertices, SIZE, SIZE, SIZE, dtype=torch.float64)
    shuffle = torch.as_tensor(np.random.default_rng(0).permutation(sphere.n_vertices))
    assert equivariance_error(net, field, lambda f: f[:, :, shuffle]) > 1e-3


@pytest.mark.parametrize("kind", ["e3so3-stem", "concat"])
def test_networks_commute_with_translations(kind):
    sphere = HealpixSphere(2, hemisphere=True)
    net = network(kind, sphere)
    radius = receptive_radius(net, 3, sphere.n_vertices)
    field = torch.rand(1, 3, sphere.n_vertices, 11, 11, 11, dtype=torch.float64)
    shifted = torch.roll(field, shifts=(2, -1, 3), dims=(3, 4, 5))
    with torch.no_grad():
        out, out_shifted = net(field), net(shifted)
    # Compare voxels whose receptive field stays inside the grid in both.
    inner = slice(radius + 3, 11 - radius - 3)
    rolled = torch.roll(out, shifts=(2, -1, 3), dims=(3, 4, 5))
    error = (out_shifted - rolled)[..., inner, inner, inner].abs().max().item()
    assert error < 1e-10


def test_receptive_radius_of_rtesd_is_its_spatial_layers():
    sphere = HealpixSphere(2, hemisphere=True)
    for layers in (1, 2):
        torch.manual_seed(0)
        net = build_unet("e3so3-stem", sphere, 3, 2, depth=2, filter_start=4, kernel_size=3,
                         spatial_kernel_size=3, spatial_layers=layers)
        assert receptive_radius(net, 3, sphere.n_vertices) == layers


def test_hemisphere_network_equals_full_sphere_network_on_even_signals():
    full, half = HealpixSphere(2), HealpixSphere(2, hemisphere=True)
    torch.manual_seed(1)
    net_full = network("spherical", full, seed=3)
    net_half = network("spherical", half, seed=3)
    net_half.load_state_dict(net_full.state_dict())
    x = torch.rand(1, 3, half.n_vertices, 2, 2, 2, dtype=torch.float64)
    # Even signal on the full sphere: each vertex takes its kept antipode's value.
    antipode_row = np.array([np.flatnonzero(np.isclose(half.vertices @ v, 1) |
                                            np.isclose(half.vertices @ v, -1))[0]
                             for v in full.vertices])
    with torch.no_grad():
        on_full = net_full(x[:, :, antipode_row])[:, :, half.pixels]
        on_half = net_half(x)
    # Spherical pooling keeps the pairing (children of antipodes are antipodes
    # of children), so the hemisphere network is the full one on even signals,
    # up to the float32 rounding of the stored Chebyshev matrices (a hemisphere
    # entry can be the sum of two full-sphere entries).
    assert (on_full - on_half).abs().max().item() < 1e-6
