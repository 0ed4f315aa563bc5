"""``esdmri_apply``: run a trained model on other scans (inference only).

Examples
--------
``esdmri_apply fit/model.pt "sub-*/dwi.nii.gz" "sub-*/dwi.bval"
"sub-*/dwi.bvec" --mask "sub-*/mask.nii.gz" --out_strat append
--out_dir esdmri`` writes ``fodf_sh.nii.gz``, ``fractions.nii.gz`` and
``peaks.pam5`` into ``sub-*/esdmri/``. The scans need the shells of the
training scan; their directions may differ. Models trained on many scans
by ``esdmri_train`` apply the same way. Each model file is read once for all
scans, and the next scan is read from disk while the current one is
deconvolved.
"""

from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from esdmri.reconst.config import PEAK_THRESHOLD

from .fit import write_fit_outputs
from .io import (EsdmriWorkflow, load_dwi, load_mask, match_optional, run_workflow,
                 verbose_logging)
from .io import logger


class ApplyFlow(EsdmriWorkflow):
    # Outputs go with each scan, not with the (shared) model file.
    output_anchor = "input_files"

    @classmethod
    def get_short_name(cls):
        return "esdmri_apply"

    def run(self, model_files, input_files, bvalues_files, bvectors_files, mask=None,
            b0_threshold=50.0, bvecs_tol=0.01, device="cpu", tournier=False,
            relative_peak_threshold=PEAK_THRESHOLD, min_separation_angle=25.0, npeaks=5,
            vertex_peaks=False,
            batch_size=0, out_dir="", out_shm="fodf_sh.nii.gz",
            out_tournier="fodf_sh_tournier07.nii.gz", out_fractions="fractions.nii.gz",
            out_peaks="peaks.pam5"):
        """Deconvolve scans with a model from esdmri_fit or esdmri_train, without training.

        The model keeps the response functions it was trained with, so the
        scans must have the same shells (b-values); their gradient
        directions may differ, since signals are interpolated onto the
        network's sphere. Outputs as esdmri_fit: WM fODF SH (DIPY default
        basis), tissue fractions (wm, gm, csf order), .pam5 peaks. Example:
        esdmri_apply fit/model.pt "sub-*/dwi.nii.gz" "sub-*/dwi.bval"
        "sub-*/dwi.bvec" --out_strat append --out_dir esdmri (outputs in each
        sub-*/esdmri/).

        Parameters
        ----------
        model_files : string
            Model file(s) written by esdmri_fit or esdmri_train (one for all scans,
            or one per scan).
        input_files : string
            4D diffusion NIfTI file(s); a glob processes one subject at a time.
        bvalues_files : string
            FSL b-value file(s).
        bvectors_files : string
            FSL b-vector file(s).
        mask : string, optional
            Brain mask NIfTI (one file, or a glob with one file per subject).
        b0_threshold : float, optional
            b-values up to this count as b0.
        bvecs_tol : float, optional
            Tolerance of DIPY's check that the b-vectors have unit length.
        device : string, optional
            cpu, cuda or cuda:N.
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
        batch_size : int, optional
            Blocks per network pass (0: the model's training batch size);
            larger batches keep a GPU busier.
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
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        from esdmri.reconst.models import load_model  # torch: only when a command runs

        io_it = self.get_io_iterator(skip_outputs=() if tournier else ("out_tournier",))
        masks = match_optional("mask", mask, len(io_it))
        models = {path: load_model(path, device=device, verbose=False)
                  for path in dict.fromkeys(paths[0] for paths in io_it)}
        if batch_size:
            models = {path: model.with_options(batch_size=batch_size)
                      for path, model in models.items()}

        def read_scan(paths_and_mask):
            (_, dwi, bvals, bvecs, *_), mask_path = paths_and_mask
            data, affine, gtab = load_dwi(dwi, bvals, bvecs, b0_threshold, bvecs_tol)
            return data, affine, gtab, load_mask(mask_path, data.shape[:3])

        scans = list(zip(io_it, masks))
        fits = []
        progress = tqdm(zip(scans, prefetched(read_scan, scans)), total=len(scans),
                        desc="esdmri_apply", unit="scan", disable=not verbose_logging())
        for ((paths, _), (data, affine, gtab, brain)) in progress:
            (model_path, dwi, _, _, shm_path, tournier_path, fractions_path,
             peaks_path) = paths
            try:
                model = models[model_path].with_gtab(gtab)
            except ValueError as error:
                raise ValueError(f"{dwi} does not fit model {model_path}: {error}") from None
            fit = model.fit(data, mask=brain, retrain=False)
            write_fit_outputs(fit, affine, shm_path, fractions_path, peaks_path,
                              tournier_path if tournier else None,
                              relative_peak_threshold, min_separation_angle, npeaks,
                              vertex_peaks)
            logger.debug(f"{dwi}: wrote {shm_path}, {fractions_path}, {peaks_path}")
            fits.append(fit)
        logger.info(f"deconvolved {len(fits)} scan(s); outputs as {self.flat_outputs[-1]}")
        return fits


def prefetched(load, items):
    """Yield ``load(item)`` for each item, loading the next in a thread meanwhile.

    Reading and decompressing a scan overlaps the previous scan's
    deconvolution (torch and zlib release the GIL).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[0]) if items else None
        for index in range(len(items)):
            loaded = pending.result()
            if index + 1 < len(items):
                pending = pool.submit(load, items[index + 1])
            yield loaded


def main():
    """Entry point of ``esdmri_apply``."""
    run_workflow(ApplyFlow())


if __name__ == "__main__":
    main()
