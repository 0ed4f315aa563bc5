"""The refinement's matrix products with bfloat16 inputs on this CPU (issue 28).

Sapphire Rapids and later Xeons multiply bfloat16 matrices in AMX tiles (and
AVX512-BF16) at several times their float32 rate; oneDNN, torch's CPU matrix
library besides MKL, can take float32 matrices, round them to bfloat16 as it
packs them and sum in float32 (``torch.backends.mkldnn.matmul.fp32_precision =
"bf16"``). This script measures what that does to the refinement's evaluation,
on the default fit's refinement inputs of the clinical acquisition
(``bench_memory.py``'s 100 volumes, SNR 30; ``--shape`` of the scan, the
clinical-size 96 x 96 x 60 by default), at SH order 12 and 8 (``--orders``):

- products: the evaluation's two products (blocks of `_CPU_BLOCK` voxels per thread
  times ``C`` coefficients against the stacked ``C x (k + V)`` operator and
  back, as :class:`~esdmri.reconst.refine.CoupledObjective` makes them) in
  float32; with bfloat16 inputs (``bf16``); a compensated bfloat16 scheme
  (``bf16-split``: ``x = x_hi + x_lo`` and ``A = A_hi + A_lo`` in bfloat16,
  ``x A ~ x_hi A_hi + x_hi A_lo + x_lo A_hi`` as one product of three times
  the depth, with its splitting passes); and the products of
  the two partial schemes that the reverted refinement option ran
  (``bf16-gradient``: the product back; ``bf16-samples``: the sampler's
  columns both ways, the residual's in float32), each forward and back, with
  the relative error (Frobenius norm) of each product against float64 on the
  scan's own coefficients (forward: of the residual ``R c - Q^T y``, the part
  the signal term sees, and of the fODF samples; back: of the gradient).

The refinement option that ran ``bf16-gradient`` and ``bf16-samples`` inside
``VoxelLoss`` (``refine_matmul_precision``, with the voxel terms' and the dev
fits' tables of docs/benchmarks.md) was measured and reverted: it failed the dev
switch rule and saved 4-9 % of an evaluation; commit 2f7b51d reproduces it.

With ``--folded``, also the shipped pretrained correction's folded inference
(:mod:`esdmri.reconst.folded`, ``RTESDModel.corrected_prior``) on the scan with
its products inside the same bfloat16 switch: the time ratio and the per-voxel
relative error of the corrected coefficients against float32.

Times are the best of ``--repeats``, the variants alternating within each
repeat in one process: one thread's CPU time, two threads' wall time; on a
shared machine read the ratios (absolute times need an idle machine).

Usage::

    python -m benchmarks.bench_refine_precision --shape 64 64 40
    python -m benchmarks.bench_refine_precision --threads 1 --orders 12
"""

import argparse
import contextlib
import os
import time
import warnings

import numpy as np
import torch

from esdmri import RTESDModel
from esdmri.reconst.losses import CAUCHY_SIGMA
from esdmri.reconst.refine import _CPU_BLOCK, VoxelLoss
from esdmri.sims import make_phantom

from .bench_floor import timed
from .bench_memory import SHAPE as BRAIN_SHAPE
from .bench_memory import clinical_gtab
from .bench_preconditioner import refinement_inputs


def bf16_products_available():
    """Whether this CPU multiplies bfloat16 natively and torch can use it for float32.

    The ``avx512_bf16`` / ``amx_tile`` flags, read by torch's own cpuinfo checks
    (elsewhere bfloat16 is emulated, slower than float32), with oneDNN and its
    per-backend precision switch (torch 2.9 and later).
    """
    if not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


