"""``esdmri_eval``: peak accuracy of fODFs against a ground truth.

Examples
--------
``esdmri_eval fit/peaks.pam5 phantom/ground_truth.npz`` scores the peaks of an
``esdmri_fit`` run on an esdmri phantom; ``esdmri_eval csd_sh.nii.gz
~/.esdmri/disco/disco_1`` scores SH fODFs (peaks extracted at
``--relative_peak_threshold``) against DiSCo phantom 1 (fetched with
``esdmri_fetch disco``). The table goes to stdout and to ``metrics.csv``.

``esdmri_eval csd_sh.nii.gz phantom/ground_truth.npz --tractogram csd.trk
--end_regions "phantom/end_regions/*.nii.gz" --bundle_masks "phantom/bundles/*.nii.gz"``
also scores a tractogram Tractometer-style (valid, invalid and no
connections, bundle overlap and overreach, steps along a true fibre) into
``tractography.csv``; the same options take the ISMRM 2015 (Tractometer)
end-region and bundle files.
"""

import re
import zipfile
from pathlib import Path

import numpy as np
from dipy.io.streamline import load_tractogram

from esdmri.metrics import evaluate_fractions, evaluate_peaks, score_tractogram
from esdmri.peaks import peaks_from_sh, sh_order_from_coeffs
from esdmri.shm import legacy_to_descoteaux

from .io import (EsdmriWorkflow, _resolve_input, load_fodf, load_fractions, load_mask,
                 match_optional, read_nifti, run_workflow, save_table)
from .io import logger

PEAK_COLUMNS = ("subset", "n_voxels", "angular_error", "angular_error_median",
                "success_rate", "tp", "fp", "fn", "fp_rate", "fn_rate")
TRACT_COLUMNS = ("n_streamlines", "vc", "ic", "nc", "vc_rate", "ic_rate", "nc_rate",
                 "n_bundles", "valid_bundles", "invalid_bundles", "overlap", "overreach",
                 "steps_along_fibres", "steps_off_fibres")
TRACTOGRAM_SUFFIXES = (".trk", ".tck", ".trx")
DISCO_GRIDS = {40: "high", 20: "low"}
_DISCO_FOLDER = re.compile(r"disco_(\d)")
# DiSCo DWIs read_disco may load (any one gives the same ground truth).
_DISCO_SNRS = (None, 10, 20, 30, 40, 50)


class GroundTruth:
    """Ground-truth fibre directions (and fractions when known) of a volume.

    Attributes
    ----------
    fibre_dirs : ndarray, shape (X, Y, Z, K, 3)
        NaN-padded unit directions in the voxel frame.
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels with at least one fibre.
    tissue_fractions : ndarray, shape (X, Y, Z, 3) or None
        (wm, gm, csf) volume fractions, when the ground truth has them.
    source : str
    """

    def __init__(self, fibre_dirs, tissue_fractions, source):
        self.fibre_dirs = fibre_dirs
        self.mask = np.isfinite(fibre_dirs).all(axis=-1).any(axis=-1)
        self.tissue_fractions = tissue_fractions
        self.source = source


def read_ground_truth(path, spatial_shape):
    """An esdmri phantom's ``ground_truth.npz`` or a DiSCo phantom folder.

    Parameters
    ----------
    path : str
        ``ground_truth.npz`` written by ``Phantom.save``, or a DiSCo folder
        ``<data_home>/disco/disco_<N>`` (as ``esdmri_fetch disco`` makes it).
    spatial_shape : tuple of 3 int
        Grid of the fODFs to score (40^3 picks DiSCo's high resolution,
        20^3 the low one).

    Returns
    -------
    truth : GroundTruth
    """
    path = Path(path)
    if path.is_dir():
        return _read_disco_truth(path, spatial_shape)
    if path.suffix != ".npz":
        raise ValueError(f"ground_truth must be an esdmri ground_truth.npz or a DiSCo "
                         f"folder (disco_<N>), got {path}")
    try:
        with np.load(path, allow_pickle=False) as truth:
            if "fibre_dirs" not in truth:
                raise ValueError(f"{path} has no fibre_dirs: not an esdmri phantom ground "
                                 "truth")
            fibre_dirs = truth["fibre_dirs"]
            fractions = truth["tissue_fractions"] if "tissue_fractions" in truth else None
    except (zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"ground truth {path} cannot be read as a .npz file (truncated or "
                         f"corrupt? {type(error).__name__})") from None
    _check_grid(fibre_dirs.shape[:3], spatial_shape, path)
    return GroundTruth(fibre_dirs, fractions, str(path))


