"""Shared pieces of the esdmri command-line workflows.

:class:`EsdmriWorkflow` is DIPY's ``Workflow`` with stricter input/output
handling: ``get_io_iterator`` resolves the input globs one subject at a
time like DIPY's, but refuses (rather than silently skipping) to overwrite
existing outputs without ``--force``, refuses two subjects writing the same
file, checks that ``--out_dir`` can be created, and names the argument when
a glob matches nothing, and runs each command as one output transaction
(:mod:`esdmri.atomic`): every file is written under a temporary name and
the outputs appear together when the command succeeds, or not at all when
it fails or is interrupted. :func:`run_workflow` turns the errors of bad
input into one line on stderr and exit status 1.
"""

import argparse
import csv
import functools
import gzip
import inspect
import logging
import os
import signal
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.io.gradients import read_bvals_bvecs
from dipy.io.image import load_nifti
from dipy.utils.logging import get_logger
from dipy.workflows.base import get_args_default
from dipy.workflows.flow_runner import run_flow
from dipy.workflows.multi_io import _resolve_path_or_pattern, connect_output_paths
from dipy.workflows.workflow import Workflow
from nibabel.filebasedimages import ImageFileError

from esdmri.atomic import output_transaction, staged_output
from esdmri.reconst.inputs import check_gtab
from esdmri.threads import fixed_num_threads


# What nibabel, gzip and zlib raise on a corrupt or truncated file.
CORRUPT_FILE_ERRORS = (ImageFileError, EOFError, zlib.error, gzip.BadGzipFile, OSError,
                       ValueError)

# Errors that bad input raises (missing, corrupt or truncated files, wrong
# shapes, bad options). They are reported in one line; anything else keeps
# its traceback.
USER_ERRORS = (OSError, ValueError, TypeError, ImageFileError, EOFError, zlib.error)

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

# --num_threads of every EsdmriWorkflow, with DIPY's convention
# (esdmri.threads.resolve_num_threads). Added next to DIPY's common options
# rather than to each run's signature; the run wrapper applies it.
NUM_THREADS_OPTION = {"num_threads": dict(
    action="store", dest="num_threads", metavar="int", type=int, default=None,
    help="Number of CPU threads of torch (intra-op). Default: OMP_NUM_THREADS if set, "
         "otherwise one per physical core. A negative value -k uses all available CPUs "
         "but k - 1 (-1: all); 0 is an error. On a machine shared with other jobs, "
         "fewer threads than cores avoids waiting for a busy core.")}

# The commands log under esdmri's own name ("[esdmri] INFO: ..."), through
# DIPY's logger factory so that messages look like DIPY's; DIPY's functions
# keep logging under "dipy". --log_level and --log_file apply to both.
logger = get_logger("esdmri")
_LOGGERS = (logger, get_logger("dipy"))

# Header description of the tissue-fraction maps, followed by the tissue names.
FRACTIONS_DESCRIPTION = "esdmri tissue fractions: "


