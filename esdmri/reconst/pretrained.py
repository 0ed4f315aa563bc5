"""A pretrained, acquisition-agnostic correction of the linear prior (issue 27).

The network reads the linear prior's output, not the signal: each voxel's WM
fODF (:meth:`esdmri.reconst.models.RTESDModel.prior_coefficients`, up to
:data:`CORRECTED_ORDER`) sampled on a HEALPix grid, and its GM and CSF
fractions as constant channels, all divided by the voxel's total tissue
fraction. The acquisition (shells, directions, SH order) is absorbed by the
prior's deconvolution, so one set of weights serves any gtab. An RT-ESD U-Net
(an E(3) x SO(3) stem and a spherical U-Net, :func:`esdmri.reconst.network.build_unet`)
outputs a signed spherical function whose degrees 2 to :data:`CORRECTED_ORDER`
are added to the prior's WM coefficients (scaled back by the total); the l = 0
term (the WM amount), the isotropic tissues and the WM degrees above
:data:`CORRECTED_ORDER` pass through unchanged. Each degree is corrected by a
function on the grid projected back by least squares, so the correction is
rotation-equivariant degree by degree; the HEALPix nside-4 hemisphere carries
order 8 (condition number 1.0-1.4, see :data:`esdmri.reconst.config.MAX_GRID_CONDITION`).
Another corrected order (the architecture's ``corrected_order``,
:func:`check_architecture`) runs on the smallest hemisphere that carries it
(order 12: nside 8). The head starts at zero: the untrained correction is the prior.

The same correction serves ESD (a voxel-wise spherical U-Net) and C-ESD (the
3^3 neighbours' inputs concatenated as channels), each with its own weights
(:data:`ARCHITECTURES`). The shipped weights (:data:`DEFAULT_WEIGHTS`) come from
``esdmri_pretrain`` (:mod:`esdmri.reconst.pretraining`): simulated scans of
several phantom families, acquisitions and SNRs, each with its own estimated
responses, trained against the phantoms' true fibre directions
(:func:`fibre_target`). Their SHA-256 is recorded here and checked on loading.
"""

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.unet import UNet
from ..shm import n_coeffs, sh_degrees, sh_matrix
from ..sphere import HealpixSphere
from ..threads import run_chunks
from .config import carrying_nside
from .folded import CHUNK, FoldedCorrection, foldable
from .network import NORMALIZATION_FLOOR, build_unet, volume_fractions_from_coefficients

# Highest WM SH degree the network corrects; degrees above pass through.
CORRECTED_ORDER = 8
# The architecture of each model class's correction, keyed by the class's
# ``conv_kind``: the same spherical U-Net after RT-ESD's E(3) x SO(3) stem
# ("e3so3-stem"), voxel-wise for ESD ("spherical", no spatial reach) or on the
# 3^3 neighbours' inputs concatenated as channels for C-ESD ("concat", one
# voxel of reach). ``spatial_layers * (spatial_kernel_size // 2)`` is the reach
# that block-wise inference pads. A weights file records its architecture and
# must match its model class's.
_SHARED = {"nside": 4, "depth": 2, "filter_start": 8, "kernel_size": 3, "norm": "voxel",
           "corrected_order": CORRECTED_ORDER, "in_channels": 3}
ARCHITECTURES = {
    "e3so3-stem": {**_SHARED, "kind": "e3so3-stem", "spatial_kernel_size": 3,
                   "spatial_layers": 1},
    "spherical": {**_SHARED, "kind": "spherical", "spatial_kernel_size": 1,
                  "spatial_layers": 0},
    "concat": {**_SHARED, "kind": "concat", "spatial_kernel_size": 3, "spatial_layers": 1},
}
# Input channels after the WM fODF: these isotropic tissues' fractions (zero
# when the scan's response lacks one, e.g. GM with b0 plus one shell).
ISOTROPIC_INPUTS = ("gm", "csf")
FORMAT = "esdmri-pretrained-1"

_DATA = Path(__file__).resolve().parent.parent / "data"
# The shipped weights of each architecture and their SHA-256 (``esdmri_pretrain``
# prints it with the weights).
DEFAULT_WEIGHTS = {"e3so3-stem": _DATA / "pretrained_rtesd.pt",
                   "spherical": _DATA / "pretrained_esd.pt",
                   "concat": _DATA / "pretrained_cesd.pt"}
