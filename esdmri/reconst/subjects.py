"""Block sources: the training blocks of one scan in memory, or of many scans on disk.

The trainer (:class:`esdmri.reconst.training.Trainer`) reads its batches from
a *block source*, so a single-scan fit is a one-subject run of the same
trainer that trains on a cohort. A block source has

- ``block_size`` (int), ``gtabs``, ``masks``, ``names`` and ``responses``
  (one per subject: its gradient table, boolean mask ``(X, Y, Z)``, a name
  for messages and checkpoints, and its own TissueResponse or None);
- ``plan_epoch(rng)``: blocks tiling every subject's mask once at a fresh
  random offset (:func:`esdmri.reconst.tiling.training_windows`), as an
  integer array ``(n_blocks, 4)`` of subject index and corner;
- ``read(blocks)``: the batch of those blocks, as :func:`collate_blocks`
  returns it.

:class:`ScanBlocks` holds one normalised scan in memory (``model.fit``).
A cohort does not fit in memory, so :class:`SubjectBlocks` keeps only each
scan's header, mask and shell-to-grid operator and reads a block's voxels
from disk when a batch asks for it (``img.dataobj`` slicing: a memory map or
seek-and-read for ``.nii``; ``.nii.gz`` works but decompresses up to the
block, so store large cohorts uncompressed). Every scan keeps its own
gradient table: its shells are interpolated onto the network's HEALPix grid
by :class:`esdmri.shm.ShellInterpolator`, so the blocks of all scans feed
one network, while the loss compares predictions with each scan's own
measurements.
"""

import contextlib
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from dipy.core.gradients import GradientTable, gradient_table
from dipy.io.gradients import read_bvals_bvecs

from ..response import TissueResponse
from ..shm import DEFAULT_BVAL_TOLERANCE, ShellInterpolator
from .inputs import check_gtab
from .tiling import cut_window, training_windows


class ScanBlocks:
    """Blocks of one scan held in memory, put on the HEALPix grid per batch.

    Only the measured signal is kept on the device; its grid version
    ``[B, S, V, X, Y, Z]`` is made per batch, so a whole scan never needs
    S x V values per voxel in memory. With ``prior``, the network's input is
    instead the linear prior's coefficients (fine-tuning the pretrained
    correction, :mod:`esdmri.reconst.finetune`).

    Parameters
    ----------
    normalized : ndarray, shape (X, Y, Z, N)
        Signal divided by the mean b0, zero outside the mask.
    mask : ndarray of bool, shape (X, Y, Z)
    gtab : GradientTable
        Acquisition of the N measurements.
    interpolation : ndarray, shape (S, V, N), or None
        The shell-to-grid operator of :class:`esdmri.shm.ShellInterpolator`
        (None with ``prior``).
    block_size : int
        Edge of the blocks in voxels.
    device : torch.device
    prior : ndarray, shape (X, Y, Z, C_total), optional
        The linear prior's tissue coefficients (zero outside the mask): a
        batch's ``grid`` is then their windows ``[B, C_total, X, Y, Z]``, the
        input of :class:`esdmri.reconst.pretrained.PriorCorrection`.

    Attributes
    ----------
    gtabs, masks, names, responses : list
        Of the one subject: ``[gtab]``, ``[mask]``, ``["scan"]`` and
        ``[None]`` (the model's response serves it).
    """

    def __init__(self, normalized, mask, gtab, interpolation, block_size, device, prior=None):
        self.normalized = normalized
        self.mask = mask
        self.block_size = int(block_size)
        self.device = device
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float32)
        self.interpolation = None if interpolation is None else torch.as_tensor(
            interpolation, dtype=torch.float32, device=device)
        self.gtabs, self.masks, self.names, self.responses = [gtab], [mask], ["scan"], [None]

    @classmethod
    def from_scan(cls, scan, block_size, device="cpu"):
        """The blocks of a scan prepared by a model (``model.prepare``).

        Parameters
        ----------
        scan : esdmri.reconst.inputs.PreparedScan
        block_size : int
        device : str or torch.device

        Returns
        -------
        source : ScanBlocks
        """
        return cls(scan.normalized, scan.mask, scan.gtab, scan.interpolator.operator,
                   block_size, device)

    @property
    def n_shells(self):
        """Shells (b0 included): the grid's channels."""
        return self.interpolation.shape[0]

    def plan_epoch(self, rng):
        """Blocks tiling the mask at a fresh random offset, subject index 0.

        Parameters
        ----------
        rng : numpy.random.Generator

        Returns
        -------
        blocks : ndarray of int, shape (n_blocks, 4)
        """
        starts = training_windows(self.mask, self.block_size, rng)
        return np.column_stack([np.zeros(len(starts), dtype=np.int64), starts])

    def read(self, blocks):
        """The batch of some blocks, as :func:`collate_blocks` returns it.

        Parameters
        ----------
        blocks : ndarray of int, shape (B, 4)
            Subject index (0) and corner; a block may extend past the volume.

        Returns
        -------
        batch : dict
            ``grid`` [B, S, V, X, Y, Z] (with ``prior``: the prior's
            windows [B, C_total, X, Y, Z]), ``mask`` [B, X, Y, Z] and one
            group with ``subject`` 0, ``rows`` and ``signal`` [B, N, X, Y, Z].
        """
        starts, size = blocks[:, 1:], self.block_size

        def windows(volume):
            cut = np.stack([cut_window(volume, start, size) for start in starts])
            return torch.as_tensor(cut, device=self.device).permute(0, 4, 1, 2, 3)

        signal = windows(self.normalized)
        mask = np.stack([cut_window(self.mask, start, size) for start in starts])
        if self.prior is not None:
            grid = windows(self.prior)
        else:
            grid = torch.einsum("svn,bnxyz->bsvxyz", self.interpolation, signal)
        return {"grid": grid, "mask": torch.as_tensor(mask, device=self.device),
                "groups": [{"subject": 0, "rows": torch.arange(len(blocks)),
                            "signal": signal}]}


