"""The refinement's L-BFGS passes over coefficient fields, fused on a CPU (issue 28).

Each step of :func:`esdmri.reconst.refine._lbfgs_descent` is a sequence of
inner products and linear combinations of whole coefficient fields (one row
per voxel: 84 MB each at brain size in float32). Written as torch operations,
every ``vdot`` and every ``axpy`` is its own pass over memory, and the solver
moves the equivalent of 84-102 fields per step (docs/benchmarks.md, "The
evaluation's floor"). The functions here each do one of the solver's jobs
in one pass, with the inner product that the solver needs next computed from
the values just written:

- :func:`start_direction`: the gradient with the held bounds zeroed, and the
  newest pair's ``s.d``;
- :func:`axpy_dot`: one update of the two-loop recursion, ``d += a x``, and
  the next pair's ``u.d``;
- :func:`finish_direction`: the recursion's last update, the held bounds
  zeroed again, and ``g.d`` (the descent check);
- :func:`trial_point`: the line search's projected trial point, the step
  ``s = trial - c`` and ``g.s``;
- :func:`pair_difference`: ``y = g' - g`` with ``s.y`` and ``y.y``;
- :func:`block_apply` and :func:`block_quadratic`: the preconditioner
  ``p (I - M)``, ``M`` nonzero on a few columns, applied to each row, and the
  sum of its quadratic forms (:class:`esdmri.reconst.refine.Preconditioner`).

On CPU tensors they run as numba kernels on ``.numpy()`` views of the
tensors (no copies), parallel over blocks of the field on as many threads as
torch runs (:func:`sync_numba_threads`), their inner products accumulated in
float64 per block. On any other device (and on a CPU with :data:`ENABLED`
off) they run the torch expressions the solver used before, in the same
order, so a GPU's iterates are those of the unfused loop to the last bit.
The two paths differ by round-off only: the kernels' inner products are
accumulated in float64 in another order than torch's.

An isotropic coefficient (columns ``n_wm_coeffs:``) is *held* when it is at
its lower bound 0 and its gradient points outwards (``c <= 0`` and ``g >
0``); held coefficients are left out of the direction.
"""

import numba
import numpy as np
import torch

from ..threads import sync_numba_threads
from .fused_objective import numba_takes

# Whether CPU tensors take the numba kernels; tests and benchmarks turn it off
# to run the torch expressions on a CPU (the reference the kernels are held to).
ENABLED = True

# Elements of a flattened field per parallel task (64 KB in float32: a
# thread's share of each field stays in its L2 cache between passes), and rows
# of a (voxels, coefficients) field per task where the columns matter.
_CHUNK = 16384
_ROWS = 176

# Fast-math only to reorder the float64 sums, so that they vectorise (a strict
# left-to-right sum is bound by the adder's latency, not by memory); no
# contraction to fused multiply-adds, whose rounding torch's passes do not share.
_KERNEL = dict(nogil=True, cache=True, parallel=True, fastmath={"reassoc"})


def _fused(*fields):
    """Whether the kernels run on ``fields``: :data:`ENABLED`, and all contiguous of a kind
    numba takes (:func:`esdmri.reconst.fused_objective.numba_takes`)."""
    if not ENABLED or not all(numba_takes(f) and f.is_contiguous() for f in fields):
        return False
    sync_numba_threads()
    return True


def held_coefficients(c, gradient, n_wm_coeffs):
    """Boolean mask of the held isotropic coefficients, shape (n, C - n_wm_coeffs)."""
    return (c[:, n_wm_coeffs:] <= 0) & (gradient[:, n_wm_coeffs:] > 0)


# The inner loops index a slice or a row from 0: numba then knows the indices are
# not negative and leaves out its wraparound check, which keeps LLVM from vectorising.


