"""ISMRM 2015 Tractography Challenge data (Tractometer), from the organisers.

Fiberfox-simulated brain, 2 mm isotropic, 1 b0 + 32 directions at
b = 1000 s/mm^2, with a T1, the artefact-free ground-truth DWI, the 25
ground-truth bundles of 2015 and the 2023 ROI-based rescoring data
(Renauld et al. 2023). URLs and md5 sums are those published on
https://tractometer.org/ismrm2015/ (the 2023 scoring archive has no published
md5: its zip CRCs are checked instead).

Each part is one zip archive, kept in ``<ESDMRI_HOME>/tractometer/archives``
and unpacked into ``<ESDMRI_HOME>/tractometer/<part>``. Files are found inside
an unpacked part by name, not by a fixed path, so the folder nesting of the
archives does not matter.

Conventions: the b-vectors (``*.bvecs``, FSL text layout) are used as
distributed, as DIPY does. The 2015 bundles (``.fib``) are stored in LPS
millimetres per the organisers' note and are converted to RAS on loading;
reading them needs DIPY's optional VTK support (``fury``). The 2023 bundles
are ``.trk`` files that carry their own space.
"""

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from dipy.core.gradients import GradientTable, gradient_table
from dipy.io import vtk as dipy_vtk
from dipy.io.gradients import read_bvals_bvecs
from dipy.io.stateful_tractogram import Space
from dipy.io.streamline import load_tractogram

from .download import RemoteFile, download_file, esdmri_home, extract_zip

TRACTOMETER_URL = "https://scil.usherbrooke.ca/ismrm2015/"


def _remote(filename, md5, description):
    return RemoteFile(url=TRACTOMETER_URL + filename, filename=filename, md5=md5,
                      description=description)


TRACTOMETER_FILES = {
    "dwi": _remote(
        "ISMRM_2015_Tracto_challenge_data_v1_1.zip", "6ab9c875709e73ab394a09aac66356ff",
        "challenge DWI (2 mm, 1 b0 + 32 directions, b=1000), field map, T1, gradients"),
    "ground_truth_dwi": _remote(
        "ISMRM_2015_Tracto_challenge_ground_truth_dwi_v2.zip",
        "2bfc6b19136f10e8ee10079fa0c53274",
        "artefact-free ground-truth DWI, gradients"),
    "bundles": _remote(
        "ISMRM_2015_Tracto_challenge_ground_truth_bundles_VTK_v2.zip",
        "d5696ef555d669c1cfd341c0713c6ff4", "25 ground-truth bundles of 2015 (.fib)"),
    "scoring": _remote(
        "scoring_data_Renauld2023.zip", None,
        "2023 ROI-based scoring: bundles (.trk), masks, ROIs, configs (md5 not "
        "published: zip CRCs checked)"),
}
DWI_PARTS = {"challenge": "dwi", "ground_truth": "ground_truth_dwi"}
BUNDLE_PARTS = {"2023": "scoring", "2015": "bundles"}


def tractometer_folder(data_home=None):
    """Folder of the Tractometer data in the esdmri cache."""
    return esdmri_home(data_home) / "tractometer"


def _check_parts(parts):
    if isinstance(parts, str):
        parts = (parts,)
    unknown = [part for part in parts if part not in TRACTOMETER_FILES]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of "
                         f"{tuple(TRACTOMETER_FILES)}, got {parts!r}")
    return tuple(parts)


def fetch_tractometer(parts=("dwi", "ground_truth_dwi", "bundles", "scoring"),
                      data_home=None, force=False, quiet=False):
    """Download and unpack parts of the ISMRM 2015 challenge data.

    Parameters
    ----------
    parts : sequence of str, optional
        Any of "dwi", "ground_truth_dwi", "bundles", "scoring".
    data_home : str or Path, optional
        Cache folder; default ``$ESDMRI_HOME`` or ``~/.esdmri``.
    force : bool, optional
        Download and unpack again even if present.
    quiet : bool, optional
        Hide progress bars.

    Returns
    -------
    folders : dict
        Part name -> folder holding its unpacked files.
    """
    parts = _check_parts(parts)
    root = tractometer_folder(data_home)
    folders = {}
    for part in parts:
        archive = download_file(TRACTOMETER_FILES[part], root / "archives",
                                force=force, quiet=quiet)
        folders[part] = extract_zip(archive, root / part, force=force)
    return folders


def _part_folder(part, data_home):
    folder = tractometer_folder(data_home) / part
    if not folder.is_dir():
        remote = TRACTOMETER_FILES[part]
        raise FileNotFoundError(
            f"Tractometer part {part!r} is not in {folder}. Run "
            f"esdmri.data_fetchers.fetch_tractometer(parts=({part!r},)) (command "
            f"line: esdmri_fetch tractometer --parts {part}); without network, "
            f"download {remote.url} manually into {folder.parent / 'archives'} "
            "and run the same call, which verifies and unpacks it.")
    return folder


