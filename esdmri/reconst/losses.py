"""The unsupervised deconvolution loss of ESD and RT-ESD (Elaldi et al. 2021, 2023).

All terms take voxel-major tensors restricted to a window: ``[B, ..., X, Y, Z]``
values with a boolean ``mask`` of shape ``[B, X, Y, Z]``.
"""

import warnings

import torch

# The weights live with the other options, in the torch-free configuration module.
from .config import LossWeights  # noqa: F401

# Scale of the Cauchy sparsity penalty of the ESD papers.
CAUCHY_SIGMA = 1e-5


def _masked_mean(values, mask):
    """Mean of ``values [B, K, X, Y, Z]`` over masked voxels and over K."""
    weights = mask.unsqueeze(1).to(values.dtype)
    return (values * weights).sum() / (weights.sum() * values.shape[1]).clamp_min(1)


def intensity_loss(predicted, measured, mask):
    """Mean squared error over masked voxels and measurements, ``[B, N, X, Y, Z]``."""
    return _masked_mean((predicted - measured) ** 2, mask)


def sparsity_loss(fodf_samples, mask):
    """Cauchy sparsity of sampled fODFs ``[B, V, X, Y, Z]``."""
    return _masked_mean(2 * torch.log1p(fodf_samples**2 / (2 * CAUCHY_SIGMA)), mask)


def nonnegativity_loss(fodf_samples, mask):
    """Squared negative part of sampled fODFs ``[B, V, X, Y, Z]``."""
    return _masked_mean(torch.relu(-fodf_samples) ** 2, mask)


def neighbour_pairs(mask):
    """Face-neighbouring voxel pairs inside a mask (or a batch of masks).

    Parameters
    ----------
    mask : Tensor or ndarray of bool, shape (..., X, Y, Z)
        Pairs are taken along the last three axes only, so the windows of a
        batch ``[B, X, Y, Z]`` never pair with each other.

    Returns
    -------
    first, second : Tensor of int64, shape (P,)
        Positions, in the order of ``mask.nonzero()`` (C order), of the two
        voxels of each pair; on the mask's device.
    """
    mask = torch.as_tensor(mask, dtype=torch.bool)
    index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    index[mask] = torch.arange(int(mask.sum()), device=mask.device)
    firsts, seconds = [], []
    for axis in range(mask.ndim - 3, mask.ndim):
        length = mask.shape[axis] - 1
        lower, upper = index.narrow(axis, 0, length), index.narrow(axis, 1, length)
        both = (lower >= 0) & (upper >= 0)
        firsts.append(lower[both])
        seconds.append(upper[both])
    return torch.cat(firsts), torch.cat(seconds)


def difference_operators(first, second, n, dtype=torch.float32):
    """Sparse matrices of the neighbour pairs' differences and of their transpose.

    ``D`` has one row per pair, ``+1`` at ``first`` and ``-1`` at ``second``:
    ``D @ c`` is every pair's coefficient difference and ``D.T @ d`` adds
    each pair's ``d`` to its first voxel and subtracts it from its second,
    each one sparse product (one pass) instead of two gathers, a subtraction
    and two scattered adds.

    Parameters
    ----------
    first, second : Tensor of int, shape (P,)
        :func:`neighbour_pairs`.
    n : int
        Number of voxels.
    dtype : torch.dtype, optional

    Returns
    -------
    difference, transpose : Tensor, sparse CSR, shapes (P, n) and (n, P)
    """
    pairs = len(first)
    rows = torch.arange(pairs, device=first.device).repeat_interleave(2)
    columns = torch.stack([first, second], dim=1).flatten()
    values = torch.tensor([1.0, -1.0], dtype=dtype, device=first.device).repeat(pairs)
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": products with dense matrices are tested.
        warnings.simplefilter("ignore", UserWarning)
        difference = torch.sparse_coo_tensor(torch.stack([rows, columns]), values, (pairs, n))
        transpose = torch.sparse_coo_tensor(torch.stack([columns, rows]), values, (n, pairs))
        return difference.coalesce().to_sparse_csr(), transpose.coalesce().to_sparse_csr()