DEFAULT_SHA256 = {
    "e3so3-stem": "1f4967ee29549071415f5545f70247d70936f79f188bcb1bdce1e23a1c69e35f",
    "spherical": "bb8b995bc772cff2bc302c41370c59de1fec6a3d1438e6a5434867791e620670",
    "concat": "93a848fd858d4eb1b8bc648552e82ca05284156fbd8b31cebab51f8baa2e37b1",
}


def check_architecture(kind, corrected_order=CORRECTED_ORDER):
    """The architecture of a ``conv_kind`` (a key of :data:`ARCHITECTURES`).

    Parameters
    ----------
    kind : str
    corrected_order : int
        Highest WM SH degree the correction reads and corrects (even, >= 2).
        :data:`CORRECTED_ORDER` gives :data:`ARCHITECTURES`' entry as is;
        another order runs on the smallest HEALPix hemisphere that carries it
        (:func:`esdmri.reconst.config.carrying_nside`: order 12 on nside 8).

    Returns
    -------
    architecture : dict
    """
    if kind not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got "
                         f"{kind!r}")
    if (isinstance(corrected_order, bool) or not isinstance(corrected_order, int)
            or corrected_order < 2 or corrected_order % 2):
        raise ValueError(f"corrected_order must be an even integer >= 2, got "
                         f"{corrected_order!r}")
    if corrected_order == CORRECTED_ORDER:
        return dict(ARCHITECTURES[kind])
    return {**ARCHITECTURES[kind], "corrected_order": corrected_order,
            "nside": carrying_nside(corrected_order)}


def recorded_architecture(saved):
    """The architecture a weights file records (files without a kind are RT-ESD's:
    they predate the ESD and C-ESD corrections)."""
    architecture = saved.get("architecture")
    if not isinstance(architecture, dict):
        return architecture
    return {"kind": "e3so3-stem", **architecture}