@dataclass
class Subject:
    """One scan of a cohort: file paths and optional per-scan settings.

    Parameters
    ----------
    dwi : str or Path
        4D diffusion NIfTI file (X, Y, Z, N).
    bvals, bvecs : str or Path, optional
        FSL gradient files; give them or ``gtab``.
    gtab : GradientTable, optional
        Acquisition of ``dwi`` instead of the gradient files.
    mask : str or Path, optional
        Brain mask NIfTI (non-zero voxels); default: every voxel with a
        positive mean b0 signal.
    response : TissueResponse, optional
        This scan's own tissue responses; default: the group response.
    b0_threshold : float
        b-values up to this are b0 volumes (with ``bvals``/``bvecs``).
    bvecs_tol : float
        Tolerance of DIPY's check that the b-vectors have unit length (with
        ``bvals``/``bvecs``; ``atol`` of ``dipy.core.gradients.gradient_table``).
    """

    dwi: str | Path
    bvals: str | Path | None = None
    bvecs: str | Path | None = None
    gtab: GradientTable | None = None
    mask: str | Path | None = None
    response: TissueResponse | None = None
    b0_threshold: float = 50.0
    bvecs_tol: float = 0.01

    def __post_init__(self):
        self.dwi = _existing("dwi", self.dwi)
        if self.mask is not None:
            self.mask = _existing("mask", self.mask)
        if self.gtab is not None:
            if self.bvals is not None or self.bvecs is not None:
                raise ValueError(f"subject {self.dwi}: give gtab or bvals/bvecs, not both")
            if not isinstance(self.gtab, GradientTable):
                raise TypeError(f"subject {self.dwi}: gtab must be a dipy GradientTable, got "
                                f"{type(self.gtab).__name__}")
        elif self.bvals is None or self.bvecs is None:
            raise ValueError(f"subject {self.dwi}: bvals and bvecs files (or a gtab) are "
                             "required")
        else:
            self.bvals = _existing("bvals", self.bvals)
            self.bvecs = _existing("bvecs", self.bvecs)
        if self.response is not None and not isinstance(self.response, TissueResponse):
            raise TypeError(f"subject {self.dwi}: response must be a TissueResponse or None, "
                            f"got {type(self.response).__name__}")

    def load_gtab(self):
        """The gradient table of this scan.

        Returns
        -------
        gtab : GradientTable
        """
        if self.gtab is not None:
            return self.gtab
        try:
            bvals, bvecs = read_bvals_bvecs(str(self.bvals), str(self.bvecs))
        except OSError as error:
            raise ValueError(f"subject {self.dwi}: bvals {self.bvals} and bvecs {self.bvecs} "
                             f"do not agree ({error})") from error
        return gradient_table(bvals, bvecs=bvecs, b0_threshold=self.b0_threshold,
                              atol=self.bvecs_tol)


def _existing(name, path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} file {path} does not exist")
    return path