def _read_disco_truth(folder, spatial_shape):
    from esdmri.data_fetchers.disco import disco_folder, dwi_file_name, read_disco

    match = _DISCO_FOLDER.fullmatch(folder.name)
    if match is None:
        raise ValueError(f"ground_truth folder {folder} must be a DiSCo folder named "
                         "disco_<N> (as esdmri_fetch disco makes it)")
    resolution = DISCO_GRIDS.get(spatial_shape[0])
    if resolution is None or len(set(spatial_shape)) != 1:
        raise ValueError(f"DiSCo grids are 40^3 or 20^3 but the fODFs have shape "
                         f"{tuple(spatial_shape)}")
    phantom = int(match.group(1))
    data_home = folder.parent.parent
    # read_disco looks in <data_home>/disco/disco_<N> (then in DIPY's folder).
    if disco_folder(phantom, data_home).resolve() != folder.resolve():
        raise ValueError(f"ground_truth folder {folder} must sit at "
                         "<data_home>/disco/disco_<N>, as esdmri_fetch and DIPY's fetchers "
                         "lay it out")
    # read_disco loads a DWI too; any SNR gives the same ground truth. When
    # none is present, read_disco's error names the files to fetch.
    snr = next((snr for snr in _DISCO_SNRS
                if (folder / dwi_file_name(phantom, resolution, snr)).is_file()), None)
    disco = read_disco(phantom, resolution, snr=snr, data_home=data_home)
    return GroundTruth(disco.gt_peak_dirs, None, str(folder))


def _check_grid(truth_shape, spatial_shape, path):
    if tuple(truth_shape) != tuple(spatial_shape):
        raise ValueError(f"ground truth {path} covers a {tuple(truth_shape)} grid but the "
                         f"fODFs have {tuple(spatial_shape)}")


def predicted_peaks(path, relative_peak_threshold=0.5, min_separation_angle=25, npeaks=5):
    """Peak directions of a .pam5 file, or extracted from a SH NIfTI.

    Parameters
    ----------
    path : str
        ``.pam5`` (its peaks are used as they are) or a SH NIfTI in DIPY's
        default basis (peaks found by :func:`esdmri.peaks.peaks_from_sh`).
    relative_peak_threshold, min_separation_angle, npeaks
        Peak extraction of SH input.

    Returns
    -------
    directions : ndarray, shape (X, Y, Z, P, 3)
        Zero- or NaN-padded.
    """
    shm_coeff, _, pam = load_fodf(path)
    if pam is not None:
        return np.asarray(pam.peak_dirs, dtype=float)
    coeffs = legacy_to_descoteaux(shm_coeff, sh_order_from_coeffs(shm_coeff.shape[-1]))
    directions, _ = peaks_from_sh(coeffs, relative_peak_threshold=relative_peak_threshold,
                                  min_separation_angle=min_separation_angle, npeaks=npeaks)
    return directions


def peak_table(summary):
    """Rows of :data:`PEAK_COLUMNS` from :func:`esdmri.metrics.evaluate_peaks`."""
    subsets = {"all": summary["all"], "crossing": summary["crossing"]}
    subsets.update({f"{n} fibre{'s' if n > 1 else ''}": value
                    for n, value in summary["by_n_fibres"].items()})
    subsets.update({f"crossing {low:g}-{high:g} deg": value
                    for (low, high), value in summary["by_crossing_angle"].items()})
    return [{"subset": name, **{key: values[key] for key in PEAK_COLUMNS[1:]}}
            for name, values in subsets.items() if values["n_voxels"] > 0]


def format_table(rows, columns):
    """Fixed-width text table (floats with 3 decimals)."""
    def cell(value):
        if isinstance(value, float):
            return "nan" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    cells = [[cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells))
              for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(value.rjust(width) if i else value.ljust(width)
                        for i, (value, width) in enumerate(zip(line, widths)))
              for line in cells]
    return "\n".join(lines)


