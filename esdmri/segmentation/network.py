"""Segmentation networks on 6D dMRI: the equivariant pq-network and a 3D CNN baseline.

Both take ``[batch, 1, Q, X, Y, Z]`` (the normalised signal of Q
measurements, see :func:`esdmri.segmentation.signal_to_input`) and return
voxel-wise lesion probabilities ``[batch, X, Y, Z]``; ``logits`` gives the
values before the sigmoid (for training with a stable BCE).
"""

import math

import numpy as np
import torch
from torch import nn

from esdmri.nn.gated import EquivariantBatchNorm, GatedNonlinearity, swish
from esdmri.nn.pq import (
    MAX_FILTER_ORDER,
    ZERO_OFFSET,
    PConv,
    PQConv,
    QReduction,
    _check_q,
    symmetric_q_sampling,
)
from esdmri.nn.tensor_field import as_field_type


def _check_input(x, n_q, name="input"):
    if x.ndim != 6 or x.shape[1] != 1 or x.shape[2] != n_q:
        raise ValueError(f"{name} must have shape (batch, 1, {n_q}, X, Y, Z), got {tuple(x.shape)}")


# Published configurations, by name (see PQSegmentationNetwork.from_preset).
PRESETS = {
    # The example network of Mueller et al.'s code, "the same hyperparameters as our best
    # model": one pq-layer to 7 scalars + 4 vectors on the input's q-sampling (b0s
    # averaged), a length-weighted q-reduction, p-layers to (20, 5), (10, 3), (5, 2) and
    # 1 scalar, 5^3 kernels, cosine radial basis on voxel offsets, Gaussian ones on
    # q-lengths (one per distinct length), gated swish, no batch norm; layers with the
    # two-sided selection rule, unit q offsets and a linear map of zero-length offsets.
    "mueller2021": dict(
        pq_channels=((7, 4),), p_channels=((20, 5), (10, 3), (5, 2), (1,)), q_hidden="input",
        kernel_size=5, n_radial_q="lengths", max_order_p=None, max_order_q=None,
        batch_norm=False, selection_rule="two_sided", normalize_q_offsets=True,
        zero_offsets="linear", p_radial="cosine"),
}

# q-lengths closer than this are one shell when counting radial functions.
_LENGTH_TOLERANCE = 1e-3


def _b0_mask(q):
    return np.linalg.norm(q, axis=1) < ZERO_OFFSET


def _distinct_lengths(q):
    return len(np.unique(np.round(np.linalg.norm(q, axis=1) / _LENGTH_TOLERANCE)))


