"""Spherical-tensor fields: how channels of different orders share one axis.

A spherical-tensor field has ``multiplicities[l]`` channels of order ``l``
(``l = 0`` scalars, ``l = 1`` vectors, ``l = 2`` traceless symmetric
tensors, ...). Layers take tensors ``[batch, channels, ...]`` whose channel
axis stacks the components of all channels:

* orders ascend: first every ``l = 0`` channel, then every ``l = 1``
  channel, and so on;
* a channel of order ``l`` occupies ``2 l + 1`` consecutive rows, its
  components in e3nn's real basis (``m = -l .. l``, the order of
  ``e3nn.o3.spherical_harmonics``);
* so row ``offset(l) + c (2 l + 1) + (m + l)`` holds component ``m`` of the
  ``c``-th channel of order ``l``.

This is exactly the layout of the e3nn irreps ``"m0x0e + m1x1o + m2x2e + ..."``
(parity ``(-1)^l``, the parity of the spherical harmonics), so a rotation
``R`` acts on the channel axis with the block-diagonal matrix
``Irreps.D_from_matrix(R)``.
"""

import numbers
from contextlib import contextmanager

import torch
from e3nn import o3

# Highest supported order. The kernel bases grow like l^4 and a 3^3 or 5^3
# voxel neighbourhood cannot resolve angular frequencies much beyond this.
MAX_ORDER = 4


@contextmanager
def _default_dtype(dtype):
    # e3nn builds the so(3) generators behind its Wigner-D matrices in the
    # default dtype; float64 rotations need them in float64.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class TensorFieldType:
    """Multiplicities per order ``l`` of a spherical-tensor field.

    Parameters
    ----------
    multiplicities : int or sequence of int
        ``multiplicities[l]`` is the number of channels of order ``l``
        (``0 <= l <= MAX_ORDER``). An int means that many scalar channels.
        Trailing zeros are dropped.

    Attributes
    ----------
    multiplicities : tuple of int
        Channels per order, index = ``l``; the last entry is positive.
    max_order : int
        Highest order present.
    n_channels : int
        Number of channels (all orders).
    dim : int
        Length of the channel axis, ``sum_l multiplicities[l] (2 l + 1)``.

    Examples
    --------
    >>> field = TensorFieldType((4, 2, 1))
    >>> field.dim, field.n_channels, field.slice(1)
    (15, 7, slice(4, 10, None))
    """

    def __init__(self, multiplicities):
        if isinstance(multiplicities, bool):
            raise TypeError(
                f"multiplicities must be an int or a sequence of int, got {multiplicities!r}")
        if isinstance(multiplicities, numbers.Integral):
            multiplicities = (multiplicities,)
        try:
            values = list(multiplicities)
        except TypeError:
            raise TypeError("multiplicities must be an int or a sequence of int, "
                            f"got {multiplicities!r}") from None
        for l, mult in enumerate(values):
            if isinstance(mult, bool) or not isinstance(mult, numbers.Integral):
                raise TypeError(f"multiplicities[{l}] must be an int, got {mult!r}")
            if mult < 0:
                raise ValueError(f"multiplicities[{l}] must be >= 0, got {mult}")
        while values and values[-1] == 0:
            values.pop()
        if not values:
            raise ValueError("multiplicities must contain at least one channel")
        if len(values) - 1 > MAX_ORDER:
            raise ValueError(
                f"multiplicities has channels of order l = {len(values) - 1}; "
                f"supported orders are 0 to {MAX_ORDER}")
        self.multiplicities = tuple(int(m) for m in values)

    @property
    def max_order(self):
        return len(self.multiplicities) - 1

    @property
    def n_channels(self):
        return sum(self.multiplicities)

    @property
    def dim(self):
        return sum(mult * (2 * l + 1) for l, mult in enumerate(self.multiplicities))

    def orders(self):
        """Orders ``l`` with at least one channel, ascending."""
        return [l for l, mult in enumerate(self.multiplicities) if mult > 0]

    def multiplicity(self, l):
        """Number of channels of order ``l`` (0 beyond ``max_order``)."""
        return self.multiplicities[l] if l < len(self.multiplicities) else 0

    def offset(self, l):
        """First row of the order-``l`` block on the channel axis."""
        return sum(mult * (2 * k + 1) for k, mult in enumerate(self.multiplicities[:l]))

    def slice(self, l):
        """Rows of the order-``l`` block on the channel axis."""
        start = self.offset(l)
        return slice(start, start + self.multiplicity(l) * (2 * l + 1))

    def channel_of_row(self):
        """Channel index (0 .. n_channels - 1) of every row, shape (dim,)."""
        rows, channel = [], 0
        for l, mult in enumerate(self.multiplicities):
            for _ in range(mult):
                rows.extend([channel] * (2 * l + 1))
                channel += 1
        return torch.tensor(rows, dtype=torch.long)

    @property
    def irreps(self):
        """The same layout as e3nn irreps, parity ``(-1)^l``."""
        return o3.Irreps([(mult, (l, (-1) ** l))
                          for l, mult in enumerate(self.multiplicities) if mult > 0])

    def with_gates(self):
        """Field type that feeds a gated nonlinearity producing this type.

        One extra scalar (the gate) per channel of order ``l > 0``, placed
        after the scalars of this type: the scalar block holds
        ``[scalars | gates]``, gates in the order of the gated channels.
        """
        n_gates = sum(self.multiplicities[1:])
        return TensorFieldType((self.multiplicity(0) + n_gates,) + self.multiplicities[1:])

    def D_from_matrix(self, rotation):
        """Block-diagonal representation of a rotation on the channel axis.

        Parameters
        ----------
        rotation : torch.Tensor, shape (3, 3)
            Proper rotation matrix acting on column vectors.

        Returns
        -------
        D : torch.Tensor, shape (dim, dim)
            e3nn's Wigner-D matrices, with ``Y^l(R x) = D^l(R) Y^l(x)`` for
            e3nn's real spherical harmonics; same dtype as ``rotation``.
        """
        rotation = torch.as_tensor(rotation)
        if rotation.shape != (3, 3):
            raise ValueError(f"rotation must have shape (3, 3), got {tuple(rotation.shape)}")
        if not rotation.is_floating_point():
            rotation = rotation.to(torch.get_default_dtype())
        with _default_dtype(rotation.dtype):
            return self.irreps.D_from_matrix(rotation.cpu()).to(rotation.device)

    def check(self, tensor, name="input", axis=1):
        """Raise ValueError unless ``tensor.shape[axis]`` equals ``dim``."""
        if tensor.ndim <= axis or tensor.shape[axis] != self.dim:
            raise ValueError(
                f"{name} must have {self.dim} rows on axis {axis} for the field "
                f"{self!r} (sum of multiplicity x (2l+1)), got shape {tuple(tensor.shape)}")

    def __eq__(self, other):
        if not isinstance(other, TensorFieldType):
            return NotImplemented
        return self.multiplicities == other.multiplicities

    def __hash__(self):
        return hash(self.multiplicities)

    def __repr__(self):
        return f"TensorFieldType({self.multiplicities})"


def as_field_type(field, name="field"):
    """A TensorFieldType from itself, an int, or a sequence of multiplicities."""
    if isinstance(field, TensorFieldType):
        return field
    try:
        return TensorFieldType(field)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: {error}") from None