def total_variation(coefficients, first, second, pair_weights=None, smoothing=0.0,
                    gradient=False, operators=None, differences=None, add_to=None):
    """Smoothed total variation of a coefficient field over neighbour pairs.

    ``sum_pairs w sqrt(|c_i - c_j|^2 + delta^2)``: the Euclidean norm of a
    coefficient difference is the L2 distance between the two voxels'
    spherical functions (and tissue fractions), so the term is rotation
    invariant; ``delta`` (``smoothing``) makes it differentiable where
    neighbours agree (a Charbonnier / Huber-like penalty: quadratic below
    ``delta``, linear above). The training loss differentiates the value by
    autograd; the refinement asks for the gradient written out, which is a
    few passes instead of autograd's many.

    Parameters
    ----------
    coefficients : Tensor, shape (n, C)
    first, second : Tensor of int, shape (P,)
        :func:`neighbour_pairs`.
    pair_weights : Tensor, shape (P,), optional
        Weight of each pair (default 1).
    smoothing : float, optional
    gradient : bool, optional
        Also return the gradient with respect to ``coefficients``.
    operators : tuple of Tensor, optional
        :func:`difference_operators` of the pairs: the differences and the
        gradient's sums go through them (the same values, 2-3x faster on a
        CPU; not differentiable by autograd).
    differences : Tensor, shape (P, C), optional
        With ``operators``: where the pairs' differences are written (a
        buffer reused from call to call: a fresh one of a brain's pairs is
        hundreds of MB, whose first touch costs more than the product).
    add_to : Tensor, shape (n, C), optional
        With ``operators`` and ``gradient``: the gradient is added to it in
        place, and it is returned as the gradient.

    Returns
    -------
    value : Tensor, scalar
    gradient : Tensor, shape (n, C)
        Only with ``gradient``.
    """
    if operators is None:
        difference = coefficients[first] - coefficients[second]
    elif differences is not None:
        # beta=0: the product overwrites the buffer without zero-filling it first.
        difference = torch.addmm(differences, operators[0], coefficients, beta=0,
                                 out=differences)
    else:
        difference = operators[0] @ coefficients
    if coefficients.requires_grad:
        norm = torch.sqrt((difference * difference).sum(dim=1) + smoothing**2)
    else:
        # One pass over the differences, no temporary of their size.
        norm = torch.linalg.vector_norm(difference, dim=1).square_().add_(smoothing**2).sqrt_()
    weighted = norm if pair_weights is None else pair_weights * norm
    if not gradient:
        return weighted.sum()
    scale = 1 / norm if pair_weights is None else pair_weights / norm
    pair_gradient = difference.mul_(scale.unsqueeze(1))
    if operators is not None:
        if add_to is not None:
            return weighted.sum(), add_to.addmm_(operators[1], pair_gradient)
        return weighted.sum(), operators[1] @ pair_gradient
    result = torch.zeros_like(coefficients)
    result.index_add_(0, first, pair_gradient)
    result.index_add_(0, second, pair_gradient, alpha=-1)
    return weighted.sum(), result


def total_variation_loss(coefficients, samples, mask, form="coefficients", smoothing=1e-6):
    """Total variation over the face-neighbour pairs of a batch of windows.

    Three forms (:class:`esdmri.reconst.config.LossWeights`, ``tv_form``):

    * ``"coefficients"``: :func:`total_variation` of the tissue coefficients,
      ``mean_pairs |c_i - c_j|`` (slightly smoothed);
    * ``"normalized_fodf"``: ``mean_pairs mean_v (u_i(v) - u_j(v))^2`` with
      ``u = f / |f|`` each voxel's WM fODF samples scaled to unit L2 norm
      over the sphere's vertices, so the term compares fibre shapes and
      not their amplitudes (the training loss of Elaldi et al. 2024, whose
      mean over the six neighbour directions of every masked voxel counts
      each pair twice, as the mean over pairs does once). Rotation
      invariant on a sphere that samples the fODF evenly;
    * ``"coupled"``: the refinement's term (:mod:`esdmri.reconst.refine`),
      ``sum_pairs sqrt(|c_i - c_j|^2 + delta^2)`` divided by the masked
      voxels, so that, weighted as the refinement weighs it, the summed
      voxel losses plus this term are the refinement's objective per voxel.

    Parameters
    ----------
    coefficients : Tensor, shape [B, C, X, Y, Z]
    samples : Tensor, shape [B, V, X, Y, Z]
        The WM fODF on a dense sphere (used by ``"normalized_fodf"``).
    mask : Tensor of bool, shape [B, X, Y, Z]
    form : str
    smoothing : float
        ``delta`` of the ``"coefficients"`` and ``"coupled"`` forms.

    Returns
    -------
    loss : Tensor, scalar
        0 when no two masked voxels are neighbours.

    References
    ----------
    .. [1] Elaldi, A., Gerig, G., Dey, N. "Equivariant spatio-hemispherical
       networks for diffusion MRI deconvolution", NeurIPS 2024.
    """
    first, second = neighbour_pairs(mask)
    if form == "normalized_fodf":
        values = samples.movedim(1, -1)[mask]
        unit = values / (torch.linalg.vector_norm(values, dim=1, keepdim=True) + 1e-16)
        difference = unit[first] - unit[second]
        return (difference * difference).mean(dim=1).sum() / max(len(first), 1)
    if form not in ("coefficients", "coupled"):
        raise ValueError(f"form must be 'coefficients', 'normalized_fodf' or 'coupled', got "
                         f"{form!r}")
    value = total_variation(coefficients.movedim(1, -1)[mask], first, second,
                            smoothing=smoothing)
    if form == "coupled":
        return value / max(int(mask.sum()), 1)
    return value / max(len(first), 1)