class EvaluateFlow(EsdmriWorkflow):
    folder_inputs = ("ground_truth",)

    @classmethod
    def get_short_name(cls):
        return "esdmri_eval"

    def run(self, input_files, ground_truth, mask=None, fractions=None, tractogram=None,
            end_regions=None, bundle_masks=None, relative_peak_threshold=0.5,
            min_separation_angle=25.0, npeaks=5, match_angle=25.0, out_dir="",
            out_csv="metrics.csv", out_fractions_csv="fraction_metrics.csv",
            out_tracts_csv="tractography.csv"):
        """Score fODF peaks against ground-truth fibres (table to stdout and CSV).

        Angular error (mean over the true fibres of the angle to the nearest
        peak), success rate (as many peaks as fibres, all matched), and
        true/false positive and false negative peak counts with one-to-one
        matching within match_angle degrees; overall, over crossing voxels,
        per number of fibres and per crossing-angle bin. Example: esdmri_eval
        fit/peaks.pam5 ground_truth.npz --mask mask.nii.gz --out_dir eval.

        Parameters
        ----------
        input_files : string
            .pam5 file(s) (their peaks are scored as they are) or fODF SH
            NIfTI file(s) in DIPY's default basis (peaks are extracted first).
        ground_truth : string
            ground_truth.npz of an esdmri phantom (Phantom.save), or a DiSCo
            folder disco_<N> as esdmri_fetch makes it (any DWI of it must be
            present; 40^3 fODFs use the high-resolution truth, 20^3 the low).
        mask : string, optional
            Voxels to score (NIfTI); default: every voxel with a true fibre.
        fractions : string, optional
            4D tissue-fraction NIfTI (wm, gm, csf) of esdmri_fit, scored
            against the phantom's true fractions over its brain mask.
        tractogram : string, optional
            Tractogram (.trk, .tck, .trx) tracked from the input, scored
            against --end_regions (one file, or one per input).
        end_regions : string, optional
            NIfTI end regions of the true bundles (folder or glob), two per
            bundle: in sorted order bundle 1 start, bundle 1 end, bundle 2
            start, ... (what the held-out phantom's save writes; ISMRM 2015's
            <bundle>_head/<bundle>_tail files sort the same way).
        bundle_masks : string, optional
            The true bundles (folder or glob), one per bundle in the order of
            --end_regions: NIfTI masks or tractograms (their voxels), for
            overlap and overreach.
        relative_peak_threshold : float, optional
            Peak threshold for SH input.
        min_separation_angle : float, optional
            Degrees; closer peaks of SH input are merged.
        npeaks : int, optional
            Most peaks per voxel of SH input.
        match_angle : float, optional
            Largest angle (degrees) between a matched peak and fibre.
        out_dir : string, optional
            Output folder (default: current folder).
        out_csv : string, optional
            Peak metrics table (CSV).
        out_fractions_csv : string, optional
            Fraction metrics (CSV, with --fractions).
        out_tracts_csv : string, optional
            Tractography scores (CSV, with --tractogram).

        Returns
        -------
        tables : list of list of dict
            The peak table of each input.

        References
        ----------
        .. [1] Elaldi A, Dey N, Kim H, Gerig G. Equivariant Spherical Deconvolution:
           Learning Sparse Orientation Distribution Functions from Spherical Data.
           Information Processing in Medical Imaging (IPMI), 2021.

        .. [2] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-Equivariant Networks for
           Spherical Deconvolution in Diffusion MRI. Medical Imaging with Deep
           Learning (MIDL), 2023.

        .. [3] Rafael-Patino J, Girard G, Truffet R, Pizzolato M, Caruyer E,
           Thiran JP. The Diffusion-Simulated Connectivity (DiSCo) dataset.
           Data in Brief 38:107429, 2021.
        """
        skip = tuple(name for name, given in (("out_fractions_csv", fractions),
                                              ("out_tracts_csv", tractogram)) if not given)
        io_it = self.get_io_iterator(skip_outputs=skip)
        masks = match_optional("mask", mask, len(io_it))
        fraction_maps = match_optional("fractions", fractions, len(io_it))
        tractograms = match_optional("tractogram", tractogram, len(io_it))
        if tractogram is not None and end_regions is None:
            raise ValueError("--tractogram needs --end_regions (the true bundles' ends)")
        tables = []
        for paths, mask_path, fractions_path, tractogram_path in zip(
                io_it, masks, fraction_maps, tractograms):
            fodf_path, truth_path, csv_path, fractions_csv_path, tracts_csv_path = paths
            directions = predicted_peaks(fodf_path, relative_peak_threshold,
                                         min_separation_angle, npeaks)
            truth = read_ground_truth(truth_path, directions.shape[:3])
            score_mask = (truth.mask if mask_path is None
                          else load_mask(mask_path, directions.shape[:3]))
            rows = peak_table(evaluate_peaks(directions, truth.fibre_dirs, score_mask,
                                             threshold_deg=match_angle))
            print(f"{fodf_path} vs {truth.source}")
            print(format_table(rows, PEAK_COLUMNS))
            save_table(csv_path, rows, PEAK_COLUMNS)
            written = [csv_path]
            if fractions_path is not None:
                row = score_fractions(fractions_path, truth)
                print(format_table([row], list(row)))
                save_table(fractions_csv_path, [row], list(row))
                written.append(fractions_csv_path)
            if tractogram_path is not None:
                row = score_tracts(tractogram_path, end_regions, bundle_masks, truth)
                print(f"{tractogram_path} vs {end_regions}")
                print(format_table([row], TRACT_COLUMNS))
                save_table(tracts_csv_path, [row], TRACT_COLUMNS)
                written.append(tracts_csv_path)
            logger.info(f"wrote {', '.join(written)}")
            tables.append(rows)
        return tables


