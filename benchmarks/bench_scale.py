"""Group-training throughput with 1 and 2 torchrun processes, and inference throughput.

Saves phantoms with two different gradient tables as uncompressed NIfTI
(the streamed layout), then for each setting launches
``python -m torch.distributed.run --nproc_per_node=P`` training 1 + E
epochs with ``esdmri.reconst.train_group``. Rank 0 timestamps the end of each
epoch (train_group's per-epoch log record), and the median epoch after the
first is reported, so interpreter start-up, process-group set-up and
``torch.compile`` time are left out; voxels/s counts each masked voxel once
per epoch (each process sees its share of the blocks). Each
process uses ``--threads`` / P torch threads, so the rows use the same
cores (plus a row of one process on one thread). The batch is per process, so P processes take
P times larger
optimiser steps (DDP's usual weak scaling of the batch).

``first_s`` is the first epoch with set-up (and compilation) since launch.
The last line is inference with the trained model (``load_model`` once,
then each scan deconvolved as ``esdmri_apply`` does).

Usage: python benchmarks/bench_scale.py [--quick] [--compile] [--threads 2]
"""

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

MODEL = dict(model="rtesd", sh_order_max=8, nside=4, depth=2, filter_start=8, block_size=8,
             batch_size=2, lr=1.7e-3)
FULL = dict(shape=(24, 24, 24), subjects=4, epochs=4)
QUICK = dict(shape=(12, 12, 12), subjects=2, epochs=2)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_cohort(folder, shape, n_subjects):
    """Phantoms saved as .nii, alternating two gradient tables; returns masked voxels."""
    from dipy.core.gradients import gradient_table

    from esdmri.sims import make_phantom

    rng = np.random.default_rng(0)
    directions = rng.normal(size=(90, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sparse = gradient_table(np.concatenate([np.zeros(2), np.repeat([1000., 2000., 3000.], 30)]),
                            bvecs=np.concatenate([np.zeros((2, 3)), directions]))
    voxels = 0
    for index in range(n_subjects):
        phantom = make_phantom(shape, gtab=None if index % 2 == 0 else sparse, seed=index)
        target = folder / f"sub-{index}"
        phantom.save(target)
        nib.save(nib.load(target / "dwi.nii.gz"), target / "dwi.nii")
        (target / "dwi.nii.gz").unlink()
        voxels += int(phantom.mask.sum())
    phantom.response.to_mrtrix([folder / f"{t}.txt" for t in phantom.response.tissues])
    return voxels


class EpochClock(logging.Handler):
    """Records when train_group logs the end of an epoch."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times = []

    def emit(self, record):
        if record.getMessage().startswith("epoch "):
            self.times.append(time.perf_counter())


def worker(folder, epochs, compile_network, out_file):
    """Body of one torchrun process: train on the cohort of ``folder``."""
    import torch

    from esdmri.reconst.subjects import Subject
    from esdmri.response import TissueResponse
    from esdmri.reconst.group import train_group

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    folder = Path(folder)
    subjects = [Subject(d / "dwi.nii", d / "bvals", d / "bvecs", mask=d / "mask.nii.gz")
                for d in sorted(folder.glob("sub-*"))]
    tissues = ("wm", "gm", "csf")
    response = TissueResponse.from_mrtrix([folder / f"{t}.txt" for t in tissues], tissues)
    clock = EpochClock()
    train_logger = logging.getLogger("esdmri.reconst.training")
    train_logger.setLevel(logging.INFO)
    train_logger.addHandler(clock)
    start = time.perf_counter()
    train_group(subjects, response, epochs=epochs, compile=compile_network, verbose=False,
                out_file=out_file, force=True, patience=100, **MODEL)
    if os.environ.get("RANK", "0") == "0":
        Path(out_file).with_suffix(".json").write_text(
            json.dumps([start] + clock.times))


def launch(folder, processes, threads, epochs, compile_network, out_file):
    """Seconds of the first and the median later epoch of one torchrun launch."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__,
               "--worker", str(folder), "--epochs", str(epochs), "--out", str(out_file)]
    if compile_network:
        command.append("--compile")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"torchrun failed:\n{result.stderr[-3000:]}")
    times = np.diff(json.loads(Path(out_file).with_suffix(".json").read_text()))
    return times[0], float(np.median(times[1:]))


def inference_rate(folder, model_file, threads):
    """Voxels/s of deconvolving every scan with one loaded model."""
    import torch

    from esdmri.reconst.models import load_model
    from esdmri.workflows.io import load_dwi, load_mask

    torch.set_num_threads(threads)
    model = load_model(model_file, verbose=False)
    voxels, seconds = 0, 0.0
    for scan in sorted(folder.glob("sub-*")):
        data, _, gtab = load_dwi(str(scan / "dwi.nii"), str(scan / "bvals"), str(scan / "bvecs"))
        mask = load_mask(str(scan / "mask.nii.gz"), data.shape[:3])
        start = time.perf_counter()
        model.with_gtab(gtab).fit(data, mask=mask, retrain=False)
        seconds += time.perf_counter() - start
        voxels += int(mask.sum())
    return voxels / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 small phantoms, 2 epochs")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, default=2, help="cores shared by the processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.epochs, args.compile, args.out)

    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        voxels = make_cohort(folder, settings["shape"], settings["subjects"])
        epochs = settings["epochs"]
        print(f"{settings['subjects']} phantoms {settings['shape']} (two gradient tables), "
              f"{voxels} masked voxels; RT-ESD {MODEL}; {epochs} timed epochs; "
              f"{args.threads} cores in all\n")
        header = (f"{'processes':>9} {'threads/proc':>12} {'compile':>7} {'first_s':>8} "
                  f"{'epoch_s':>8} {'voxels/s':>9} {'speed-up':>8}")
        print(header)
        print("-" * len(header))
        baseline = None
        model_file = folder / "model.pt"
        for compile_network in (False, True) if args.compile else (False,):
            # One process on all cores, one process per core, then 2 processes.
            settings_rows = [(1, args.threads)] + [(1, 1)] * (args.threads > 1) + [
                (2, max(1, args.threads // 2))]
            for processes, threads in settings_rows:
                first, epoch = launch(folder, processes, threads, 1 + epochs,
                                      compile_network, model_file)
                rate = voxels / epoch
                baseline = baseline or rate
                print(f"{processes:>9} {threads:>12} {str(compile_network):>7} {first:>8.2f} "
                      f"{epoch:>8.2f} {rate:>9.0f} {rate / baseline:>8.2f}", flush=True)
        for threads in sorted({1, args.threads}):
            print(f"\ninference (load_model once, {settings['subjects']} scans, {threads} "
                  f"thread(s)): {inference_rate(folder, model_file, threads):.0f} voxels/s",
                  end="")
        print()


if __name__ == "__main__":
    main()