class PriorCorrection(nn.Module):
    """The pretrained correction of the linear prior's WM fODF.

    Parameters
    ----------
    architecture : dict, optional
        One of :data:`ARCHITECTURES` (default: RT-ESD's) or a file's copy of it.
    """

    def __init__(self, architecture=None):
        super().__init__()
        self.architecture = (check_architecture("e3so3-stem") if architecture is None
                             else dict(architecture))
        arch = self.architecture
        self.order = arch["corrected_order"]
        self.n_corrected = n_coeffs(self.order)
        # The receptive radius in voxels, which block-wise inference and
        # training windows pad.
        self.halo = arch["spatial_layers"] * (arch["spatial_kernel_size"] // 2)
        sphere = HealpixSphere(arch["nside"], hemisphere=True)
        self.unet = build_unet(
            arch["kind"], sphere, in_channels=arch["in_channels"], out_channels=1,
            depth=arch["depth"], filter_start=arch["filter_start"],
            kernel_size=arch["kernel_size"], spatial_kernel_size=arch["spatial_kernel_size"],
            spatial_layers=arch["spatial_layers"], signed_output=True, norm=arch["norm"])
        basis = sh_matrix(self.order, sphere.vertices)  # (V, C8)
        to_sh = np.linalg.pinv(basis)
        to_sh[0] = 0  # the WM amount (l = 0) is the prior's
        self.register_buffer("sh_to_grid", torch.as_tensor(basis, dtype=torch.float32))
        self.register_buffer("grid_to_sh", torch.as_tensor(to_sh, dtype=torch.float32))

    def zero_head(self):
        """Zero the U-Net's head: the correction is then zero, the output the prior."""
        head = [module for module in self.unet.modules() if isinstance(module, UNet)][-1].head
        for parameter in head.parameters():
            nn.init.zeros_(parameter)
        return self

    def inputs(self, coefficients, tissues):
        """The network's input and each voxel's scale.

        Parameters
        ----------
        coefficients : Tensor, shape [B, C_total, X, Y, Z]
            WM SH coefficients of an even order >= 2, then one l = 0
            coefficient per isotropic tissue of ``tissues[1:]``.
        tissues : tuple of str
            The response's tissues, WM first.

        Returns
        -------
        grid : Tensor, shape [B, 3, V, X, Y, Z]
        scale : Tensor, shape [B, 1, X, Y, Z]
            Each voxel's total tissue fraction (at least
            :data:`esdmri.reconst.network.NORMALIZATION_FLOOR`).
        """
        low, shares, scale = self.normalized(coefficients, tissues)
        fodf = torch.einsum("vc,bcxyz->bvxyz", self.sh_to_grid, low)
        channels = [fodf] + [share[:, None].expand_as(fodf) for share in shares.unbind(1)]
        return torch.stack(channels, dim=1), scale

    def normalized(self, coefficients, tissues):
        """The input's SH coefficients and isotropic shares, before the grid.

        Parameters as :meth:`inputs`.

        Returns
        -------
        low : Tensor, shape [B, n_coeffs(order), X, Y, Z]
            WM degrees 0 to ``order`` divided by ``scale`` (zero above the
            scan's order).
        shares : Tensor, shape [B, len(ISOTROPIC_INPUTS), X, Y, Z]
            Fractions of :data:`ISOTROPIC_INPUTS` divided by ``scale`` (zero
            for a tissue the response lacks).
        scale : Tensor, shape [B, 1, X, Y, Z]
            As :meth:`inputs`.
        """
        n_wm = coefficients.shape[1] - (len(tissues) - 1)
        fractions = volume_fractions_from_coefficients(coefficients.movedim(1, -1), n_wm)
        scale = fractions.sum(-1).clamp_min(NORMALIZATION_FLOOR)[:, None]
        low = coefficients[:, :min(n_wm, self.n_corrected)] / scale
        if low.shape[1] < self.n_corrected:
            low = nn.functional.pad(low, (0, 0, 0, 0, 0, 0, 0, self.n_corrected - low.shape[1]))
        shares = [fractions[..., tissues.index(tissue)] / scale[:, 0] if tissue in tissues
                  else torch.zeros_like(scale[:, 0]) for tissue in ISOTROPIC_INPUTS]
        return low, torch.stack(shares, dim=1), scale

    def correction(self, coefficients, tissues):
        """The WM SH correction of degrees 2 to ``order``, shape [B, C8, X, Y, Z]."""
        grid, scale = self.inputs(coefficients, tissues)
        out = self.unet(grid)[:, 0]
        return torch.einsum("cv,bvxyz->bcxyz", self.grid_to_sh, out) * scale

    def forward(self, coefficients, tissues):
        """The corrected coefficients, laid out as ``coefficients``.

        Parameters
        ----------
        coefficients : Tensor, shape [B, C_total, X, Y, Z]
        tissues : tuple of str

        Returns
        -------
        corrected : Tensor, shape [B, C_total, X, Y, Z]
        """
        delta = self.correction(coefficients, tissues)
        n = min(self.n_corrected, coefficients.shape[1] - (len(tissues) - 1))
        return torch.cat([coefficients[:, :n] + delta[:, :n], coefficients[:, n:]], dim=1)


def sha256_of(path):
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights(pretrained, kind="e3so3-stem"):
    """The weights file and the checksum it must have, of a ``pretrained`` option.

    Parameters
    ----------
    pretrained : bool, "default", str or Path
        True or "default": the shipped weights of ``kind``; a path: other weights.
    kind : str
        The model class's ``conv_kind`` (a key of :data:`ARCHITECTURES`).

    Returns
    -------
    path : Path
    sha256 : str or None
        The recorded checksum of the shipped weights; None for other files.
    """
    check_architecture(kind)
    if pretrained is True or pretrained == "default":
        path, sha256 = DEFAULT_WEIGHTS[kind], DEFAULT_SHA256[kind]
        if sha256 is None or not path.is_file():
            raise ValueError(f"pretrained=True needs the shipped {kind} weights {path}, "
                             "which this installation lacks")
        return path, sha256
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained)
        if not path.is_file():
            raise ValueError(f"pretrained must be True, False, 'default' or the path of a "
                             f"weights file; {str(path)!r} is no file")
        return path, None
    raise TypeError(f"pretrained must be True, False, 'default' or a path, got "
                    f"{type(pretrained).__name__}")


