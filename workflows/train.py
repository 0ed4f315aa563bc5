"""``esdmri_train``: one deconvolution network trained on a cohort of scans.

Examples
--------
``esdmri_train subjects.tsv --response_wm wm.txt --response_gm gm.txt
--response_csf csf.txt --out_dir group`` trains RT-ESD on every scan listed
in ``subjects.tsv`` and writes ``model.pt`` (for ``esdmri_apply``),
``checkpoint.pt`` and ``training_curve.png``. On 4 GPUs:
``torchrun --nproc_per_node=4 -m esdmri.workflows.train subjects.tsv
--device cuda --precision bf16 --num_workers 4 --out_dir group``; after an
interruption the same command with ``--resume`` continues from the
checkpoint.

The subjects file is tab-separated with a header row: columns ``dwi``,
``bval``, ``bvec`` and optionally ``mask``, ``response_wm``,
``response_gm``, ``response_csf`` (MRtrix3 files of that scan's own
responses). Relative paths are relative to the subjects file.
"""

import csv
from pathlib import Path

import matplotlib.pyplot as plt

from esdmri.reconst.config import GROUP_OPTIONS
from esdmri.viz import plot_training_curves, save_figure

from .fit import MODEL_DEFAULTS, check_model_kind, read_responses
from .io import EsdmriWorkflow, display_name, run_workflow, verbose_logging
from .io import logger

# Group training has its own epochs, batch size and run options; the other
# options are the models'. The run options repeat train_group's keyword
# defaults so that --help does not import torch (tests/test_workflows.py
# checks that they agree).
GROUP_DEFAULTS = {**MODEL_DEFAULTS, **GROUP_OPTIONS, "precision": "fp32", "compile": False,
                  "num_workers": 0}

REQUIRED_COLUMNS = ("dwi", "bval", "bvec")
OPTIONAL_COLUMNS = ("mask", "response_wm", "response_gm", "response_csf")


