"""The U-Net builder: topology, conv kinds, training, bad input."""

import numpy as np
import pytest
import torch

from esdmri.nn import CONV_KINDS, E3SO3Conv, SpatialConv, SphericalConv, UNet
from esdmri.nn.unet import ConvKind, get_conv_kind, register_conv_kind
from esdmri.sphere import HealpixSphere


@pytest.fixture(autouse=True)
def small_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sphere():
    return HealpixSphere(4, hemisphere=True)


def test_topology_widths_and_output(sphere):
    net = UNet(3, 2, sphere, depth=3, filter_start=4, conv="e3so3", convs_per_block=2)
    widths = [[conv.out_channels for conv in block.convs]
              for block in [*net.encoder, net.bottleneck, *net.decoder]]
    assert widths == [[4, 4], [8, 8], [16, 16, 8], [8, 8, 4], [4, 4, 4]]
    assert [block.convs[0].in_channels for block in net.decoder] == [16, 8]
    # Each level runs on its own sphere of the pyramid.
    assert [block.convs[0].operator.n_vertices for block in net.encoder] == [96, 24]
    assert net.bottleneck.convs[0].operator.n_vertices == 6
    assert all(isinstance(conv, E3SO3Conv) and conv.bias is None
               for block in net.encoder for conv in block.convs)
    assert net.head.bias is not None
    x = torch.randn(2, 3, sphere.n_vertices, 8, 4, 4)
    y = net(x)
    assert y.shape == (2, 2, sphere.n_vertices, 8, 4, 4)
    assert torch.all(y >= 0)  # Softplus head


@pytest.mark.parametrize("conv, layer, grid", [
    ("spherical", SphericalConv, (3, 2, 1)),  # no grid pooling: any grid
    ("concat", SphericalConv, (3, 2, 1)),
    ("spatial", SpatialConv, (4, 4, 4)),
    ("e3so3", E3SO3Conv, (4, 4, 4)),
])
def test_conv_kinds(conv, layer, grid):
    sphere = HealpixSphere(2, hemisphere=True)
    net = UNet(2, 3, sphere, depth=2, filter_start=2, conv=conv)
    assert isinstance(net.encoder[0].convs[0], layer)
    if conv == "concat":
        assert net.encoder[0].convs[0].in_channels == 2 * 27
    y = net(torch.randn(1, 2, sphere.n_vertices, *grid))
    assert y.shape == (1, 3, sphere.n_vertices, *grid)


def test_voxel_norm_is_local_and_the_same_in_training_and_evaluation(sphere):
    """Batch norm mixes windows and padding into a voxel's output in training; voxel norm not."""
    x = torch.randn(2, 2, sphere.n_vertices, 3, 3, 3)
    changed = x.clone()
    changed[1, :, :, 0, 0, 0] += 5.0  # another window's voxel
    for norm, local in (("voxel", True), ("batch", False)):
        net = UNet(2, 1, sphere, depth=2, filter_start=2, conv="spherical", norm=norm)
        with torch.no_grad():
            y, y_changed = net.train()(x), net(changed)
            same_voxels = torch.equal(y[0], y_changed[0])
            assert same_voxels == local, norm
            if norm == "voxel":
                torch.testing.assert_close(net.eval()(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet(2, 1, sphere, depth=2, norm="group")


def test_concat_kind_sees_the_neighbourhood_but_no_further():
    sphere = HealpixSphere(2, hemisphere=True)
    net = UNet(1, 1, sphere, depth=2, filter_start=2, conv="concat").eval()
    x = torch.randn(1, 1, sphere.n_vertices, 5, 1, 1)
    changed = x.clone()
    changed[..., 4, 0, 0] += 1.0
    difference = (net(changed) - net(x)).abs().amax(dim=(0, 1, 2, 4, 5))
    assert torch.all(difference[3:] > 0) and torch.all(difference[:3] == 0)


def test_pq_kind_is_registered_on_demand():
    pytest.importorskip("esdmri.nn.pq")
    kind = get_conv_kind("pq")
    assert kind.pooling == "both" and "pq" in CONV_KINDS
    sphere = HealpixSphere(2, hemisphere=True)
    net = UNet(2, 1, sphere, depth=2, filter_start=2, conv="pq")
    assert type(net.encoder[0].convs[0]).__name__ == "PQSphereConv"
    assert net(torch.randn(1, 2, sphere.n_vertices, 2, 2, 2)).shape == (1, 1, 24, 2, 2, 2)


def test_registered_kind_is_used(sphere):
    calls = []

    def build(in_channels, out_channels, level, operator, options, bias):
        calls.append(level.n_vertices)
        return SphericalConv(in_channels, out_channels, operator, bias=bias)

    register_conv_kind("test-kind", ConvKind(build, "spherical"))
    try:
        UNet(1, 1, sphere, depth=2, filter_start=2, conv="test-kind", convs_per_block=1)
    finally:
        del CONV_KINDS["test-kind"]
    assert calls == [96, 24, 24, 96, 96, 96]  # encoder, bottleneck x2, decoder x2, head


def test_training_fits_a_target(sphere):
    net = UNet(2, 1, sphere, depth=2, filter_start=4, conv="e3so3")
    x = torch.rand(2, 2, sphere.n_vertices, 4, 4, 4)
    target = x[:, :1] * 0.5 + 0.2  # reachable and non-negative
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = (net(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_state_dict_is_sphere_independent():
    full, hemi = HealpixSphere(4), HealpixSphere(4, hemisphere=True)
    net_full = UNet(1, 1, full, depth=2, filter_start=2)
    state = net_full.state_dict()
    assert not any("synthesis" in key or "analysis" in key for key in state)
    UNet(1, 1, hemi, depth=2, filter_start=2).load_state_dict(state)


def test_bad_input(sphere):
    with pytest.raises(ValueError, match=r"conv must be one of .*'e3so3'.* got 'sphere'"):
        UNet(1, 1, sphere, conv="sphere")
    with pytest.raises(ValueError, match=r"spatial_kernel_size must be odd .* got 2"):
        UNet(1, 1, sphere, spatial_kernel_size=2)
    with pytest.raises(ValueError, match=r"depth=5 needs nside >= 16"):
        UNet(1, 1, sphere, depth=5)
    with pytest.raises(ValueError, match=r"filter_start must be a positive int"):
        UNet(1, 1, sphere, filter_start=0)
    with pytest.raises(ValueError, match=r"pooling_mode must be one of"):
        UNet(1, 1, sphere, pooling_mode="median")
    net = UNet(2, 1, sphere, depth=3, filter_start=2)
    with pytest.raises(ValueError, match=r"x must have grid sizes divisible by 4 for depth=3"):
        net(torch.randn(1, 2, sphere.n_vertices, 8, 6, 4))
    with pytest.raises(ValueError, match=r"x must have 96 vertices"):
        net(torch.randn(1, 2, 192, 4, 4, 4))
    with pytest.raises(ValueError, match=r"x must have 2 channels"):
        net(torch.randn(1, 1, 96, 4, 4, 4))
    with pytest.raises(ValueError, match=r"x must have 6 dimensions"):
        net(torch.randn(2, 96, 4, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unet_on_cuda(sphere):
    net = UNet(2, 1, sphere, depth=2, filter_start=2).eval()
    x = torch.randn(1, 2, sphere.n_vertices, 4, 4, 4)
    expected = net(x)
    np.testing.assert_allclose(net.to("cuda")(x.to("cuda")).cpu().detach().numpy(),
                               expected.detach().numpy(), rtol=1e-4, atol=1e-5)
