"""DiSCo phantoms (Diffusion-Simulated Connectivity, ISBI 2021 challenge).

Three Monte-Carlo phantoms, each at 40^3 ("high") and 20^3 ("low") voxels,
4 b0 + 4 shells x 90 directions (b about 1000, 1925, 3094 and 13192 s/mm^2),
noise-free and with Rician noise at SNR 10 to 50, with ground-truth strand
fODFs. Mendeley Data, DOI 10.17632/fgf86jdfg6 (v3).

The download table (Mendeley URLs, local names, md5 sums) is read from DIPY's
``dipy.data.fetch_disco{1,2,3}_dataset`` fetchers rather than copied; the files
are downloaded with :func:`data_fetchers.download.download_file` (resumable,
atomic, verified). :func:`read_disco` also finds files that DIPY's own
fetchers put in ``~/.dipy/disco/disco_N``.

Conventions, checked by :func:`read_disco`:

- Gradients: ``DiSCo_gradients_dipy.bvecs`` holds the directions in the voxel
  frame of the images, which is what DIPY expects. They are compared with
  ``DiSCo_gradients_mrtrix.b`` (MRtrix convention: scanner frame) mapped into
  the voxel frame through the image affine; if the two disagree the MRtrix
  table wins (it is unambiguous) and a warning is issued.
- Ground-truth fODFs (``*_Strand_ODFs.nii.gz``): 91 coefficients, SH order 12,
  in the MRtrix3 basis (DIPY's non-legacy ``tournier07``, as used by DIPY's
  own tests on these files) and, as always in MRtrix, in the scanner frame.
  They are returned in DIPY's non-legacy ``descoteaux07`` basis and in the
  voxel frame, so that they compare directly with DIPY fits and with
  :func:`esdmri.peaks.peaks_from_sh` peaks computed from the DWI and ``gtab``.
"""

import inspect
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dipy.data.fetcher as dipy_fetcher
import nibabel as nib
import numpy as np
from dipy.core.gradients import GradientTable, gradient_table
from dipy.core.sphere import Sphere
from dipy.data import get_sphere
from dipy.io.gradients import read_bvals_bvecs
from dipy.reconst.shm import sh_to_sf_matrix

from esdmri.peaks import peaks_from_sh
from esdmri.shm import tournier_to_descoteaux

from .download import RemoteFile, download_file, esdmri_home

PHANTOMS = (1, 2, 3)
RESOLUTIONS = ("high", "low")
SNRS = (10, 20, 30, 40, 50)
GT_SH_ORDER = 12
GT_N_COEFFS = (GT_SH_ORDER + 1) * (GT_SH_ORDER + 2) // 2
BVALS_FILE = "DiSCo_gradients.bvals"
BVECS_FILE = "DiSCo_gradients_dipy.bvecs"
MRTRIX_GRAD_FILE = "DiSCo_gradients_mrtrix.b"

_RESOLVED_NAME = re.compile(r"(high|low)Res_DiSCo\d_(.+)\.nii\.gz")
# |cos| between the two gradient tables of one volume: 0.999 is 2.6 degrees,
# far above text rounding and far below any real convention error (a flipped
# axis moves most directions by tens of degrees).
_SAME_DIRECTION_COS = 0.999


def check_phantom(phantom):
    """Return `phantom` as int after checking it is 1, 2 or 3."""
    if isinstance(phantom, bool) or not isinstance(phantom, (int, np.integer)) \
            or phantom not in PHANTOMS:
        raise ValueError(f"phantom must be 1, 2 or 3, got {phantom!r}")
    return int(phantom)


def _check_resolution(resolution):
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be 'high' or 'low', got {resolution!r}")
    return resolution


def _check_snr(snr):
    if snr is None:
        return None
    if isinstance(snr, bool) or not isinstance(snr, (int, np.integer)) \
            or snr not in SNRS:
        raise ValueError(
            f"snr must be None (noise-free) or one of {SNRS}, got {snr!r}")
    return int(snr)