def one_line(error):
    """The message of an exception on a single line."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _configure_logging(argv):
    """Apply ``--log_level`` and ``--log_file`` to esdmri's and DIPY's loggers.

    ``run_flow`` parses both options but its level lookup always falls back
    to INFO, and it configures only the root logger, while the ``esdmri`` and
    ``dipy`` loggers keep their own INFO handlers on stdout; so both options
    are applied here to those two loggers.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--log_level", default="INFO")
    parser.add_argument("--log_file", default="")
    known, _ = parser.parse_known_args(argv)
    level = str(known.log_level).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"--log_level must be one of {', '.join(LOG_LEVELS)}, got "
                         f"{known.log_level!r}")
    if known.log_file:
        handler = logging.FileHandler(known.log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s: %(message)s"))
        for each in _LOGGERS:
            for old in list(each.handlers):
                each.removeHandler(old)
            each.addHandler(handler)
    for each in _LOGGERS:
        each.setLevel(level)
        for handler in each.handlers:
            handler.setLevel(level)


def run_workflow(flow, argv=None):
    """Run ``flow`` from the command line, DIPY style, with one-line errors.

    Parameters
    ----------
    flow : EsdmriWorkflow
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    result
        Whatever ``flow.run`` returns. On bad input the process exits with
        status 1 after printing ``<command>: error: <message>`` to stderr
        (the traceback is logged at ``--log_level DEBUG``). Interrupted by
        Ctrl-C or SIGTERM, it exits with status 130 or 143 after one line
        saying so (no partial output is left: see :mod:`esdmri.atomic`).
    """
    if argv is not None:
        sys.argv[1:] = argv
    name = flow.get_short_name()
    # Commands write figures to files; a display backend is never needed.
    plt.switch_backend("Agg")
    # SIGTERM (kill, a job scheduler's time limit) unwinds like Ctrl-C, so
    # that the temporary files of unfinished outputs are removed.
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # only the main thread may set signal handlers
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _configure_logging(sys.argv[1:])
        extra = NUM_THREADS_OPTION if isinstance(flow, EsdmriWorkflow) else None
        return run_flow(flow, extra_args=extra)
    except USER_ERRORS as error:
        logger.debug("traceback:", exc_info=True)
        sys.exit(f"{name}: error: {one_line(error)}")
    except (KeyboardInterrupt, _Terminated) as interruption:
        logger.debug("traceback:", exc_info=True)
        number = signal.SIGTERM if isinstance(interruption, _Terminated) else signal.SIGINT
        print(f"{name}: interrupted ({signal.Signals(number).name}); no partial output was "
              "left behind", file=sys.stderr)
        sys.exit(128 + number)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that cleanup code runs."""


def _raise_terminated(number, frame):
    raise _Terminated


def _resolve_input(name, pattern, keep_folders):
    """Files (sorted) that one positional input names; a folder may stay whole."""
    if isinstance(pattern, (list, tuple)):
        return [path for item in pattern for path in _resolve_input(name, item, keep_folders)]
    if keep_folders and Path(pattern).is_dir():
        return [Path(pattern)]
    paths = _resolve_path_or_pattern(pattern)
    if not paths:
        raise FileNotFoundError(f"{name}: no file matches {pattern}")
    return paths


def check_out_dir(folder, name="out_dir"):
    """Raise unless ``folder`` exists as a writable folder or can be created.

    Parameters
    ----------
    folder : str or Path
    name : str, optional
        The option that named the folder, for the message.
    """
    folder = Path(folder) if str(folder) else Path.cwd()
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{name} {folder} cannot be created: {existing} is a "
                                 "file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {folder} is not writable ({existing} does not "
                              "allow writing)")


def check_outputs(paths, force):
    """Refuse to overwrite existing files unless ``force``.

    Parameters
    ----------
    paths : iterable of str or Path
        Files the command is about to write.
    force : bool
        Value of ``--force``.
    """
    existing = [str(path) for path in paths if Path(path).exists()]
    if existing and not force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"output {existing[0]}{more} exists already: pass --force "
                              "to overwrite, or choose another --out_dir")
    for path in existing:
        logger.info(f"overwriting {path} (--force)")


class EsdmriWorkflow(Workflow):
    """DIPY ``Workflow`` base of the esdmri commands.

    Subclasses write ``run`` as DIPY workflows do (positional inputs that may
    be globs, then options, ``out_dir`` and ``out_*`` file names) and call
    ``self.get_io_iterator()`` from ``run``.
    """

    # Positional inputs that may name a folder (kept whole, not expanded).
    folder_inputs = ()
    # Positional input whose paths place the outputs under --out_strat
    # (default: the first one).
    output_anchor = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in vars(cls):
            cls.run = _with_num_threads(_transactional(cls.run))

    def get_io_iterator(self, skip_outputs=()):
        """One tuple (inputs..., outputs...) of paths per subject.

        Like DIPY's: every positional argument of ``run`` is a file or glob,
        one that matches a single file is used for every subject, and the
        ``out_*`` names are placed by ``--out_strat``/``--mix_names``. Unlike
        DIPY's, existing outputs raise ``FileExistsError`` without
        ``--force`` instead of silently skipping the work.

        Parameters
        ----------
        skip_outputs : sequence of str
            ``out_*`` arguments that this run will not write (e.g. optional
            outputs that were not requested); their files are not checked.

        Returns
        -------
        subjects : list of tuple of str
        """
        values = inspect.getargvalues(inspect.currentframe().f_back).locals
        names, defaults = get_args_default(self.run)
        positional = names[:len(names) - len(defaults)]
        out_keys = [name for name in names[len(positional):]
                    if "out_" in name and name != "out_dir"]
        out_dir = values.get("out_dir", "")

        inputs = [_resolve_input(name, values[name], name in self.folder_inputs)
                  for name in positional]
        counts = {name: len(paths) for name, paths in zip(positional, inputs)}
        n_subjects = max(counts.values(), default=1)
        mismatched = {name: n for name, n in counts.items() if n not in (1, n_subjects)}
        if mismatched:
            raise ValueError(
                "the input globs must match one file or the same number of files each, "
                f"got {counts}")
        inputs = [paths * n_subjects if len(paths) == 1 else paths for paths in inputs]

        fnames = [values[key] for key in out_keys]
        if inputs:
            anchor = positional.index(self.output_anchor) if self.output_anchor else 0
            # DIPY places outputs after its first input list.
            ordered = [inputs[anchor]] + inputs[:anchor] + inputs[anchor + 1:]
            _, outputs = connect_output_paths(
                ordered, out_dir, fnames, output_strategy=self._output_strategy,
                mix_names=self._mix_names)
        else:
            outputs = [[Path(out_dir) / name for name in fnames]]
        written = [[path for key, path in zip(out_keys, subject) if key not in skip_outputs]
                   for subject in outputs]
        flat = [path for subject in written for path in subject]
        repeated = sorted(str(path) for path, n in Counter(flat).items() if n > 1)
        if repeated:
            raise ValueError(
                f"several of the {n_subjects} subjects would write {repeated[0]}: use "
                "--out_strat append (or prepend) or --mix_names to separate them")
        for folder in sorted({Path(path).parent for path in flat}):
            check_out_dir(folder)
        check_outputs(flat, self._force_overwrite)
        for folder in sorted({Path(path).parent for path in flat}):
            folder.mkdir(parents=True, exist_ok=True)

        self.flat_outputs = [str(path) for subject in outputs for path in subject]
        self.last_generated_outputs = dict(zip(out_keys, map(str, outputs[-1])))
        subject_inputs = list(zip(*inputs)) or [()]
        return [tuple(map(str, ins)) + tuple(map(str, outs))
                for ins, outs in zip(subject_inputs, outputs)]


def _transactional(run):
    """``run`` with its outputs in one transaction: all appear at its end, or none.

    ``functools.wraps`` keeps the signature and docstring that DIPY's
    argument parser reads.
    """
    @functools.wraps(run)
    def transactional_run(self, *args, **kwargs):
        with output_transaction():
            return run(self, *args, **kwargs)
    return transactional_run


def _with_num_threads(run):
    """``run`` taking ``num_threads`` (``--num_threads``) for its duration.

    torch's thread count is restored afterwards, so that flows run in one
    process (tests, scripts) do not change each other's. A given count is
    the user's: the load-aware count of esdmri.threads leaves it alone.
    """
    @functools.wraps(run)
    def threaded_run(self, *args, num_threads=None, **kwargs):
        # None: torch's default, adapted to the load; light commands need not load torch.
        with fixed_num_threads(num_threads):
            return run(self, *args, **kwargs)
    return threaded_run


def match_optional(name, pattern, n_subjects):
    """Paths of an optional per-subject input (e.g. ``--mask``), or Nones.

    Parameters
    ----------
    name : str
        Option name, for messages.
    pattern : str or None
        File or glob; one match is shared by all subjects, otherwise it must
        match one file per subject (paired in sorted order, like DIPY pairs
        positional globs).
    n_subjects : int

    Returns
    -------
    paths : list of (str or None), length n_subjects
    """
    if pattern is None:
        return [None] * n_subjects
    paths = [str(path) for path in _resolve_input(name, pattern, keep_folders=False)]
    if len(paths) == 1:
        return paths * n_subjects
    if len(paths) != n_subjects:
        raise ValueError(f"{name} matches {len(paths)} files but there are {n_subjects} "
                         "subjects: give one file, or one per subject")
    return paths


def read_nifti(path, what="image"):
    """Values and affine of a NIfTI file, with one-line errors for bad files.

    Parameters
    ----------
    path : str
    what : str
        Role of the file ("mask", "stopping map"), for messages.

    Returns
    -------
    values : ndarray
    affine : ndarray, shape (4, 4)
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return load_nifti(str(path))
    except CORRUPT_FILE_ERRORS as error:
        raise ValueError(f"{what} {path} cannot be read as a NIfTI image (truncated or "
                         f"corrupt? {type(error).__name__}: {one_line(error)})") from None


def load_dwi(dwi_path, bvals_path, bvecs_path, b0_threshold=50, bvecs_tol=0.01):
    """Read a 4D scan and its FSL gradient files, checking they agree.

    Parameters
    ----------
    dwi_path, bvals_path, bvecs_path : str
    b0_threshold : float
        b-values up to this are b0 volumes.
    bvecs_tol : float
        How far from unit length the b-vectors of diffusion-weighted volumes
        may be (DIPY's ``gradient_table(atol=...)``, ``--bvecs_tol`` of DIPY's
        own commands).

    Returns
    -------
    data : ndarray, shape (X, Y, Z, N)
    affine : ndarray, shape (4, 4)
    gtab : dipy.core.gradients.GradientTable
    """
    data, affine = read_nifti(dwi_path, "diffusion scan")
    if data.ndim != 4:
        raise ValueError(f"{dwi_path} must be a 4D diffusion scan (X, Y, Z, N), got shape "
                         f"{data.shape}")
    try:
        bvals, bvecs = read_bvals_bvecs(bvals_path, bvecs_path)
    except OSError as error:
        raise ValueError(f"{bvals_path} and {bvecs_path} do not agree: "
                         f"{one_line(error)}") from error
    if len(bvals) != data.shape[-1]:
        raise ValueError(f"{dwi_path} has {data.shape[-1]} volumes but {bvals_path} has "
                         f"{len(bvals)} b-values")
    try:
        gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold, atol=bvecs_tol)
    except ValueError as error:
        if "unit" not in str(error):
            raise
        # DIPY says "the tolerance can be modified" without saying how here.
        raise ValueError(f"{bvecs_path}: {one_line(error)} (--bvecs_tol, now {bvecs_tol})"
                         ) from None
    try:
        check_gtab(gtab)
    except ValueError as error:
        raise ValueError(f"{bvals_path}: {one_line(error)}") from None
    return data, affine, gtab