@numba.njit(**_KERNEL)
def _start_kernel(d, g, c, n_wm, s):
    n, m = d.shape
    total = 0.0
    for block in numba.prange((n + _ROWS - 1) // _ROWS):
        part = 0.0
        for i in range(block * _ROWS, min(block * _ROWS + _ROWS, n)):
            d_row, g_row, c_row, s_row = d[i], g[i], c[i], s[i]
            for j in range(n_wm):
                value = g_row[j]
                d_row[j] = value
                part += np.float64(s_row[j]) * np.float64(value)
            for j in range(n_wm, m):
                value = g_row[j]
                if c_row[j] <= 0 and value > 0:
                    value = 0
                d_row[j] = value
                part += np.float64(s_row[j]) * np.float64(value)
        total += part
    return total


@numba.njit(**_KERNEL)
def _axpy_dot_kernel(d, a, x, u):
    n = d.size
    total = 0.0
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        low, high = chunk * _CHUNK, min(chunk * _CHUNK + _CHUNK, n)
        d_part, x_part, u_part = d[low:high], x[low:high], u[low:high]
        part = 0.0
        for i in range(high - low):
            value = d_part[i] + a * x_part[i]
            d_part[i] = value
            part += np.float64(u_part[i]) * np.float64(value)
        total += part
    return total


@numba.njit(**_KERNEL)
def _finish_kernel(d, a, x, g, c, n_wm, update):
    n, m = d.shape
    total = 0.0
    for block in numba.prange((n + _ROWS - 1) // _ROWS):
        part = 0.0
        for i in range(block * _ROWS, min(block * _ROWS + _ROWS, n)):
            d_row, x_row, g_row, c_row = d[i], x[i], g[i], c[i]
            for j in range(n_wm):
                value = d_row[j] + a * x_row[j] if update else d_row[j]
                d_row[j] = value
                part += np.float64(g_row[j]) * np.float64(value)
            for j in range(n_wm, m):
                value = d_row[j] + a * x_row[j] if update else d_row[j]
                if c_row[j] <= 0 and g_row[j] > 0:
                    value = 0
                d_row[j] = value
                part += np.float64(g_row[j]) * np.float64(value)
        total += part
    return total


@numba.njit(**_KERNEL)
def _trial_kernel(trial, s, c, d, length, g, n_wm):
    n, m = d.shape
    total = 0.0
    for block in numba.prange((n + _ROWS - 1) // _ROWS):
        part = 0.0
        for i in range(block * _ROWS, min(block * _ROWS + _ROWS, n)):
            t_row, s_row, c_row, d_row, g_row = trial[i], s[i], c[i], d[i], g[i]
            for j in range(n_wm):
                value = c_row[j] + length * d_row[j]
                t_row[j] = value
                step = value - c_row[j]
                s_row[j] = step
                part += np.float64(g_row[j]) * np.float64(step)
            for j in range(n_wm, m):
                value = c_row[j] + length * d_row[j]
                if value < 0:  # the bound; a NaN stays, as torch's clamp leaves it
                    value = 0
                t_row[j] = value
                step = value - c_row[j]
                s_row[j] = step
                part += np.float64(g_row[j]) * np.float64(step)
        total += part
    return total


@numba.njit(**_KERNEL)
def _difference_kernel(y, new, old, s):
    n = y.size
    s_dot_y = 0.0
    y_dot_y = 0.0
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        low, high = chunk * _CHUNK, min(chunk * _CHUNK + _CHUNK, n)
        y_part, new_part, old_part, s_part = y[low:high], new[low:high], old[low:high], s[low:high]
        sy = 0.0
        yy = 0.0
        for i in range(high - low):
            value = new_part[i] - old_part[i]
            y_part[i] = value
            sy += np.float64(s_part[i]) * np.float64(value)
            yy += np.float64(value) * np.float64(value)
        s_dot_y += sy
        y_dot_y += yy
    return s_dot_y, y_dot_y


# The block kernels multiply a block of rows' kept columns at a time by BLAS (numba's
# np.dot): 2.4x faster than row-by-row dot products and 2x faster than loops over a
# transposed block at 17 x 93 (docs/benchmarks.md). Each block's product stays under
# OpenBLAS's threshold for threading a product (65536 x GEMM_MULTITHREAD_THRESHOLD,
# default 4, multiply-adds), so no BLAS thread pool starts inside numba's threads.
_BLAS_SERIAL = 65536 * 4


def _block_rows(width):
    """Rows per block of the block kernels (``width`` kept columns)."""
    return max(1, min(4096, _BLAS_SERIAL // max(width * width, 1)))


@numba.njit(nogil=True, cache=True)
def _gathered(x, low, high, columns):
    """Rows ``low:high`` of ``x``, their ``columns`` only (a new array)."""
    kept = np.empty((high - low, len(columns)), dtype=x.dtype)
    for i in range(high - low):
        row, kept_row = x[low + i], kept[i]
        for k in range(len(columns)):
            kept_row[k] = row[columns[k]]
    return kept


@numba.njit(**_KERNEL)
def _block_kernel(out, x, columns, block, scale, rows_per_block):
    n, m = x.shape
    width = len(columns)
    for chunk in numba.prange((n + rows_per_block - 1) // rows_per_block):
        low, high = chunk * rows_per_block, min(chunk * rows_per_block + rows_per_block, n)
        kept = _gathered(x, low, high, columns)
        # Taken whole before out's rows are written: out may be x.
        correction = np.dot(kept, block)
        for i in range(high - low):
            row, out_row, correction_row = x[low + i], out[low + i], correction[i]
            for j in range(m):
                out_row[j] = scale * row[j]
            for k in range(width):
                out_row[columns[k]] -= correction_row[k]


@numba.njit(**_KERNEL)
def _block_quadratic_kernel(x, columns, block, rows_per_block):
    n, m = x.shape
    width = len(columns)
    total = 0.0
    for chunk in numba.prange((n + rows_per_block - 1) // rows_per_block):
        low, high = chunk * rows_per_block, min(chunk * rows_per_block + rows_per_block, n)
        kept = _gathered(x, low, high, columns)
        products = np.dot(kept, block)
        part = 0.0
        for i in range(high - low):
            row, kept_row, product = x[low + i], kept[i], products[i]
            for j in range(m):
                part += np.float64(row[j]) * np.float64(row[j])
            for k in range(width):
                part -= np.float64(kept_row[k]) * np.float64(product[k])
        total += part
    return total


def _scalar(field, value):
    """``value`` as a scalar of ``field``'s dtype, as torch's ``alpha`` is applied."""
    return field.numpy().dtype.type(value)


def _dot(a, b):
    """``a.b`` over whole fields, a float (torch's accumulation)."""
    return float(torch.vdot(a.flatten(), b.flatten()))


def start_direction(direction, gradient, c, n_wm_coeffs, s=None):
    """Write the gradient with the held coefficients zeroed to ``direction``.

    Parameters
    ----------
    direction : Tensor, shape (n, C)
        Overwritten.
    gradient, c : Tensor, shape (n, C)
        The gradient and the coefficients it was taken at.
    n_wm_coeffs : int
        Columns before the isotropic (bounded) ones.
    s : Tensor, shape (n, C), optional
        The newest pair's step.

    Returns
    -------
    float or None
        ``s.direction`` (None without ``s``).
    """
    if _fused(direction, gradient, c, *([] if s is None else [s])):
        product = _start_kernel(direction.numpy(), gradient.numpy(), c.numpy(), n_wm_coeffs,
                                (gradient if s is None else s).numpy())
        return None if s is None else product
    direction.copy_(gradient)
    direction[:, n_wm_coeffs:].masked_fill_(held_coefficients(c, gradient, n_wm_coeffs), 0)
    return None if s is None else _dot(s, direction)


def axpy_dot(direction, alpha, x, u=None):
    """``direction += alpha x`` in place; returns ``u.direction`` (a float; None without ``u``).

    ``direction``, ``x`` and ``u`` are fields of one shape; ``alpha`` a float.
    """
    if _fused(direction, x, *([] if u is None else [u])):
        flat = [f.numpy().reshape(-1) for f in (direction, x, x if u is None else u)]
        product = _axpy_dot_kernel(flat[0], _scalar(direction, alpha), flat[1], flat[2])
        return None if u is None else product
    direction.add_(x, alpha=alpha)
    return None if u is None else _dot(u, direction)


def finish_direction(direction, gradient, c, n_wm_coeffs, alpha=0.0, x=None):
    """``direction += alpha x`` (when ``x`` is given), the held coefficients zeroed.

    The fields are those of :func:`start_direction`; ``x`` one more of their shape.

    Returns
    -------
    float
        ``gradient.direction``: negative for a descent direction.
    """
    if _fused(direction, gradient, c, *([] if x is None else [x])):
        return _finish_kernel(direction.numpy(), _scalar(direction, alpha),
                              (direction if x is None else x).numpy(), gradient.numpy(),
                              c.numpy(), n_wm_coeffs, x is not None)
    if x is not None:
        direction.add_(x, alpha=alpha)
    direction[:, n_wm_coeffs:].masked_fill_(held_coefficients(c, gradient, n_wm_coeffs), 0)
    return _dot(gradient, direction)


def trial_point(trial, s, c, direction, length, gradient, n_wm_coeffs):
    """The line search's trial point ``c + length direction``, projected, and its step.

    Writes the trial point, its isotropic coefficients clamped to be
    non-negative, to ``trial`` and ``trial - c`` to ``s`` (fields of ``c``'s
    shape).

    Returns
    -------
    float
        ``gradient.s``, the step's first-order change of the objective.
    """
    if _fused(trial, s, c, direction, gradient):
        return _trial_kernel(trial.numpy(), s.numpy(), c.numpy(), direction.numpy(),
                             _scalar(c, length), gradient.numpy(), n_wm_coeffs)
    torch.add(c, direction, alpha=length, out=trial)[:, n_wm_coeffs:].clamp_(min=0)
    return _dot(gradient, torch.sub(trial, c, out=s))


def pair_difference(y, new_gradient, gradient, s):
    """``y = new_gradient - gradient`` in place, with ``s.y`` and ``y.y``.

    Returns
    -------
    s_dot_y : float or Tensor
        A float from the kernels; torch's 0-d tensor otherwise (the solver
        divides by it as computed).
    y_dot_y : float
    """
    if _fused(y, new_gradient, gradient, s):
        return _difference_kernel(y.numpy().reshape(-1), new_gradient.numpy().reshape(-1),
                                  gradient.numpy().reshape(-1), s.numpy().reshape(-1))
    torch.sub(new_gradient, gradient, out=y)
    return torch.vdot(s.flatten(), y.flatten()), _dot(y, y)


def block_apply(out, field, columns, block, scale):
    """``out = scale (field - M field)`` row by row, ``M`` nonzero on ``columns`` only.

    ``M``'s block on ``columns`` is ``block``; ``out`` may be ``field``.

    Parameters
    ----------
    out, field : Tensor, shape (n, C)
    columns : Tensor of int64, shape (r,)
    block : Tensor, shape (r, r)
        Symmetric, in ``field``'s dtype.
    scale : float

    Returns
    -------
    out : Tensor
    """
    if len(columns) and _fused(out, field, block):
        _block_kernel(out.numpy(), field.numpy(), columns.numpy(),
                      (block * scale).numpy(), _scalar(field, scale), _block_rows(len(columns)))
        return out
    correction = field[:, columns] @ block
    torch.mul(field, scale, out=out)
    out[:, columns] -= correction.mul_(scale)
    return out


def block_quadratic(field, columns, block):
    """``sum_i x_i . (I - M) x_i`` over the rows ``x_i``, ``M`` as in :func:`block_apply`: a float.

    Accumulated in float64 on a CPU.
    """
    if len(columns) and _fused(field, block):
        return _block_quadratic_kernel(field.numpy(), columns.numpy(), block.numpy(),
                                       _block_rows(len(columns)))
    kept = field[:, columns]
    return _dot(field, field) - _dot(kept, kept @ block)
