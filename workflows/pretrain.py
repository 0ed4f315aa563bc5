"""``esdmri_pretrain``: the shipped pretrained corrections, rebuilt from a fixed seed.

Examples
--------
``esdmri_pretrain --out_dir weights`` simulates the cohort of the shipped
weights (24 training and 3 held-aside scans of 14^3 voxels, seed 0) and trains
the RT-ESD correction for 3,159 steps, writing ``weights/pretrained.pt``;
``esdmri_pretrain --model esd`` and ``--model cesd`` train the
ESD and C-ESD corrections the same way. ``esdmri_pretrain --scans 6 --held 1
--steps 300`` is a smaller run. The file is what ``RTESDModel(gtab,
pretrained=PATH)`` (``esdmri_fit --pretrained PATH``) reads.
"""

import json
import time
from pathlib import Path

from esdmri.reconst.config import check_integer

from .fit import check_model_kind
from .io import (EsdmriWorkflow, check_out_dir, check_outputs, logger, run_workflow,
                 verbose_logging)

# The model kinds of the commands and the pretrained module's keys (the model
# classes' conv_kind; tests/test_workflows_pretrain.py checks that they agree),
# repeated here so that --help does not import torch.
CONV_KINDS = {"rtesd": "e3so3-stem", "esd": "spherical", "cesd": "concat"}
# esdmri.reconst.pretraining.LOSSES and esdmri.reconst.pretrained.CORRECTED_ORDER (the
# shipped weights' order), repeated for the same reason (and checked there too).
LOSSES = ("supervised", "unsupervised", "mixed", "refined", "supervised+refined")
CORRECTED_ORDER = 8


class PretrainFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_pretrain"

    def run(self, model="rtesd", scans=24, held=3, side=14, steps=3159, lr=1e-3,
            window=10, every=200, seed=0, loss="supervised", wm_masks=False, device="cpu",
            quiet=False, checkpoints="", corrected_order=CORRECTED_ORDER, out_dir="",
            out_weights="pretrained.pt"):
        """Pretrain the correction of the linear prior on a simulated cohort.

        Simulates a cohort of scans (three phantom families, four
        acquisitions from one shell with 30 directions to three shells, SNR
        5-40; see esdmri.cohort), computes each scan's linear prior with
        responses estimated from the scan, and trains the correction that the
        default fit applies (esdmri.reconst.pretrained) against the phantoms'
        true fibres, keeping the weights that score best on the held-aside
        scans. The defaults rebuild the recipe of the shipped weights (the
        full size takes about 13 minutes of CPU time per architecture on one
        thread). Example: esdmri_pretrain --model esd --out_dir weights
        (or, small: esdmri_pretrain --scans 6 --held 1 --steps 300), then
        esdmri_fit ... --model esd --pretrained weights/pretrained.pt, or
        ESDModel(gtab, pretrained=PATH) in Python.

        Parameters
        ----------
        model : string, optional
            Model class whose correction is trained: rtesd (E(3) x SO(3)
            stem), esd (voxel-wise spherical U-Net) or cesd (neighbours
            concatenated as channels).
        scans : int, optional
            Training scans of the cohort.
        held : int, optional
            Held-aside scans (the ones after the training scans) that choose
            the best weights.
        side : int, optional
            Edge of each simulated scan (voxels).
        steps : int, optional
            Optimiser steps (one window of one scan each).
        lr : float, optional
            Adam learning rate, decayed to 0 by a cosine over the steps.
        window : int, optional
            Edge of the training windows (voxels).
        every : int, optional
            Steps between evaluations on the held-aside scans.
        seed : int, optional
            Seed of the cohort, the initial weights and the windows.
        loss : string, optional
            supervised (against the phantoms' true fibres; the shipped
            weights'), unsupervised (each scan's own objective, the one the
            refinement descends), mixed (the mean of the two) or refined
            (distillation: toward each scan's default fit, the shipped
            correction then the default refinement, computed once per scan
            when the cohort is built; one refinement per scan) or
            supervised+refined (the mean of supervised and refined).
        wm_masks : bool, optional
            Also train on every scan fitted on its WM voxels only, so that
            the correction sees masks that cut through the volume.
        device : string, optional
            cpu, cuda or cuda:N.
        quiet : bool, optional
            No progress bars.
        checkpoints : string, optional
            Folder that receives the weights at every held-aside evaluation
            (step-00000.pt, step-00200.pt, ...; never over an existing file
            without --force), so that the kept weights can be chosen
            afterwards by another criterion, e.g. the refined fit of
            held-aside scans (python -m benchmarks.select_weights).
        corrected_order : int, optional
            Highest WM SH degree the correction reads and corrects (even;
            the shipped weights: 8, on the HEALPix nside-4 hemisphere).
            Another order runs on the smallest nside that carries it
            (12: nside 8) and trains against targets of that order.
        out_dir : string, optional
            Output folder (default: current folder).
        out_weights : string, optional
            Weights file.

        Returns
        -------
        summary : dict
            Steps, CPU seconds, held-aside losses and the file's SHA-256.

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
        for name, value, minimum in (("scans", scans, 1), ("held", held, 1), ("side", side, 6),
                                     ("steps", steps, 1), ("window", window, 3),
                                     ("every", every, 1), ("corrected_order", corrected_order, 2)):
            check_integer(name, value, minimum)
        if corrected_order % 2:
            raise ValueError(f"corrected_order must be even, got {corrected_order}")
        if window > side:
            raise ValueError(f"window ({window}) must not exceed side ({side})")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        (weights_path,), = self.get_io_iterator()
        checkpoint_path = checkpoint_paths(checkpoints, steps, every, self._force_overwrite)
        import torch  # only when a command runs

        from esdmri.atomic import staged_output
        from esdmri.cohort import build_cohort
        from esdmri.reconst.pretrained import (check_architecture, save_correction,
                                               sha256_of)
        from esdmri.reconst.pretraining import as_tensors, pretrain_correction

        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for but torch sees no CUDA device")
        kind = CONV_KINDS[model]
        progress = verbose_logging() and not quiet
        settings = {"model": model, "scans": scans, "held": held, "side": side,
                    "steps": steps, "lr": lr, "window": window, "every": every, "seed": seed,
                    "loss": loss, "wm_masks": bool(wm_masks), "device": str(device)}
        if corrected_order != CORRECTED_ORDER:  # the shipped weights' settings: unchanged
            settings["corrected_order"] = corrected_order
        architecture = check_architecture(kind, corrected_order)
        logger.info(f"pretraining the {model} correction: {json.dumps(settings)}")
        start = time.process_time()
        cohort = build_cohort(scans + held, side, seed, progress=progress, log=logger.debug,
                              wm_masks=wm_masks, refined="refined" in loss,
                              target_order=corrected_order)
        cohort_cpu = time.process_time() - start

        def items(part):
            return [as_tensors(scan, device) for masks in part for scan in masks]

        def save_checkpoint(correction, progress):
            with staged_output(checkpoint_path(progress["steps"]), detached=True) as temporary:
                save_correction(correction, temporary,
                                {"settings": settings, "architecture": architecture,
                                 **progress})

        correction, summary = pretrain_correction(
            items(cohort[:scans]), items(cohort[scans:]), kind=kind, loss=loss, steps=steps,
            seed=seed, lr=lr, window=window, every=every, device=device, log=logger.debug,
            progress=progress, on_evaluation=save_checkpoint if checkpoints else None,
            corrected_order=corrected_order)
        metadata = {"settings": settings, "cohort": [masks[0]["setting"] for masks in cohort],
                    "architecture": architecture, "cohort_cpu_seconds": cohort_cpu,
                    **summary}
        with staged_output(weights_path) as temporary:
            save_correction(correction, temporary, metadata)
            sha256 = sha256_of(temporary)
        logger.info(f"{summary['steps']} steps in {summary['cpu_seconds']:.0f} s CPU (cohort "
                    f"{cohort_cpu:.0f} s); held-aside loss {summary['best_loss']:.5f} at step "
                    f"{summary['best_step']} (prior {summary['prior_loss']:.5f})")
        logger.info(f"wrote {weights_path}, sha256 {sha256}")
        return {**summary, "cohort_cpu_seconds": cohort_cpu, "sha256": sha256}


def checkpoint_paths(folder, steps, every, force):
    """The file of each evaluation's checkpoint in ``folder`` (made if missing).

    Returns a function of the step; refuses before any training if one of the
    files (steps 0, every, 2 every, ..., steps) exists and ``force`` is off.
    """
    if not folder:
        return None
    check_out_dir(folder, "checkpoints")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def path(step):
        return str(folder / f"step-{step:05d}.pt")

    check_outputs([path(step) for step in sorted({*range(0, steps, every), steps})], force)
    return path


def main():
    """Entry point of ``esdmri_pretrain``."""
    run_workflow(PretrainFlow())


if __name__ == "__main__":
    main()