@contextlib.contextmanager
def _bf16_products():
    """float32 products with bfloat16 inputs (oneDNN rounds them as it packs), float32 sums."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def relative_error(value, reference):
    """Frobenius norm of ``value - reference`` over that of ``reference`` (float64)."""
    return float((value.double() - reference).norm() / reference.norm())


def split_operator(matrix):
    """``[A_hi; A_lo; A_hi]`` of the compensated scheme, stacked along the depth."""
    high = matrix.bfloat16().float()
    return torch.cat([high, matrix - high, high])


def split_product(rows, stacked, buffer, out):
    """``x_hi A_hi + x_hi A_lo + x_lo A_hi`` as one product of ``[x_hi, x_hi, x_lo]``."""
    width = rows.shape[1]
    buffer = buffer[:len(rows)]
    high = buffer[:, :width]
    high.copy_(rows.bfloat16())
    buffer[:, width:2 * width].copy_(high)
    torch.sub(rows, high, out=buffer[:, 2 * width:])
    with _bf16_products():
        torch.mm(buffer, stacked, out=out)


def product_variants(loss, c, mapped, block):
    """Forward and back product functions of each scheme over the field's blocks."""
    n, k = len(c), loss.rank
    chunks = [slice(i, min(i + block, n)) for i in range(0, n, block)]
    forward, back = torch.empty_like(mapped), torch.empty_like(c)
    split_forward, split_back = split_operator(loss.operator), split_operator(loss.operator_t)
    buffers = (torch.empty(block, 3 * c.shape[1]), torch.empty(block, 3 * mapped.shape[1]))
    residual_op, samples_op = loss.operator[:, :k].contiguous(), loss.operator[:, k:].contiguous()
    residual_t, samples_t = loss.operator_t[:k].contiguous(), loss.operator_t[k:].contiguous()
    residuals, samples = torch.empty(n, k), torch.empty(n, loss.n_samples)
    mapped_residual, mapped_samples = mapped[:, :k].contiguous(), mapped[:, k:].contiguous()

    def plain(switch):
        def forward_products():
            for p in chunks:
                with switch():
                    torch.mm(c[p], loss.operator, out=forward[p])

        def back_products():
            for p in chunks:
                with switch():
                    torch.mm(mapped[p], loss.operator_t, out=back[p])
        return forward_products, back_products

    def split_forward_products():
        for p in chunks:
            split_product(c[p], split_forward, buffers[0], forward[p])

    def split_back_products():
        for p in chunks:
            split_product(mapped[p], split_back, buffers[1], back[p])

    def samples_forward():
        for p in chunks:
            torch.mm(c[p], residual_op, out=residuals[p])
            with _bf16_products():
                torch.mm(c[p], samples_op, out=samples[p])

    def samples_collect():
        """The forward results in one field, to read their error (not timed)."""
        forward[:, :k], forward[:, k:] = residuals, samples

    def samples_back():
        for p in chunks:
            torch.mm(mapped_residual[p], residual_t, out=back[p])
            with _bf16_products():
                back[p].addmm_(mapped_samples[p], samples_t)

    float_forward, float_back = plain(contextlib.nullcontext)
    bf16_forward, bf16_back = plain(_bf16_products)
    variants = {
        "float32": (float_forward, float_back),
        "bf16": (bf16_forward, bf16_back),
        "bf16-split": (split_forward_products, split_back_products),
        "bf16-gradient": (float_forward, bf16_back),
        "bf16-samples": (samples_forward, samples_back),
    }
    collect = {name: (lambda: None) for name in variants}
    collect["bf16-samples"] = samples_collect
    return forward, back, variants, collect