def _known_architecture(kind, architecture):
    """The architecture of ``kind`` at the corrected order a file records (None where
    the record holds no valid order)."""
    order = architecture.get("corrected_order") if isinstance(architecture, dict) else None
    try:
        return check_architecture(kind, order)
    except ValueError:
        return None


def load_correction(pretrained, device="cpu", kind="e3so3-stem"):
    """The pretrained correction of a ``pretrained`` option, checked.

    Parameters
    ----------
    pretrained : True, "default", str or Path
    device : str or torch.device
    kind : str
        The model class's ``conv_kind``: the file must hold this architecture
        (:data:`ARCHITECTURES`).

    Returns
    -------
    correction : PriorCorrection
        In evaluation mode.

    Raises
    ------
    ValueError
        The file's checksum differs from the one recorded for the shipped
        weights, or it is not a weights file of ``kind``'s architecture.
    """
    path, expected = resolve_weights(pretrained, kind)
    if expected is not None:
        found = sha256_of(path)
        if found != expected:
            raise ValueError(f"the shipped weights {path} have SHA-256 {found}, not the "
                             f"{expected} this esdmri records: the file is corrupted or "
                             "from another version; reinstall esdmri")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same error
        raise ValueError(f"pretrained weights {path} could not be read: {error}") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not an esdmri pretrained-weights file (format "
                         f"{FORMAT!r})")
    architecture = recorded_architecture(saved)
    if architecture != _known_architecture(kind, architecture):
        other = next((name for name in ARCHITECTURES
                      if architecture == _known_architecture(name, architecture)), None)
        found = f"the {other} correction" if other else f"architecture {architecture}"
        raise ValueError(f"{path} holds weights of {found}, not the {kind} correction this "
                         f"model needs ({ARCHITECTURES[kind]}, or with another "
                         "corrected_order on the nside that carries it)")
    correction = PriorCorrection(architecture)
    try:
        correction.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"{path} does not match the pretrained network: {error}") from error
    return correction.to(device).eval()


def save_correction(correction, path, metadata=None):
    """Write a correction's weights (with :data:`FORMAT` and its architecture).

    Parameters
    ----------
    correction : PriorCorrection
    path : str or Path
        Written as is (callers stage it, :func:`esdmri.atomic.staged_output`).
    metadata : dict, optional
        Plain data kept with the weights (the pretraining's settings).
    """
    state = {name: tensor.detach().cpu().clone()
             for name, tensor in correction.state_dict().items()}
    torch.save({"format": FORMAT, "architecture": correction.architecture,
                "state_dict": state, "metadata": metadata or {}}, path)


def _corrected_voxels(correction, block, keep, tissues):
    """The corrected coefficients of the kept voxels of one padded block.

    RT-ESD's only spatial layers are its stem's (:func:`build_unet`'s
    E(3) x SO(3) convolutions, reach ``halo``) and ESD has none; everything
    after acts on each voxel alone (spherical convolutions and pooling,
    :class:`esdmri.nn.unet.VoxelNorm`). So the stem runs on the block, and the
    spherical U-Net and the projection back to SH only on the voxels ``keep``
    selects, stacked along one axis: the same values as
    :meth:`PriorCorrection.forward` there. C-ESD's first layer concatenates
    the neighbours inside its U-Net, which then runs on the whole block.

    Parameters
    ----------
    correction : PriorCorrection
    block : Tensor, shape [1, C_total, X + 2 halo, Y + 2 halo, Z + 2 halo]
        ``halo``: the correction's (:attr:`PriorCorrection.halo`).
    keep : Tensor of bool, shape (X, Y, Z)
    tissues : tuple of str

    Returns
    -------
    corrected : Tensor, shape [n_kept, C_total]
    """
    halo = correction.halo
    grid, scale = correction.inputs(block, tissues)
    inner = (slice(None),) * 3 + tuple(slice(halo, size - halo) for size in block.shape[2:])
    kind = correction.architecture["kind"]
    if kind == "concat":
        out = correction.unet(grid)[inner][0, 0][..., keep]  # [V, n]
    else:
        if kind == "e3so3-stem":
            stem, spherical = correction.unet
            features = stem(grid)[inner][..., keep]  # [1, F, V, n]
        else:  # voxel-wise ESD
            spherical, features = correction.unet, grid[inner][..., keep]
        out = spherical(features[..., None, None])[0, 0, :, :, 0, 0]  # [V, n]
    delta = (correction.grid_to_sh @ out) * scale[0, 0][inner[3:]][keep]  # [C8, n]
    coefficients = block[0][(slice(None),) + inner[3:]][..., keep]  # [C_total, n]
    n = min(correction.n_corrected, coefficients.shape[0] - (len(tissues) - 1))
    coefficients[:n] += delta[:n]
    return coefficients.T