class _Scan:
    """What a dataset keeps of one subject: image proxy, gtab, mask, grid operator."""

    def __init__(self, index, subject, vertices):
        label = f"subjects[{index}] ({subject.dwi})"
        self.subject = subject
        self.gtab = subject.load_gtab()
        try:
            image = nib.load(subject.dwi)
        except (nib.filebasedimages.ImageFileError, EOFError, zlib.error) as error:
            raise ValueError(f"{label}: {subject.dwi} cannot be read as a NIfTI image "
                             f"({type(error).__name__})") from None
        shape = image.shape
        if len(shape) != 4:
            raise ValueError(f"{label}: dwi must be a 4D scan (X, Y, Z, N), got shape {shape}")
        if shape[3] != len(self.gtab.bvals):
            raise ValueError(f"{label}: dwi has {shape[3]} volumes but its gradient table has "
                             f"{len(self.gtab.bvals)} b-values")
        try:
            check_gtab(self.gtab)
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        self.b0_volumes = np.flatnonzero(self.gtab.b0s_mask)
        self.image = image
        self.spatial_shape = shape[:3]
        self.label = label
        with self.reading():
            self.mask = self._load_mask(label)
        self.interpolator = ShellInterpolator(self.gtab, vertices)

    @contextlib.contextmanager
    def reading(self):
        """Turn the errors of a truncated or corrupt scan into one naming it."""
        try:
            yield
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise ValueError(f"{self.label}: {self.subject.dwi} cannot be read (truncated or "
                             f"corrupt? {type(error).__name__})") from None

    def _load_mask(self, label):
        if self.subject.mask is None:
            # Only the b0 volumes are read, one at a time.
            b0_sum = sum(np.asarray(self.image.dataobj[..., int(v)], dtype=np.float64)
                         for v in self.b0_volumes)
            mask = b0_sum > 0
        else:
            mask = np.squeeze(np.asarray(nib.load(self.subject.mask).dataobj)) > 0
            if mask.shape != self.spatial_shape:
                raise ValueError(f"{label}: mask {self.subject.mask} has shape {mask.shape} but "
                                 f"the dwi grid is {self.spatial_shape}")
        if not mask.any():
            raise ValueError(f"{label}: the mask selects no voxel")
        return mask

    def read(self, start, size):
        """b0-normalised signal ``(size,) * 3 + (N,)`` and its valid voxels, zero outside."""
        source = tuple(slice(max(s, 0), min(s + size, n))
                       for s, n in zip(start, self.spatial_shape))
        target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, start))
        raw = np.zeros((size, size, size, len(self.gtab.bvals)), dtype=np.float32)
        mask = np.zeros((size, size, size), dtype=bool)
        if all(sl.stop > sl.start for sl in source):
            with self.reading():
                raw[target] = self.image.dataobj[source]
            mask[target] = self.mask[source]
        mean_b0 = raw[..., self.b0_volumes].mean(axis=-1)
        # A corrupt voxel (NaN/inf) is left out rather than stopping a long training run.
        mask &= (mean_b0 > 0) & np.isfinite(raw).all(axis=-1)
        normalized = np.zeros_like(raw)
        normalized[mask] = raw[mask] / mean_b0[mask, None]
        return normalized, mask


