"""The refinement's matrix products with bfloat16 inputs (``refine_matmul_precision``).

On a CPU with native bfloat16 products (AVX512-BF16, AMX) the options run; elsewhere
they fall back to float32, and the accuracy checks hold a fortiori.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_refine import (COUPLED, equivariance_errors, field, phantom,  # noqa: F401
                         plain_voxel_loss)
from test_refine import real_shaped_scan as refine_scan

from esdmri.reconst import refine
from esdmri.reconst.config import MATMUL_PRECISIONS, RefinementConfig
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.refine import VoxelLoss, _bf16_products, bf16_products_available

NATIVE = bf16_products_available("cpu")
BF16_OPTIONS = [name for name in MATMUL_PRECISIONS if name != "float32"]


def cpu_flags():
    """The CPU's instruction-set flags as Linux lists them, or None without /proc."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_detection_reads_the_cpu_flags_and_refuses_other_devices():
    flags = cpu_flags()
    switch = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")
    if flags is not None and switch and torch.backends.mkldnn.is_available():
        assert NATIVE == bool(flags & {"avx512_bf16", "amx_tile"})
    assert not bf16_products_available("cuda")
    assert not bf16_products_available(torch.device("meta"))


def real_shaped_scan():
    """test_refine's order-12 scan, smaller: signals, matrix, sampler, n_wm, start."""
    measured, matrix, sampler, n_wm, _, start = refine_scan(side=8)
    return measured, matrix, sampler, n_wm, start


@pytest.mark.parametrize("precision", BF16_OPTIONS)
def test_bf16_voxel_terms_against_the_plain_formula_in_float64(precision):
    """Loss and gradient against the written-out loss's float64 autograd: float32's own
    errors (1e-7 / 1e-6) grow to bfloat16's where it runs (measured: gradient 2.1e-3
    relative for bf16-gradient, 7e-4 for bf16-samples; the summed loss exact to float32
    for bf16-gradient, 8e-5 relative for bf16-samples)."""
    measured, matrix, sampler, n_wm, start = real_shaped_scan()
    weights = LossWeights()
    reference = start.clone().requires_grad_(True)
    expected = plain_voxel_loss(reference, measured, matrix, sampler, n_wm, weights)
    expected_gradient = torch.autograd.grad(expected.sum(), reference)[0]
    expected = expected.detach()
    errors = {}
    for name in ("float32", precision):
        voxel_loss = VoxelLoss(matrix.float(), sampler.float(), n_wm, weights,
                               matmul_precision=name)
        assert voxel_loss.matmul_precision == (name if NATIVE else "float32")
        gradient, loss = voxel_loss(start.float(), *voxel_loss.project(measured.float()),
                                    return_loss=True)
        errors[name] = (float((gradient.double() - expected_gradient).norm()
                              / expected_gradient.norm()),
                        abs(float(loss.sum() - expected.sum())) / float(expected.sum()))
    print(f"relative errors (gradient, summed loss): {errors}")
    gradient_error, loss_error = errors[precision]
    assert gradient_error < 1e-2
    assert loss_error < (1e-6 if precision == "bf16-gradient" else 1e-3)
    if NATIVE:  # the products did run with bfloat16 inputs
        assert gradient_error > 20 * errors["float32"][0]
    else:
        assert errors[precision] == errors["float32"]
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"  # the switch was restored


def test_fallback_is_float32_to_the_bit(monkeypatch):
    measured, matrix, sampler, n_wm, start = real_shaped_scan()
    weights = LossWeights()
    # float64 evaluations never take bfloat16 products.
    assert VoxelLoss(matrix, sampler, n_wm, weights,
                     matmul_precision="bf16-samples").matmul_precision == "float32"
    plain = VoxelLoss(matrix.float(), sampler.float(), n_wm, weights)
    expected = plain(start.float(), *plain.project(measured.float()), return_loss=True)
    monkeypatch.setattr(refine, "bf16_products_available", lambda device: False)
    for name in BF16_OPTIONS:
        voxel_loss = VoxelLoss(matrix.float(), sampler.float(), n_wm, weights,
                               matmul_precision=name)
        assert voxel_loss.matmul_precision == "float32"
        result = voxel_loss(start.float(), *voxel_loss.project(measured.float()),
                            return_loss=True)
        assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])


def test_the_switch_is_restored_after_an_error():
    if not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        pytest.skip("torch without the per-backend precision switch")
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError):
        with _bf16_products():
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            torch.mm(torch.ones(2, 3), torch.ones(2, 3))
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bad_precision_is_refused():
    measured, matrix, sampler, n_wm, _ = real_shaped_scan()
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        VoxelLoss(matrix.float(), sampler.float(), n_wm, LossWeights(), matmul_precision="fp16")
    with pytest.raises(ValueError, match="refine_matmul_precision must be one of"):
        RefinementConfig(refine_matmul_precision="bfloat16")
    assert RefinementConfig().solver_options()["matmul_precision"] == "float32"


@pytest.mark.parametrize("precision", BF16_OPTIONS)
def test_one_step_stays_equivariant(phantom, field, precision):  # noqa: F811
    """One coupled L-BFGS step on the full loss in float32: a random rotation's error
    (the HEALPix sampling's, with float32 round-off) and a quarter turn's (exact up to
    round-off) with bfloat16 products within 1e-4 of float32's own (measured: random
    6.9e-4 for all three; quarter 2.7e-8 float32, 5.7e-6 bf16-gradient, 1.5e-8
    bf16-samples)."""
    options = dict(COUPLED, steps=1)
    errors = {name: equivariance_errors(phantom, field, LossWeights(),
                                        dict(options, matmul_precision=name))
              for name in ("float32", precision)}
    print(f"one step, relative errors: {errors}")
    for kind in ("random", "quarter"):
        assert errors[precision][kind] < errors["float32"][kind] + 1e-4
    assert np.isfinite(errors[precision]["random"])
