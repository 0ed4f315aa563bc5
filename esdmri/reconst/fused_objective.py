"""Fused CPU kernels of the refinement's objective: the voxel terms' pass and the TV stencil.

On a CPU most of an evaluation of :class:`esdmri.reconst.refine.CoupledObjective`
outside its two matrix products is memory-bound passes that torch runs one
kernel at a time: about ten over each block's fODF samples (the residual, the
Cauchy argument, the clamp, two norms, two scalings, the division, the ``log``
and its sum) and about eighteen field passes for the total variation (the
pairs' differences written, read for their norms, scaled and multiplied back
through sparse products). The kernels here do each in one pass, compiled by
numba (its own LLVM: no compiler or build step at install time):

- :func:`voxel_terms`: one pass over a block's ``coefficients @ operator``
  that turns the residual and the fODF samples into what the product back
  needs (the gradient of :class:`~esdmri.reconst.refine.VoxelLoss` with
  respect to them) and, when asked, each voxel's loss;
- :func:`parity_voxel_terms`: the same pass when the products are split by
  the sampler's parity classes (:mod:`esdmri.reconst.sampler_parity`), with
  the Hadamard butterfly and its transpose around each row;
- :func:`increment_voxel_terms`: the same with the signal term taken by
  increments from the previous evaluation's point through the Gram matrix
  (:meth:`esdmri.reconst.sampler_parity.ParitySplit.evaluate_from`);
- :class:`TotalVariationStencil`: the weighted smoothed total variation's
  value and gradient (:func:`esdmri.reconst.losses.total_variation`) as a
  stencil over each voxel's neighbours, added to the evaluation's gradient in
  place, block by block right after the voxel terms have written the block's
  rows (still in cache), each pair's norm computed once.

They take CPU tensors through ``.numpy()`` views (no copies), float32 or
float64; the refinement on any other device runs torch's code, which the tests
also use as the reference. Compiled code is cached (``cache=True``) beside
this module, or where ``NUMBA_CACHE_DIR`` points (numba's own fallback when the
package directory is read-only is a user cache directory: docs/benchmarks.md
gives the first call's cost either way). The threads are numba's, as many as
torch's (:func:`esdmri.threads.sync_numba_threads`, called before each
evaluation).
"""

import math

import numpy as np
import torch
from numba import get_num_threads, njit, prange

__all__ = ["ENABLED", "TotalVariationStencil", "evaluate_voxel_terms", "fused_on",
           "increment_voxel_terms", "numba_takes",
           "parity_voxel_terms", "voxel_terms"]

# Whether objectives built from now on use the kernels on a CPU (a benchmark or a
# test builds a torch reference by setting it False).
ENABLED = True

# The float rules of the kernels: sums may be reassociated (so that LLVM
# vectorises the reductions over a row) and products contracted into fused
# multiply-adds; no assumptions about infinities or NaNs, which the loss and
# the line search must see as torch's code does.
_FAST = {"reassoc", "contract", "nsz"}
# fODF samples whose penalty arguments are multiplied in one float64 product: the
# product of 32 arguments ``1 + f^2 / (2 sigma)``, each about 5e4 for f ~ 1,
# stays far inside float64's range (64 would not); a group whose product overflows
# takes its logarithms one by one. The groups' products accumulate as a mantissa and a
# power of two, so a voxel takes one logarithm.
_LOG_GROUP = 32
_LN2 = math.log(2.0)


def numba_takes(tensor):
    """Whether numba's kernels can work on ``tensor`` through a ``.numpy()`` view.

    CPU tensors of float32 or float64 (numba has no half-precision arrays);
    the solver's kernels (:mod:`esdmri.reconst.fused_solver`) ask the same.
    """
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)


def fused_on(tensor):
    """Whether an objective built now evaluates ``tensor``'s kind with these kernels.

    :data:`ENABLED` and :func:`numba_takes`.
    """
    return ENABLED and numba_takes(tensor)


