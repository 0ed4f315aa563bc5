"""``esdmri_track``: streamlines from fODFs with DIPY's local tracking.

Examples
--------
``esdmri_track fit/fodf_sh.nii.gz --out_dir fit`` seeds and stops on the
fODF's relative peak amplitude (> 0.2); ``esdmri_track fit/peaks.pam5 --seeds wm_mask.nii.gz
--stop fit/fractions.nii.gz --threshold 0.5 --tracker prob
--out_tractogram prob.trx`` seeds in a mask and stops where the WM fraction
(first volume of the fractions map) drops below 0.5.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Space, StatefulTractogram

from esdmri.tracking import sh_peak_amplitude, track

from .io import (EsdmriWorkflow, load_fodf, match_optional, read_nifti, read_pam,
                 run_workflow, save_streamlines)
from .io import logger

TRACTOGRAM_FORMATS = (".trk", ".trx", ".tck")


def reference_header(shape, affine):
    """A NIfTI header describing the grid, to anchor a tractogram to it."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def load_stop_map(path, volume=0):
    """A 3D stopping map from a NIfTI file (a 4D file gives ``volume``) or a .pam5 GFA."""
    if str(path).endswith(".pam5"):
        pam = read_pam(path)
        if pam.gfa is None:
            raise ValueError(f"the stopping map {path} holds no GFA")
        return np.asarray(pam.gfa, dtype=float)
    values, _ = read_nifti(path, "stopping map")
    if values.ndim == 4:
        if not 0 <= volume < values.shape[-1]:
            raise ValueError(f"stop_volume must be in [0, {values.shape[-1]}) for {path}, "
                             f"got {volume}")
        values = values[..., volume]
    if values.ndim != 3:
        raise ValueError(f"the stopping map {path} must be 3D or 4D, got shape {values.shape}")
    return values


class TrackFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_track"

    def run(self, input_files, seeds=None, stop=None, threshold=0.2, stop_volume=0,
            tracker="det", step_size=0.5, max_angle=30.0, seed_density=1,
            pmf_threshold=0.1, min_length=10.0, max_length=250.0, random_seed=0,
            out_dir="", out_tractogram="tractogram.trk"):
        """Track streamlines through fODFs with DIPY's LocalTracking.

        The fODF is read from a SH NIfTI (DIPY's default basis, as
        esdmri_fit writes it) or from the SH coefficients of a .pam5 file.
        Tracking goes on while the stopping map exceeds the threshold; the
        stopping map defaults to the fODF's peak amplitude relative to its
        99th percentile over the volume (it falls in GM and CSF, where GFA,
        scale-free, stays high) and the seeds to the voxels above the
        threshold. Streamlines are saved in RAS mm against the
        input grid: .trk by default, .trx or .tck when out_tractogram says so.
        Example: esdmri_track fit/peaks.pam5 --seeds mask.nii.gz --tracker prob
        --out_dir tracks.

        Parameters
        ----------
        input_files : string
            fODF SH NIfTI or .pam5 file(s); a glob processes one subject at a time.
        seeds : string, optional
            Seed mask NIfTI (non-zero voxels; one file, or one per subject).
        stop : string, optional
            Stopping map: a NIfTI (e.g. GFA, or the fractions map of
            esdmri_fit, whose volume stop_volume is used: 0 is WM) or a .pam5
            file (its GFA). Default: the fODF's relative peak amplitude.
        threshold : float, optional
            Tracking stops where the stopping map falls to this value or below.
        stop_volume : int, optional
            Volume of a 4D stopping map (0: WM fraction of esdmri_fit's map).
        tracker : string, optional
            det (DeterministicMaximumDirectionGetter) or prob
            (ProbabilisticDirectionGetter).
        step_size : float, optional
            Step size in mm.
        max_angle : float, optional
            Largest angle (degrees) between successive steps.
        seed_density : int, optional
            Seeds per voxel along each axis (2 gives 8 seeds per voxel).
        pmf_threshold : float, optional
            fODF values below this fraction of the voxel maximum are not followed.
        min_length : float, optional
            Shortest streamline kept (mm).
        max_length : float, optional
            Longest streamline (mm).
        random_seed : int, optional
            Seed of the random generator (probabilistic tracking).
        out_dir : string, optional
            Output folder (default: current folder).
        out_tractogram : string, optional
            Tractogram file name (.trk, .trx or .tck).

        Returns
        -------
        tractograms : list of StatefulTractogram
            One per subject.

        References
        ----------
        .. [1] Elaldi A, Dey N, Kim H, Gerig G. Equivariant Spherical Deconvolution:
           Learning Sparse Orientation Distribution Functions from Spherical Data.
           Information Processing in Medical Imaging (IPMI), 2021.

        .. [2] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-Equivariant Networks for
           Spherical Deconvolution in Diffusion MRI. Medical Imaging with Deep
           Learning (MIDL), 2023.
        """
        if Path(out_tractogram).suffix.lower() not in TRACTOGRAM_FORMATS:
            raise ValueError(f"out_tractogram must end with one of "
                             f"{', '.join(TRACTOGRAM_FORMATS)}, got {out_tractogram!r}")
        io_it = self.get_io_iterator()
        seed_paths = match_optional("seeds", seeds, len(io_it))
        stop_paths = match_optional("stop", stop, len(io_it))
        tractograms = []
        for (fodf_path, out_path), seed_path, stop_path in zip(io_it, seed_paths, stop_paths):
            shm_coeff, affine, pam = load_fodf(fodf_path)
            if stop_path is not None:
                stop_map = load_stop_map(stop_path, stop_volume)
            else:
                stop_map = sh_peak_amplitude(shm_coeff)
            seed_mask = (None if seed_path is None
                         else np.squeeze(read_nifti(seed_path, "seed mask")[0]) > 0)
            streamlines = track(
                shm_coeff, affine, stop_map, threshold=threshold, seed_mask=seed_mask,
                tracker=tracker, step_size=step_size, max_angle=max_angle,
                seed_density=seed_density, pmf_threshold=pmf_threshold,
                min_length=min_length, max_length=max_length, random_seed=random_seed)
            reference = (fodf_path if pam is None
                         else reference_header(shm_coeff.shape[:3], affine))
            tractogram = StatefulTractogram(streamlines, reference, Space.RASMM)
            save_streamlines(out_path, tractogram)
            logger.info(f"{fodf_path}: {len(streamlines)} streamlines ({tracker}) -> "
                        f"{out_path}")
            tractograms.append(tractogram)
        return tractograms


def main():
    """Entry point of ``esdmri_track``."""
    run_workflow(TrackFlow())


if __name__ == "__main__":
    main()