def _find(folder, pattern, what):
    """The single file matching `pattern` under `folder`."""
    matches = sorted(path for path in folder.rglob(pattern)
                     if not path.name.startswith("._"))
    if len(matches) != 1:
        raise FileNotFoundError(f"Expected one {what} ({pattern}) under {folder}, "
                                f"found {len(matches)}: {matches[:4]}")
    return matches[0]


def _load_bundles(bundle_set, data_home, reference):
    folder = _part_folder(BUNDLE_PARTS[bundle_set], data_home)
    if bundle_set == "2023":
        files = sorted(folder.rglob("bundles/*.trk"))
        kwargs = {"reference": "same"}
    else:
        if not dipy_vtk.have_fury:
            raise ImportError("Reading the 2015 .fib bundles needs DIPY's VTK "
                              "support: pip install fury (it brings vtk).")
        files = sorted([*folder.rglob("*.fib"), *folder.rglob("*.vtk")])
        kwargs = {"reference": str(reference), "from_space": Space.LPSMM}
    files = [path for path in files if not path.name.startswith("._")]
    if not files:
        raise FileNotFoundError(f"No bundle files under {folder}")
    bundles = {}
    for path in files:
        tractogram = load_tractogram(str(path), bbox_valid_check=False, **kwargs)
        if tractogram is False:
            # DIPY logs the reason and returns False instead of raising.
            raise ValueError(f"DIPY could not load the bundle {path}")
        bundles[path.name.split(".")[0]] = tractogram
    return bundles, folder


@dataclass
class TractometerData:
    """The ISMRM 2015 phantom as arrays, gradients and bundles.

    Attributes
    ----------
    data : ndarray (X, Y, Z, N) float32
        Diffusion-weighted signal (challenge or ground-truth DWI).
    affine : ndarray (4, 4)
    gtab : dipy GradientTable
    bundles : dict
        Bundle name -> dipy StatefulTractogram (RAS mm); empty if not loaded.
    paths : dict
        "dwi", "bvals", "bvecs", and where present "t1", "bundles",
        "scoring_config_segmentation", "scoring_config_tractometry" -> Path.
    """

    data: np.ndarray
    affine: np.ndarray
    gtab: GradientTable
    bundles: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def read_tractometer(dwi="challenge", bundles="2023", data_home=None):
    """Load downloaded ISMRM 2015 challenge data.

    Parameters
    ----------
    dwi : {"challenge", "ground_truth"}, optional
        The challenge DWI (with artefacts and noise) or the artefact-free one.
    bundles : {"2023", "2015", None}, optional
        Ground-truth bundles to load: the 2023 rescoring set (``.trk``, from
        the "scoring" part), the 2015 set (``.fib``, "bundles" part, needs
        ``fury``), or none.
    data_home : str or Path, optional
        Cache folder; default ``$ESDMRI_HOME`` or ``~/.esdmri``.

    Returns
    -------
    tractometer : TractometerData

    Raises
    ------
    FileNotFoundError
        If a needed part was not fetched; the message names the fetch call.
    """
    if dwi not in DWI_PARTS:
        raise ValueError(f"dwi must be one of {tuple(DWI_PARTS)}, got {dwi!r}")
    if bundles is not None and bundles not in BUNDLE_PARTS:
        raise ValueError(f"bundles must be one of {tuple(BUNDLE_PARTS)} or None, "
                         f"got {bundles!r}")
    folder = _part_folder(DWI_PARTS[dwi], data_home)
    bvals_path = _find(folder, "*.bvals", "b-value file")
    stem = bvals_path.name[:-len(".bvals")]
    paths = {"dwi": bvals_path.with_name(stem + ".nii.gz"), "bvals": bvals_path,
             "bvecs": bvals_path.with_name(stem + ".bvecs")}
    t1 = sorted(folder.rglob("T1.nii.gz"))
    if t1:
        paths["t1"] = t1[0]
    bvals, bvecs = read_bvals_bvecs(str(paths["bvals"]), str(paths["bvecs"]))
    gtab = gradient_table(bvals, bvecs=bvecs)
    image = nib.load(paths["dwi"])
    data = image.get_fdata(dtype=np.float32)
    if data.ndim != 4 or data.shape[-1] != bvals.size:
        raise ValueError(f"{paths['dwi']} must be 4D with {bvals.size} volumes, got "
                         f"shape {data.shape}")
    loaded = {}
    if bundles is not None:
        loaded, paths["bundles"] = _load_bundles(bundles, data_home, paths["dwi"])
        if bundles == "2023":
            for kind in ("segmentation", "tractometry"):
                config = sorted(paths["bundles"].rglob(f"config_file_{kind}.json"))
                if config:
                    paths[f"scoring_config_{kind}"] = config[0]
    return TractometerData(data=data, affine=image.affine, gtab=gtab,
                           bundles=loaded, paths=paths)