@torch.inference_mode()
def apply_correction(correction, coefficients, mask, tissues, slab=8, folded=True):
    """Correct a volume of prior coefficients on its masked voxels.

    By default, on a CPU, the correction runs folded
    (:class:`esdmri.reconst.folded.FoldedCorrection`: the same function, fewer
    operations, on chunks of masked voxels);
    ``folded=False`` runs the network's layers slab by slab with a halo: only
    the masked voxels run past the network's stem (:func:`_corrected_voxels`),
    the stem only on each slab's masked box across y and z with its halo, and
    slabs without one are skipped.

    Parameters
    ----------
    correction : PriorCorrection
    coefficients : ndarray, shape (X, Y, Z, C_total)
        :meth:`esdmri.reconst.models.RTESDModel.prior_coefficients`'s output
        (zero outside ``mask``).
    mask : ndarray of bool, shape (X, Y, Z)
    tissues : tuple of str
    slab : int
        Voxels along x per pass of the layered network (``folded=False``).
    folded : bool
        Fold the network (on a CPU, where :func:`esdmri.reconst.folded.foldable`).

    Returns
    -------
    corrected : ndarray, float32, shape (X, Y, Z, C_total)
        Zero outside ``mask``.
    """
    result = np.zeros(coefficients.shape, dtype=np.float32)
    if not mask.any():
        return result
    # Only the mask's bounding box runs: outside the mask the prior is zero, as
    # the zero padding is, so each masked voxel sees the same inputs.
    box = tuple(slice(int(axis.min()), int(axis.max()) + 1) for axis in np.nonzero(mask))
    volume = torch.as_tensor(np.ascontiguousarray(coefficients[box]), dtype=torch.float32)
    # The folded pass is measured on CPUs (chunks sized to a core's cache); a GPU
    # keeps the layered pass's large products.
    cpu = correction.sh_to_grid.device.type == "cpu"
    inside, tissues = np.asarray(mask[box], dtype=bool), tuple(tissues)
    if folded and cpu and foldable(correction):
        corrected = _folded_voxels(correction, volume, inside, tissues)
    else:
        corrected = _layered_voxels(correction, volume, inside, tissues, slab)
    result.reshape(-1, coefficients.shape[-1])[np.flatnonzero(mask)] = corrected
    return result


def _folded_voxels(correction, volume, inside, tissues):
    """The corrected coefficients of the masked voxels of a box, folded, in chunks of
    :data:`esdmri.reconst.folded.CHUNK` voxels.

    Parameters
    ----------
    correction : PriorCorrection
    volume : Tensor, shape (X, Y, Z, C_total)
    inside : ndarray of bool, shape (X, Y, Z)
    tissues : tuple of str

    Returns
    -------
    corrected : ndarray, float32, shape (n_masked, C_total)
        In C order.
    """
    folded = FoldedCorrection(correction)
    halo = folded.halo
    kept = volume[torch.as_tensor(inside)]  # (N, C_total)
    low, shares, scale = correction.normalized(volume.permute(3, 0, 1, 2)[None], tissues)
    # Channel last with a zero margin: outside the box the prior is zero, and so
    # are its normalised inputs. Written in place (a cat, a pad and a contiguous copy
    # took 0.5 s of the brain's pass, this 0.1 s).
    padded = low.new_zeros(tuple(size + 2 * halo for size in inside.shape)
                           + (low.shape[1] + shares.shape[1],))
    inner = tuple(slice(halo, halo + size) for size in inside.shape)
    padded[inner + (slice(None, low.shape[1]),)] = low[0].permute(1, 2, 3, 0)
    padded[inner + (slice(low.shape[1], None),)] = shares[0].permute(1, 2, 3, 0)
    voxels = np.nonzero(inside)
    rows = torch.as_tensor(np.ravel_multi_index(tuple(axis + halo for axis in voxels),
                                                padded.shape[:3]))
    scale = scale[0, 0][voxels]
    n = min(correction.n_corrected, volume.shape[-1] - (len(tissues) - 1))

    def work(part):
        delta = folded.delta(folded.features(padded, rows[part]))
        kept[part, :n].addcmul_(delta[:, :n], scale[part, None])

    run_chunks(work, len(rows), CHUNK)
    return kept.numpy()