def _dipy_fetcher_table(phantom):
    """Variables DIPY's ``fetch_disco{phantom}_dataset`` was built from.

    DIPY builds its fetchers with a closure over the file table; reading the
    closure keeps DIPY the single source of the URLs and md5 sums.
    """
    fetcher = getattr(dipy_fetcher, f"fetch_disco{check_phantom(phantom)}_dataset")
    return inspect.getclosurevars(fetcher).nonlocals


def disco_remote_files(phantom):
    """Download table of one DiSCo phantom, from DIPY's fetcher.

    Parameters
    ----------
    phantom : {1, 2, 3}

    Returns
    -------
    files : dict
        Local file name -> :class:`RemoteFile` (Mendeley URL and md5 sum).
    """
    table = _dipy_fetcher_table(phantom)
    # DIPY marks hosts that reject scripts with `use_headers`; its first header
    # set is a plain browser User-Agent (the others ask for compressed bodies).
    headers = tuple(dipy_fetcher.HEADER_LIST[0].items()) if table["use_headers"] else ()
    return {
        str(local): RemoteFile(url=table["baseurl"] + remote, filename=str(local),
                               md5=md5, description=f"DiSCo{phantom} {local}",
                               headers=headers)
        for remote, local, md5 in zip(table["remote_fnames"], table["local_fnames"],
                                      table["md5_list"], strict=True)
    }


def disco_data_size(phantom):
    """DIPY's size estimate of one whole phantom, e.g. ``'1.05 GB'``."""
    return _dipy_fetcher_table(phantom)["data_size"]


def disco_folder(phantom, data_home=None):
    """Folder where :func:`fetch_disco` puts phantom `phantom`."""
    return esdmri_home(data_home) / "disco" / f"disco_{check_phantom(phantom)}"


def dipy_disco_folder(phantom):
    """Folder where DIPY's own ``fetch_disco{phantom}_dataset`` puts its files."""
    return Path(_dipy_fetcher_table(phantom)["folder"])


def _dwi_kind(snr):
    return "DWI" if snr is None else f"DWI_RicianNoise-snr{snr}"


def dwi_file_name(phantom, resolution, snr):
    """Name of the DWI file of one phantom, resolution and SNR (None: noise-free)."""
    return f"{resolution}Res_DiSCo{phantom}_{_dwi_kind(snr)}.nii.gz"


def _parse_snr_selection(snr):
    """Set of wanted DWI kinds ('DWI', 'DWI_Intra', 'DWI_RicianNoise-snr30')."""
    if isinstance(snr, str):
        if snr != "all":
            raise ValueError(f"snr must be 'all', None, an int in {SNRS} or a "
                             f"list of those, got {snr!r}")
        return {"DWI", "DWI_Intra"} | {f"DWI_RicianNoise-snr{s}" for s in SNRS}
    values = snr if isinstance(snr, (list, tuple)) else [snr]
    return {_dwi_kind(_check_snr(value)) for value in values}


def select_disco_files(phantom, resolution=None, snr="all"):
    """Names of the files :func:`fetch_disco` downloads for a selection.

    Gradient tables, masks, ROIs, ground-truth maps and tractograms of the
    selected resolutions are always included; `snr` only selects DWI files.

    Parameters
    ----------
    phantom : {1, 2, 3}
    resolution : {None, "high", "low"}
        None selects both resolutions.
    snr : "all", None, int or sequence
        "all": noise-free, intra-axonal-only and every noisy DWI; otherwise the
        noise-free DWI (None) and/or the noisy DWIs at the given SNRs.

    Returns
    -------
    names : list of str
    """
    phantom = check_phantom(phantom)
    resolutions = (RESOLUTIONS if resolution is None
                   else (_check_resolution(resolution),))
    wanted_dwi = _parse_snr_selection(snr)
    names = []
    for name in disco_remote_files(phantom):
        match = _RESOLVED_NAME.fullmatch(name)
        if match is not None:
            res, kind = match.groups()
            unwanted_dwi = kind.startswith("DWI") and kind not in wanted_dwi
            if res not in resolutions or unwanted_dwi:
                continue
        names.append(name)
    return names


