"""The first Adam steps from the linear prior: order 12 on nside 4 (condition 2416) and 8.

Issue 25 reported that one Adam step at lr 1.7e-3 raised the loss 10x at order 12 on
nside 4. This script takes 1 and 10 steps of one window each (no warm-up) on the 12^3
dev phantom of ``benchmarks/training_curve.py`` (SNR 20) and prints the evaluation loss
of the trainer (eval mode, every masked voxel once) before and after, on both grids.

Usage::

    python -m benchmarks.first_steps
"""

import warnings

from esdmri import RTESDModel
from esdmri.reconst.inputs import normalize_by_b0
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.subjects import ScanBlocks
from esdmri.reconst.training import Trainer
from esdmri.shm import ShellInterpolator

from .heldout import build_phantom, scan_of, scored_voxels


def main():
    phantom = build_phantom((12,) * 3, 101, 20, "dev")
    scan = scan_of(phantom)
    normalized, mask = normalize_by_b0(scan.data, scan.gtab, scored_voxels(phantom))
    forward_model = build_forward_model(scan.response, scan.gtab, 12)
    for nside in (4, 8):
        for steps in (1, 10):
            model = RTESDModel(scan.gtab, scan.response, sh_order_max=12, nside=nside,
                               epochs=0, verbose=False)
            model.build_network()  # untrained: its output is the linear prior
            operator = ShellInterpolator(scan.gtab, model.sphere.vertices).operator
            source = ScanBlocks(normalized, mask, scan.gtab, operator, 8, "cpu")
            trainer = Trainer(model.network, source, [forward_model], build_fodf_sampler(12),
                              model.config.training.loss_weights, epochs=1, batch_size=1,
                              lr=1.7e-3, patience=3, seed=0, max_blocks=steps, halo=model.halo,
                              warmup_steps=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                history = trainer.run()
            print(f"order 12, nside {nside}: start {trainer.initial_loss:.5g}, after {steps} "
                  f"step(s) {history[-1]['eval_total']:.5g}", flush=True)


if __name__ == "__main__":
    main()