def load_mask(mask_path, spatial_shape):
    """A boolean mask from a NIfTI file (non-zero voxels), or None.

    Parameters
    ----------
    mask_path : str or None
    spatial_shape : tuple of 3 int
        Grid the mask must match.

    Returns
    -------
    mask : ndarray of bool, shape (X, Y, Z), or None
    """
    if mask_path is None:
        return None
    mask, _ = read_nifti(mask_path, "mask")
    mask = np.squeeze(mask)
    if mask.shape != tuple(spatial_shape):
        raise ValueError(f"mask {mask_path} has shape {mask.shape} but the data grid is "
                         f"{tuple(spatial_shape)}")
    return mask > 0


def save_map(path, array, affine, description=None):
    """Write a float32 NIfTI map.

    Parameters
    ----------
    path : str
    array : ndarray, shape (X, Y, Z) or (X, Y, Z, K)
    affine : ndarray, shape (4, 4)
    description : str, optional
        Stored in the header's ``descrip`` field (80 characters at most).
    """
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    if description is not None:
        image.header["descrip"] = description[:80].encode()
    with staged_output(path) as temporary:
        nib.save(image, temporary)


def save_peaks(path, pam, affine):
    """Write DIPY peaks (``PeaksAndMetrics``) to a ``.pam5`` file."""
    from dipy.io.peaks import save_pam

    with staged_output(path) as temporary:
        save_pam(str(temporary), pam, affine=affine)


