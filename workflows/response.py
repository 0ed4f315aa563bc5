"""``esdmri_response``: tissue response functions of a scan, as MRtrix3 text files.

Examples
--------
``esdmri_response dwi.nii.gz dwi.bval dwi.bvec --mask mask.nii.gz
--out_dir responses`` writes ``wm.txt``, ``gm.txt`` and ``csf.txt``
(one row per shell, b0 first, ``# Shells:`` header), readable by MRtrix3's
``dwi2fod msmt_csd`` and by ``esdmri_fit --response_wm ...``. Single-shell
scans give ``wm.txt`` only.
"""

import contextlib

import numpy as np
from dipy.utils.logging import logger

from esdmri.atomic import staged_output
from esdmri.reconst.inputs import check_data
from esdmri.response import TissueResponse
from esdmri.shm import group_shells

from .io import EsdmriWorkflow, load_dwi, load_mask, match_optional, run_workflow


def estimate_tissue_response(gtab, data, mask=None, roi_radii=10, wm_fa_thr=0.7,
                             gm_fa_thr=0.2, csf_fa_thr=0.1, gm_md_thr=0.0007,
                             csf_md_thr=0.002, sh_order_max=8):
    """Responses from the scan with DIPY's estimators.

    The rule of :func:`esdmri.reconst.models.estimate_response`, with the
    ROI and FA options exposed: WM/GM/CSF (DIPY's MSMT tools) when the scan
    has two or more diffusion-weighted shells, WM only (DIPY's
    ``auto_response_ssst``) otherwise.

    Parameters
    ----------
    gtab : GradientTable
    data : ndarray, shape (X, Y, Z, N)
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels allowed as response voxels.
    roi_radii : int
        Half-width in voxels of the central ROI searched for response voxels.
    wm_fa_thr : float
        FA above which a voxel counts as single-fibre WM.
    gm_fa_thr, csf_fa_thr, gm_md_thr, csf_md_thr : float
        FA and mean diffusivity (mm^2/s) below which a voxel counts as GM or
        CSF (multi-shell only), see ``dipy.reconst.mcsd.mask_for_response_msmt``.
    sh_order_max : int
        Even SH order of the WM response.

    Returns
    -------
    response : TissueResponse
    """
    shell_bvals, _ = group_shells(gtab)
    if np.count_nonzero(shell_bvals > 0) >= 2:
        return TissueResponse.from_dipy_msmt(
            gtab, data, mask=mask, roi_radii=roi_radii, wm_fa_thr=wm_fa_thr,
            gm_fa_thr=gm_fa_thr, csf_fa_thr=csf_fa_thr, gm_md_thr=gm_md_thr,
            csf_md_thr=csf_md_thr, sh_order_max=sh_order_max)
    if mask is not None:
        # from_dipy_ssst takes no mask: zeroed voxels have no FA, so the noisy
        # background cannot pass as high-FA white matter.
        data = np.where(mask[..., None], data, 0)
    return TissueResponse.from_dipy_ssst(gtab, data, roi_radii=roi_radii, fa_thr=wm_fa_thr,
                                         sh_order_max=sh_order_max)


class ResponseFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_response"

    def run(self, input_files, bvalues_files, bvectors_files, mask=None,
            b0_threshold=50.0, roi_radii=10, wm_fa_thr=0.7, gm_fa_thr=0.2,
            csf_fa_thr=0.1, gm_md_thr=0.0007, csf_md_thr=0.002, sh_order_max=8,
            out_dir="", out_wm="wm.txt", out_gm="gm.txt", out_csf="csf.txt"):
        """Estimate WM/GM/CSF response functions and write MRtrix3 text files.

        Multi-shell scans (two or more diffusion-weighted shells) give WM, GM
        and CSF responses from DIPY's mask_for_response_msmt and
        response_from_mask_msmt; single-shell scans give a WM response from
        DIPY's auto_response_ssst. Each file has a "# Shells:" header and one
        row of zonal SH coefficients per shell, b0 first (MRtrix3 layout).

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
        roi_radii : int, optional
            Half-width (voxels) of the central cube searched for response voxels.
        wm_fa_thr : float, optional
            FA above which a voxel is single-fibre white matter.
        gm_fa_thr : float, optional
            FA below which a voxel may be grey matter (multi-shell).
        csf_fa_thr : float, optional
            FA below which a voxel may be CSF (multi-shell).
        gm_md_thr : float, optional
            Mean diffusivity (mm^2/s) below which a low-FA voxel is grey matter.
            DIPY's default 0.0007 misses GM with a higher MD (e.g. esdmri's
            phantom, 0.0008): raise it then.
        csf_md_thr : float, optional
            Mean diffusivity (mm^2/s) above which a low-FA voxel is CSF.
        sh_order_max : int, optional
            Even SH order of the WM response.
        out_dir : string, optional
            Output folder (default: current folder).
        out_wm : string, optional
            WM response file name.
        out_gm : string, optional
            GM response file name (multi-shell scans only).
        out_csf : string, optional
            CSF response file name (multi-shell scans only).

        Returns
        -------
        responses : list of TissueResponse
            One per subject.
        """
        io_it = self.get_io_iterator()
        masks = match_optional("mask", mask, len(io_it))
        responses = []
        for (dwi, bvals, bvecs, wm_path, gm_path, csf_path), mask_path in zip(io_it, masks):
            data, _, gtab = load_dwi(dwi, bvals, bvecs, b0_threshold)
            brain = load_mask(mask_path, data.shape[:3])
            # NaN or inf in the mask named here, not as DIPY's LinAlgError later;
            # outside the mask they are set to 0.
            data = check_data(data, gtab, brain)
            response = estimate_tissue_response(
                gtab, data, brain, roi_radii=roi_radii,
                wm_fa_thr=wm_fa_thr, gm_fa_thr=gm_fa_thr, csf_fa_thr=csf_fa_thr,
                gm_md_thr=gm_md_thr, csf_md_thr=csf_md_thr, sh_order_max=sh_order_max)
            paths = dict(zip(("wm", "gm", "csf"), (wm_path, gm_path, csf_path)))
            files = [paths[tissue] for tissue in response.tissues]
            # Existing files were refused or allowed (--force) by get_io_iterator.
            with contextlib.ExitStack() as stack:
                staged = [stack.enter_context(staged_output(path)) for path in files]
                response.to_mrtrix(staged, force=True)
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