def run_order(scan_inputs, args):
    """Print the products' table for one SH order."""
    start, signal, mask, forward_matrix, sampler, n_wm, order, weights = scan_inputs
    rows = np.flatnonzero(mask)
    c = torch.as_tensor(start.reshape(-1, start.shape[-1])[rows])
    measured = torch.as_tensor(signal.reshape(-1, signal.shape[-1])[rows])
    exact = VoxelLoss(forward_matrix.double(), sampler.double(), n_wm, weights)
    projected64, _ = exact.project(measured)
    mapped64 = c.double() @ exact.operator
    residual64 = mapped64[:, :exact.rank] - projected64
    loss = VoxelLoss(forward_matrix, sampler, n_wm, weights)
    print(f"\nSH order {order}: {len(rows)} voxels, C = {c.shape[1]}, k = {exact.rank}, "
          f"V = {exact.n_samples}", flush=True)
    # The back product's input: the mapped field after the voxel terms' passes, as
    # VoxelLoss scales it (its product with the operator's transpose is the gradient).
    mapped = mapped64.clone()
    mapped[:, :exact.rank] = residual64 * exact.residual_scale
    fodf = mapped64[:, exact.rank:]
    spread = 1 + fodf.square() * (0.5 / CAUCHY_SIGMA)
    mapped[:, exact.rank:] = (fodf.clamp(max=0) * exact.negative_scale
                              + fodf / spread * exact.sparsity_scale)
    back64 = mapped @ exact.operator_t
    mapped = mapped.float()

    product_rows = []
    for threads in args.threads:
        block = _CPU_BLOCK * threads
        forward, back, variants, collect = product_variants(loss, c, mapped, block)
        times = {}
        for repeat in range(args.repeats):
            names = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
            for name in names:
                for direction, work in zip(("forward", "back"), variants[name]):
                    best = times.get((name, direction), np.inf)
                    times[name, direction] = min(best, timed(work, 1, threads))
        for name, (forward_work, back_work) in variants.items():
            forward_work()
            back_work()
            collect[name]()
            residual = forward[:, :exact.rank].double() - projected64
            errors = (relative_error(residual, residual64),
                      relative_error(forward[:, exact.rank:], mapped64[:, exact.rank:]),
                      relative_error(back, back64))
            seconds = times[name, "forward"] + times[name, "back"]
            baseline = times["float32", "forward"] + times["float32", "back"]
            product_rows.append(
                f"| {order} | {threads} | {name} | "
                f"{times[name, 'forward'] * 1e6 / len(c):.3f} | "
                f"{times[name, 'back'] * 1e6 / len(c):.3f} | "
                f"{baseline / seconds:.2f} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    print("\n| SH order | threads | products | forward (us per voxel) | back (us per voxel) | "
          "speed / float32 | rel. error: residual | fODF samples | back (gradient) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(product_rows), flush=True)


def folded_correction(phantom, args):
    """Time and error of the folded correction's inference with bfloat16 products."""
    model = RTESDModel(phantom.gtab, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = model.prepare(phantom.data, mask=phantom.mask)
        prior = model.prior_coefficients(scan)
    model.pretrained_correction()  # loaded once, outside the clock
    switches = {"float32": contextlib.nullcontext, "bf16": _bf16_products}
    results, times = {}, {}
    for threads in args.threads:
        for repeat in range(args.repeats):
            names = list(switches) if repeat % 2 == 0 else list(switches)[::-1]
            for name in names:
                torch.set_num_threads(threads)
                now = time.process_time if threads == 1 else time.perf_counter
                start = now()
                with switches[name]():
                    results[name] = model.corrected_prior(prior, scan)[scan.mask]
                seconds = now() - start
                times[name, threads] = min(times.get((name, threads), np.inf), seconds)
    reference = results["float32"].astype(np.float64)
    change = np.linalg.norm(reference - prior[scan.mask], axis=1)
    error = np.linalg.norm(results["bf16"] - reference, axis=1)
    relative = error / np.linalg.norm(reference, axis=1).clip(1e-12)
    of_correction = error / change.clip(1e-12)
    n = int(scan.mask.sum())
    print(f"\nfolded correction, {n} voxels: per-voxel error of the corrected coefficients "
          f"against float32, relative to the voxel's coefficients: median "
          f"{np.median(relative):.1e}, max {relative.max():.1e}; relative to the "
          f"correction's change: median {np.median(of_correction):.1e}, "
          f"max {of_correction.max():.1e}")
    print("| threads | float32 (us per voxel) | bf16 (us per voxel) | speed / float32 |")
    print("|---|---|---|---|")
    for threads in args.threads:
        base, other = times["float32", threads], times["bf16", threads]
        print(f"| {threads} | {base * 1e6 / n:.2f} | {other * 1e6 / n:.2f} | "
              f"{base / other:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=list(BRAIN_SHAPE))
    parser.add_argument("--orders", type=int, nargs="*", default=[12, 8],
                        help="SH orders of the refinement's parts (none: --folded alone)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folded", action="store_true",
                        help="also the pretrained correction's folded inference")
    args = parser.parse_args()
    print(f"{'x'.join(map(str, args.shape))} clinical SNR 30; native bfloat16 products: "
          f"{bf16_products_available()}; machine load when started: "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    phantom = make_phantom(shape=tuple(args.shape), gtab=clinical_gtab(), snr=30)
    for order in args.orders:
        inputs, _, _ = refinement_inputs(phantom, sh_order_max=order)
        run_order(inputs, args)
    if args.folded:
        folded_correction(phantom, args)


if __name__ == "__main__":
    main()
