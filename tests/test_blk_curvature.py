"""L-BFGS with one curvature model per voxel (``curvature="voxel"``, issue 28): its
minimum against scipy's, its equivariance under random SO(3) rotations of the gradient
table and under voxel permutations, and its options."""

import pytest
import torch
from scipy.optimize import minimize
from test_refine import (COUPLED, ORDER, equivariance_errors, field, phantom,  # noqa: F401
                         refine_field)
from test_refine_buffers import coupled_problem

from esdmri.reconst.config import RefinementConfig
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.models import ESDModel
from esdmri.reconst.refine import _row_dots
from esdmri.shm import n_coeffs


def test_row_dots_are_each_rows_inner_product():
    rng = torch.Generator().manual_seed(0)
    first, second = (torch.randn((7, 5), generator=rng, dtype=torch.float64) for _ in range(2))
    expected = torch.tensor([[float(a @ b)] for a, b in zip(first, second)], dtype=torch.float64)
    torch.testing.assert_close(_row_dots(first, second), expected, rtol=1e-14, atol=1e-15)


def test_voxel_curvature_reaches_scipys_minimum_of_a_convex_objective(phantom, field):  # noqa: F811
    """On the convex objective (signal fit, non-negativity with the isotropic bound active in
    some voxels, total variation; no Cauchy sparsity) the per-voxel L-BFGS with its per-voxel
    line search stops where scipy's L-BFGS-B (float64, the same bound) does, as the global
    L-BFGS does (``test_refine_buffers``)."""
    convex = LossWeights(sparsity=0.0)
    objective, *_, start, _ = coupled_problem(phantom, field, convex,
                                              COUPLED["total_variation"])
    n_wm = n_coeffs(ORDER)
    signal, mask, start_field = field
    refined, history = refine_field(phantom, phantom.gtab, signal, mask, start_field, convex,
                                    dtype=torch.float64, steps=600, tolerance=1e-12,
                                    check_every=5, curvature="voxel", **COUPLED)
    assert (refined[mask][:, n_wm:] >= 0).all()
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    shape = start.shape

    def value_and_gradient(x):
        value, gradient = objective(torch.as_tensor(x.reshape(shape)))
        return value, gradient.numpy().ravel()

    bounds = [(None, None) if column < n_wm else (0, None)
              for _ in range(shape[0]) for column in range(shape[1])]
    reference = minimize(value_and_gradient, start.numpy().ravel(), jac=True,
                         method="L-BFGS-B", bounds=bounds,
                         options=dict(maxiter=20000, maxfun=40000, ftol=1e-15, gtol=1e-11))
    theirs = reference.fun / shape[0]
    print(f"voxel curvature: {history[-1]:.12g} ({history.evaluations:.1f} evaluations, "
          f"{history.steps} steps), scipy {theirs:.12g} ({reference.nfev} evaluations)")
    # Measured: 3.3e-7 above scipy's after 600 steps and 3357 evaluations, where the global
    # L-BFGS is within 1e-8 after 421: the per-voxel model is poor under the coupling.
    assert abs(history[-1] - theirs) < 1e-6 * theirs


def test_voxel_curvature_is_equivariant(phantom, field):  # noqa: F811
    """Signal fit and total variation (which rotations leave exact), float64, 30 steps:
    rotating the gradient table by a random SO(3) rotation rotates the result, and a quarter
    turn of the grid (a permutation of the voxels, with the matching rotation) turns it. The
    check can fail: ``equivariance_errors`` asserts that the unrotated result differs by
    more than 0.05. Every scalar is invariant, but each voxel's line search takes its own
    pass-or-halve decisions, and a decision that round-off flips changes that voxel's step
    and, through its pairs, its later steps: measured 1.1e-7 (random) and 1.1e-7 (quarter
    turn) where the global L-BFGS, with one decision per step, keeps 3e-8 and 4e-15 (with
    the first version's linearised spatial share, commit 91eb831: 4.6e-5 and 1.2e-5)."""
    errors = equivariance_errors(phantom, field, LossWeights(sparsity=0.0, nonnegativity=0.0),
                                 dict(COUPLED, dtype=torch.float64, curvature="voxel"))
    print(f"voxel curvature, signal fit + total variation: relative errors {errors}")
    assert errors["random"] < 1e-5
    assert errors["quarter"] < 1e-5


def test_voxel_curvature_on_the_full_loss_lowers_the_objective(phantom, field):  # noqa: F811
    """With the nonconvex sparsity term, float32 as the models run it: every recorded
    objective is below the one before (the line search accepts only decreases), the
    evaluations count the voxels the per-voxel line search evaluated again, and the end is
    within 1 % of the global L-BFGS's (a non-convex objective: not the same minimum)."""
    signal, mask, start = field
    weights = LossWeights()
    ends = {}
    for curvature in ("global", "voxel"):
        _, history = refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                                  steps=60, curvature=curvature, **COUPLED)
        assert all(later <= earlier for earlier, later in zip(history, history[1:]))
        assert history.evaluations >= history.steps
        ends[curvature] = history[-1]
    assert abs(ends["voxel"] - ends["global"]) < 0.01 * ends["global"]


def test_bad_curvature(phantom, field):  # noqa: F811
    signal, mask, start = field
    with pytest.raises(ValueError, match="curvature"):
        refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(),
                     curvature="diagonal")
    with pytest.raises(ValueError, match="refine_curvature"):
        ESDModel(phantom.gtab, phantom.response, refine_curvature="newton")
    assert RefinementConfig(refine_curvature="voxel").solver_options()["curvature"] == "voxel"
