"""``esdmri_fit``: deconvolve a scan with ESD, RT-ESD or C-ESD and write its fODFs.

Examples
--------
``esdmri_fit dwi.nii.gz dwi.bval dwi.bvec --mask mask.nii.gz --out_dir fit``
fits RT-ESD with its defaults (no training on the scan: the linear prior,
corrected by the shipped pretrained network, ``--pretrained``, and refined with the
spatially coupled loss, ``--refine_tv``) and responses estimated from the scan, and writes
``fodf_sh.nii.gz``, ``fractions.nii.gz``, ``peaks.pam5`` and ``model.pt``;
``--epochs 10`` fine-tunes the shipped network on the scan first (``--pretrained
none --epochs 30`` trains a network from scratch instead) and adds
``training_curve.png``. With MRtrix3 responses and an MRtrix3 copy of the
fODFs: ``esdmri_fit dwi.nii.gz dwi.bval dwi.bvec --response_wm wm.txt
--response_gm gm.txt --response_csf csf.txt --tournier``.
"""

import matplotlib.pyplot as plt
import numpy as np

from esdmri.reconst.config import PEAK_THRESHOLD, option_defaults
from esdmri.response import TissueResponse
from esdmri.shm import descoteaux_to_tournier
from esdmri.viz import plot_training_curves, save_figure

from .io import (FRACTIONS_DESCRIPTION, EsdmriWorkflow, display_name, load_dwi, load_mask,
                 match_optional, run_workflow, save_map, save_peaks, verbose_logging)
from .io import logger

# The commands' defaults are the configuration classes' fields (torch-free, so
# that --help answers without importing torch), so a command and the Python
# call it wraps cannot drift apart (they did: esdmri_fit once trained a network
# 16x as costly as RTESDModel). RTESDModel's own keyword defaults and the
# network kinds (esdmri.reconst.models.MODEL_CLASSES) are repeated here;
# tests/test_workflows.py checks that they agree.
MODEL_DEFAULTS = {**option_defaults(), "device": "cpu"}
MODEL_KINDS = ("rtesd", "esd", "cesd")


def check_model_kind(model):
    """Raise ValueError unless ``model`` names a network kind."""
    if model not in MODEL_KINDS:
        raise ValueError(f"model must be one of {', '.join(MODEL_KINDS)}, got {model!r}")


def read_responses(response_wm=None, response_gm=None, response_csf=None):
    """MRtrix3 response files -> TissueResponse, or None when none is given.

    Parameters
    ----------
    response_wm, response_gm, response_csf : str, optional
        MRtrix3 response text files; WM is required when any is given.

    Returns
    -------
    response : TissueResponse or None
    """
    files = {"wm": response_wm, "gm": response_gm, "csf": response_csf}
    given = {tissue: path for tissue, path in files.items() if path is not None}
    if not given:
        return None
    if "wm" not in given:
        raise ValueError("response_wm is required when response_gm or response_csf is "
                         "given: the WM response defines the fODF")
    return TissueResponse.from_mrtrix(list(given.values()), tuple(given))


def write_fit_outputs(fit, affine, out_shm, out_fractions, out_peaks, out_tournier=None,
                      relative_peak_threshold=PEAK_THRESHOLD, min_separation_angle=25, npeaks=5,
                      vertex_peaks=False):
    """Write the maps of a deconvolution fit.

    Parameters
    ----------
    fit : esdmri.reconst.fit.DeconvolutionFit
    affine : ndarray, shape (4, 4)
    out_shm : str
        WM fODF SH NIfTI in DIPY's default basis (legacy descoteaux07).
    out_fractions : str
        4D NIfTI of volume fractions, one volume per tissue in the order of
        the response (wm, gm, csf; on single-shell data above b = 1500 or with
        fewer than 30 directions wm and csf, or wm only), recorded
        in the header's description.
    out_peaks : str
        DIPY ``.pam5`` peaks (with the SH coefficients and GFA).
    out_tournier : str, optional
        Copy of the fODF in MRtrix3's ``tournier07`` basis.
    relative_peak_threshold, min_separation_angle, npeaks
        Peak extraction, see :meth:`DeconvolutionFit.peaks`.
    vertex_peaks : bool
        Peaks at the search sphere's vertices (DIPY's ``peak_directions``),
        not refined between them (``subvertex=False``).

    Returns
    -------
    pam : dipy.direction.peaks.PeaksAndMetrics
        The peaks written to ``out_peaks``.
    """
    save_map(out_shm, fit.shm_coeff, affine,
             f"esdmri WM fODF SH order {fit.sh_order_max} descoteaux07 legacy")
    if out_tournier is not None:
        save_map(out_tournier,
                 descoteaux_to_tournier(fit.shm_coeff_descoteaux07, fit.sh_order_max),
                 affine, f"esdmri WM fODF SH order {fit.sh_order_max} tournier07")
    fractions = fit.volume_fractions
    save_map(out_fractions, np.stack(list(fractions.values()), axis=-1), affine,
             FRACTIONS_DESCRIPTION + ",".join(fractions))
    pam = fit.peaks(relative_peak_threshold=relative_peak_threshold,
                    min_separation_angle=min_separation_angle, npeaks=npeaks, affine=affine,
                    subvertex=not vertex_peaks)
    save_peaks(out_peaks, pam, affine)
    return pam


class FitFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_fit"

    def run(self, input_files, bvalues_files, bvectors_files, mask=None,
            response_wm=None, response_gm=None, response_csf=None, model="rtesd",
            b0_threshold=50.0, bvecs_tol=0.01, sh_order_max=MODEL_DEFAULTS["sh_order_max"],
            nside=MODEL_DEFAULTS["nside"], depth=MODEL_DEFAULTS["depth"],
            filter_start=MODEL_DEFAULTS["filter_start"],
            block_size=MODEL_DEFAULTS["block_size"], epochs=MODEL_DEFAULTS["epochs"],
            batch_size=MODEL_DEFAULTS["batch_size"], lr=MODEL_DEFAULTS["lr"],
            train_windows=MODEL_DEFAULTS["train_windows"],
            total_variation=MODEL_DEFAULTS["train_tv"],
            refine_steps=MODEL_DEFAULTS["refine_steps"], refine_tv=MODEL_DEFAULTS["refine_tv"],
            pretrained="default", noise_floor="none", device=MODEL_DEFAULTS["device"],
            seed=MODEL_DEFAULTS["seed"], tournier=False,
            relative_peak_threshold=PEAK_THRESHOLD, min_separation_angle=25.0, npeaks=5,
            vertex_peaks=False, out_dir="",
            out_shm="fodf_sh.nii.gz", out_tournier="fodf_sh_tournier07.nii.gz",
            out_fractions="fractions.nii.gz", out_peaks="peaks.pam5",
            out_model="model.pt", out_curve="training_curve.png"):
        """Deconvolve a scan with an equivariant deconvolution model (no labels needed).

        The model (RT-ESD by default) fits fODFs and tissue fractions whose
        convolution with the response functions reproduces the measured
        signal, with a total variation coupling neighbouring voxels
        (--refine_tv). By default no network is trained on the scan: its
        linear prior is corrected by the network shipped with esdmri
        (--pretrained) and refined by that spatially coupled descent of the
        loss (the most accurate setting measured, docs/benchmarks.md; ESD,
        RT-ESD and C-ESD then give the same fit); with --epochs N the shipped
        network is first fine-tuned on the scan by the scan's own loss, and
        with --pretrained none --epochs N a network is trained on the scan
        from scratch, as in the papers. Outputs: the WM fODF as SH
        coefficients in DIPY's default basis (legacy descoteaux07, what
        dipy_track and DIPY's sh_to_sf read), optionally an MRtrix3
        (tournier07) copy, a 4D map of tissue volume fractions (volumes in
        the order wm, gm, csf; wm and csf, or wm only, on single-shell data above
        b = 1500 or with fewer than 30 directions), DIPY peaks
        (.pam5), the model (for esdmri_apply) and, when it was trained, a
        training-curve figure. Example: esdmri_fit dwi.nii.gz dwi.bval dwi.bvec
        --mask mask.nii.gz --out_dir fit (then esdmri_track fit/peaks.pam5
        --out_dir tracks).

        Parameters
        ----------
        input_files : string
            4D diffusion NIfTI file(s); a glob processes one subject at a time.
        bvalues_files : string
            FSL b-value file(s).
        bvectors_files : string
            FSL b-vector file(s).
        mask : string, optional
            Brain mask NIfTI (one file, or a glob with one file per subject);
            default: every voxel with a positive b0 signal.
        response_wm : string, optional
            MRtrix3 WM response file (e.g. from esdmri_response or
            dwi2response); default: estimated from each scan inside the mask
            with the estimator of esdmri_response and of the Python API.
        response_gm : string, optional
            MRtrix3 GM response file.
        response_csf : string, optional
            MRtrix3 CSF response file.
        model : string, optional
            Network: rtesd (roto-translation equivariant), esd (voxel-wise
            equivariant) or cesd (neighbourhood concatenation). Untrained (no
            --epochs) all three give the same spatially coupled fit.
        b0_threshold : float, optional
            b-values up to this count as b0.
        bvecs_tol : float, optional
            Tolerance of DIPY's check that the b-vectors have unit length.
        sh_order_max : int, optional
            Even SH order of the WM fODF (default: 14, 12, 10 or 8, the highest
            that the scan's distinct directions determine, and 14 on one shell
            above b = 1500 of 45 directions or more, on nside 8). This and the
            network and training options below default to the Python API's
            (esdmri.reconst.RTESDModel).
        nside : int, optional
            HEALPix resolution of the network's sphere (a power of 2).
        depth : int, optional
            U-Net levels (each halves nside).
        filter_start : int, optional
            Channels of the first U-Net level.
        block_size : int, optional
            Edge (voxels) of the training windows and inference blocks;
            smaller blocks need less memory.
        epochs : int, optional
            Training passes over the mask (0: no training). A single-scan fit
            takes at most train_windows optimiser steps over all epochs
            (esdmri.reconst.config.TrainingConfig), so a large scan may stop
            before the last epoch.
        batch_size : int, optional
            Training windows per optimiser step (default: 4 fine-tuning the
            shipped network, 1 training one from scratch).
        lr : float, optional
            Adam learning rate (default: 1e-3 fine-tuning the shipped network,
            1.7e-3 training one from scratch).
        train_windows : int, optional
            Most optimiser steps of one window batch over all epochs (only
            with --epochs > 0): the budget that bounds training on a large
            scan (a warning says when it stopped training early).
        total_variation : float, optional
            Weight of a spatial total-variation term in the training loss
            (only with --epochs > 0; 0: off, and fine-tuning then takes the
            refinement's, --refine_tv). The fit's own spatial coupling is
            --refine_tv.
        refine_steps : int, optional
            Most steps of the spatially coupled descent of the loss from the
            network's output (it stops earlier once the loss has converged;
            0: the network's output as is, voxel by voxel).
        refine_tv : float, optional
            Weight of the total variation between neighbouring voxels in that
            descent, relative to the signal's likelihood at the noise level
            estimated from the scan (0: voxel by voxel; default: 10, or 5 on
            a single-shell scan).
        pretrained : string, optional
            Network that corrects the linear prior before the refinement:
            default (the weights shipped with esdmri for this --model,
            pretrained on simulated scans of many acquisitions), a path to
            other weights (esdmri_pretrain writes them), or none (the
            network-free fit). With --epochs N those weights are fine-tuned on
            the scan (the model file records which weights they started
            from); none with --epochs N trains a network from scratch.
        noise_floor : string, optional
            none (the default: the magnitudes are the signal), power or
            rician_mean: debias the magnitudes for the Rician noise floor with
            the scan's noise level before the fit, and fit an estimated
            response as Rician means (docs/benchmarks.md, "Debiasing the noise
            floor": on the test phantoms, with sparsity 1.5e-4, a mean
            crossing error of 6.5 against 6.8 degrees and as many missed
            fibres, but worse on two families, so not the default); model:
            leave the magnitudes as they are, fit an estimated response as
            Rician means and let the refinement's data term predict each
            magnitude as the Rician mean of the forward signal.
        device : string, optional
            cpu, cuda or cuda:N.
        seed : int, optional
            Seed of the weights and of the window order.
        tournier : bool, optional
            Also write the fODF in MRtrix3's tournier07 basis (out_tournier).
        relative_peak_threshold : float, optional
            Peaks below this fraction of the largest peak are dropped (default
            0.2, chosen on the dev phantoms; DIPY's is 0.5).
        min_separation_angle : float, optional
            Degrees; closer peaks are merged.
        npeaks : int, optional
            Most peaks per voxel in the .pam5 file.
        vertex_peaks : bool, optional
            Keep the peaks at the search sphere's vertices, as DIPY's
            peak_directions returns them (about 3.8 degrees apart), instead of
            refining each one between them.
        out_dir : string, optional
            Output folder (default: current folder).
        out_shm : string, optional
            WM fODF SH NIfTI (DIPY default basis).
        out_tournier : string, optional
            WM fODF SH NIfTI in the tournier07 basis (with --tournier).
        out_fractions : string, optional
            4D tissue volume-fraction NIfTI.
        out_peaks : string, optional
            DIPY peaks file (.pam5).
        out_model : string, optional
            Model file, trained or not (read by esdmri_apply).
        out_curve : string, optional
            Training-curve figure (.png; written only with --epochs > 0).

        Returns
        -------
        fits : list of DeconvolutionFit
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
        check_model_kind(model)
        from esdmri.reconst.models import MODEL_CLASSES  # torch: only when a fit runs

        response = read_responses(response_wm, response_gm, response_csf)
        skipped = (() if tournier else ("out_tournier",)) + (() if epochs else ("out_curve",))
        io_it = self.get_io_iterator(skip_outputs=skipped)
        masks = match_optional("mask", mask, len(io_it))
        fits = []
        for paths, mask_path in zip(io_it, masks):
            (dwi, bvals, bvecs, shm_path, tournier_path, fractions_path, peaks_path,
             model_path, curve_path) = paths
            data, affine, gtab = load_dwi(dwi, bvals, bvecs, b0_threshold, bvecs_tol)
            brain = load_mask(mask_path, data.shape[:3])
            deconvolution = MODEL_CLASSES[model](
                gtab, response, sh_order_max=sh_order_max, nside=nside, depth=depth,
                filter_start=filter_start, block_size=block_size, epochs=epochs,
                batch_size=batch_size, lr=lr, train_windows=train_windows,
                train_tv=total_variation, refine_steps=refine_steps, refine_tv=refine_tv,
                pretrained=pretrained_option(pretrained),
                noise_floor=noise_floor_option(noise_floor), device=device, seed=seed,
                verbose=verbose_logging())
            logger.info(f"{dwi}: fitting {model} ({epochs} training epochs on {device})")
            # The fit checks the scan once (NaN or inf in the mask are named
            # before the response estimation would fail on them), then
            # estimates the subject's response when none was given.
            fit = deconvolution.fit(data, mask=brain)
            if response is None:
                logger.info(f"{dwi}: estimated {fit.response}")
            write_fit_outputs(fit, affine, shm_path, fractions_path, peaks_path,
                              tournier_path if tournier else None,
                              relative_peak_threshold, min_separation_angle, npeaks,
                              vertex_peaks)
            # Existing files were refused or allowed (--force) by get_io_iterator.
            deconvolution.with_response(fit.response).save(model_path, force=True)
            written = [shm_path, f"{fractions_path} ({', '.join(fit.volume_fractions)})",
                       peaks_path, model_path]
            if epochs:
                curve = plot_training_curves(fit.training_history)
                curve.set_title(f"training of {model} on {display_name(dwi)}")
                figure = curve.figure
                save_figure(figure, curve_path, force=True)
                plt.close(figure)
                written.append(curve_path)
            if tournier:
                written.append(tournier_path)
            logger.info(f"{dwi}: wrote {', '.join(map(str, written))}")
            fits.append(fit)
        return fits


def pretrained_option(value):
    """The models' ``pretrained`` option of the --pretrained flag's text."""
    if value.lower() == "none":
        return False
    return None if value == "default" else value


def noise_floor_option(value):
    """The models' ``noise_floor`` option of the --noise_floor flag's text."""
    return None if value.lower() == "none" else value


def main():
    """Entry point of ``esdmri_fit``."""
    run_workflow(FitFlow())


if __name__ == "__main__":
    main()