class PQSegmentationNetwork(nn.Module):
    """SE(3)-equivariant network (Mueller et al.) for voxel-wise segmentation of 6D dMRI.

    ``pq-layers -> q-reduction -> p-layers``: the first pq-layer maps the
    acquisition's q-samples onto the hidden q-sampling, the q-reduction after
    the last one leaves a 3D spherical-tensor field, and 3D steerable
    convolutions end in one scalar channel. Every layer but the last is
    followed by equivariant batch norm (optional) and the gated nonlinearity
    (swish on scalars); the output is a sigmoid. The defaults are ``pq -> pq
    -> pq + q-reduction -> p -> p`` on a 7-point hidden q-sampling;
    :meth:`from_preset` builds the authors' published configuration.

    The output is invariant to rotating the whole 6D input (voxel grid and
    q-space together) by any rotation that maps the grid and the hidden
    q-sampling onto themselves, and approximately invariant to any other
    rotation. With ``q_hidden="input"`` the hidden sampling rotates with the
    acquisition, so only the voxel grid's discretisation breaks the symmetry.

    Parameters
    ----------
    q : array_like, shape (Q, 3)
        q-vectors of the input measurements (``esdmri.nn.pq.q_from_gtab``).
    pq_channels : sequence of (int or sequence of int), optional
        Multiplicities per order ``l`` of the output of each pq-layer.
    p_channels : sequence of (int or sequence of int), optional
        Multiplicities of the output of each p-layer; the last must be one
        scalar, ``(1,)``.
    q_hidden : array_like, shape (Q_h, 3), or "input", optional
        Hidden q-sampling. None: the origin plus the 6 face directions at
        ``|q| = 1`` (:func:`esdmri.nn.pq.symmetric_q_sampling`); denser
        symmetric samplings (14 or 26 directions) approach invariance to
        arbitrary rotations more closely, at a cost that grows as ``Q_h^2``.
        ``"input"``: the input's own sampling with its b0 measurements
        averaged into one (the published network); costs ``Q^2``.
    kernel_size : {1, 3, 5}, optional
        Voxel kernel size of every layer (the layers' ``spatial_kernel_size``;
        saved networks store it under this name).
    n_radial_q : int or "lengths", optional
        Radial functions on q-lengths in the pq-layers and the q-reduction;
        ``"lengths"``: one per distinct q-length of the input (b0 and shells).
    max_order_p, max_order_q : int, optional
        Largest p and q harmonic orders in the pq-kernels; None: the
        layer's default for ``l_p`` (``min(kernel_size - 1, 3)``), only the
        selection rule for ``l_q``.
    batch_norm : bool, optional
        Equivariant batch norm before each gated nonlinearity.
    selection_rule, normalize_q_offsets, zero_offsets : optional
        Passed to every :class:`esdmri.nn.pq.PQConv`.
    p_radial : {"gaussian", "cosine", "learned"}, optional
        Radial functions on voxel offsets of every layer.
    radial_units, radial_layers : int, optional
        Size of the network of ``p_radial="learned"``.

    References
    ----------
    .. [1] P. Mueller, V. Golkov, V. Tomassini, D. Cremers. Rotation-Equivariant
       Deep Learning for Diffusion MRI. ISMRM 2021. Code:
       https://github.com/philip-mueller/equivariant-deep-dmri
    """

    def __init__(self, q, pq_channels=((4, 2, 1),) * 3, p_channels=((4, 2, 1), (1,)),
                 q_hidden=None, kernel_size=3, *, n_radial_q=3, max_order_p=None, max_order_q=3,
                 batch_norm=True, selection_rule="one_sided", normalize_q_offsets=False,
                 zero_offsets="l0", p_radial="gaussian", radial_units=16, radial_layers=2):
        super().__init__()
        q = _check_q(q, "q")
        self.n_q = len(q)
        pq_fields = self._fields(pq_channels, "pq_channels")
        p_fields = self._fields(p_channels, "p_channels")
        if p_fields[-1].multiplicities != (1,):
            raise ValueError(f"p_channels must end with one scalar, (1,), got {p_channels[-1]!r}")
        averaged = None
        if isinstance(q_hidden, str):
            if q_hidden != "input":
                raise ValueError(f"q_hidden must be None, 'input' or a (Q_h, 3) array, "
                                 f"got {q_hidden!r}")
            b0s = _b0_mask(q)
            if b0s.sum() > 1:
                averaged = np.flatnonzero(b0s)
            q_layers = np.concatenate([np.zeros((1, 3)), q[~b0s]]) if b0s.any() else q
            hidden_q = q_layers
        else:
            q_layers = q
            hidden_q = symmetric_q_sampling(6) if q_hidden is None else _check_q(q_hidden,
                                                                                "q_hidden")
        if isinstance(n_radial_q, str):
            if n_radial_q != "lengths":
                raise ValueError(f"n_radial_q must be an int or 'lengths', got {n_radial_q!r}")
            radial_q = max(_distinct_lengths(q), 1)
        else:
            radial_q = n_radial_q
        if averaged is not None:
            self.register_buffer("b0_index", torch.from_numpy(averaged), persistent=False)
            self.register_buffer("dw_index", torch.from_numpy(np.flatnonzero(~_b0_mask(q))),
                                 persistent=False)
        else:
            self.b0_index = None
        radial = dict(p_radial=p_radial, radial_units=radial_units, radial_layers=radial_layers)
        pq_options = dict(spatial_kernel_size=kernel_size, n_radial_q=radial_q,
                          max_order_p=max_order_p,
                          max_order_q=MAX_FILTER_ORDER if max_order_q is None else max_order_q,
                          selection_rule=selection_rule, normalize_q_offsets=normalize_q_offsets,
                          zero_offsets=zero_offsets, **radial)
        layers, field, samples = [], as_field_type(1, "input"), q_layers
        for out in pq_fields:
            layers.append(PQConv(field, out.with_gates(), samples, hidden_q, **pq_options))
            field, samples = out, hidden_q
        self.pq_layers = nn.ModuleList(layers)
        self.q_reduction = QReduction(field, hidden_q, radial_q)
        layers = []
        for index, out in enumerate(p_fields):
            last = index == len(p_fields) - 1
            layers.append(PConv(field, out if last else out.with_gates(), kernel_size, **radial))
            field = out
        self.p_layers = nn.ModuleList(layers)
        hidden = [*pq_fields, *p_fields[:-1]]
        self.norms = nn.ModuleList([
            EquivariantBatchNorm(out.with_gates()) if batch_norm else nn.Identity()
            for out in hidden])
        self.gates = nn.ModuleList([GatedNonlinearity(out) for out in hidden])
        self._config = dict(
            q=q.tolist(), pq_channels=[list(f.multiplicities) for f in pq_fields],
            p_channels=[list(f.multiplicities) for f in p_fields],
            q_hidden=q_hidden if q_hidden is None or isinstance(q_hidden, str)
            else hidden_q.tolist(), kernel_size=kernel_size, n_radial_q=n_radial_q,
            max_order_p=max_order_p, max_order_q=max_order_q, batch_norm=bool(batch_norm),
            selection_rule=selection_rule, normalize_q_offsets=bool(normalize_q_offsets),
            zero_offsets=zero_offsets, p_radial=p_radial, radial_units=radial_units,
            radial_layers=radial_layers)

    @staticmethod
    def _fields(channels, name):
        if isinstance(channels, (int, np.integer)) or len(channels) == 0:
            raise ValueError(f"{name} must be a non-empty sequence of channel multiplicities, "
                             f"got {channels!r}")
        return [as_field_type(c, f"{name}[{i}]") for i, c in enumerate(channels)]

    @classmethod
    def from_preset(cls, name, q, **overrides):
        """A network in a published configuration.

        Parameters
        ----------
        name : {"mueller2021"}
            ``"mueller2021"``: the example network of the authors' code
            (philip-mueller/equivariant-deep-dmri), which they give as their
            best model's hyperparameters; see :data:`PRESETS`.
        q : array_like, shape (Q, 3)
        **overrides
            Constructor arguments that replace the preset's.

        Returns
        -------
        PQSegmentationNetwork
        """
        if name not in PRESETS:
            raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(q, **{**PRESETS[name], **overrides})

    @property
    def config(self):
        """Constructor arguments (plain Python types), for :func:`save_network`."""
        return dict(self._config)

    def logits(self, x):
        """Lesion logits ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        _check_input(x, self.n_q)
        if self.b0_index is not None:
            # One b0 sample, their mean, first (the published network's input).
            x = torch.cat([x.index_select(2, self.b0_index).mean(2, keepdim=True),
                           x.index_select(2, self.dw_index)], dim=2)
        step = 0
        for layer in self.pq_layers:
            x = self.gates[step](self.norms[step](layer(x)))
            step += 1
        x = self.q_reduction(x)
        for layer in self.p_layers[:-1]:
            x = self.gates[step](self.norms[step](layer(x)))
            step += 1
        return self.p_layers[-1](x)[:, 0]

    def forward(self, x):
        """Lesion probabilities ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        return torch.sigmoid(self.logits(x))