class SubjectBlocks:
    """Cubic blocks of many scans, read from disk on demand.

    :meth:`plan_epoch` tiles every subject's mask with blocks at a random
    offset (:func:`esdmri.reconst.tiling.training_windows`), so each masked
    voxel is seen once per epoch; :meth:`read` reads a batch of them. The
    object pickles, so DataLoader worker processes can read batches.

    Parameters
    ----------
    subjects : sequence of Subject
    vertices : ndarray, shape (V, 3), or HealpixSphere
        The network's grid.
    block_size : int
        Edge of the blocks in voxels.

    Attributes
    ----------
    gtabs : list of GradientTable
        One per subject.
    masks : list of ndarray of bool, shape (X, Y, Z)
        Brain masks, one per subject.
    names : list of str
        The subjects' dwi files.
    responses : list of TissueResponse or None
        Each subject's own response (None: the group's).
    n_shells : int
        Shells (b0 included) of every subject: the grid's channels.
    """

    def __init__(self, subjects, vertices, block_size):
        subjects = check_subjects(subjects)
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        vertices = getattr(vertices, "vertices", vertices)
        self._scans = [_Scan(index, subject, vertices) for index, subject in enumerate(subjects)]
        self._check_shells()
        self.gtabs = [scan.gtab for scan in self._scans]
        self.masks = [scan.mask for scan in self._scans]
        self.names = [str(subject.dwi) for subject in subjects]
        self.responses = [subject.response for subject in subjects]
        self.n_shells = len(self._scans[0].interpolator.shell_bvals)

    def _check_shells(self):
        reference = self._scans[0].interpolator.shell_bvals
        for index, scan in enumerate(self._scans[1:], start=1):
            shells = scan.interpolator.shell_bvals
            if (len(shells) != len(reference)
                    or np.abs(shells - reference).max() > DEFAULT_BVAL_TOLERANCE):
                raise ValueError(
                    f"subjects[{index}] ({scan.subject.dwi}) has shells "
                    f"{np.round(shells).tolist()} but subjects[0] has "
                    f"{np.round(reference).tolist()}: every scan of a group needs the same "
                    "shells (their directions may differ)")

    def plan_epoch(self, rng):
        """Tile every subject's mask with blocks at a fresh random offset.

        Parameters
        ----------
        rng : numpy.random.Generator

        Returns
        -------
        blocks : ndarray of int, shape (n_blocks, 4)
            Subject index and corner of each block, subject by subject.
        """
        planned = []
        for index, scan in enumerate(self._scans):
            starts = training_windows(scan.mask, self.block_size, rng)
            planned.append(np.column_stack([np.full(len(starts), index), starts]))
        return np.concatenate(planned).astype(np.int64)

    def read_block(self, subject, start):
        """One block of a subject, normalised by its b0 signal.

        Parameters
        ----------
        subject : int
        start : array_like of 3 int
            Corner; the block may extend past the volume (zero there).

        Returns
        -------
        normalized : ndarray, float32, shape (B, B, B, N)
            Signal divided by each voxel's mean b0, zero outside ``mask``.
        mask : ndarray of bool, shape (B, B, B)
            Masked voxels with a positive mean b0 and finite values.
        """
        return self._scans[subject].read([int(s) for s in start], self.block_size)

    def read(self, blocks):
        """The batch of some blocks.

        Parameters
        ----------
        blocks : ndarray of int, shape (B, 4)
            Subject index and corner of each block (from :meth:`plan_epoch`).

        Returns
        -------
        batch : dict
            As :func:`collate_blocks`.
        """
        return collate_blocks([self._item(subject, start) for subject, *start in blocks])

    def _item(self, subject, start):
        """One block as :func:`collate_blocks` takes it."""
        normalized, mask = self.read_block(subject, start)
        grid = self._scans[subject].interpolator(normalized)  # (B, B, B, S, V)
        return {"subject": int(subject),
                "signal": torch.from_numpy(np.ascontiguousarray(np.moveaxis(normalized, -1, 0))),
                "grid": torch.from_numpy(np.ascontiguousarray(grid.transpose(3, 4, 0, 1, 2))),
                "mask": torch.from_numpy(mask)}

    def load_subject(self, subject):
        """The whole 4D scan of one subject (e.g. to estimate its responses).

        Returns
        -------
        data : ndarray, float32, shape (X, Y, Z, N)
        """
        scan = self._scans[subject]
        with scan.reading():
            return np.asarray(scan.image.dataobj, dtype=np.float32)


def collate_blocks(items):
    """Batch the blocks of :class:`SubjectBlocks`.

    Grids and masks stack; signals stack per subject, since subjects may
    have different numbers of measurements.

    Parameters
    ----------
    items : list of dict
        One per block: ``subject`` (int), ``signal`` Tensor [N, X, Y, Z]
        (normalised), ``grid`` Tensor [S, V, X, Y, Z] (the signal on the
        network's grid) and ``mask`` bool Tensor [X, Y, Z].

    Returns
    -------
    batch : dict
        ``grid`` [B, S, V, X, Y, Z], ``mask`` [B, X, Y, Z] and ``groups``: one
        dict per subject present with ``subject`` (int), ``rows`` (LongTensor
        of its positions in the batch) and ``signal`` [B_subject, N, X, Y, Z].
    """
    subjects = [item["subject"] for item in items]
    groups = []
    for subject in sorted(set(subjects)):
        rows = [row for row, value in enumerate(subjects) if value == subject]
        groups.append({"subject": subject, "rows": torch.tensor(rows),
                       "signal": torch.stack([items[row]["signal"] for row in rows])})
    return {"grid": torch.stack([item["grid"] for item in items]),
            "mask": torch.stack([item["mask"] for item in items]),
            "groups": groups}


def check_subjects(subjects):
    """A non-empty list of Subject records, or TypeError/ValueError."""
    if isinstance(subjects, (str, Path, Subject)):
        raise TypeError("subjects must be a sequence of esdmri.reconst.subjects.Subject, got a "
                        f"single {type(subjects).__name__}")
    subjects = list(subjects)
    if not subjects:
        raise ValueError("subjects is empty: give at least one Subject")
    wrong = [type(s).__name__ for s in subjects if not isinstance(s, Subject)]
    if wrong:
        raise TypeError(f"subjects must hold esdmri.reconst.subjects.Subject records, got "
                        f"{wrong[0]}")
    return subjects
