"""The refinement's fused CPU kernels (esdmri.reconst.fused_objective, issue 28) against
torch's code, the reference they replace on a CPU and the code every other device runs:
the voxel terms' pass, the total variation's stencil, the whole objective and the whole
refinement, in float32 and float64, and numba's thread count following torch's."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
from test_refine import COUPLED, ORDER, field, phantom, refine_field  # noqa: F401

from esdmri.reconst import fused_objective
from esdmri.reconst.losses import (LossWeights, difference_operators, neighbour_pairs,
                                   total_variation)
from esdmri.reconst.refine import CoupledObjective, VoxelLoss
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sphere import HealpixSphere
from esdmri.threads import NUMBA_LAYERS, sync_numba_threads

# Relative round-off of each dtype that the kernels may add (sums reassociated, products
# fused into multiply-adds, float64 sums where torch sums in float32).
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture
def torch_reference(monkeypatch):
    """A function that builds an object with the kernels off (torch's code on the CPU)."""
    def build(factory, *args, **kwargs):
        monkeypatch.setattr(fused_objective, "ENABLED", False)
        built = factory(*args, **kwargs)
        monkeypatch.setattr(fused_objective, "ENABLED", True)
        return built
    return build


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """torch's and numba's threads: one runs the serial kernels, two the parallel ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    assert sync_numba_threads() == min(request.param, numba.config.NUMBA_NUM_THREADS)
    yield request.param
    torch.set_num_threads(previous)
    sync_numba_threads()


def random_problem(n, dtype, seed=0, n_measurements=30):
    """A forward matrix, a sampler (order 6 on 96 directions) and random voxels."""
    rng = np.random.default_rng(seed)
    n_wm = n_coeffs(ORDER)
    matrix = torch.as_tensor(rng.normal(0, 0.3, (n_wm + 2, n_measurements)), dtype=dtype)
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(4, hemisphere=True).vertices),
                              dtype=dtype)
    coefficients = torch.as_tensor(rng.normal(0, 0.05, (n, n_wm + 2)), dtype=dtype)
    measured = torch.as_tensor(rng.uniform(0, 1, (n, n_measurements)), dtype=dtype)
    return matrix, sampler, n_wm, coefficients, measured


def assert_close(actual, expected, dtype):
    """Equal to the dtype's round-off, relative to the largest entry."""
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 300])
def test_voxel_terms_are_torchs(dtype, n, threads, torch_reference):
    """Value and gradient of the fused pass against torch's passes, with and without the
    loss, written to ``out``; the samples include large ones (a group of penalty
    arguments whose product overflows float64) and negative ones."""
    matrix, sampler, n_wm, coefficients, measured = random_problem(n, dtype)
    coefficients[0, :n_wm] *= 1e4  # f ~ 1e3: 32 arguments of ~1e10 overflow
    weights = LossWeights(intensity=0.7, sparsity=2e-4, nonnegativity=0.3)
    fused = VoxelLoss(matrix, sampler, n_wm, weights)
    reference = torch_reference(VoxelLoss, matrix, sampler, n_wm, weights)
    assert fused.fused and not reference.fused
    inputs = fused.project(measured)
    samples = coefficients[:, :n_wm] @ sampler.T
    assert bool((samples < 0).any()) and float(samples.abs().max()) > 100
    out = torch.full_like(coefficients, np.nan)
    gradient, loss = fused(coefficients, *inputs, out=out, return_loss=True)
    expected_gradient, expected_loss = reference(coefficients, *inputs, return_loss=True)
    assert gradient.data_ptr() == out.data_ptr() and loss.dtype == torch.float64
    assert bool(torch.isfinite(loss).all())
    assert_close(gradient, expected_gradient, dtype)
    torch.testing.assert_close(loss, expected_loss, rtol=TOLERANCE[dtype], atol=0)
    assert_close(fused(coefficients, *inputs), expected_gradient, dtype)


def masks():
    """A mask with holes and voxels without neighbours, and a single voxel."""
    holes = np.random.default_rng(1).random((7, 6, 5)) > 0.45
    holes[0, 0, 0], holes[0, 0, 1], holes[0, 1, 0], holes[1, 0, 0] = True, False, False, False
    single = np.zeros((3, 3, 3), dtype=bool)
    single[1, 1, 1] = True
    return {"holes": holes, "single": single}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", [1, 7, 1000])