def _layered_voxels(correction, volume, inside, tissues, slab):
    """The corrected coefficients of the masked voxels of a box, layer by layer.

    Parameters and result as :func:`_folded_voxels`, and ``slab``: voxels along x per pass.
    """
    halo = correction.halo
    device = next(correction.parameters()).device
    padded = nn.functional.pad(volume.permute(3, 0, 1, 2)[None], (halo,) * 6)
    inside = torch.as_tensor(inside)
    corrected = np.empty((int(inside.sum()), volume.shape[-1]), dtype=np.float32)
    done = 0
    for start in range(0, volume.shape[0], slab):
        stop = min(start + slab, volume.shape[0])
        keep = inside[start:stop]
        count = int(keep.sum())
        if not count:
            continue
        # The slab's own masked box across y and z (with the halo): nothing outside it
        # reaches a masked voxel of the slab.
        (y_start, y_stop), (z_start, z_stop) = (
            (int(occupied[0]), int(occupied[-1]) + 1)
            for occupied in (keep.any(dim=2).any(dim=0).nonzero()[:, 0],
                             keep.any(dim=1).any(dim=0).nonzero()[:, 0]))
        keep = keep[:, y_start:y_stop, z_start:z_stop]
        block = padded[:, :, start:stop + 2 * halo, y_start:y_stop + 2 * halo,
                       z_start:z_stop + 2 * halo].to(device)
        # Masked voxels in C order, slab after slab: the order of the mask's voxels.
        corrected[done:done + count] = _corrected_voxels(
            correction, block, keep.to(device), tissues).cpu().numpy()
        done += count
    return corrected


def fibre_target(fibre_dirs, fibre_weights, wm_amount, order=CORRECTED_ORDER,
                 smoothing=150.0):
    """Supervised target: the true fibres as apodised deltas of a given WM amount.

    Parameters
    ----------
    fibre_dirs : ndarray, shape (..., K, 3)
        Unit fibre directions, NaN where absent.
    fibre_weights : ndarray, shape (..., K)
        Each fibre's share of the voxel's WM (summing to 1 where there are fibres).
    wm_amount : ndarray, shape (...)
        The l = 0 coefficient of the voxel's true WM, in the fit's units.
    order : int
    smoothing : float
        Degree l is weighted by ``exp(-l (l + 1) / smoothing)`` (less ringing
        than a truncated delta).

    Returns
    -------
    target : ndarray, float32, shape (..., n_coeffs(order))
        Degrees 0 to ``order``; a voxel without fibres is isotropic.
    """
    shape = fibre_dirs.shape[:-2]
    dirs = fibre_dirs.reshape(-1, fibre_dirs.shape[-2], 3)
    weights = np.nan_to_num(fibre_weights.reshape(len(dirs), -1))
    present = np.all(np.isfinite(dirs), axis=-1)
    degrees = sh_degrees(order)
    apodisation = np.exp(-degrees * (degrees + 1) / smoothing)
    flat_dirs = np.where(present[..., None], dirs, [0.0, 0.0, 1.0]).reshape(-1, 3)
    basis = sh_matrix(order, flat_dirs).reshape(len(dirs), -1, len(degrees))
    lobes = np.einsum("nk,nkc->nc", weights * present, basis) * apodisation
    lobes *= math.sqrt(4 * math.pi)  # unit l = 0 coefficient per unit weight
    lobes[~present.any(-1)] = 0
    lobes[:, 0] = 1
    return (lobes * wm_amount.reshape(-1, 1)).reshape(shape + (len(degrees),)).astype(
        np.float32)
