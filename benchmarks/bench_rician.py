"""Cost of one evaluation of the refinement's objective: least squares against the
Rician-mean data term (``noise_floor="model"``, issue 26).

The least-squares term goes through the reduced QR factor of the forward matrix (``k =
min(N, C)`` columns per voxel); the Rician term needs the full predicted signal (``N``
columns) and its Rician mean at each measurement, through two Bessel functions or the
closed form that the refinement uses (``RicianVoxelLoss(approximate=True)``). They are
timed interleaved in one
process (ratios hold on a loaded machine, absolute times do not), on the refinement's
own objective (:class:`esdmri.reconst.refine.CoupledObjective`, with the total
variation), float32, SH order 12 and the 384-direction sampler, for acquisitions of
several sizes. Prints a markdown table.

Usage::

    python -m benchmarks.bench_rician --num_threads 1
"""

import argparse
import time

import numpy as np
import torch
from dipy.core.gradients import gradient_table
from dipy.core.sphere import disperse_charges, HemiSphere

from esdmri.reconst.losses import LossWeights, neighbour_pairs
from esdmri.reconst.network import SAMPLING_NSIDE, stacked_forward_matrix
from esdmri.reconst.refine import CoupledObjective
from esdmri.response import TissueResponse
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sphere import HealpixSphere

ORDER = 12


def acquisition(n_shells, n_directions, seed=0):
    """A b0 plus ``n_shells`` shells of ``n_directions`` directions each."""
    rng = np.random.default_rng(seed)
    vectors, bvals = [np.zeros((1, 3))], [np.zeros(1)]
    for shell in range(n_shells):
        theta, phi = rng.uniform(0, np.pi, n_directions), rng.uniform(0, 2 * np.pi,
                                                                        n_directions)
        hemisphere, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 200)
        vectors.append(hemisphere.vertices)
        bvals.append(np.full(n_directions, 1000.0 * (shell + 1)))
    return gradient_table(np.concatenate(bvals), bvecs=np.concatenate(vectors))


def time_objective(objective, coefficients, repeats):
    """Median seconds of one evaluation (value and gradient)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        objective(coefficients)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=14, help="voxels per side of the cube")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    rng = np.random.default_rng(0)
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(SAMPLING_NSIDE,
                                                             hemisphere=True).vertices),
                              dtype=torch.float32)
    mask = np.ones((args.side,) * 3, bool)
    first, second = neighbour_pairs(torch.as_tensor(mask))
    n_voxels = int(mask.sum())
    print("| acquisition | N | least squares (ms) | Rician mean, Bessel form (ms) | ratio | "
          "Rician mean, closed form (the default, ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n_shells, n_directions in ((2, 32), (2, 64), (3, 64), (3, 100)):
        gtab = acquisition(n_shells, n_directions)
        response = TissueResponse.from_tensors(1000.0 * np.arange(n_shells + 1),
                                               sh_order_max=8)
        matrix = torch.as_tensor(stacked_forward_matrix(response.normalized(), gtab, ORDER),
                                 dtype=torch.float32)
        n_total = len(matrix)
        coefficients = torch.as_tensor(rng.normal(0, 0.05, (n_voxels, n_total)),
                                       dtype=torch.float32)
        coefficients[:, 0] = 0.28
        measured = (coefficients @ matrix).abs() + 0.02 * torch.randn(n_voxels, matrix.shape[1])
        pair_weights = torch.full((len(first),), 1e-3)
        objectives = {}
        for name, sigma in (("ls", None), ("bessel", torch.full((n_voxels,), 0.1)),
                            ("closed", torch.full((n_voxels,), 0.1))):
            objectives[name] = CoupledObjective(
                measured, matrix, sampler, n_coeffs(ORDER), LossWeights(), first, second,
                pair_weights, 1e-3, 512 * args.num_threads, noise_sigma=sigma)
        objectives["bessel"].voxel_loss.approximate = False
        seconds = {name: [] for name in objectives}
        for _ in range(3):  # interleaved rounds
            for name, objective in objectives.items():
                seconds[name].append(time_objective(objective, coefficients, args.repeats))
        ls, bessel, closed = (1e3 * min(seconds[name]) for name in objectives)
        print(f"| {n_shells} x {n_directions} + b0 | {matrix.shape[1]} | {ls:.1f} | "
              f"{bessel:.1f} | {bessel / ls:.2f} | {closed:.1f} | {closed / ls:.2f} |",
              flush=True)
    print(f"\n{n_voxels} voxels, SH order {ORDER}, {len(sampler)} fODF samples, float32, "
          f"{args.num_threads} thread(s); value and gradient with the total variation.")


if __name__ == "__main__":
    main()