def test_total_variation_stencil_is_torchs(dtype, blocks, threads):
    """The stencil, block by block, adds the gradient of ``total_variation`` to the
    gradient it is given and sums its value, on a mask with holes and an isolated voxel
    (a zero gradient), whatever the blocks and threads."""
    mask = masks()["holes"]
    first, second = neighbour_pairs(mask)
    n = int(mask.sum())
    rng = np.random.default_rng(2)
    coefficients = torch.as_tensor(rng.normal(0, 0.1, (n, 17)), dtype=dtype)
    weights = torch.as_tensor(rng.uniform(0.2, 1, len(first)), dtype=dtype)
    isolated = sorted(set(range(n)) - set(first.tolist()) - set(second.tolist()))
    assert isolated  # the test can see a voxel without neighbours
    start = torch.as_tensor(rng.normal(size=(n, 17)), dtype=dtype)
    expected_value, expected = total_variation(
        coefficients, first, second, weights, 0.05, gradient=True,
        operators=difference_operators(first, second, n, dtype=dtype), add_to=start.clone())
    stencil = fused_objective.TotalVariationStencil(first, second, weights, 0.05, n)
    gradient, value = start.clone(), 0.0
    for rows in (slice(i, i + blocks) for i in range(0, n, blocks)):
        value += stencil.add_gradient(coefficients, gradient, rows)
    assert abs(value - float(expected_value)) <= TOLERANCE[dtype] * float(expected_value)
    assert_close(gradient, expected, dtype)
    torch.testing.assert_close(gradient[isolated], start[isolated], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_name", ["holes", "single"])
def test_coupled_objective_is_torchs(dtype, mask_name, threads, torch_reference):
    """The whole objective (voxel terms and total variation, blocks of 11 voxels) against
    torch's, with and without the value."""
    mask = masks()[mask_name]
    first, second = neighbour_pairs(mask)
    n = int(mask.sum())
    matrix, sampler, n_wm, coefficients, measured = random_problem(n, dtype, seed=3)
    weights = LossWeights()
    pair_weights = (torch.as_tensor(np.random.default_rng(4).uniform(0, 1e-3, len(first)),
                                    dtype=dtype) if len(first) else None)
    arguments = (measured, matrix, sampler, n_wm, weights, first, second, pair_weights,
                 1e-3, 11)
    fused = CoupledObjective(*arguments)
    reference = torch_reference(CoupledObjective, *arguments)
    assert fused.fused and (fused.stencil is not None) == (mask_name == "holes")
    assert not reference.fused and reference.stencil is None
    value, gradient = fused(coefficients)
    expected_value, expected = reference(coefficients)
    assert abs(value - expected_value) <= TOLERANCE[dtype] * abs(expected_value)
    assert_close(gradient, expected, dtype)
    none, again = fused(coefficients, with_value=False)
    assert none is None
    torch.testing.assert_close(again, gradient, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refinement_is_torchs(phantom, field, dtype, monkeypatch):  # noqa: F811
    """The coupled L-BFGS refinement of a small phantom with the kernels and with torch's
    code: in float64 the same steps to round-off; in float32 the same objective to
    float32's precision (its round-off may move the stop by a few steps), measured against
    float64's: torch's float32 residual ``R c - Q^T y`` cancels digits (1.9e-5 off float64's
    objective after 40 steps), the kernels' increments from the previous point do not
    (3e-7)."""
    signal, mask, start = field
    options = dict(COUPLED, steps=40, tolerance=1e-7, check_every=5)
    refined, history = refine_field(phantom, phantom.gtab, signal, mask, start,
                                    LossWeights(), dtype=dtype, **options)
    monkeypatch.setattr(fused_objective, "ENABLED", False)
    expected, expected_history = refine_field(phantom, phantom.gtab, signal, mask, start,
                                              LossWeights(), dtype=dtype, **options)
    if dtype == torch.float64:
        assert history.evaluations == expected_history.evaluations
        np.testing.assert_allclose(history, expected_history, rtol=1e-12)
        np.testing.assert_allclose(refined, expected, rtol=0,
                                   atol=1e-9 * np.abs(expected).max())
    else:
        _, precise = refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(),
                                  dtype=torch.float64, **options)
        assert abs(history[-1] - precise[-1]) <= 2e-6 * abs(precise[-1])
        assert abs(expected_history[-1] - precise[-1]) <= 3e-5 * abs(precise[-1])
        assert abs(history.evaluations - expected_history.evaluations) <= 5


def test_numba_threads_follow_torchs():
    """``sync_numba_threads`` gives numba torch's current count, and torch's count stays
    what it was."""
    previous = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            expected = min(count, numba.config.NUMBA_NUM_THREADS)
            assert sync_numba_threads() == expected == numba.get_num_threads()
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(previous)
        sync_numba_threads()


def test_numba_starting_its_threads_keeps_torchs_count():
    """In a fresh process on one torch thread, numba's start (its OpenMP layer sets the
    runtime's count to its pool's size) leaves torch's count at one, and the layer is the
    first of ``NUMBA_LAYERS`` that loads."""
    code = ("import torch, numba\n"
            "from esdmri.threads import NUMBA_LAYERS, sync_numba_threads\n"
            "torch.set_num_threads(1)\n"
            "assert sync_numba_threads() == 1 == torch.get_num_threads()\n"
            "print(numba.threading_layer(), numba.config.NUMBA_NUM_THREADS)\n")
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("OMP_NUM_THREADS", "NUMBA_THREADING_LAYER")}
    environment["NUMBA_NUM_THREADS"] = "2"  # a pool larger than torch's count
    result = subprocess.run([sys.executable, "-c", code], env=environment,
                            capture_output=True, text=True, check=True)
    layer, pool = result.stdout.split()
    assert layer in NUMBA_LAYERS and pool == "2"


def test_kernels_only_for_float_cpu_tensors():
    """float32 and float64 CPU tensors get the kernels; half precision keeps torch's code."""
    assert fused_objective.fused_on(torch.zeros(1))
    assert fused_objective.fused_on(torch.zeros(1, dtype=torch.float64))
    assert not fused_objective.fused_on(torch.zeros(1, dtype=torch.bfloat16))
    assert not fused_objective.fused_on(torch.zeros(1, device="meta"))
