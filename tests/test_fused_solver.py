"""The fused L-BFGS passes (numba) against the torch expressions they replace."""

import numpy as np
import pytest
import torch
from tqdm.auto import tqdm

from esdmri.reconst import fused_solver
from esdmri.reconst.refine import Preconditioner, RefinementHistory, _lbfgs_descent

N_WM = 15  # 15 WM coefficients (order 4) and 2 isotropic tissues
COLUMNS = N_WM + 2
# Rows that are not a multiple of the kernels' blocks: every block and chunk boundary is hit.
ROWS = 1000


class torch_path:
    """Run the torch expressions on the CPU within the block."""

    def __enter__(self):
        fused_solver.ENABLED = False

    def __exit__(self, *exc):
        fused_solver.ENABLED = True


def fields(dtype, count, seed=0):
    """``count`` random fields, shape (ROWS, COLUMNS); the first is a point ``c`` whose
    isotropic coefficients are at the bound 0 in about half the voxels, the second a
    gradient pointing outwards at about half of those (held)."""
    generator = torch.Generator().manual_seed(seed)
    out = [torch.randn(ROWS, COLUMNS, generator=generator, dtype=dtype) for _ in range(count)]
    out[0][:, N_WM:].clamp_(min=0)
    return out


def both(function, *arguments):
    """``function`` on copies of ``arguments`` by the kernels and by torch: the two
    results and the two sets of arguments after the call."""
    results = []
    for reference in (False, True):
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in arguments]
        if reference:
            with torch_path():
                value = function(*copies)
        else:
            value = function(*copies)
        results.append((value, copies))
    return results


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                          atol=1e-12)


