"""SE(3)-equivariant layers on 6D dMRI (Mueller et al.): pq-layer, p-conv, q-reduction.

A dMRI scan is a field over p-space (the voxel grid) and q-space (the
q-vectors of the acquisition). A rotation ``R`` of the object rotates both:
``f'(p, q) = D(R) f(R^-1 p, R^-1 q)`` with ``D(R)`` the Wigner-D matrices of
the field's channels (:mod:`esdmri.nn.tensor_field`). The layers here commute
with these roto-translations.

Tensors are ``[batch, channels, q_samples, X, Y, Z]`` (pq-layer) or
``[batch, channels, X, Y, Z]`` (p-conv); the channel axis follows
:class:`~esdmri.nn.tensor_field.TensorFieldType`. Voxel offsets are in voxel
units along the array axes (X, Y, Z), q-vectors in the same frame (FSL bvecs
of an image with an axis-aligned voxel grid).

**pq-layer** (:class:`PQConv`). For output channel ``c_out`` of order
``l_out``::

    out_{m_out}(p_out, q_out) = sum_{c_in, l_f, l_p, l_q, k1, k2, k3}
        W[c_out, c_in, (l_f, l_p, l_q), k1, k2, k3]
        sum_{m_f, m_in} C^{(l_out m_out)}_{(l_f m_f)(l_in m_in)}
        (1 / Q_in) sum_{p_in, q_in} phi1_k1(|p_out - p_in|) phi2_k2(|q_out|) phi3_k3(|q_in|)
        sum_{m_p, m_q} C^{(l_f m_f)}_{(l_p m_p)(l_q m_q)}
            Y^{l_p}_{m_p}(unit(p_out - p_in)) Y^{l_q}_{m_q}(unit(q_out - q_in))
        in_{m_in}(p_in, q_in)

with ``|l_out - l_in| <= l_f <= l_out + l_in``, ``|l_p - l_q| <= l_f <= l_p + l_q``
and ``|l_f - l_p| <= 1`` (the paper's formula). ``C`` are e3nn's real
Clebsch-Gordan coefficients (``e3nn.o3.wigner_3j``), ``Y`` e3nn's real
spherical harmonics (component normalisation). A zero offset (the centre
voxel; ``q_out = q_in``, e.g. b0 to b0) has no direction: it contributes its
``l = 0`` terms only (``Y^0 = 1``, ``Y^{l>0} = 0``), which keeps the kernel
equivariant. The sum over ``q_in`` is divided by ``Q_in`` so that a layer
behaves alike for 30 or 300 directions (a quadrature of the integral over
q-space). ``l_p <= max_order_p`` and ``l_q <= max_order_q`` bound the
angular bases; any such bound keeps the layer equivariant.

Radial bases (Gaussian RBFs ``exp(-(r - c)^2 / (2 w^2))``):

* ``phi1`` on the voxel offset length: centres ``0, 1, ..., round(sqrt(3) *
  (spatial_kernel_size // 2))`` voxels (``0, 1, 2`` for a 3^3 kernel, ``0 .. 3`` for
  5^3), width 0.6 voxel;
* ``phi2``, ``phi3`` on ``|q_out|``, ``|q_in|``: ``n_radial_q`` centres
  evenly in [0, 1] with width equal to their spacing (q-vectors are expected
  scaled to ``|q| <= 1``, see :func:`q_from_gtab`); a single radial function
  (``n_radial_q=1``) is the constant 1.

The published implementation (philip-mueller/equivariant-deep-dmri) makes
other choices where the paper leaves room; each is an option of
:class:`PQConv` (``selection_rule="two_sided"``, ``normalize_q_offsets``,
``zero_offsets="linear"``, ``p_radial="cosine"`` or ``"learned"``), and
``esdmri.segmentation.PQSegmentationNetwork.from_preset("mueller2021", q)``
combines them as in the authors' example network.

The kernel bases are precomputed at construction in float64 (buffers), so a
forward pass contracts the learned weights with them and runs one
``conv3d``. The dense q-coupling costs ``(rows_out Q_out) x (rows_in Q_in) x
spatial_kernel_size^3`` multiply-adds per voxel; ``q_radius`` restricts it to q
offsets shorter than a radius (a smooth window in ``|q_out - q_in|``, still
equivariant), which :class:`PQSphereConv` uses on dense spheres.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from e3nn import o3
from scipy.spatial import cKDTree
from torch import nn

from esdmri.nn.tensor_field import MAX_ORDER, as_field_type

SUPPORTED_SPATIAL_KERNEL_SIZES = (1, 3, 5)

# Width of the Gaussian radial functions on voxel offsets (in voxels).
P_RADIAL_WIDTH = 0.6

# Offsets shorter than this (in q units) count as zero: they have no direction.
ZERO_OFFSET = 1e-9

# Highest spherical-harmonic order allowed in the p and q parts of a kernel.
MAX_FILTER_ORDER = 2 * MAX_ORDER + 1

# Options of the kernel (see PQConv): radial profiles on voxel offsets, the
# rule that pairs p and q orders, and the treatment of zero-length offsets.
P_RADIAL_KINDS = ("gaussian", "cosine", "learned")
SELECTION_RULES = ("one_sided", "two_sided")
ZERO_OFFSET_RULES = ("l0", "linear")


# --------------------------------------------------------------------------
# q-samplings


def q_from_gtab(gtab, b_max=None):
    """q-vectors of an acquisition: ``bvec * sqrt(b / b_max)``.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
        Acquisition. Its b0 measurements (``gtab.b0s_mask``) get ``q = 0``.
    b_max : float, optional
        b-value mapped to ``|q| = 1``; the largest b-value if None.

    Returns
    -------
    q : ndarray, shape (N, 3), float64
        One q-vector per measurement, ``|q| <= 1`` when ``b_max`` is the
        largest b-value.
    """
    bvals = np.asarray(gtab.bvals, dtype=float)
    bvecs = np.asarray(gtab.bvecs, dtype=float)
    if b_max is None:
        b_max = bvals.max()
    if not np.isfinite(b_max) or b_max <= 0:
        raise ValueError(f"b_max must be a positive b-value, got {b_max}")
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    directions = np.divide(bvecs, norms, out=np.zeros_like(bvecs), where=norms > 0)
    q = directions * np.sqrt(np.clip(bvals, 0, None) / b_max)[:, None]
    q[np.asarray(gtab.b0s_mask, dtype=bool)] = 0.0
    return q


def symmetric_q_sampling(n_directions=6, radius=1.0, origin=True):
    """A q-sampling mapped onto itself by the 24 rotations of the voxel grid.

    Directions of the 3^3 neighbourhood: the 6 face directions (``+-x, +-y,
    +-z``), plus the 8 corner directions (14), plus the 12 edge directions
    (26). A network whose hidden q-samplings are such sets is exactly
    invariant to 90-degree rotations of the whole 6D input.

    Parameters
    ----------
    n_directions : {6, 14, 26}, optional
    radius : float, optional
        Length of the q-vectors.
    origin : bool, optional
        Prepend ``q = 0``.

    Returns
    -------
    q : ndarray, shape (n_directions + origin, 3), float64
    """
    if n_directions not in (6, 14, 26):
        raise ValueError(f"n_directions must be 6, 14 or 26, got {n_directions!r}")
    if not np.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    offsets = np.stack(np.meshgrid(*[np.array([-1, 0, 1])] * 3, indexing="ij"), -1).reshape(-1, 3)
    n_nonzero = np.count_nonzero(offsets, axis=1)
    kept = {6: n_nonzero == 1, 14: (n_nonzero == 1) | (n_nonzero == 3), 26: n_nonzero > 0}
    # Faces first, then corners, then edges, for a stable order.
    offsets = offsets[kept[n_directions]]
    offsets = offsets[np.argsort(np.array([0, 0, 2, 1])[np.count_nonzero(offsets, axis=1)],
                                 kind="stable")]
    directions = offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
    q = radius * directions
    if origin:
        q = np.concatenate([np.zeros((1, 3)), q])
    return q


def _check_q(q, name, unit=False):
    q = np.asarray(q, dtype=float)
    if q.ndim != 2 or q.shape[1] != 3 or q.shape[0] == 0:
        raise ValueError(f"{name} must have shape (Q, 3) with Q >= 1, got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError(f"{name} must be finite")
    if unit:
        norms = np.linalg.norm(q, axis=1)
        if np.max(np.abs(norms - 1)) > 1e-6:
            raise ValueError(
                f"{name} must be unit vectors, got norms from {norms.min():.6g} "
                f"to {norms.max():.6g}")
    return q


def _check_spatial_kernel_size(size):
    if isinstance(size, bool) or size not in SUPPORTED_SPATIAL_KERNEL_SIZES:
        raise ValueError(f"spatial_kernel_size must be one of {SUPPORTED_SPATIAL_KERNEL_SIZES} "
                         f"(odd), got {size!r}")
    return int(size)


def _check_order(value, name, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= value <= MAX_FILTER_ORDER:
        raise ValueError(f"{name} must be in [0, {MAX_FILTER_ORDER}], got {value}")
    return int(value)


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_reachable(fan_in, l_out, in_field, spatial_kernel_size):
    if fan_in == 0:
        raise ValueError(
            f"out_field has channels of order l = {l_out} that no kernel reaches from in_field "
            f"orders {in_field.orders()} with spatial_kernel_size={spatial_kernel_size}; raise "
            "spatial_kernel_size or max_order_p, or drop that order")


# --------------------------------------------------------------------------
# Bases


def _gaussian_rbf(r, centres, width):
    """Gaussian radial functions, shape (n_centres, *r.shape)."""
    centres = np.asarray(centres, dtype=float).reshape((-1,) + (1,) * np.ndim(r))
    return np.exp(-((np.asarray(r, dtype=float) - centres) ** 2) / (2 * width**2))


def p_radial_centres(spatial_kernel_size):
    """Centres (voxels) of the radial basis on voxel offsets."""
    return np.arange(int(round(math.sqrt(3) * (spatial_kernel_size // 2))) + 1, dtype=float)


def q_radial_basis(q_lengths, n_radial_q):
    """Radial basis on q-lengths, shape (n_radial_q, Q); see the module docstring."""
    q_lengths = np.asarray(q_lengths, dtype=float)
    if n_radial_q == 1:
        return np.ones((1,) + q_lengths.shape)
    centres = np.linspace(0.0, 1.0, n_radial_q)
    return _gaussian_rbf(q_lengths, centres, centres[1] - centres[0])


def kernel_offsets(size):
    """Voxel offsets ``p_out - p_in`` of the conv3d kernel taps, shape (size^3, 3).

    ``conv3d`` reads the input at ``p_out + t - size // 2`` for tap ``t``, so
    ``p_out - p_in = size // 2 - t`` (taps in C order over the three axes).
    """
    taps = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return (size // 2 - taps).astype(float)


def cosine_radial_basis(r, n_functions):
    """``cos^2`` finite elements on ``[0, 1]`` (the published code's p radial basis).

    ``phi_k(r) = cos^2(pi (r - mu_k) / (2 h))`` for ``|r - mu_k| < h``, 0
    elsewhere, with ``n_functions`` centres ``mu_k`` evenly in [0, 1] and ``h``
    their spacing; a single function is the constant 1.

    Returns
    -------
    phi : ndarray, shape ``(n_functions, *r.shape)``
    """
    r = np.asarray(r, dtype=float)
    if n_functions == 1:
        return np.ones((1,) + r.shape)
    centres = np.linspace(0.0, 1.0, n_functions).reshape((-1,) + (1,) * r.ndim)
    u = (r - centres) * (n_functions - 1)
    return np.where(np.abs(u) < 1, np.cos(0.5 * np.pi * u) ** 2, 0.0)


class RadialProfile(nn.Module):
    """Radial functions of the voxel offsets of a ``spatial_kernel_size^3`` kernel.

    ``kind="gaussian"``: Gaussians centred at 0, 1, ... voxels (width
    ``P_RADIAL_WIDTH``); ``"cosine"``: :func:`cosine_radial_basis` with
    ``(spatial_kernel_size + 1) // 2`` functions on the offset length divided by
    ``spatial_kernel_size // 2`` (the published layers' basis); ``"learned"``: that
    cosine basis fed through a small fully connected network (``layers``
    layers of ``units`` units, scaled ReLU), whose ``units`` outputs are the
    radial functions, learned with the layer.

    The layers build their kernel bases once against :attr:`samples` (one row
    per radial function, or for ``"learned"`` one row per distinct offset
    length, an indicator) and fold the profile into the weights in
    :meth:`mix`, so a learned profile costs one small matrix product per
    forward pass.

    Parameters
    ----------
    spatial_kernel_size : {1, 3, 5}
    kind : {"gaussian", "cosine", "learned"}, optional
    units, layers : int, optional
        Size of the network of ``"learned"``.
    """

    def __init__(self, spatial_kernel_size, kind="gaussian", units=16, layers=2):
        super().__init__()
        self.kind = _check_choice(kind, "p_radial", P_RADIAL_KINDS)
        radii = np.linalg.norm(kernel_offsets(spatial_kernel_size), axis=1)
        scale = max(spatial_kernel_size // 2, 1)
        n_cosine = (spatial_kernel_size + 1) // 2
        if kind == "gaussian":
            samples = _gaussian_rbf(radii, p_radial_centres(spatial_kernel_size), P_RADIAL_WIDTH)
        elif kind == "cosine":
            samples = cosine_radial_basis(radii / scale, n_cosine)
        else:
            units = _check_count(units, "radial_units")
            layers = _check_count(layers, "radial_layers")
            distinct, index = np.unique(np.round(radii, 9), return_inverse=True)
            samples = (index[None, :] == np.arange(len(distinct))[:, None]).astype(float)
            self.register_buffer("features", torch.from_numpy(
                cosine_radial_basis(distinct / scale, n_cosine).T.copy()), persistent=False)
            sizes = [n_cosine] + [units] * layers
            self.network = nn.ParameterList([
                nn.Parameter(torch.randn(n_out, n_in) / (1.0 if i == 0 else math.sqrt(n_in)))
                for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))])
        self.register_buffer("samples", torch.from_numpy(np.ascontiguousarray(samples)),
                             persistent=False)
        self.n_functions = units if kind == "learned" else samples.shape[0]

    def profile(self):
        """Learned radial functions at the distinct offset lengths, ``(n_lengths, units)``."""
        x = self.features.to(self.network[0].dtype)
        for weight in self.network:
            # ReLU scaled by sqrt(2) keeps the second moment of unit-variance inputs.
            x = math.sqrt(2.0) * torch.relu(x @ weight.T)
        return x

    def mix(self, weight, axis):
        """Weights against :attr:`samples`: ``weight`` with its radial ``axis`` mapped."""
        if self.kind != "learned":
            return weight
        return torch.movedim(torch.tensordot(weight, self.profile(), dims=([axis], [1])), -1, axis)


def spherical_harmonics(l, vectors):
    """e3nn real spherical harmonics of the directions of ``vectors``.

    Parameters
    ----------
    l : int
    vectors : ndarray, shape (..., 3)

    Returns
    -------
    Y : ndarray, shape (..., 2 l + 1), float64
        Component normalisation (``|Y^l|^2 = 2 l + 1``); vectors shorter than
        ``ZERO_OFFSET`` have no direction and get ``Y^0 = 1``, ``Y^{l>0} = 0``.
    """
    vectors = np.asarray(vectors, dtype=float)
    zero = np.linalg.norm(vectors, axis=-1) < ZERO_OFFSET
    if l == 0:
        return np.ones(vectors.shape[:-1] + (1,))
    safe = np.where(zero[..., None], 1.0, vectors)
    values = o3.spherical_harmonics(l, torch.from_numpy(safe), normalize=True,
                                    normalization="component").numpy()
    values[zero] = 0.0
    return values


def _wigner_3j(l1, l2, l3):
    return o3.wigner_3j(l1, l2, l3, dtype=torch.float64).numpy()


def pq_angular_terms(l_in, l_out, max_order_p, max_order_q, selection_rule="one_sided"):
    """Angular terms ``(l_f, l_p, l_q)`` of the pq-kernel from ``l_in`` to ``l_out``.

    ``|l_out - l_in| <= l_f <= l_out + l_in``, ``|l_p - l_q| <= l_f <= l_p +
    l_q`` and ``|l_f - l_p| <= 1`` (``"one_sided"``, the paper's formula);
    ``"two_sided"`` also asks ``|l_f - l_q| <= 1`` (the published code's
    ``l_diff_to_out_max = 1``). Sorted by ``(l_q, l_f, l_p)``: the index of a
    term is the ``n_terms`` axis of the layer's weights.
    """
    _check_choice(selection_rule, "selection_rule", SELECTION_RULES)
    terms = []
    for l_f in range(abs(l_out - l_in), l_out + l_in + 1):
        for l_p in range(max(l_f - 1, 0), min(l_f + 1, max_order_p) + 1):
            for l_q in range(abs(l_f - l_p), min(l_f + l_p, max_order_q) + 1):
                if selection_rule == "two_sided" and abs(l_f - l_q) > 1:
                    continue
                terms.append((l_f, l_p, l_q))
    return sorted(terms, key=lambda term: (term[2], term[0], term[1]))


def _pq_path_basis(l_in, l_out, terms, p_radial, offsets, keep_zero_offsets=True):
    """Basis E[a, k1, m_out, m_in, m_q, d] of the terms of one (l_out, l_in) path.

    All terms share one ``l_q`` (so one ``m_q`` axis); ``d`` runs over the
    taps. Without ``keep_zero_offsets`` the centre tap gets no angular term.
    """
    nonzero = (np.linalg.norm(offsets, axis=1) >= ZERO_OFFSET)[:, None]
    blocks = []
    for l_f, l_p, l_q in terms:
        # H[m_out, m_in, m_p, m_q] = sum_mf C(l_f, l_in -> l_out) C(l_p, l_q -> l_f)
        coupling = np.einsum("fio,pqf->oipq", _wigner_3j(l_f, l_in, l_out),
                             _wigner_3j(l_p, l_q, l_f))
        harmonics = spherical_harmonics(l_p, offsets)
        if not keep_zero_offsets:
            harmonics = harmonics * nonzero
        angular = np.einsum("oipq,dp->oiqd", coupling, harmonics)
        blocks.append(p_radial[:, None, None, None, :] * angular[None])
    return np.stack(blocks)


def _q_pairs(q_in, q_out, q_radius, antipodal):
    """Pairs (q_out, q_in sample) the kernel couples, with their window weights.

    Returns ``index`` (Q_out, n) into ``q_in``, ``position`` (Q_out, n, 3) of
    the paired input sample (``-q_in`` for antipodal copies) and ``weight``
    (Q_out, n), 0 on padding.
    """
    signs = np.array([1.0, -1.0]) if antipodal else np.array([1.0])
    candidates = (signs[:, None, None] * q_in[None]).reshape(-1, 3)
    candidate_index = np.tile(np.arange(len(q_in)), len(signs))
    if q_radius is None:
        shape = (len(q_out), len(candidates))
        return (np.ascontiguousarray(np.broadcast_to(candidate_index, shape)),
                np.broadcast_to(candidates, shape + (3,)), np.ones(shape))
    pairs = cKDTree(q_out).sparse_distance_matrix(
        cKDTree(candidates), q_radius, output_type="ndarray")
    pairs = pairs[np.lexsort((pairs["j"], pairs["i"]))]
    counts = np.bincount(pairs["i"], minlength=len(q_out))
    if np.any(counts == 0):
        raise ValueError(
            f"q_radius={q_radius} leaves {np.sum(counts == 0)} output q-samples without any "
            "input sample in range; increase q_radius")
    # Slot of each pair among the pairs of its output sample; padding slots keep weight 0.
    slot = np.arange(len(pairs)) - np.repeat(np.cumsum(counts) - counts, counts)
    candidate = np.zeros((len(q_out), counts.max()), dtype=int)
    candidate[pairs["i"], slot] = pairs["j"]
    weight = np.zeros(candidate.shape)
    # Smooth window: pairs that cross the radius under round-off carry ~0 weight.
    weight[pairs["i"], slot] = 0.5 * (1 + np.cos(np.pi * pairs["v"] / q_radius))
    return candidate_index[candidate], candidates[candidate], weight


def _unit_or_zero(vectors):
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms >= ZERO_OFFSET)


def _q_offsets(q_out, position, normalize):
    """``q_out - q_in`` per pair, of the unit vectors when ``normalize`` (0 stays 0)."""
    if normalize:
        return _unit_or_zero(q_out)[:, None, :] - _unit_or_zero(position)
    return q_out[:, None, :] - position


def _q_basis(q_in, q_out, index, weight, n_radial_q, max_order_q, offsets,
             keep_zero_offsets=True):
    """QB[j, k2, k3, q_out, n] = phi2_k2 phi3_k3 Y_j(unit(q offset)) window / Q_in.

    Without ``keep_zero_offsets`` the pairs with a zero offset get no angular
    term at all (not even ``l = 0``): a separate linear map handles them.
    """
    harmonics = np.concatenate(
        [spherical_harmonics(l, offsets) for l in range(max_order_q + 1)], axis=-1)
    if not keep_zero_offsets:
        harmonics = harmonics * (np.linalg.norm(offsets, axis=-1) >= ZERO_OFFSET)[..., None]
    phi_out = q_radial_basis(np.linalg.norm(q_out, axis=1), n_radial_q)  # (n2, Qo)
    phi_in = q_radial_basis(np.linalg.norm(q_in, axis=1), n_radial_q)[:, index]  # (n3, Qo, n)
    basis = np.einsum("bo,con,onj->jbcon", phi_out, phi_in, harmonics)
    return basis * weight / len(q_in)


# --------------------------------------------------------------------------
# Layers


class PQConv(nn.Module):
    """SE(3)-equivariant pq-layer on 6D spherical-tensor fields (Mueller et al.).

    Parameters
    ----------
    in_field, out_field : TensorFieldType or int or sequence of int
        Multiplicities per order ``l`` of the input and output channels.
    q_in : array_like, shape (Q_in, 3)
        q-vectors of the input samples (e.g. :func:`q_from_gtab`), ``|q| <= 1``
        expected by the radial bases.
    q_out : array_like, shape (Q_out, 3), optional
        q-vectors of the output samples; ``q_in`` if None. May differ in
        number and position (e.g. a reduction to fewer samples).
    spatial_kernel_size : {1, 3, 5}, optional
        Voxel kernel size (cube).
    n_radial_q : int, optional
        Radial functions on ``|q_out|`` and on ``|q_in|`` each.
    max_order_p : int, optional
        Largest ``l_p``; ``min(spatial_kernel_size - 1, 3)`` if None (0 for kernel
        size 1, whose only offset is the centre).
    max_order_q : int, optional
        Largest ``l_q``.
    q_radius : float, optional
        Couple only q-samples closer than this, with the window
        ``(1 + cos(pi |q_out - q_in| / q_radius)) / 2``; None couples all
        pairs (the paper's layer).
    antipodal : bool, optional
        Treat every input sample as also sampled at ``-q_in`` (antipodally
        symmetric signals on a hemisphere sampling).
    bias : bool, optional
        Learned bias on scalar outputs, a radial function of ``|q_out|``.
    selection_rule : {"one_sided", "two_sided"}, optional
        ``|l_f - l_p| <= 1`` (the paper's formula) or also ``|l_f - l_q| <=
        1`` (the published code); see :func:`pq_angular_terms`.
    normalize_q_offsets : bool, optional
        Form the q offsets from unit vectors, ``unit(q_out) - unit(q_in)``
        (``q = 0`` stays 0), as the published code does: the angular part
        then sees directions only, the shells enter through the radial
        functions alone. False uses the length-scaled q-vectors.
    zero_offsets : {"l0", "linear"}, optional
        Offsets without direction (the centre voxel; equal q offsets, e.g.
        b0 to b0): ``"l0"`` keeps their ``l = 0`` terms with their radial
        factors; ``"linear"`` (the published code) gives every (p, q) pair
        where either offset is zero one learned linear map instead, mixing
        channels of equal order (``linear["l"]``, ``(mult_out, mult_in)``),
        with no radial or angular factor.
    p_radial : {"gaussian", "cosine", "learned"}, optional
        Radial functions on voxel offsets (:class:`RadialProfile`).
    radial_units, radial_layers : int, optional
        Size of the network of ``p_radial="learned"``.

    Notes
    -----
    Input ``[batch, in_field.dim, Q_in, X, Y, Z]``, output ``[batch,
    out_field.dim, Q_out, X, Y, Z]`` (zero padding keeps the grid).
    Learned weights per path ``(l_out, l_in)``: ``weights["lo_li"]`` of
    shape ``(mult_out, mult_in, n_terms, n_radial_p, n_radial_q,
    n_radial_q)``.

    Every option keeps the layer exactly equivariant: offsets formed from
    unit vectors rotate with q-space, a zero offset stays zero, and the
    linear map of zero offsets acts on each order ``l`` as a multiple of the
    identity on its ``2 l + 1`` components.

    References
    ----------
    .. [1] P. Mueller, V. Golkov, V. Tomassini, D. Cremers. Rotation-Equivariant
       Deep Learning for Diffusion MRI. ISMRM 2021. Code:
       https://github.com/philip-mueller/equivariant-deep-dmri
    """

    def __init__(self, in_field, out_field, q_in, q_out=None, spatial_kernel_size=3, *,
                 n_radial_q=3, max_order_p=None, max_order_q=4, q_radius=None, antipodal=False,
                 bias=True, selection_rule="one_sided", normalize_q_offsets=False,
                 zero_offsets="l0", p_radial="gaussian", radial_units=16, radial_layers=2):
        super().__init__()
        self.in_field = as_field_type(in_field, "in_field")
        self.out_field = as_field_type(out_field, "out_field")
        self.spatial_kernel_size = _check_spatial_kernel_size(spatial_kernel_size)
        self.n_radial_q = _check_count(n_radial_q, "n_radial_q")
        default_p = min(self.spatial_kernel_size - 1, 3)
        self.max_order_p = 0 if self.spatial_kernel_size == 1 else _check_order(
            max_order_p, "max_order_p", default_p)
        self.max_order_q = _check_order(max_order_q, "max_order_q", 4)
        if q_radius is not None and not (np.isfinite(q_radius) and q_radius > 0):
            raise ValueError(f"q_radius must be a positive float or None, got {q_radius!r}")
        self.q_radius = None if q_radius is None else float(q_radius)
        self.antipodal = bool(antipodal)
        self.selection_rule = _check_choice(selection_rule, "selection_rule", SELECTION_RULES)
        self.normalize_q_offsets = bool(normalize_q_offsets)
        self.zero_offsets = _check_choice(zero_offsets, "zero_offsets", ZERO_OFFSET_RULES)
        keep_zero = self.zero_offsets == "l0"
        q_in = _check_q(q_in, "q_in")
        q_out = q_in if q_out is None else _check_q(q_out, "q_out")
        self.n_q_in, self.n_q_out = len(q_in), len(q_out)

        offsets = kernel_offsets(self.spatial_kernel_size)
        self.p_radial = RadialProfile(self.spatial_kernel_size, p_radial, radial_units,
                                      radial_layers)
        p_samples = self.p_radial.samples.numpy()
        self.n_radial_p = self.p_radial.n_functions

        self.paths = []
        self.weights = nn.ParameterDict()
        used_order_q = 0
        for l_out in self.out_field.orders():
            fan_in = 0
            for l_in in self.in_field.orders():
                terms = pq_angular_terms(l_in, l_out, self.max_order_p, self.max_order_q,
                                         self.selection_rule)
                if not terms:
                    continue
                # One basis per l_q: its terms are a contiguous range of the weights.
                groups = []
                for l_q in range(terms[-1][2] + 1):
                    indices = [a for a, term in enumerate(terms) if term[2] == l_q]
                    if indices:
                        self.register_buffer(
                            f"basis_{l_out}_{l_in}_{l_q}",
                            torch.from_numpy(_pq_path_basis(
                                l_in, l_out, [terms[a] for a in indices], p_samples, offsets,
                                keep_zero)),
                            persistent=False)
                    groups.append((l_q, indices[0] if indices else 0,
                                   indices[-1] + 1 if indices else 0))
                used_order_q = max(used_order_q, terms[-1][2])
                self.paths.append((l_out, l_in, groups))
                shape = (self.out_field.multiplicity(l_out), self.in_field.multiplicity(l_in),
                         len(terms), self.n_radial_p, self.n_radial_q, self.n_radial_q)
                self.weights[f"{l_out}_{l_in}"] = nn.Parameter(torch.randn(shape))
                fan_in += math.prod(shape[1:])
            _check_reachable(fan_in, l_out, self.in_field, self.spatial_kernel_size)
            for l_in in self.in_field.orders():
                key = f"{l_out}_{l_in}"
                if key in self.weights:
                    with torch.no_grad():
                        self.weights[key].mul_(1 / math.sqrt(fan_in))

        index, position, weight = _q_pairs(q_in, q_out, self.q_radius, self.antipodal)
        q_offsets = _q_offsets(q_out, position, self.normalize_q_offsets)
        q_basis = _q_basis(q_in, q_out, index, weight, self.n_radial_q, used_order_q, q_offsets,
                           keep_zero)
        self.sparse = self.q_radius is not None
        if not keep_zero:
            # Z[d, q_out, n]: where the p or the q offset is zero, with the window and 1 / Q_in.
            p_zero = np.linalg.norm(offsets, axis=1) < ZERO_OFFSET
            q_zero = np.linalg.norm(q_offsets, axis=-1) < ZERO_OFFSET
            zero = (p_zero[:, None, None] | q_zero[None]) * (weight / len(q_in))[None]
            self.linear = nn.ParameterDict({
                str(l): nn.Parameter(torch.randn(self.out_field.multiplicity(l),
                                                 self.in_field.multiplicity(l))
                                     / math.sqrt(self.in_field.multiplicity(l)))
                for l in self.out_field.orders() if self.in_field.multiplicity(l)})
        else:
            self.linear = None
        if self.sparse:
            self.register_buffer("q_index", torch.from_numpy(index.reshape(-1)), persistent=False)
            self.n_neighbours = index.shape[1]
        else:
            # Dense pairs are [q_in, -q_in (antipodal)]: both copies read the same sample.
            q_basis = q_basis.reshape(q_basis.shape[:-1] + (-1, len(q_in))).sum(axis=-2)
            if not keep_zero:
                zero = zero.reshape(zero.shape[:-1] + (-1, len(q_in))).sum(axis=-2)
        self.register_buffer("q_basis", torch.from_numpy(np.ascontiguousarray(q_basis)),
                             persistent=False)
        if not keep_zero:
            self.register_buffer("zero_coupling", torch.from_numpy(np.ascontiguousarray(zero)),
                                 persistent=False)

        n_scalars = self.out_field.multiplicity(0)
        if bias and n_scalars:
            self.bias = nn.Parameter(torch.zeros(n_scalars, self.n_radial_q))
            self.register_buffer(
                "bias_radial", torch.from_numpy(q_radial_basis(np.linalg.norm(q_out, axis=1),
                                                               self.n_radial_q)),
                persistent=False)
        else:
            self.register_parameter("bias", None)

    def kernel(self):
        """Assemble the kernel from the weights.

        Returns
        -------
        kernel : torch.Tensor
            Dense: ``(out.dim, Q_out, in.dim, Q_in, k^3)``; with ``q_radius``:
            ``(Q_out, out.dim, in.dim, n_neighbours, k^3)``.
        """
        dtype = next(iter(self.weights.values())).dtype
        q_basis = self.q_basis.to(dtype)
        n_pairs = q_basis.shape[-1]
        taps = self.spatial_kernel_size**3
        blocks = {}
        for l_out, l_in, groups in self.paths:
            weight = self.p_radial.mix(self.weights[f"{l_out}_{l_in}"], 3)
            rows_out = weight.shape[0] * (2 * l_out + 1)
            rows_in = weight.shape[1] * (2 * l_in + 1)
            # T[(o, m_out, i, m_in, d), (l_q, m_q, k2, k3)]: p part and CG couplings folded in.
            partial = []
            for l_q, start, stop in groups:
                if start == stop:
                    partial.append(weight.new_zeros(rows_out * rows_in * taps,
                                                    (2 * l_q + 1) * self.n_radial_q**2))
                    continue
                basis = getattr(self, f"basis_{l_out}_{l_in}_{l_q}").to(dtype)
                partial.append(torch.einsum("oiakbc,akxymd->oxiydmbc", weight[:, :, start:stop],
                                            basis).reshape(rows_out * rows_in * taps, -1))
            n_q_components = len(groups) ** 2
            q_part = q_basis[:n_q_components].reshape(-1, self.n_q_out * n_pairs)
            block = (torch.cat(partial, dim=1) @ q_part).view(
                rows_out, rows_in, taps, self.n_q_out, n_pairs)
            if self.linear is not None and l_out == l_in:
                identity = torch.eye(2 * l_in + 1, dtype=dtype, device=block.device)
                mixing = torch.kron(self.linear[str(l_in)], identity)
                block = block + mixing[:, :, None, None, None] * self.zero_coupling.to(dtype)
            if self.sparse:
                blocks[l_out, l_in] = block.permute(3, 0, 1, 4, 2)
            else:
                blocks[l_out, l_in] = block.permute(0, 3, 1, 4, 2)
        in_axis, out_axis = (2, 1) if self.sparse else (2, 0)
        rows = []
        for l_out in self.out_field.orders():
            row = []
            for l_in in self.in_field.orders():
                if (l_out, l_in) in blocks:
                    row.append(blocks[l_out, l_in])
                else:
                    shape = list(next(iter(blocks.values())).shape)
                    shape[out_axis] = self.out_field.multiplicity(l_out) * (2 * l_out + 1)
                    shape[in_axis] = self.in_field.multiplicity(l_in) * (2 * l_in + 1)
                    row.append(q_basis.new_zeros(shape))
            rows.append(torch.cat(row, dim=in_axis))
        return torch.cat(rows, dim=out_axis)

    def forward(self, x):
        """Apply the layer.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, in_field.dim, Q_in, X, Y, Z)

        Returns
        -------
        torch.Tensor, shape (batch, out_field.dim, Q_out, X, Y, Z)
        """
        if x.ndim != 6:
            raise ValueError(
                f"input must have shape (batch, {self.in_field.dim}, {self.n_q_in}, X, Y, Z), "
                f"got {tuple(x.shape)}")
        self.in_field.check(x, "input")
        if x.shape[2] != self.n_q_in:
            raise ValueError(
                f"input has {x.shape[2]} q-samples on axis 2, the layer was built for "
                f"q_in with {self.n_q_in}")
        batch, grid = x.shape[0], x.shape[3:]
        k = self.spatial_kernel_size
        kernel = self.kernel()
        if self.sparse:
            # Gather each output sample's neighbours: a grouped conv, one group per q_out.
            gathered = x.index_select(2, self.q_index).view(
                batch, self.in_field.dim, self.n_q_out, self.n_neighbours, *grid)
            gathered = gathered.transpose(1, 2).reshape(batch, -1, *grid)
            out = F.conv3d(gathered, kernel.reshape(-1, self.in_field.dim * self.n_neighbours,
                                                    k, k, k),
                           padding=k // 2, groups=self.n_q_out)
            out = out.view(batch, self.n_q_out, self.out_field.dim, *grid).transpose(1, 2)
        else:
            out = F.conv3d(x.reshape(batch, -1, *grid),
                           kernel.reshape(self.out_field.dim * self.n_q_out, -1, k, k, k),
                           padding=k // 2)
            out = out.view(batch, self.out_field.dim, self.n_q_out, *grid)
        if self.bias is not None:
            bias = self.bias @ self.bias_radial.to(self.bias.dtype)  # (scalars, Q_out)
            out = torch.cat([out[:, :bias.shape[0]] + bias[:, :, None, None, None],
                             out[:, bias.shape[0]:]], dim=1)
        return out

    def extra_repr(self):
        return (f"{self.in_field} -> {self.out_field}, q {self.n_q_in} -> {self.n_q_out}, "
                f"spatial_kernel_size={self.spatial_kernel_size}, max_order_p={self.max_order_p}, "
                f"max_order_q={self.max_order_q}, q_radius={self.q_radius}, "
                f"selection_rule={self.selection_rule!r}, "
                f"normalize_q_offsets={self.normalize_q_offsets}, "
                f"zero_offsets={self.zero_offsets!r}, p_radial={self.p_radial.kind!r}")


class PConv(nn.Module):
    """SE(3)-equivariant 3D steerable convolution on spherical-tensor fields.

    The p-only layer (Weiler et al.): kernel ``W[c_out, c_in, l_f, k1]
    C^{(l_out m_out)}_{(l_f m_f)(l_in m_in)} phi1_k1(|p_out - p_in|)
    Y^{l_f}_{m_f}(unit(p_out - p_in))``, with the radial basis of
    :class:`PQConv`.

    Parameters
    ----------
    in_field, out_field : TensorFieldType or int or sequence of int
    spatial_kernel_size : {1, 3, 5}, optional
    max_order_p : int, optional
        Largest filter order ``l_f``; ``min(spatial_kernel_size - 1, 3)`` if None.
    bias : bool, optional
        Learned bias on scalar outputs.
    p_radial : {"gaussian", "cosine", "learned"}, optional
        Radial functions on voxel offsets (:class:`RadialProfile`).
    radial_units, radial_layers : int, optional
        Size of the network of ``p_radial="learned"``.

    Notes
    -----
    Input ``[batch, in_field.dim, X, Y, Z]``, output ``[batch,
    out_field.dim, X, Y, Z]``.
    """

    def __init__(self, in_field, out_field, spatial_kernel_size=3, *, max_order_p=None, bias=True,
                 p_radial="gaussian", radial_units=16, radial_layers=2):
        super().__init__()
        self.in_field = as_field_type(in_field, "in_field")
        self.out_field = as_field_type(out_field, "out_field")
        self.spatial_kernel_size = _check_spatial_kernel_size(spatial_kernel_size)
        self.max_order_p = 0 if self.spatial_kernel_size == 1 else _check_order(
            max_order_p, "max_order_p", min(self.spatial_kernel_size - 1, 3))
        offsets = kernel_offsets(self.spatial_kernel_size)
        self.p_radial = RadialProfile(self.spatial_kernel_size, p_radial, radial_units,
                                      radial_layers)
        p_radial = self.p_radial.samples.numpy()
        self.n_radial_p = self.p_radial.n_functions
        self.paths = []
        self.weights = nn.ParameterDict()
        for l_out in self.out_field.orders():
            fan_in = 0
            for l_in in self.in_field.orders():
                orders = range(abs(l_out - l_in), min(l_out + l_in, self.max_order_p) + 1)
                if not orders:
                    continue
                basis = np.stack([
                    p_radial[:, None, None, :] * np.einsum(
                        "fio,df->oid", _wigner_3j(l_f, l_in, l_out),
                        spherical_harmonics(l_f, offsets))[None]
                    for l_f in orders])  # (l_f, k1, m_out, m_in, taps)
                self.register_buffer(f"basis_{l_out}_{l_in}", torch.from_numpy(basis),
                                     persistent=False)
                self.paths.append((l_out, l_in))
                shape = (self.out_field.multiplicity(l_out), self.in_field.multiplicity(l_in),
                         len(orders), self.n_radial_p)
                self.weights[f"{l_out}_{l_in}"] = nn.Parameter(torch.randn(shape))
                fan_in += math.prod(shape[1:])
            _check_reachable(fan_in, l_out, self.in_field, self.spatial_kernel_size)
            for l_in in self.in_field.orders():
                if f"{l_out}_{l_in}" in self.weights:
                    with torch.no_grad():
                        self.weights[f"{l_out}_{l_in}"].mul_(1 / math.sqrt(fan_in))
        n_scalars = self.out_field.multiplicity(0)
        self.bias = nn.Parameter(torch.zeros(n_scalars)) if bias and n_scalars else None

    def kernel(self):
        """The conv3d weight, shape ``(out.dim, in.dim, k, k, k)``."""
        dtype = next(iter(self.weights.values())).dtype
        k = self.spatial_kernel_size
        kernel = torch.zeros(self.out_field.dim, self.in_field.dim, k**3, dtype=dtype,
                             device=next(iter(self.weights.values())).device)
        for l_out, l_in in self.paths:
            basis = getattr(self, f"basis_{l_out}_{l_in}").to(dtype)
            weight = self.p_radial.mix(self.weights[f"{l_out}_{l_in}"], 3)
            block = torch.einsum("oiak,akxyd->oxiyd", weight, basis)
            kernel[self.out_field.slice(l_out), self.in_field.slice(l_in)] = block.reshape(
                block.shape[0] * block.shape[1], block.shape[2] * block.shape[3], -1)
        return kernel.view(self.out_field.dim, self.in_field.dim, k, k, k)

    def forward(self, x):
        """Apply the layer to ``x`` of shape (batch, in_field.dim, X, Y, Z)."""
        if x.ndim != 5:
            raise ValueError(
                f"input must have shape (batch, {self.in_field.dim}, X, Y, Z), "
                f"got {tuple(x.shape)}")
        self.in_field.check(x, "input")
        bias = None
        if self.bias is not None:
            bias = torch.cat([self.bias, self.bias.new_zeros(self.out_field.dim - len(self.bias))])
        return F.conv3d(x, self.kernel(), bias=bias, padding=self.spatial_kernel_size // 2)

    def extra_repr(self):
        return (f"{self.in_field} -> {self.out_field}, "
                f"spatial_kernel_size={self.spatial_kernel_size}, "
                f"max_order_p={self.max_order_p}, p_radial={self.p_radial.kind!r}")


class QReduction(nn.Module):
    """Learned q-length weighted average over q: 6D field -> 3D field.

    ``out_c(p) = (1 / Q) sum_q w_c(|q|) in_c(p, q)`` with ``w_c(r) = 1 +
    sum_k V[c, k] phi_k(r)``, ``phi`` the q radial basis of :class:`PQConv`
    and ``V`` learned, one weight function per channel shared by its
    ``2 l + 1`` components, so the result is invariant to rotations of the
    q-sampling (and to its order).

    Parameters
    ----------
    field : TensorFieldType or int or sequence of int
    q : array_like, shape (Q, 3)
        q-vectors of the input samples.
    n_radial_q : int, optional

    Notes
    -----
    Input ``[batch, field.dim, Q, X, Y, Z]``, output ``[batch, field.dim, X, Y, Z]``.
    Initialised to the plain mean over q (``V = 0``).
    """

    def __init__(self, field, q, n_radial_q=3):
        super().__init__()
        self.field = as_field_type(field, "field")
        q = _check_q(q, "q")
        self.n_q = len(q)
        n_radial_q = _check_count(n_radial_q, "n_radial_q")
        radial = q_radial_basis(np.linalg.norm(q, axis=1), n_radial_q)
        self.register_buffer("radial", torch.from_numpy(radial), persistent=False)
        self.weight = nn.Parameter(torch.zeros(self.field.n_channels, n_radial_q))
        self.register_buffer("channel_of_row", self.field.channel_of_row(), persistent=False)

    def forward(self, x):
        """Reduce ``x`` of shape (batch, field.dim, Q, X, Y, Z) over q."""
        if x.ndim != 6:
            raise ValueError(
                f"input must have shape (batch, {self.field.dim}, {self.n_q}, X, Y, Z), "
                f"got {tuple(x.shape)}")
        self.field.check(x, "input")
        if x.shape[2] != self.n_q:
            raise ValueError(
                f"input has {x.shape[2]} q-samples, the layer was built for {self.n_q}")
        q_weights = 1 + self.weight @ self.radial.to(self.weight.dtype)  # (channels, Q)
        row_weights = q_weights[self.channel_of_row] / self.n_q
        return torch.einsum("rq,brq...->br...", row_weights, x)


class PQSphereConv(PQConv):
    """pq-layer on scalar spherical signals, a conv kind for the deconvolution U-Net.

    Each vertex of the sphere is a unit q-vector; the layer couples vertices
    closer than ``q_radius`` and 3D neighbours in the ``spatial_kernel_size^3``
    block, jointly equivariant to rotations of the grid and the sphere.

    Parameters
    ----------
    in_channels, out_channels : int
        Scalar (``l = 0``) channels.
    vertices : array_like, shape (V, 3)
        Unit vectors (e.g. ``HealpixSphere.vertices``), the same for input
        and output.
    spatial_kernel_size : {1, 3, 5}, optional
    q_radius : float or "auto" or None, optional
        Chord length ``|v_out - v_in|`` beyond which vertices are not
        coupled; ``"auto"`` is twice the median nearest-neighbour distance
        of the vertices (about 12 neighbours on HEALPix), None couples all
        ``V^2`` pairs (cost grows as ``V^2``).
    antipodal : bool, optional
        The signal is even: each vertex also stands for its antipode (use
        with hemisphere vertex sets).
    max_order_q : int, optional
        Largest ``l_q``.

    Notes
    -----
    Input ``[batch, in_channels, V, X, Y, Z]``, output ``[batch,
    out_channels, V, X, Y, Z]``. All ``|q| = 1``, so one radial function in
    q is used.
    """

    def __init__(self, in_channels, out_channels, vertices, spatial_kernel_size=3, *,
                 q_radius="auto", antipodal=False, max_order_q=4, bias=True):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        vertices = _check_q(vertices, "vertices", unit=True)
        if isinstance(q_radius, str):
            if q_radius != "auto":
                raise ValueError(f"q_radius must be a float, 'auto' or None, got {q_radius!r}")
            q_radius = 2 * PQSphereConv.nearest_neighbour_distance(vertices, antipodal)
        super().__init__(int(in_channels), int(out_channels), vertices,
                         spatial_kernel_size=spatial_kernel_size, n_radial_q=1,
                         max_order_q=max_order_q, q_radius=q_radius, antipodal=antipodal,
                         bias=bias)

    @staticmethod
    def nearest_neighbour_distance(vertices, antipodal=False):
        """Median chord distance from each vertex to its nearest other vertex."""
        points = np.concatenate([vertices, -vertices]) if antipodal else vertices
        if len(points) < 2:
            return 2.0
        distances, _ = cKDTree(points).query(vertices, k=2)
        return float(np.median(distances[:, 1]))