def fetch_disco(phantom=1, resolution=None, snr="all", data_home=None, force=False,
                quiet=False):
    """Download one DiSCo phantom (or part of it) into the esdmri cache.

    Parameters
    ----------
    phantom : {1, 2, 3}
        Which phantom.
    resolution : {None, "high", "low"}, optional
        40^3 ("high") or 20^3 ("low") voxels; None downloads both.
    snr : "all", None, int or sequence, optional
        DWI files to download, see :func:`select_disco_files`. The whole
        phantom is about 1 GB; ``resolution="high", snr=30`` about a tenth.
    data_home : str or Path, optional
        Cache folder; default ``$ESDMRI_HOME`` or ``~/.esdmri``. Files go to
        ``<data_home>/disco/disco_<phantom>``.
    force : bool, optional
        Download again even if verified files are present.
    quiet : bool, optional
        Hide progress bars.

    Returns
    -------
    files : dict
        File name -> Path of every selected file.
    folder : Path
        Folder that holds them.
    """
    remote = disco_remote_files(phantom)
    folder = disco_folder(phantom, data_home)
    files = {name: download_file(remote[name], folder, force=force, quiet=quiet)
             for name in select_disco_files(phantom, resolution, snr)}
    return files, folder


def _locate(phantom, name, data_home, resolution, snr, required=True):
    """Path of a DiSCo file in the esdmri cache or DIPY's folder."""
    folders = (disco_folder(phantom, data_home), dipy_disco_folder(phantom))
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    if not required:
        return None
    raise FileNotFoundError(
        f"DiSCo file {name} is not in {folders[0]} nor in {folders[1]}. Run "
        f"esdmri.data_fetchers.fetch_disco(phantom={phantom}, "
        f"resolution={resolution!r}, snr={snr!r}) (command line: esdmri_fetch "
        f"disco --phantom {phantom}), or DIPY's "
        f"dipy.data.fetch_disco{phantom}_dataset().")


def _voxel_rotation(affine):
    """Orthogonal part of the affine: voxel-frame direction -> scanner frame."""
    u, _, vt = np.linalg.svd(np.asarray(affine, dtype=float)[:3, :3])
    return u @ vt


def _read_gradients(bvals_path, bvecs_path, mrtrix_path, rotation):
    """DiSCo gradient table in the voxel frame and a note on how it was checked."""
    bvals, bvecs = read_bvals_bvecs(str(bvals_path), str(bvecs_path))
    gtab = gradient_table(bvals, bvecs=bvecs)
    if mrtrix_path is None:
        return gtab, (f"{BVECS_FILE} used as is; {MRTRIX_GRAD_FILE} absent, "
                      "frame not cross-checked")
    table = np.loadtxt(mrtrix_path, comments="#", ndmin=2)
    if table.shape != (bvals.size, 4):
        raise ValueError(f"{mrtrix_path} must hold {bvals.size} rows 'x y z b', "
                         f"got shape {table.shape}")
    if not np.allclose(table[:, 3], bvals, rtol=1e-2, atol=1.0):
        raise ValueError(f"b-values of {mrtrix_path} and {bvals_path} disagree")
    # Row vectors: u = R^T w  <=>  u_row = w_row @ R.
    mrtrix_voxel = table[:, :3] @ rotation
    weighted = ~gtab.b0s_mask
    a = mrtrix_voxel[weighted] / np.linalg.norm(mrtrix_voxel[weighted], axis=1,
                                                keepdims=True)
    b = gtab.bvecs[weighted]
    if np.all(np.abs(np.sum(a * b, axis=1)) > _SAME_DIRECTION_COS):
        return gtab, f"{BVECS_FILE} agrees with {MRTRIX_GRAD_FILE} through the affine"
    flips = [axis for axis in range(3) if np.all(
        np.abs(np.sum(a * b * np.where(np.arange(3) == axis, -1, 1), axis=1))
        > _SAME_DIRECTION_COS)]
    detail = f" (they differ by a flip of voxel axis {flips[0]})" if flips else ""
    warnings.warn(
        f"{bvecs_path} disagrees with {mrtrix_path} mapped into the voxel frame"
        f"{detail}; using the MRtrix table, whose scanner-frame convention is "
        "unambiguous.", UserWarning, stacklevel=3)
    bvecs_voxel = np.zeros_like(mrtrix_voxel)
    bvecs_voxel[weighted] = a
    return (gradient_table(bvals, bvecs=bvecs_voxel),
            f"{MRTRIX_GRAD_FILE} mapped into the voxel frame ({BVECS_FILE} disagreed)")