# numba's compile options of every kernel: ``error_model="numpy"`` lets a
# division be a division (no zero check, which keeps LLVM from vectorising).
_OPTIONS = dict(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")


@njit(**_OPTIONS)
def _sample_terms(samples, spread_scale, sparsity_scale, negative_scale, with_loss):
    """The fODF samples' gradient, in place; their ``(logs, negatives)`` sums with the loss.

    ``logs`` is the sum of ``log(1 + spread_scale f^2)``, ``negatives`` that of
    ``min(f, 0)^2`` (both float64, zero without ``with_loss``).
    """
    one, zero = samples.dtype.type(1), samples.dtype.type(0)
    logs, negatives = 0.0, 0.0
    if with_loss:
        # The groups' products are carried as mantissa x 2^exponent (math.frexp), so a
        # voxel takes one logarithm instead of one per group (0.34 -> 0.32 us per voxel
        # with the parity split, one thread).
        mantissa, exponent = 1.0, 0
        for group in range(0, len(samples), _LOG_GROUP):
            part = samples[group:group + _LOG_GROUP]
            product = 1.0
            for v in range(len(part)):
                product *= np.float64(one + part[v] * part[v] * spread_scale)
            if product < np.inf:
                mantissa, shift = math.frexp(mantissa * product)
                exponent += shift
            else:
                for v in range(len(part)):
                    logs += math.log(np.float64(one + part[v] * part[v] * spread_scale))
        logs += math.log(mantissa) + exponent * _LN2
        for v in range(len(samples)):
            negative = samples[v] if samples[v] < zero else zero  # min(f, 0)
            negatives += np.float64(negative) * np.float64(negative)
    for v in range(len(samples)):
        sample = samples[v]
        negative = sample if sample < zero else zero
        samples[v] = (negative * negative_scale
                      + sparsity_scale * sample / (one + sample * sample * spread_scale))
    return logs, negatives


@njit(**_OPTIONS)
def _voxel_row(i, mapped, projected, constant, rank, residual_scale, spread_scale,
               sparsity_scale, negative_scale, residual_weight, negative_weight, log_weight,
               loss):
    """:func:`voxel_terms` of row ``i``."""
    # Rows sliced and looped from 0: indices that LLVM knows are not negative (numba
    # wraps negative ones), so that it vectorises the loops.
    residuals, target = mapped[i, :rank], projected[i]
    squares = 0.0
    for q in range(len(residuals)):
        residual = residuals[q] - target[q]
        squares += np.float64(residual) * np.float64(residual)
        residuals[q] = residual * residual_scale
    logs, negatives = _sample_terms(mapped[i, rank:], spread_scale, sparsity_scale,
                                    negative_scale, len(loss) > 0)
    if len(loss) > 0:
        loss[i] = (residual_weight * (squares + constant[i]) + negative_weight * negatives
                   + log_weight * logs)


@njit(**_OPTIONS)
def _voxel_terms_serial(mapped, *arguments):
    """:func:`voxel_terms` on the calling thread."""
    for i in range(len(mapped)):
        _voxel_row(i, mapped, *arguments)


@njit(parallel=True, **_OPTIONS)
def _voxel_terms_parallel(mapped, *arguments):
    """:func:`voxel_terms` on numba's threads."""
    for i in prange(len(mapped)):
        _voxel_row(i, mapped, *arguments)


def voxel_terms(mapped, projected, constant, rank, residual_scale, spread_scale,
                sparsity_scale, negative_scale, loss_scales, loss):
    """The voxel terms' elementwise pass, in place, and each voxel's loss.

    On numba's threads when it has more than one, else on the calling thread.

    Parameters
    ----------
    mapped : ndarray, shape (n, k + V)
        ``coefficients @ operator`` of :class:`~esdmri.reconst.refine.VoxelLoss`:
        ``R c`` then the fODF samples ``f``. Overwritten by the loss's
        gradient with respect to them: ``residual_scale (R c - Q^T y)``, then
        ``negative_scale min(f, 0) + sparsity_scale f / (1 + spread_scale
        f^2)``.
    projected : ndarray, shape (n, k)
    constant : ndarray, float64, shape (n,)
        :meth:`~esdmri.reconst.refine.VoxelLoss.project`.
    rank : int
        ``k``.
    residual_scale, spread_scale, sparsity_scale, negative_scale : scalar
        Of ``mapped``'s dtype.
    loss_scales : tuple of float
        The weights of the squared residual (with ``constant``), of the
        squared negative part and of the sum of ``log(1 + spread_scale
        f^2)``.
    loss : ndarray, float64, shape (n,) or (0,)
        Each voxel's loss is written here (accumulated in float64); an empty
        array skips the loss.
    """
    # On one thread, no parallel launch: it cost 2-6 us under numba's OpenMP layer and
    # about 50 us under its work queue (which wakes a worker and waits for it), a
    # tenth of a 512-voxel block's pass (measured on a 2-core machine).
    (_voxel_terms_serial if get_num_threads() == 1 else _voxel_terms_parallel)(
        mapped, projected, constant, rank, residual_scale, spread_scale, sparsity_scale,
        negative_scale, *loss_scales, loss)


@njit(**_OPTIONS)
def _stencil_span(coefficients, gradient, start, first_row, last_row, pointers, neighbours,
                  pair_of, pair_weights, smoothing_squared, scales):
    """The TV stencil of rows ``first_row:last_row``, one thread's share of ``start:stop``.

    Each voxel ``i`` gets ``sum_j s_ij (c_i - c_j)`` over its neighbours ``j``,
    ``s_ij = w_ij / sqrt(|c_i - c_j|^2 + delta^2)``. A pair's ``s`` is computed
    by its lower voxel, stored in ``scales`` and reused by its upper voxel when
    that one comes later in the same span or in a later call of the
    evaluation (``j < start``: blocks in order); an upper voxel whose lower
    one is in another thread's span of this call computes ``s`` itself.
    Returns the value of the pairs whose lower voxel is in the span (float64).
    """
    width = coefficients.shape[1]
    value = 0.0
    for i in range(first_row, last_row):
        own, row = coefficients[i], gradient[i]
        for entry in range(pointers[i], pointers[i + 1]):
            j, pair = neighbours[entry], pair_of[entry]
            other = coefficients[j]
            if j < start or first_row <= j < i:
                scale = scales[pair]
            else:
                squares = smoothing_squared  # |c_i - c_j|^2 + delta^2, in their dtype
                for q in range(width):
                    difference = own[q] - other[q]
                    squares += difference * difference
                norm = math.sqrt(squares)
                scale = pair_weights[pair] / norm
                if j > i:
                    scales[pair] = scale
                    value += np.float64(pair_weights[pair] * norm)
            for q in range(width):
                row[q] += scale * (own[q] - other[q])
    return value


@njit(**_OPTIONS)
def _stencil_serial(threads, coefficients, gradient, start, stop, *arguments):
    """:func:`_stencil_span` of ``start:stop`` on the calling thread (``threads`` is 1)."""
    return _stencil_span(coefficients, gradient, start, start, stop, *arguments)


@njit(parallel=True, **_OPTIONS)
def _stencil_parallel(threads, coefficients, gradient, start, stop, *arguments):
    """:func:`_stencil_span` of ``start:stop`` in one consecutive span per thread.

    ``threads``: numba's count (an argument: a kernel that reads it cannot be cached).
    """
    values = np.zeros(threads)
    for thread in prange(threads):
        first_row = start + (stop - start) * thread // threads
        last_row = start + (stop - start) * (thread + 1) // threads
        values[thread] = _stencil_span(coefficients, gradient, start, first_row, last_row,
                                       *arguments)
    return values.sum()


class TotalVariationStencil:
    """The refinement's total variation over neighbour pairs, as a fused CPU stencil.

    ``sum_pairs w sqrt(|c_i - c_j|^2 + delta^2)`` and its gradient, the same
    values as :func:`esdmri.reconst.losses.total_variation` (to float
    round-off: the value is summed in float64), evaluated block by block
    (:meth:`add_gradient`) in the order of the rows.

    Parameters
    ----------
    first, second : Tensor of int, shape (P,)
        :func:`esdmri.reconst.losses.neighbour_pairs` of ``n`` voxels.
    pair_weights : Tensor, shape (P,)
        On the CPU, in the evaluation's dtype.
    smoothing : float
        ``delta``.
    n : int
        Number of voxels.
    """

    def __init__(self, first, second, pair_weights, smoothing, n):
        first, second = first.cpu().numpy(), second.cpu().numpy()
        pairs = len(first)
        ends = np.concatenate([first, second])
        # Each voxel's neighbours (CSR, ordered by voxel then neighbour) and the pair of each.
        order = np.lexsort((np.concatenate([second, first]), ends))
        index = np.int32 if 2 * pairs < 2**31 and n < 2**31 else np.int64
        self.neighbours = np.concatenate([second, first])[order].astype(index)
        self.pair_of = np.tile(np.arange(pairs), 2)[order].astype(index)
        self.pointers = np.searchsorted(ends[order], np.arange(n + 1)).astype(np.int64)
        self.pair_weights = pair_weights.numpy()
        self.smoothing_squared = self.pair_weights.dtype.type(smoothing**2)
        self.scales = np.empty_like(self.pair_weights)

    def add_gradient(self, coefficients, gradient, rows):
        """Add the gradient of the rows' voxels to ``gradient``; the value of their pairs.

        Called for consecutive row blocks from the first: a block's pairs
        with an earlier voxel reuse that voxel's norms.

        Parameters
        ----------
        coefficients : Tensor, shape (n, C)
            The whole field.
        gradient : Tensor, shape (n, C)
            Its rows ``rows`` are added to in place.
        rows : slice
            Consecutive rows, ``step`` 1.

        Returns
        -------
        value : float
            The total variation of the pairs whose lower voxel is in ``rows``.
        """
        start, stop, _ = rows.indices(len(gradient))
        threads = get_num_threads()
        return (_stencil_serial if threads == 1 else _stencil_parallel)(
            threads, coefficients.numpy(), gradient.numpy(), start, stop, self.pointers,
            self.neighbours, self.pair_of, self.pair_weights, self.smoothing_squared,
            self.scales)


def evaluate_voxel_terms(voxel_loss, coefficients, projected, constant, out, return_loss):
    """:class:`~esdmri.reconst.refine.VoxelLoss`'s evaluation with the fused pass (CPU).

    Parameters and returns as :meth:`~esdmri.reconst.refine.VoxelLoss.__call__`.
    """
    mapped = coefficients @ voxel_loss.operator
    dtype = mapped.numpy().dtype.type
    loss = torch.empty(len(mapped) if return_loss else 0, dtype=torch.float64)
    voxel_terms(mapped.numpy(), projected.numpy(), constant.numpy(), voxel_loss.rank,
                dtype(voxel_loss.residual_scale), dtype(voxel_loss.spread_scale),
                dtype(voxel_loss.sparsity_scale), dtype(voxel_loss.negative_scale),
                voxel_loss.loss_scales, loss.numpy())
    gradient = torch.mm(mapped, voxel_loss.operator_t, out=out)
    return (gradient, loss) if return_loss else gradient


# The sampler's parity split (esdmri.reconst.sampler_parity). Its kernels live here,
# beside the row they call: numba's cache does not see changes of a function defined
# in another file, so a kernel cached elsewhere could keep a stale copy of _voxel_row.
@njit(**_OPTIONS)
def _butterfly(row, start, width):
    """The samples on the orbits from the classes' samples at their first points, in place.

    ``row[start + q width + j]`` holds class ``q``'s part of orbit ``j``'s first
    sample; afterwards ``row[start + k width + j]`` holds the sample at the orbit's
    point ``k``: the 4 x 4 Hadamard matrix (Sylvester order), its own transpose.
    """
    # The four regions as slices indexed from 0: numba then leaves out its check for
    # negative indices, and LLVM vectorises the loop (indexed as ``row[start + j]`` it
    # did not: the row's pass without the loss took 0.45 instead of 0.17 us, one thread).
    end = start + 4 * width
    first, second = row[start:start + width], row[start + width:start + 2 * width]
    third, fourth = row[start + 2 * width:end - width], row[end - width:end]
    for j in range(width):
        a, b, c, d = first[j], second[j], third[j], fourth[j]
        even, odd, even_2, odd_2 = a + b, a - b, c + d, c - d
        first[j] = even + even_2
        second[j] = odd + odd_2
        third[j] = even - even_2
        fourth[j] = odd - odd_2


@njit(**_OPTIONS)
def _parity_row(i, mapped, start, width, *arguments):
    """The butterfly, :func:`voxel_terms`'s row, its transpose."""
    _butterfly(mapped[i], start, width)
    _voxel_row(i, mapped, *arguments)
    _butterfly(mapped[i], start, width)


@njit(**_OPTIONS)
def _parity_terms_serial(mapped, start, width, *arguments):
    """:func:`_parity_row` of every row on the calling thread."""
    for i in range(len(mapped)):
        _parity_row(i, mapped, start, width, *arguments)


@njit(parallel=True, **_OPTIONS)
def _parity_terms_parallel(mapped, start, width, *arguments):
    """:func:`_parity_row` of every row on numba's threads."""
    for i in prange(len(mapped)):
        _parity_row(i, mapped, start, width, *arguments)


def parity_voxel_terms(mapped, start, width, projected, constant, rank, residual_scale,
                       spread_scale, sparsity_scale, negative_scale, loss_scales, loss):
    """:func:`voxel_terms` on a block whose orbits' samples come by parity class.

    Per row: the Hadamard butterfly of the four classes' regions (the orbits'
    samples), the voxel terms' row, and the butterfly again (its own
    transpose: the gradient with respect to the classes' regions).

    Parameters
    ----------
    mapped : ndarray, shape (n, start + 4 width)
        ``R c``, the samples in no orbit, then four regions of ``width``
        columns: class ``q``'s part of each orbit's first sample
        (:class:`esdmri.reconst.sampler_parity.ParitySplit`). Overwritten by
        the loss's gradient with respect to them.
    start, width : int
    projected, constant, rank, residual_scale, spread_scale, sparsity_scale, negative_scale,
    loss_scales, loss
        As in :func:`voxel_terms`.
    """
    (_parity_terms_serial if get_num_threads() == 1 else _parity_terms_parallel)(
        mapped, start, width, projected, constant, rank, residual_scale, spread_scale,
        sparsity_scale, negative_scale, *loss_scales, loss)


@njit(**_OPTIONS)
def _increment_row(i, mapped, start, width, coefficients, delta, reference, reference_gradient,
                   reference_squares, gradient, constant, residual_scale, spread_scale,
                   sparsity_scale, negative_scale, residual_weight, negative_weight, log_weight,
                   loss):
    """:func:`increment_voxel_terms` of row ``i``."""
    _butterfly(mapped[i], start, width)
    n_coefficients = len(delta[i])
    step, moved, before = delta[i], mapped[i, :n_coefficients], reference_gradient[i]
    point, now, out = reference[i], coefficients[i], gradient[i]
    # |r + R d|^2 = |r|^2 + d . (2 R^T r + G d): the sum of small terms, accumulated
    # in float64, where |R c - Q^T y|^2 computed anew would cancel float32 digits.
    change = 0.0
    for q in range(n_coefficients):
        after = before[q] + moved[q]
        change += np.float64(step[q]) * (np.float64(before[q]) + np.float64(after))
        before[q] = after
        out[q] = after * residual_scale
        # c itself, not c0 + d rounded: the state is off c by d's round-off at most.
        point[q] = now[q]
    squares = reference_squares[i] + change
    reference_squares[i] = squares
    logs, negatives = _sample_terms(mapped[i, n_coefficients:], spread_scale, sparsity_scale,
                                    negative_scale, len(loss) > 0)
    if len(loss) > 0:
        loss[i] = (residual_weight * (squares + constant[i]) + negative_weight * negatives
                   + log_weight * logs)
    _butterfly(mapped[i], start, width)


@njit(**_OPTIONS)
def _increment_terms_serial(mapped, start, width, *arguments):
    """:func:`_increment_row` of every row on the calling thread."""
    for i in range(len(mapped)):
        _increment_row(i, mapped, start, width, *arguments)


@njit(parallel=True, **_OPTIONS)
def _increment_terms_parallel(mapped, start, width, *arguments):
    """:func:`_increment_row` of every row on numba's threads."""
    for i in prange(len(mapped)):
        _increment_row(i, mapped, start, width, *arguments)


def increment_voxel_terms(mapped, start, width, coefficients, delta, reference, constant,
                          gradient, residual_scale, spread_scale, sparsity_scale,
                          negative_scale, loss_scales, loss):
    """:func:`parity_voxel_terms` from a reference point: the signal term by increments.

    The signal term's gradient and value at ``c = c0 + d`` from those at the
    reference ``c0`` (:meth:`esdmri.reconst.sampler_parity.ParitySplit.reference_state`):
    ``R^T r = R^T r0 + G d`` and ``|r|^2 = |r0|^2 + d . (R^T r0 + R^T r)``,
    with ``r = R c - Q^T y`` and ``G = R^T R``. Afterwards ``c`` is the
    reference, with its ``R^T r`` and ``|r|^2``.

    Parameters
    ----------
    mapped : ndarray, shape (n, start + 4 width)
        ``G d`` (``C`` columns), the samples in no orbit, then the four
        classes' regions as in :func:`parity_voxel_terms`. The samples'
        columns are overwritten by the loss's gradient with respect to them.
    start, width : int
    coefficients, delta : ndarray, shape (n, C)
        ``c`` and ``d = c - c0``.
    reference : tuple of ndarray
        ``c0`` (n, C), ``R^T r0`` (n, C) and ``|r0|^2`` (n,) (float64), each
        updated in place to ``c``'s.
    constant : ndarray, float64, shape (n,)
    gradient : ndarray, shape (n, C)
        Where ``residual_scale R^T r`` is written (the signal term's gradient).
    residual_scale, spread_scale, sparsity_scale, negative_scale, loss_scales, loss
        As in :func:`voxel_terms`.
    """
    (_increment_terms_serial if get_num_threads() == 1 else _increment_terms_parallel)(
        mapped, start, width, coefficients, delta, *reference, gradient, constant,
        residual_scale, spread_scale, sparsity_scale, negative_scale, *loss_scales, loss)