def save_streamlines(path, tractogram):
    """Write a StatefulTractogram (.trk, .trx or .tck, from the extension)."""
    from dipy.io.streamline import save_tractogram

    with staged_output(path) as temporary:
        save_tractogram(tractogram, str(temporary), bbox_valid_check=False)


def save_table(path, rows, columns):
    """Write dict rows as a CSV file with a header of ``columns``."""
    with staged_output(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def save_text(path, text):
    """Write a text file."""
    with staged_output(path) as temporary:
        Path(temporary).write_text(text)


def display_name(path):
    """A file as figure titles name it: its folder and file name (a full path
    would set the figure's width)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def verbose_logging():
    """Whether INFO messages (and progress bars) are shown."""
    return logger.isEnabledFor(logging.INFO)


def read_pam(path):
    """DIPY peaks from a ``.pam5`` file, with one-line errors for bad files."""
    from dipy.io.peaks import load_pam

    if not Path(path).is_file():
        raise FileNotFoundError(f"peaks file {path} does not exist")
    try:
        return load_pam(str(path), verbose=False)
    except CORRUPT_FILE_ERRORS + (KeyError,) as error:
        raise ValueError(f"{path} cannot be read as a DIPY .pam5 file (truncated or corrupt? "
                         f"{type(error).__name__}: {one_line(error)})") from None


def load_fodf(path):
    """WM fODF SH coefficients from a NIfTI file or a DIPY ``.pam5`` file.

    Both hold coefficients in DIPY's default (legacy ``descoteaux07``) basis,
    as ``esdmri_fit`` writes them and DIPY's own workflows read them.

    Parameters
    ----------
    path : str

    Returns
    -------
    shm_coeff : ndarray, shape (X, Y, Z, C)
        Legacy ``descoteaux07`` coefficients.
    affine : ndarray, shape (4, 4)
    pam : dipy.direction.peaks.PeaksAndMetrics or None
        The peaks when ``path`` is a ``.pam5`` file.
    """
    from esdmri.peaks import sh_order_from_coeffs

    if str(path).endswith(".pam5"):
        pam = read_pam(path)
        shm_coeff, affine = pam.shm_coeff, pam.affine
        if shm_coeff is None:
            raise ValueError(f"{path} holds no SH coefficients (shm_coeff)")
    else:
        pam = None
        shm_coeff, affine = read_nifti(path, "fODF file")
    if shm_coeff.ndim != 4:
        raise ValueError(f"{path} must hold SH coefficients of shape (X, Y, Z, C), got "
                         f"{shm_coeff.shape}")
    try:
        sh_order_from_coeffs(shm_coeff.shape[-1])
    except ValueError as error:
        raise ValueError(f"{path}: {one_line(error)}") from None
    return np.asarray(shm_coeff, dtype=np.float64), np.asarray(affine, dtype=float), pam


def load_fractions(path, what="fractions"):
    """A 4D tissue-fraction map and its tissue names.

    Parameters
    ----------
    path : str
        NIfTI written by ``esdmri_fit`` (names in the header description) or
        any (X, Y, Z) / (X, Y, Z, T) map (names "map 0", "map 1", ...).
    what : str
        Role of the file ("fractions", "background"), for messages.

    Returns
    -------
    fractions : ndarray, shape (X, Y, Z, T)
    names : list of str
    """
    fractions, _ = read_nifti(path, what)
    image = nib.load(path)
    if fractions.ndim == 3:
        fractions = fractions[..., None]
    if fractions.ndim != 4:
        raise ValueError(f"{what} {path} must be 3D or 4D, got shape {fractions.shape}")
    description = image.header["descrip"].item().decode(errors="replace")
    names = [f"map {t}" for t in range(fractions.shape[-1])]
    if description.startswith(FRACTIONS_DESCRIPTION):
        stored = description[len(FRACTIONS_DESCRIPTION):].split(",")
        if len(stored) == fractions.shape[-1]:
            names = stored
    return fractions, names