def _sh_to_voxel_frame(coeffs, rotation):
    """Re-express descoteaux07 SH defined in the scanner frame in the voxel frame.

    ``f_voxel(u) = f_scanner(R u)``: sample the scanner-frame function at the
    rotated vertices and refit. Exact for any orthogonal R (for even SH a
    reflection acts like the rotation ``-R``) because rotations map each SH
    degree onto itself and 724 vertices determine 91 coefficients.
    """
    if np.allclose(rotation, np.eye(3), atol=1e-6):
        return coeffs
    sphere = get_sphere(name="repulsion724")
    _, sf_to_sh = sh_to_sf_matrix(sphere, sh_order_max=GT_SH_ORDER,
                                  basis_type="descoteaux07", legacy=False)
    rotated = Sphere(xyz=sphere.vertices @ rotation.T)
    sh_to_rotated_sf, _ = sh_to_sf_matrix(rotated, sh_order_max=GT_SH_ORDER,
                                          basis_type="descoteaux07", legacy=False)
    return coeffs @ (sh_to_rotated_sf @ sf_to_sh)


@dataclass
class DiscoData:
    """One DiSCo phantom, ready for fitting and scoring.

    Attributes
    ----------
    phantom : int
    resolution : str
        "high" (40^3) or "low" (20^3).
    snr : int or None
        None for the noise-free signal.
    data : ndarray (X, Y, Z, N) float32
        Diffusion-weighted signal.
    affine : ndarray (4, 4)
    gtab : dipy GradientTable
        b-vectors in the voxel frame (DIPY convention), see ``bvec_check``.
    mask : ndarray (X, Y, Z) bool
        The phantom's tissue mask.
    gt_fodf_sh : ndarray (X, Y, Z, 91) float64
        Ground-truth strand fODF, SH order 12, DIPY non-legacy
        ``descoteaux07`` basis, voxel frame.
    gt_peak_dirs : ndarray (X, Y, Z, npeaks, 3)
        Ground-truth peaks from :func:`esdmri.peaks.peaks_from_sh`, NaN-padded.
    gt_peak_values : ndarray (X, Y, Z, npeaks)
    bvec_check : str
        How the gradient convention was verified.
    files : dict
        Role ("dwi", "mask", "fodf", "bvals", "bvecs", "mrtrix_grad") -> Path.
    """

    phantom: int
    resolution: str
    snr: int | None
    data: np.ndarray
    affine: np.ndarray
    gtab: GradientTable
    mask: np.ndarray
    gt_fodf_sh: np.ndarray
    gt_peak_dirs: np.ndarray
    gt_peak_values: np.ndarray
    bvec_check: str
    files: dict = field(default_factory=dict)
    sh_order_max: int = GT_SH_ORDER
    basis_type: str = "descoteaux07"