def read_subjects_table(path, b0_threshold=50.0, bvecs_tol=0.01):
    """Subjects listed in a tab-separated file.

    Parameters
    ----------
    path : str or Path
        Header row with ``dwi``, ``bval``, ``bvec`` and optionally ``mask``,
        ``response_wm``, ``response_gm``, ``response_csf``; one row per scan.
        Empty cells are absent values; lines starting with ``#`` are
        comments; relative paths are relative to the file's folder.
    b0_threshold : float
        b-values up to this are b0 volumes.
    bvecs_tol : float
        Tolerance of DIPY's check that the b-vectors have unit length.

    Returns
    -------
    subjects : list of esdmri.reconst.subjects.Subject
    """
    from esdmri.reconst.subjects import Subject  # torch: only when a command runs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subjects_file {path} does not exist")
    with open(path, newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    rows = list(csv.DictReader(lines, delimiter="\t"))
    columns = [] if not lines else next(csv.reader(lines[:1], delimiter="\t"))
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"subjects_file {path} needs a tab-separated header with the columns "
                         f"{', '.join(REQUIRED_COLUMNS)} (missing {', '.join(missing)})")
    unknown = [name for name in columns if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ValueError(f"subjects_file {path} has unknown columns {unknown}; expected "
                         f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    if not rows:
        raise ValueError(f"subjects_file {path} lists no subject")
    subjects = []
    for number, row in enumerate(rows, start=1):
        cells = {name: (path.parent / value.strip() if value and value.strip() else None)
                 for name, value in row.items()}
        try:
            response = read_responses(cells.get("response_wm"), cells.get("response_gm"),
                                      cells.get("response_csf"))
            subjects.append(Subject(cells["dwi"], cells["bval"], cells["bvec"],
                                    mask=cells.get("mask"), response=response,
                                    b0_threshold=b0_threshold, bvecs_tol=bvecs_tol))
        except (OSError, ValueError) as error:
            raise type(error)(f"subjects_file {path}, subject {number}: {error}") from error
    return subjects


class TrainFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_train"

    def run(self, subjects_file, response_wm=None, response_gm=None, response_csf=None,
            model="rtesd", b0_threshold=50.0, bvecs_tol=0.01,
            sh_order_max=MODEL_DEFAULTS["sh_order_max"],
            nside=MODEL_DEFAULTS["nside"], depth=MODEL_DEFAULTS["depth"],
            filter_start=MODEL_DEFAULTS["filter_start"],
            block_size=MODEL_DEFAULTS["block_size"], epochs=GROUP_DEFAULTS["epochs"],
            batch_size=GROUP_DEFAULTS["batch_size"], lr=GROUP_DEFAULTS["lr"],
            total_variation=MODEL_DEFAULTS["train_tv"], device=GROUP_DEFAULTS["device"],
            precision=GROUP_DEFAULTS["precision"], compile=GROUP_DEFAULTS["compile"],
            num_workers=GROUP_DEFAULTS["num_workers"], resume=False,
            seed=GROUP_DEFAULTS["seed"], out_dir="", out_model="model.pt",
            out_checkpoint="checkpoint.pt", out_curve="training_curve.png"):
        """Train one equivariant deconvolution network on many scans.

        The network reads the signal and is trained from scratch (the
        shipped pretrained network is fine-tuned on one scan by esdmri_fit
        --epochs N).

        Blocks of every scan are read from disk as training needs them, so
        the cohort never has to fit in memory; scans may have different
        gradient directions (the same shells). Under torchrun the processes
        share the blocks (DistributedDataParallel, gloo on CPU, NCCL on
        CUDA) and only the first process writes files. The model file
        works with esdmri_apply. Example: esdmri_train subjects.tsv
        --out_dir group (or, one process per GPU: torchrun --nproc_per_node 2
        -m esdmri.workflows.train subjects.tsv --device cuda --out_dir group),
        then esdmri_apply group/model.pt ... to deconvolve scans with it.

        Parameters
        ----------
        subjects_file : string
            Tab-separated list of scans: header dwi, bval, bvec and optional
            mask, response_wm, response_gm, response_csf columns; paths
            relative to this file.
        response_wm : string, optional
            MRtrix3 WM response of the group (e.g. averaged esdmri_response
            output); default: each scan's own response columns, or responses
            estimated from each scan, averaged.
        response_gm : string, optional
            MRtrix3 GM response of the group.
        response_csf : string, optional
            MRtrix3 CSF response of the group.
        model : string, optional
            Network: rtesd, esd or cesd.
        b0_threshold : float, optional
            b-values up to this count as b0.
        bvecs_tol : float, optional
            Tolerance of DIPY's check that the b-vectors have unit length.
        sh_order_max : int, optional
            Even SH order of the WM fODF.
        nside : int, optional
            HEALPix resolution of the network's sphere (a power of 2).
        depth : int, optional
            U-Net levels (each halves nside).
        filter_start : int, optional
            Channels of the first U-Net level.
        block_size : int, optional
            Edge (voxels) of the training blocks and inference blocks.
        epochs : int, optional
            Passes over every scan's mask.
        batch_size : int, optional
            Blocks per process and optimiser step.
        lr : float, optional
            Adam learning rate (default: 1.7e-3).
        total_variation : float, optional
            Weight of a spatial total-variation term in the training loss
            (0: off). Fits of the trained model (esdmri_apply) are refined
            with the model's own refine_tv coupling.
        device : string, optional
            cpu, cuda or cuda:N (under torchrun: each process's own GPU).
        precision : string, optional
            fp32, bf16 or fp16 autocast on CUDA (CPU trains in fp32).
        compile : bool, optional
            torch.compile the network.
        num_workers : int, optional
            Processes reading blocks from disk (0: the training process).
        resume : bool, optional
            Continue from out_checkpoint if it exists.
        seed : int, optional
            Seed of the weights, block offsets and block order.
        out_dir : string, optional
            Output folder (default: current folder).
        out_model : string, optional
            Trained model file (read by esdmri_apply).
        out_checkpoint : string, optional
            Checkpoint, one file rewritten after every epoch (the latest
            epoch only; --resume continues from it).
        out_curve : string, optional
            Training-curve figure (.png).

        Returns
        -------
        model : RTESDModel, ESDModel or CESDModel

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
        from esdmri.reconst.group import train_group  # torch: only when training runs
        from esdmri.reconst.training import DistributedContext

        response = read_responses(response_wm, response_gm, response_csf)
        # The checkpoint is checked below: it outlives an interrupted run.
        io_it = self.get_io_iterator(skip_outputs=("out_checkpoint",))
        if len(io_it) != 1:
            raise ValueError(f"subjects_file must name one file, got {len(io_it)} matches: "
                             "list every scan in a single subjects file")
        _, model_path, checkpoint_path, curve_path = io_it[0]
        if Path(checkpoint_path).exists() and not (resume or self._force_overwrite):
            raise FileExistsError(f"checkpoint {checkpoint_path} exists from an earlier run: "
                                  "pass --resume to continue it, or --force to start afresh")
        subjects = read_subjects_table(subjects_file, b0_threshold, bvecs_tol)
        is_main = DistributedContext.from_environment().is_main
        if is_main:
            logger.info(f"training {model} on {len(subjects)} scans ({epochs} epochs on "
                        f"{device})")
        # get_io_iterator has refused existing outputs unless --force.
        trained = train_group(
            subjects, response, model=model, epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, device=device, precision=precision, compile=compile,
            num_workers=num_workers, checkpoint=checkpoint_path, resume=resume,
            out_file=model_path, force=True, verbose=verbose_logging(),
            sh_order_max=sh_order_max, nside=nside, depth=depth, filter_start=filter_start,
            block_size=block_size, train_tv=total_variation)
        if is_main:
            curve = plot_training_curves(trained.training_history)
            curve.set_title(f"training of {model} on the {len(subjects)} scans of "
                            f"{display_name(subjects_file)}")
            figure = curve.figure
            save_figure(figure, curve_path, force=True)
            plt.close(figure)
            logger.info(f"wrote {model_path}, {checkpoint_path}, {curve_path}")
        return trained


def main():
    """Entry point of ``esdmri_train``."""
    run_workflow(TrainFlow())


if __name__ == "__main__":
    main()
