"""``esdmri_response``: tissue response functions of a scan, as MRtrix3 text files.

Examples
--------
``esdmri_response dwi.nii.gz dwi.bval dwi.bvec --mask mask.nii.gz
--out_dir responses`` writes ``wm.txt``, ``gm.txt`` and ``csf.txt``
(one row per shell, b0 first, ``# Shells:`` header), readable by MRtrix3's
``dwi2fod msmt_csd`` and by ``esdmri_fit --response_wm ...``. Single-shell
scans give ``wm.txt`` and ``csf.txt`` (``wm.txt`` only without CSF voxels).
"""

import numpy as np

from esdmri.reconst.inputs import check_data
from esdmri.response import estimate_response

from .io import EsdmriWorkflow, load_dwi, load_mask, match_optional, run_workflow
from .io import logger


class ResponseFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_response"

    def run(self, input_files, bvalues_files, bvectors_files, mask=None,
            b0_threshold=50.0, bvecs_tol=0.01, sh_order_max=8, out_dir="", out_wm="wm.txt",
            out_gm="gm.txt", out_csf="csf.txt"):
        """Estimate WM/GM/CSF response functions and write MRtrix3 text files.

        The estimator of the Python API (esdmri.response.estimate_response):
        single-fibre WM, GM and CSF voxels chosen without hand-set
        thresholds, each tissue's signal fitted as a smooth function of b,
        so any b-value scheme works (shells or not). A scan gets as many
        tissues as it has distinct shells, b0 included (WM and CSF from b0
        plus one shell), except b0 plus one shell at b <= 1500 with 30
        directions or more, which gets all three (the fit charges the GM and
        CSF fractions there); a tissue without voxels is left out with a
        warning.
        Each file has a "# Shells:" header and one row of zonal SH
        coefficients per shell, b0 first (MRtrix3 layout). Example:
        esdmri_response dwi.nii.gz dwi.bval dwi.bvec --mask mask.nii.gz
        --out_dir responses (then esdmri_fit ... --response_wm
        responses/wm.txt --response_gm responses/gm.txt --response_csf
        responses/csf.txt).

        Parameters
        ----------
        input_files : string
            4D diffusion NIfTI file(s); a glob processes one subject at a time.
        bvalues_files : string
            FSL b-value file(s).
        bvectors_files : string
            FSL b-vector file(s).
        mask : string, optional
            Brain mask NIfTI (one file, or a glob with one file per subject):
            response voxels are taken inside it only.
        b0_threshold : float, optional
            b-values up to this count as b0.
        bvecs_tol : float, optional
            Tolerance of DIPY's check that the b-vectors have unit length.
        sh_order_max : int, optional
            Even SH order of the WM response.
        out_dir : string, optional
            Output folder (default: current folder).
        out_wm : string, optional
            WM response file name.
        out_gm : string, optional
            GM response file name (scans with two or more shells).
        out_csf : string, optional
            CSF response file name.

        Returns
        -------
        responses : list of TissueResponse
            One per subject.

        References
        ----------
        .. [1] Jeurissen B, Tournier JD, Dhollander T, Connelly A, Sijbers J.
           Multi-tissue constrained spherical deconvolution for improved analysis
           of multi-shell diffusion MRI data. NeuroImage 103:411-426, 2014.

        .. [2] Elaldi A, Dey N, Kim H, Gerig G. Equivariant Spherical Deconvolution:
           Learning Sparse Orientation Distribution Functions from Spherical Data.
           Information Processing in Medical Imaging (IPMI), 2021.

        .. [3] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-Equivariant Networks for
           Spherical Deconvolution in Diffusion MRI. Medical Imaging with Deep
           Learning (MIDL), 2023.
        """
        io_it = self.get_io_iterator()
        masks = match_optional("mask", mask, len(io_it))
        responses = []
        for (dwi, bvals, bvecs, wm_path, gm_path, csf_path), mask_path in zip(io_it, masks):
            data, _, gtab = load_dwi(dwi, bvals, bvecs, b0_threshold, bvecs_tol)
            brain = load_mask(mask_path, data.shape[:3])
            # NaN or inf in the mask named here, not as a LinAlgError later;
            # outside the mask they are set to 0.
            data = check_data(data, gtab, brain)
            response = estimate_response(gtab, data, brain, sh_order_max=sh_order_max)
            paths = dict(zip(("wm", "gm", "csf"), (wm_path, gm_path, csf_path)))
            files = [paths[tissue] for tissue in response.tissues]
            # Existing files were refused or allowed (--force) by get_io_iterator.
            response.to_mrtrix(files, force=True)
            logger.info(f"{dwi}: {', '.join(response.tissues)} responses for shells "
                        f"{np.round(response.bvals).astype(int).tolist()} -> "
                        f"{', '.join(files)}")
            responses.append(response)
        return responses


def main():
    """Entry point of ``esdmri_response``."""
    run_workflow(ResponseFlow())


if __name__ == "__main__":
    main()