def score_fractions(path, truth):
    """Fraction metrics of a tissue-fraction NIfTI over the phantom's brain mask.

    The tissues of the map are the names ``esdmri_fit`` records in its header;
    a tissue that the fit left out (e.g. CSF, dropped when the response
    estimator found no CSF voxel) counts as fraction 0 everywhere, which is
    what the fit states. A map without names must hold (wm, gm, csf).
    """
    tissues = ("wm", "gm", "csf")
    if truth.tissue_fractions is None:
        raise ValueError(f"--fractions needs a ground truth with tissue fractions "
                         f"(an esdmri phantom); {truth.source} has none")
    predicted, names = load_fractions(path)
    if not set(names) <= set(tissues):
        if predicted.shape[-1] != len(tissues):
            raise ValueError(f"fractions {path} has {predicted.shape[-1]} volumes and no "
                             f"tissue names in its header; expected (wm, gm, csf)")
        names = tissues
    if predicted.shape[:3] != truth.tissue_fractions.shape[:3]:
        raise ValueError(f"fractions {path} has grid {predicted.shape[:3]}; the ground "
                         f"truth has {truth.tissue_fractions.shape[:3]}")
    full = np.zeros(truth.tissue_fractions.shape)
    for volume, name in enumerate(names):
        full[..., tissues.index(name)] = predicted[..., volume]
    brain = truth.tissue_fractions.sum(axis=-1) > 0
    return evaluate_fractions(full, truth.tissue_fractions, brain, tissues=tissues)


def _load_streamlines(path, reference):
    """Streamlines of a tractogram in voxel coordinates (voxel centres at integers)."""
    tractogram = load_tractogram(str(path), reference, bbox_valid_check=False)
    tractogram.to_vox()
    tractogram.to_center()
    return tractogram.streamlines


def score_tracts(tractogram_path, end_regions, bundle_masks, truth):
    """Tractometer scores of a tractogram (see :func:`esdmri.metrics.score_tractogram`)."""
    region_paths = [str(p) for p in _resolve_input("end_regions", end_regions, False)]
    if len(region_paths) % 2:
        raise ValueError(f"end_regions must hold two files per bundle (start, end), got "
                         f"{len(region_paths)}")
    volumes = [read_nifti(path, "end region") for path in region_paths]
    shape, affine = volumes[0][0].shape, volumes[0][1]
    for path, (data, _) in zip(region_paths, volumes):
        if data.shape != shape:
            raise ValueError(f"end region {path} has shape {data.shape}, {region_paths[0]} "
                             f"has {shape}")
    regions = [volume > 0 for volume, _ in volumes]
    pairs = list(zip(regions[0::2], regions[1::2]))
    masks = None
    if bundle_masks is not None:
        masks = []
        for path in _resolve_input("bundle_masks", bundle_masks, False):
            if str(path).endswith(TRACTOGRAM_SUFFIXES):
                from dipy.tracking.utils import density_map
                lines = _load_streamlines(path, region_paths[0])
                masks.append(density_map(lines, np.eye(4), shape) > 0)
            else:
                masks.append(read_nifti(path, "bundle mask")[0] > 0)
    streamlines = _load_streamlines(tractogram_path, region_paths[0])
    fibre_dirs = truth.fibre_dirs if truth.fibre_dirs.shape[:3] == shape else None
    scores = score_tractogram(streamlines, pairs, bundle_masks=masks, fibre_dirs=fibre_dirs)
    logger.debug(f"tractography scores of {tractogram_path} (affine {affine.tolist()})")
    return {column: scores[column] for column in TRACT_COLUMNS}


def main():
    """Entry point of ``esdmri_eval``."""
    run_workflow(EvaluateFlow())


if __name__ == "__main__":
    main()