class CNN3DBaseline(nn.Module):
    """Non-equivariant reference: five 3D convolutions, q-samples as input channels.

    ``conv(Q -> width) -> 3 x conv(width -> width) -> conv(width -> 1)``,
    each but the last followed by batch norm (optional) and swish; sigmoid
    output.

    Parameters
    ----------
    n_q : int
        Number of measurements Q (input channels).
    width : int, optional
        Hidden channels; see :meth:`width_for_parameters` to match another
        network's parameter count.
    kernel_size : {1, 3, 5}, optional
    batch_norm : bool, optional
    """

    def __init__(self, n_q, width=32, kernel_size=3, *, batch_norm=True):
        super().__init__()
        for name, value in (("n_q", n_q), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size not in (1, 3, 5):
            raise ValueError(f"kernel_size must be one of (1, 3, 5) (odd), got {kernel_size!r}")
        n_q, width = int(n_q), int(width)
        channels = [n_q, width, width, width, width, 1]
        self.layers = nn.ModuleList([
            nn.Conv3d(c_in, c_out, kernel_size, padding=kernel_size // 2)
            for c_in, c_out in zip(channels[:-1], channels[1:])])
        self.norms = nn.ModuleList([
            nn.BatchNorm3d(width) if batch_norm else nn.Identity() for _ in range(4)])
        self._config = dict(n_q=n_q, width=width, kernel_size=kernel_size,
                            batch_norm=bool(batch_norm))

    @staticmethod
    def width_for_parameters(n_q, n_parameters, kernel_size=3, batch_norm=True):
        """Width whose network has about ``n_parameters`` learned parameters."""
        taps = kernel_size**3
        # taps (Q w + 3 w^2 + w) + 4 w (+ 8 w for batch norm) + 1 = n_parameters
        a = 3 * taps
        b = taps * (n_q + 1) + 4 + (8 if batch_norm else 0)
        c = 1 - n_parameters
        return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))

    @property
    def config(self):
        """Constructor arguments (plain Python types), for :func:`save_network`."""
        return dict(self._config)

    @property
    def n_q(self):
        return self._config["n_q"]

    def logits(self, x):
        """Lesion logits ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        _check_input(x, self.n_q)
        x = x[:, 0]
        for layer, norm in zip(self.layers[:-1], self.norms):
            x = swish(norm(layer(x)))
        return self.layers[-1](x)[:, 0]

    def forward(self, x):
        """Lesion probabilities ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        return torch.sigmoid(self.logits(x))
