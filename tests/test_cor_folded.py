"""The folded correction (esdmri.reconst.folded) computes the layered network's function."""

import os

import numpy as np
import pytest
import torch

from esdmri import threads
from esdmri.nn.chebyshev import ChebyshevOperator
from esdmri.nn.unet import VoxelNorm
from esdmri.reconst import folded, pretrained
from esdmri.shm import n_coeffs
from esdmri.sphere import HealpixSphere


def prior_volume(shape, order, tissues, seed):
    """Random prior-like coefficients (positive WM amount and shares) and a ragged mask."""
    rng = np.random.default_rng(seed)
    coefficients = rng.normal(0, 0.2, shape + (n_coeffs(order) + len(tissues) - 1,))
    coefficients[..., 0] = rng.uniform(0.1, 0.4, shape)
    coefficients[..., n_coeffs(order):] = rng.uniform(0, 0.3, shape + (len(tissues) - 1,))
    mask = rng.uniform(size=shape) < 0.8
    mask[0] = False  # the mask's box starts inside the volume
    coefficients[~mask] = 0
    return coefficients.astype(np.float32), mask


def whole_volume(correction, coefficients, mask, tissues):
    """PriorCorrection.forward on the whole zero-padded volume in one pass (the reference)."""
    halo = correction.halo
    volume = torch.as_tensor(coefficients).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        out = correction(torch.nn.functional.pad(volume, (halo,) * 6), tissues)
    inner = out[0, :, halo:out.shape[2] - halo, halo:out.shape[3] - halo,
                halo:out.shape[4] - halo]
    expected = inner.permute(1, 2, 3, 0).numpy().copy()
    expected[~mask] = 0
    return expected


def randomized(kind, seed):
    """A correction of ``kind`` with random weights everywhere, the norms' too."""
    torch.manual_seed(seed)
    correction = pretrained.PriorCorrection(pretrained.ARCHITECTURES[kind]).eval()
    with torch.no_grad():
        for name, parameter in correction.named_parameters():
            if ".norms." in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.3)
    return correction


def assert_same(result, expected, coefficients):
    delta = np.abs(expected - coefficients).max()
    # The correction changed the prior: the comparison can fail.
    assert delta > 1e-2
    assert result.dtype == np.float32 and result.shape == expected.shape
    assert np.abs(result - expected).max() < 1e-5 * max(delta, np.abs(expected).max())


@pytest.mark.parametrize("kind", sorted(pretrained.ARCHITECTURES))
@pytest.mark.parametrize("order, tissues", [(8, ("wm", "gm", "csf")), (6, ("wm", "csf")),
                                            (10, ("wm", "gm", "csf"))])
def test_folded_equals_the_layered_network_on_random_weights(kind, order, tissues):
    """Every architecture folds; SH orders below, at and above the corrected order 8 and a
    response without GM give the layered network's values (whole volume, one pass), as
    does the layered slab-by-slab pass (folded=False)."""
    correction = randomized(kind, seed=3)
    assert folded.foldable(correction)
    coefficients, mask = prior_volume((7, 6, 5), order, tissues, seed=5)
    expected = whole_volume(correction, coefficients, mask, tissues)
    fast = pretrained.apply_correction(correction, coefficients, mask, tissues)
    layered = pretrained.apply_correction(correction, coefficients, mask, tissues, slab=2,
                                          folded=False)
    assert_same(fast, expected, coefficients)
    assert_same(layered, expected, coefficients)


@pytest.mark.parametrize("kind", sorted(pretrained.ARCHITECTURES))
def test_folded_equals_the_layered_pass_with_the_shipped_weights(kind):
    correction = pretrained.load_correction(True, kind=kind)
    tissues = ("wm", "gm", "csf")
    coefficients, mask = prior_volume((9, 8, 7), 8, tissues, seed=11)
    fast = pretrained.apply_correction(correction, coefficients, mask, tissues)
    layered = pretrained.apply_correction(correction, coefficients, mask, tissues,
                                          folded=False)
    assert_same(fast, layered, coefficients)


def test_chebyshev_matrices_of_both_layouts_are_the_basis():
    basis = HealpixSphere(4, hemisphere=True).chebyshev_basis(4)
    for layout in ("sparse", "dense"):
        terms = folded.chebyshev_matrices(ChebyshevOperator(basis, layout))
        np.testing.assert_allclose(terms.numpy(), basis, atol=1e-5)
    single = folded.chebyshev_matrices(ChebyshevOperator(basis[:1], "sparse"))
    np.testing.assert_array_equal(single.numpy(), basis[:1])


@pytest.mark.parametrize("change", [{"norm": "batch"},
                                    {"spatial_kernel_size": 3, "spatial_layers": 1}],
                         ids=["batch norm", "ESD with a reach"])