def read_disco(phantom, resolution="high", snr=None, data_home=None, sphere=None,
               relative_peak_threshold=0.1, min_separation_angle=25, npeaks=5):
    """Load a downloaded DiSCo phantom with its ground truth.

    Parameters
    ----------
    phantom : {1, 2, 3}
    resolution : {"high", "low"}, optional
        40^3 or 20^3 voxels.
    snr : {None, 10, 20, 30, 40, 50}, optional
        None for the noise-free DWI, else Rician noise at that SNR.
    data_home : str or Path, optional
        esdmri cache folder (default ``$ESDMRI_HOME`` or ``~/.esdmri``); DIPY's
        DiSCo folder is searched next.
    sphere : dipy Sphere, optional
        Sphere for the ground-truth peak search (esdmri.peaks default if None).
    relative_peak_threshold : float, optional
        Ground-truth peak threshold. The default 0.1 sits above the largest
        Gibbs side lobe of an order-12 truncated fibre (7 % of its peak) and
        keeps minor fibres that a 0.5 threshold would drop.
    min_separation_angle : float, optional
        Degrees; see :func:`esdmri.peaks.peaks_from_sh`.
    npeaks : int, optional
        Largest number of ground-truth peaks per voxel.

    Returns
    -------
    disco : DiscoData

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message names the fetch call to run.
    """
    phantom = check_phantom(phantom)
    _check_resolution(resolution)
    snr = _check_snr(snr)

    def locate(name, required=True):
        return _locate(phantom, name, data_home, resolution, snr, required)

    files = {
        "dwi": locate(dwi_file_name(phantom, resolution, snr)),
        "mask": locate(f"{resolution}Res_DiSCo{phantom}_mask.nii.gz"),
        "fodf": locate(f"{resolution}Res_DiSCo{phantom}_Strand_ODFs.nii.gz"),
        "bvals": locate(BVALS_FILE),
        "bvecs": locate(BVECS_FILE),
        "mrtrix_grad": locate(MRTRIX_GRAD_FILE, required=False),
    }
    dwi_image = nib.load(files["dwi"])
    affine = dwi_image.affine
    rotation = _voxel_rotation(affine)
    data = dwi_image.get_fdata(dtype=np.float32)
    gtab, bvec_check = _read_gradients(files["bvals"], files["bvecs"],
                                       files["mrtrix_grad"], rotation)
    if data.ndim != 4 or data.shape[-1] != gtab.bvals.size:
        raise ValueError(f"{files['dwi']} must be 4D with {gtab.bvals.size} volumes "
                         f"(one per gradient), got shape {data.shape}")
    mask = np.asarray(nib.load(files["mask"]).dataobj) > 0
    fodf_tournier = nib.load(files["fodf"]).get_fdata(dtype=np.float64)
    if fodf_tournier.shape != data.shape[:3] + (GT_N_COEFFS,):
        raise ValueError(
            f"{files['fodf']} must hold {GT_N_COEFFS} SH coefficients (order "
            f"{GT_SH_ORDER}) per voxel of the {data.shape[:3]} grid, got shape "
            f"{fodf_tournier.shape}")
    if mask.shape != data.shape[:3]:
        raise ValueError(f"{files['mask']} must have shape {data.shape[:3]}, "
                         f"got {mask.shape}")
    gt_fodf_sh = _sh_to_voxel_frame(
        tournier_to_descoteaux(fodf_tournier, GT_SH_ORDER), rotation)
    gt_peak_dirs, gt_peak_values = peaks_from_sh(
        gt_fodf_sh, sphere=sphere, relative_peak_threshold=relative_peak_threshold,
        min_separation_angle=min_separation_angle, npeaks=npeaks, mask=mask,
        basis_type="descoteaux07")
    return DiscoData(phantom=phantom, resolution=resolution, snr=snr, data=data,
                     affine=affine, gtab=gtab, mask=mask, gt_fodf_sh=gt_fodf_sh,
                     gt_peak_dirs=gt_peak_dirs, gt_peak_values=gt_peak_values,
                     bvec_check=bvec_check, files=files)