def check(results, dtype, *scalar_scales):
    (fused, fused_fields), (reference, reference_fields) = results
    for a, b in zip(fused_fields, reference_fields):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, **tolerance(dtype))
    fused = fused if isinstance(fused, tuple) else (fused,)
    reference = reference if isinstance(reference, tuple) else (reference,)
    for a, b, scale in zip(fused, reference, scalar_scales):
        if b is None:
            assert a is None
        else:
            # float64 sums against torch's: the relative tolerance of the field's sum
            assert abs(a - float(b)) <= tolerance(dtype)["rtol"] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_start_direction(dtype):
    c, gradient, direction, s = fields(dtype, 4)
    held = (c[:, N_WM:] <= 0) & (gradient[:, N_WM:] > 0)
    assert 0 < int(held.sum()) < held.numel()
    results = both(fused_solver.start_direction, direction, gradient, c, N_WM, s)
    check(results, dtype, float(s.abs().flatten() @ gradient.abs().flatten()))
    fused_direction = results[0][1][0]
    assert torch.all(fused_direction[:, N_WM:][held] == 0)
    check(both(fused_solver.start_direction, direction, gradient, c, N_WM), dtype, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_dot", [True, False])
def test_axpy_dot(dtype, with_dot):
    direction, x, u = fields(dtype, 3)
    arguments = (direction, -0.37, x) + ((u,) if with_dot else ())
    check(both(fused_solver.axpy_dot, *arguments), dtype,
          float(u.abs().flatten() @ (direction.abs() + x.abs()).flatten()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_update", [True, False])
def test_finish_direction(dtype, with_update):
    c, gradient, direction, x = fields(dtype, 4)
    update = (0.81, x) if with_update else ()
    results = both(fused_solver.finish_direction, direction, gradient, c, N_WM, *update)
    check(results, dtype, float(gradient.abs().flatten() @ (direction.abs() + x.abs()).flatten()))
    held = (c[:, N_WM:] <= 0) & (gradient[:, N_WM:] > 0)
    assert torch.all(results[0][1][0][:, N_WM:][held] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trial_point(dtype):
    c, gradient, direction, trial, s = fields(dtype, 5)
    results = both(fused_solver.trial_point, trial, s, c, direction, 0.5, gradient, N_WM)
    check(results, dtype, float(gradient.abs().flatten() @ direction.abs().flatten()))
    fused_trial = results[0][1][0]
    assert float(fused_trial[:, N_WM:].min()) == 0  # the bound is active and kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_difference(dtype):
    y, new, old, s = fields(dtype, 4)
    check(both(fused_solver.pair_difference, y, new, old, s), dtype,
          float(s.abs().flatten() @ (new - old).abs().flatten()),
          float(((new - old) ** 2).sum()))


# Degrees of the test fields' columns: order 4's WM coefficients, then 2 isotropic tissues.
DEGREES = np.array([0, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0, 0])


def spd_matrix(seed=1):
    """A symmetric positive definite ``C x C`` matrix shaped like the signal
    preconditioner: within 1e-6 of a multiple of the identity on degree 4 and
    well below it on degrees 0 and 2, with small couplings between the degrees."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.as_tensor(DEGREES < 4)
    deficit = torch.zeros(COLUMNS, COLUMNS, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(int(low.sum()), int(low.sum()),
                                           generator=generator, dtype=torch.float64))
    values = torch.linspace(0.05, 0.8, int(low.sum()), dtype=torch.float64)
    deficit[low[:, None] & low[None, :]] = ((basis * values) @ basis.T).flatten()
    noise = 1e-6 * torch.randn(COLUMNS, COLUMNS, generator=generator, dtype=torch.float64)
    deficit += noise + noise.T
    return 2.0 * (torch.eye(COLUMNS, dtype=torch.float64) - deficit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_apply_and_quadratic(dtype):
    x, out = fields(dtype, 2, seed=5)
    columns = torch.tensor([0, 3, 4, 9, 15])
    generator = torch.Generator().manual_seed(2)
    block = torch.randn(5, 5, generator=generator, dtype=dtype)
    block = (block + block.T) / 4
    check(both(fused_solver.block_apply, out, x, columns, block, -0.7), dtype)
    dense = torch.zeros(COLUMNS, COLUMNS, dtype=dtype)
    dense[columns[:, None], columns[None, :]] = block
    expected = -0.7 * (x - x @ dense)
    torch.testing.assert_close(both(fused_solver.block_apply, out, x, columns, block,
                                    -0.7)[0][1][0], expected, **tolerance(dtype))
    in_place = x.clone()
    fused_solver.block_apply(in_place, in_place, columns, block, -0.7)
    torch.testing.assert_close(in_place, expected, **tolerance(dtype))
    check(both(fused_solver.block_quadratic, x, columns, block), dtype, float((x * x).sum()))
    assert fused_solver.block_quadratic(x, columns, block) == pytest.approx(
        float((x * expected).sum()) / -0.7, rel=tolerance(dtype)["rtol"])


@pytest.mark.parametrize("tolerance_value, rank", [(0.0, None), (1e-3, 8), (1e-7, COLUMNS)])
def test_preconditioner_keeps_the_degrees_above_its_tolerance(tolerance_value, rank):
    matrix = spd_matrix()
    preconditioner = Preconditioner(matrix, tolerance_value, DEGREES)
    assert preconditioner.rank == rank
    # The reference: p (I - M) with M = I - P / p zeroed outside the kept degrees' columns.
    scale = float(torch.linalg.eigvalsh(matrix).max())
    kept = torch.as_tensor(DEGREES < 4 if rank == 8 else np.ones(COLUMNS, bool))
    deficit = torch.eye(COLUMNS, dtype=torch.float64) - matrix / scale
    expected = scale * (torch.eye(COLUMNS, dtype=torch.float64)
                        - deficit * (kept[:, None] & kept[None, :]))
    assert float(torch.linalg.matrix_norm(expected - matrix, ord=2)) <= 1e-4 * scale
    x, out = fields(torch.float64, 2, seed=7)
    applied = preconditioner.apply(x, out, alpha=-0.3)
    torch.testing.assert_close(applied, x @ (-0.3 * (matrix if rank is None else expected)),
                               rtol=1e-12, atol=1e-12)
    quadratic = float(preconditioner.quadratic(x, out))
    assert quadratic == pytest.approx(
        float((x * (x @ (matrix if rank is None else expected))).sum()), rel=1e-12)


def test_preconditioner_commutes_with_permutations():
    """Columns permuted (the solver's parity order) give the permuted operator exactly:
    the kept degrees and the block follow the columns, no eigenvectors are chosen."""
    matrix, order = spd_matrix(), torch.randperm(COLUMNS, generator=torch.Generator()
                                                 .manual_seed(4))
    x, out = fields(torch.float64, 2, seed=8)
    plain = Preconditioner(matrix, 1e-3, DEGREES).apply(x, out.clone(), alpha=0.5)
    permuted = Preconditioner(matrix[order][:, order], 1e-3, DEGREES[order.numpy()])
    torch.testing.assert_close(permuted.apply(x[:, order].contiguous(), out.clone(), 0.5),
                               plain[:, order], rtol=1e-14, atol=1e-14)


def test_preconditioner_refuses_bad_arguments():
    with pytest.raises(ValueError, match="tolerance"):
        Preconditioner(spd_matrix(), 1.0, DEGREES)
    with pytest.raises(ValueError, match="degrees"):
        Preconditioner(spd_matrix(), 1e-3)


class Objective:
    """A smooth convex objective on (n, C) fields with the refinement's call signature:
    a per-voxel quadratic with an SPD matrix plus a log-cosh term that is not quadratic,
    so L-BFGS keeps pairs, and the isotropic bound is active at the minimiser."""

    def __init__(self, dtype):
        generator = torch.Generator().manual_seed(1)
        root = torch.randn(COLUMNS, COLUMNS, generator=generator, dtype=torch.float64)
        self.matrix = (root @ root.T / COLUMNS + 0.1 * torch.eye(COLUMNS)).to(dtype)
        self.target = torch.randn(ROWS, COLUMNS, generator=generator, dtype=dtype)
        self.target[:, N_WM:] -= 0.5  # negative targets: the bound binds
        self.evaluations = 0

    def __call__(self, c, with_value=True, out=None):
        self.evaluations += 1
        residual = c - self.target
        gradient = torch.mm(residual, self.matrix, out=out)
        gradient.add_(torch.tanh(residual))
        value = float(0.5 * (residual * (residual @ self.matrix)).sum(dtype=torch.float64)
                      + torch.log(torch.cosh(residual)).sum(dtype=torch.float64))
        return value, gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory", [0, 5])
@pytest.mark.parametrize("tolerance", [0.0, 1e-2])
def test_descent_iterates_match_torch(dtype, memory, tolerance):
    # 12 steps: in float32 the objective reaches its round-off floor at about 14,
    # where each path's line search backtracks on its own round-off.
    start = fields(dtype, 1, seed=3)[0]
    preconditioner = Preconditioner(torch.linalg.inv(Objective(dtype).matrix.double()
                                                     + torch.eye(COLUMNS, dtype=torch.float64)),
                                    tolerance, DEGREES, dtype=dtype)
    runs = []
    for reference in (False, True):
        objective, history = Objective(dtype), RefinementHistory()
        arguments = dict(steps=12, lr=0.3, memory=memory, tolerance=0.0, least_fall=0.0,
                         check_every=3, history=history, bar=tqdm(disable=True),
                         preconditioner=preconditioner)
        if reference:
            with torch_path():
                result = _lbfgs_descent(start.clone(), objective, N_WM, **arguments)
        else:
            result = _lbfgs_descent(start.clone(), objective, N_WM, **arguments)
        runs.append((result, objective.evaluations, list(history)))
    (fused, fused_evaluations, fused_history), (reference, evaluations, history) = runs
    assert fused[1:] == reference[1:]  # steps and stop reason
    assert fused_evaluations == evaluations
    assert history[-1] < 0.5 * history[0]  # it descends
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(fused_history, history, rtol=rtol)
    torch.testing.assert_close(fused[0], reference[0], rtol=rtol * 10, atol=rtol * 10)
    assert float(fused[0][:, N_WM:].min()) == 0  # the bound was active


def test_non_contiguous_takes_torch():
    """A field the kernels cannot view flat (not contiguous) takes torch's path."""
    direction, x, u = (field.T for field in fields(torch.float32, 3))
    expected = direction.clone().add_(x, alpha=0.5)
    value = fused_solver.axpy_dot(direction, 0.5, x, u)
    torch.testing.assert_close(direction, expected)
    assert value == pytest.approx(float(torch.vdot(u.flatten(), expected.flatten())), rel=1e-5)


def test_fields_numba_cannot_take_run_torchs_passes():
    """bfloat16 has no numba array type: the update falls back to torch's expressions."""
    direction = torch.ones(3, 4, dtype=torch.bfloat16)
    x = torch.full((3, 4), 2.0, dtype=torch.bfloat16)
    assert not fused_solver._fused(direction, x)
    product = fused_solver.axpy_dot(direction, 0.5, x, x)
    assert torch.equal(direction, torch.full((3, 4), 2.0, dtype=torch.bfloat16))
    assert product == 48.0


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_refinement_refuses_a_bad_preconditioner_tolerance(value):
    from esdmri.reconst.refine import refine_coefficients

    with pytest.raises(ValueError, match="preconditioner_tolerance"):
        refine_coefficients(np.zeros((2, 2, 2, COLUMNS)), np.ones((2, 2, 2, 4)),
                            np.ones((2, 2, 2), bool), torch.ones(COLUMNS, 4),
                            torch.ones(6, N_WM), N_WM, 4, None, steps=1,
                            preconditioner_tolerance=value)