def test_a_correction_that_does_not_fold_runs_layered(change):
    """Batch norm, or a reach (halo) wider than the first layer's neighbourhood, do not
    fold: apply_correction runs the layers."""
    architecture = dict(pretrained.ARCHITECTURES["spherical"], **change)
    torch.manual_seed(0)
    correction = pretrained.PriorCorrection(architecture).eval()
    assert not folded.foldable(correction)
    with pytest.raises(ValueError, match="does not fold"):
        folded.FoldedCorrection(correction)
    tissues = ("wm", "gm", "csf")
    coefficients, mask = prior_volume((5, 5, 5), 8, tissues, seed=2)
    result = pretrained.apply_correction(correction, coefficients, mask, tissues)
    np.testing.assert_allclose(result, whole_volume(correction, coefficients, mask, tissues),
                               atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5])
def test_chebyshev_recursions_equal_the_dense_polynomials(kernel_size):
    """The terms T_k x and the sum sum_k T_k z_k by the recursions with the sparse
    Laplacian (rows of 7 to 9 entries: the kernel's passes of four and its remainder)
    against the dense polynomials in float64."""
    basis = HealpixSphere(4, hemisphere=True).chebyshev_basis(kernel_size)  # (K, V, V)
    laplacian = folded.sparse_rows(torch.as_tensor(basis[min(1, kernel_size - 1)],
                                                   dtype=torch.float32))
    assert len(laplacian[2]) < 10 * basis.shape[-1]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, basis.shape[-1], 37)).astype(np.float32)
    terms = np.full((3, kernel_size) + x.shape[1:], np.nan, dtype=np.float32)
    folded.chebyshev_terms(*laplacian, x, terms)
    expected = np.einsum("kvu,bun->bkvn", basis, x.astype(np.float64))
    np.testing.assert_allclose(terms, expected, rtol=1e-4, atol=1e-4)
    z = rng.normal(size=(3, kernel_size) + x.shape[1:]).astype(np.float32)
    total = np.full(x.shape, np.nan, dtype=np.float32)
    folded.chebyshev_sum(*laplacian, z, total)
    expected = np.einsum("kvu,bkun->bvn", basis, z.astype(np.float64))
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-4)


def test_norm_relu_equals_the_voxel_norm_then_relu():
    """The fused kernel against the layered VoxelNorm on [1, C, V, N], after the bias."""
    torch.manual_seed(1)
    channels, vertices, n = 5, 24, 19
    norm = VoxelNorm(channels, eps=1e-3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.5)
    bias = torch.randn(channels)
    x = 3 * torch.randn(channels, vertices, n) + 1
    with torch.no_grad():
        expected = torch.relu(norm((x + bias[:, None, None])[None]))[0]
    result = x.numpy().copy()
    folded.norm_relu(result, bias.numpy(), float(norm.eps), norm.weight.detach().numpy(),
                     norm.bias.detach().numpy())
    assert (expected > 0).any() and (expected == 0).any()
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_chunks_on_two_threads(monkeypatch):
    """Each chunk runs once, on one torch thread, under the caller's inference mode;
    torch's count is restored and the folded correction is the same as on one thread."""
    monkeypatch.setattr(threads, "adapt_num_threads", lambda: None)  # no load to adapt to
    previous = torch.get_num_threads()
    correction = pretrained.load_correction(True)
    tissues = ("wm", "gm", "csf")
    coefficients, mask = prior_volume((12, 12, 12), 8, tissues, seed=7)
    try:
        torch.set_num_threads(1)
        alone = pretrained.apply_correction(correction, coefficients, mask, tissues)
        torch.set_num_threads(2)
        seen = []

        def work(part):
            seen.append((part.start, torch.get_num_threads(),
                         torch.is_inference_mode_enabled()))

        with torch.inference_mode():
            threads.run_chunks(work, 5 * folded.CHUNK + 3, folded.CHUNK)
        assert torch.get_num_threads() == 2
        together = pretrained.apply_correction(correction, coefficients, mask, tissues)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            threads.run_chunks(work, 10, 0)
        # More threads than CPUs: as many workers as CPUs, the count restored as it was.
        torch.set_num_threads(3 * (os.cpu_count() or 1))
        pretrained.apply_correction(correction, coefficients, mask, tissues)
        assert torch.get_num_threads() == 3 * (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(previous)
    assert sorted(seen) == [(start, 1, True) for start in range(0, 6 * folded.CHUNK,
                                                                 folded.CHUNK)]
    # Each chunk's arithmetic is the same on either count.
    np.testing.assert_array_equal(together, alone)
