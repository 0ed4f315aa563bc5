"""Speed, memory and equivariance of the spatio-spherical layers and U-Net.

Compares ``esdmri.nn`` with

(a) a straightforward version of the published RT-ESD / ESD formulation,
    kept in this file only: Chebyshev recursion with a sparse Laplacian
    (``torch.sparse.mm``) on the full sphere, then a dense 27-tap
    ``conv3d`` over every vertex with the expanded weight ``A * B`` (mixed
    conv) or a channel matmul (spherical conv);
(b) this machine's float32 matmul throughput (a large ``torch.matmul``):
    each implementation's achieved GFLOP/s is reported as a fraction of it.

Every measurement runs in a fresh process with glibc's ``malloc`` told to
hand every block of 64 KiB or more straight back to the kernel
(``MALLOC_MMAP_THRESHOLD_``), so the resident memory follows the live
tensors. Peak memory is measured on Linux by resetting the process's
resident high-water mark (``/proc/self/clear_refs``) after a warm-up call
and reading ``VmHWM`` after one forward + backward pass: the rise over the
resident memory before the call (layer, weights and input excluded; output,
gradients, autograd buffers and temporaries included). Times are the best of
``--repeats`` calls after the warm-up (as ``timeit`` advises): on this VM a
run slows down by up to 1.7x at times from outside the process (first
touches of fresh memory become expensive), which a median lets through for
one implementation and not the other.

Floating-point work counts multiply-adds as 2 FLOP: dense and sparse
matmuls and convolutions as executed (the memory-bound neighbourhood sums
and copies not counted), backward included.

Usage::

    python benchmarks/bench_layers.py            # full table, writes docs/benchmarks.md
    python benchmarks/bench_layers.py --quick    # nside 4 and 8, K = 3, U-Net
    python benchmarks/bench_layers.py --threads 1 --no-write
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- layers:start -->", "<!-- layers:end -->"
GRID = 16
BATCH = 1
TARGET_CONFIG = dict(layer="mixed", nside=8, channels=(16, 16), kernel_size=3)


# --- (a) the published formulation -------------------------------------------------------

def published_chebyshev_terms(laplacian, x, kernel_size):
    """Published recursion: ``[T_0 x, ..., T_{K-1} x]`` stacked by concatenation.

    x : (V, D) -> (K, V, D), with ``torch.sparse.mm`` on a sparse Laplacian.
    """
    import torch

    terms = x.unsqueeze(0)
    if kernel_size > 1:
        x1 = torch.sparse.mm(laplacian, x)
        terms = torch.cat((terms, x1.unsqueeze(0)), 0)
        for _ in range(2, kernel_size):
            x2 = 2 * torch.sparse.mm(laplacian, x1) - x
            terms = torch.cat((terms, x2.unsqueeze(0)), 0)
            x, x1 = x1, x2
    return terms


def make_published_layers():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PublishedMixedConv(nn.Module):
        """(a) RT-ESD layer as published: sparse recursion, then conv3d per vertex."""

        def __init__(self, laplacian, weight_sphere, weight_spatial, class_index, bias):
            super().__init__()
            self.register_buffer("laplacian", laplacian)
            self.weight_sphere = nn.Parameter(weight_sphere.detach().clone())
            self.weight_spatial = nn.Parameter(weight_spatial.detach().clone())
            self.bias = nn.Parameter(bias.detach().clone())
            classes = torch.as_tensor(class_index)
            onehot = F.one_hot(classes, weight_spatial.shape[-1]).to(weight_spatial.dtype)
            self.register_buffer("weight_tmp", onehot)  # (m, m, m, R)

        def forward(self, x):
            b, n_in, v, nx, ny, nz = x.shape
            n_out, _, k = self.weight_sphere.shape
            x0 = x.permute(2, 1, 0, 3, 4, 5).contiguous().view(v, -1)
            terms = published_chebyshev_terms(self.laplacian, x0, k)
            terms = terms.view(k, v, n_in, b, nx, ny, nz).permute(3, 1, 2, 0, 4, 5, 6)
            terms = terms.contiguous().view(b * v, n_in * k, nx, ny, nz)
            spatial = (self.weight_tmp * self.weight_spatial[:, :, None, None, None, :]).sum(-1)
            m = spatial.shape[-1]
            weight = (self.weight_sphere.reshape(n_out, n_in * k, 1, 1, 1).expand(-1, -1, m, m, m)
                      * spatial.repeat_interleave(k, dim=1))
            y = F.conv3d(terms, weight, padding="same")
            y = y.view(b, v, n_out, nx, ny, nz).permute(0, 2, 1, 3, 4, 5).contiguous()
            return y + self.bias[None, :, None, None, None, None]

    class PublishedSphericalConv(nn.Module):
        """(a) ESD Chebyshev layer as published: sparse recursion, then a matmul."""

        def __init__(self, laplacian, weight, bias):
            super().__init__()
            self.register_buffer("laplacian", laplacian)
            self.weight = nn.Parameter(weight.detach().permute(2, 1, 0).contiguous())  # (K, I, O)
            self.bias = nn.Parameter(bias.detach().clone())

        def forward(self, x):
            b, n_in, v, nx, ny, nz = x.shape
            k, _, n_out = self.weight.shape
            x0 = x.permute(2, 1, 0, 3, 4, 5).contiguous().view(v, -1)
            terms = published_chebyshev_terms(self.laplacian, x0, k)
            terms = terms.view(k, v, n_in, b, nx, ny, nz).permute(3, 1, 4, 5, 6, 0, 2)
            terms = terms.contiguous().view(-1, k * n_in)
            y = terms.matmul(self.weight.view(k * n_in, n_out)).view(b, v, nx, ny, nz, n_out)
            y = y.permute(0, 5, 1, 2, 3, 4).contiguous()
            return y + self.bias[None, :, None, None, None, None]

    return PublishedMixedConv, PublishedSphericalConv


# --- building the layers -------------------------------------------------------------------

def _sphere(nside, hemisphere):
    from esdmri.sphere import HealpixSphere

    return HealpixSphere(nside, hemisphere=hemisphere)


def full_to_hemisphere_rows(nside):
    """Row of the hemisphere holding each full-sphere vertex (or its antipode)."""
    full, hemi = _sphere(nside, False), _sphere(nside, True)
    rows = np.full(full.n_vertices, -1)
    rows[hemi.pixels] = np.arange(hemi.n_vertices)
    dropped = rows < 0
    import healpy as hp

    antipodes = hp.vec2pix(nside, *(-full.vertices[dropped].T), nest=True)
    rows[dropped] = rows[antipodes]
    return rows


def build_ours(layer, nside, channels, kernel_size, hemisphere, layout="sparse"):
    import torch

    from esdmri.nn import E3SO3Conv, SphericalConv

    torch.manual_seed(0)
    sphere = _sphere(nside, hemisphere)
    basis = sphere.chebyshev_basis(kernel_size)
    if layer == "mixed":
        return E3SO3Conv(*channels, basis, spatial_kernel_size=3, layout=layout), sphere
    return SphericalConv(*channels, basis, layout=layout), sphere


def build_published(ours, nside):
    import torch

    mixed_cls, spherical_cls = make_published_layers()
    laplacian = _sphere(nside, False).laplacian(sparse=True).tocoo()
    laplacian = torch.sparse_coo_tensor(np.vstack([laplacian.row, laplacian.col]),
                                        laplacian.data, laplacian.shape,
                                        dtype=torch.get_default_dtype(),
                                        check_invariants=True).coalesce()
    if hasattr(ours, "weight_sphere"):
        return mixed_cls(laplacian, ours.weight_sphere, ours.weight_spatial,
                         ours.sums.class_index, ours.bias)
    return spherical_cls(laplacian, ours.weight, ours.bias)


def flop_counts(layer, impl, nside, channels, kernel_size):
    """(forward, backward) FLOP of one call on a BATCH x GRID^3 block."""
    n_in, n_out = channels
    k = kernel_size
    sphere = _sphere(nside, impl == "ours-hemi")
    v = sphere.n_vertices
    voxels = BATCH * GRID**3
    if impl == "published":
        nnz = sphere.laplacian(sparse=True).nnz
        recursion = 2 * (k - 1) * nnz * n_in * voxels
        mixing = 2 * v * voxels * n_out * n_in * k * (27 if layer == "mixed" else 1)
        return recursion + mixing, recursion + 2 * mixing
    # Our sparse recursions: K - 1 products with the Laplacian per field.
    recursion = 2 * (k - 1) * sphere.laplacian(sparse=True).nnz * voxels
    if layer == "mixed":
        sphere_op = recursion * n_out  # synthesis of the outputs' Chebyshev terms
        mixing = 2 * v * voxels * n_out * n_in * k * 4  # 4 distance classes
        # Backward: two matmuls and one sphere product (the analysis).
        return sphere_op + mixing, 2 * mixing + sphere_op
    sphere_op = recursion * min(n_in, n_out)
    mixing = 2 * v * voxels * n_out * n_in * k
    return sphere_op + mixing, 2 * mixing + sphere_op


def predicted_gib(layer, impl, nside, channels, kernel_size):
    """Rough peak of one forward + backward, to skip what cannot fit."""
    n_in, n_out = channels
    v = _sphere(nside, impl == "ours-hemi").n_vertices
    field = 4 * BATCH * v * GRID**3 / 2**30  # GiB of one float32 channel
    if impl == "published":
        return field * (n_in * (1 + 3 * kernel_size) + 2 * n_out)
    return field * (n_in + (kernel_size + 1) * max(n_in, n_out))


# --- worker processes ----------------------------------------------------------------------

def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(run, repeats):
    """Peak MiB of ``run()`` above the RSS before it, and its best time."""
    run()  # warm-up: thread pools, library workspaces
    gc.collect()
    if _reset_peak():
        before = _rss_kib("VmRSS")
        run()
        peak = (_rss_kib("VmHWM") - before) / 1024
    else:
        peak = float("nan")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return peak, float(np.min(times))


def worker_layer(task):
    import torch

    layer, impl, nside = task["layer"], task["impl"], task["nside"]
    channels, k = tuple(task["channels"]), task["kernel_size"]
    ours, sphere = build_ours(layer, nside, channels, k, impl == "ours-hemi",
                              task.get("layout", "sparse"))
    module = build_published(ours, nside) if impl == "published" else ours
    if impl == "published":
        sphere = _sphere(nside, False)
    del ours
    x = torch.randn(BATCH, channels[0], sphere.n_vertices, GRID, GRID, GRID, requires_grad=True)
    gc.collect()

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module(x).sum().backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    _, t_forward = measure(forward, task["repeats"])
    peak, t_both = measure(forward_backward, task["repeats"])
    return dict(forward_s=t_forward, both_s=t_both, peak_mib=peak)


def worker_check(task):
    """Relative errors of ours (hemisphere and full sphere) against (a), float32."""
    import torch

    layer, nside = task["layer"], task["nside"]
    channels, k = tuple(task["channels"]), task["kernel_size"]
    ours_full, full = build_ours(layer, nside, channels, k, hemisphere=False)
    ours_hemi, _ = build_ours(layer, nside, channels, k, hemisphere=True)
    ours_hemi.load_state_dict(ours_full.state_dict())
    published = build_published(ours_full, nside)
    rows = torch.as_tensor(full_to_hemisphere_rows(nside))
    torch.manual_seed(1)
    hemi_signal = torch.randn(BATCH, channels[0], int(rows.max()) + 1, GRID, GRID, GRID)
    even = hemi_signal[:, :, rows]  # antipodally symmetric input on the full sphere

    def run(module, x):
        x = x.clone().requires_grad_()
        y = module(x)
        (y * torch.cos(y)).sum().backward()  # a non-trivial output gradient
        return y.detach(), x.grad

    y_ref, g_ref = run(published, even)
    y_full, g_full = run(ours_full, even)
    y_hemi, g_hemi = run(ours_hemi, hemi_signal)
    kept = torch.as_tensor(_sphere(nside, True).pixels)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # The full-sphere loss counts every (even) output twice; the hemisphere's
    # input gradient collects both antipodes of the full one.
    g_ref_hemi = torch.zeros_like(g_hemi).index_add_(2, rows, g_ref) / 2
    return dict(full_output=rel(y_full, y_ref), full_grad=rel(g_full, g_ref),
                hemi_output=rel(y_hemi, y_ref[:, :, kept]), hemi_grad=rel(g_hemi, g_ref_hemi))


def worker_unet(task):
    import torch

    from esdmri.nn import UNet

    torch.manual_seed(0)
    sphere = _sphere(task["nside"], True)
    net = UNet(4, 3, sphere, depth=4, filter_start=8, conv=task["conv"])
    x = torch.rand(BATCH, 4, sphere.n_vertices, GRID, GRID, GRID)
    optimizer = torch.optim.Adam(net.parameters(), lr=1.7e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        optimizer.step()

    def inference():
        with torch.no_grad():
            net(x)

    net.train()
    peak_train, t_train = measure(train_step, task["repeats"])
    net.eval()
    peak_infer, t_infer = measure(inference, task["repeats"])
    voxels = BATCH * GRID**3
    return dict(train_voxels_s=voxels / t_train, infer_voxels_s=voxels / t_infer,
                train_s=t_train, infer_s=t_infer, peak_train_mib=peak_train,
                peak_infer_mib=peak_infer, n_vertices=sphere.n_vertices,
                parameters=sum(p.numel() for p in net.parameters()))


def worker_matmul(task):
    import torch

    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    times = []
    for _ in range(task["repeats"]):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return dict(gflops=2 * n**3 / min(times) / 1e9)


def worker_equivariance(task):
    from esdmri.testing import rotation_equivariance_error

    return rotation_equivariance_error(task["nside"], n_rotations=task["n_rotations"])


WORKERS = dict(layer=worker_layer, check=worker_check, unet=worker_unet, matmul=worker_matmul,
               equivariance=worker_equivariance)


def run_worker(task, threads):
    """Run ``task`` in a fresh process; its result dict, or ``{"error": ...}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    task = dict(task, threads=threads)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(task_json):
    import torch

    task = json.loads(task_json)
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    print(json.dumps(WORKERS[task["kind"]](task)))


# --- the report ----------------------------------------------------------------------------

def layer_rows(args, peak_gflops):
    nsides = (4, 8) if args.quick else (4, 8, 16)
    kernel_sizes = (3,) if args.quick else (3, 5)
    rows = []
    for layer in ("mixed", "spherical"):
        for nside in nsides:
            for channels in ((8, 16), (16, 16)):
                for k in kernel_sizes:
                    config = dict(layer=layer, nside=nside, channels=channels, kernel_size=k)
                    results = {}
                    for impl in ("published", "ours-full", "ours-hemi"):
                        need = predicted_gib(layer, impl, nside, channels, k)
                        if need > args.max_gib:
                            results[impl] = {"error": f"skipped: needs ~{need:.0f} GiB"}
                            continue
                        results[impl] = run_worker(dict(config, kind="layer", impl=impl,
                                                        repeats=args.repeats), args.threads)
                        print(layer, nside, channels, k, impl, results[impl], flush=True)
                    check = {}
                    if "error" not in results["published"]:
                        check = run_worker(dict(config, kind="check"), args.threads)
                    rows.append((config, results, check))
    return rows


def format_layer_table(rows, peak_gflops):
    lines = ["| layer | nside | I->O | K | implementation | V | forward ms | fwd+bwd ms | "
             "GFLOP/s | % of matmul | peak MiB | speed-up (fwd+bwd) | memory vs (a) | "
             "rel. error vs (a) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, results, check in rows:
        reference = results["published"]
        for impl, result in results.items():
            v = _sphere(config["nside"], impl == "ours-hemi").n_vertices
            head = (f"| {config['layer']} | {config['nside']} | "
                    f"{config['channels'][0]}->{config['channels'][1]} | "
                    f"{config['kernel_size']} | {impl} | {v} |")
            if "error" in result:
                lines.append(f"{head} {result['error']} | | | | | | | |")
                continue
            forward, backward = flop_counts(config["layer"], impl, config["nside"],
                                            config["channels"], config["kernel_size"])
            rate = (forward + backward) / result["both_s"] / 1e9
            speedup = memory = error = "-"
            if impl != "published" and "error" not in reference:
                speedup = f"{reference['both_s'] / result['both_s']:.1f}x"
                memory = f"{result['peak_mib'] / reference['peak_mib']:.0%}"
            if impl != "published" and check and "error" not in check:
                side = "hemi" if impl == "ours-hemi" else "full"
                error = f"{max(check[side + '_output'], check[side + '_grad']):.1e}"
            lines.append(f"{head} {1e3 * result['forward_s']:.0f} | {1e3 * result['both_s']:.0f} |"
                         f" {rate:.1f} | {rate / peak_gflops:.1%} | {result['peak_mib']:.0f} |"
                         f" {speedup} | {memory} | {error} |")
    return lines


def target_summary(rows):
    for config, results, check in rows:
        if all(config[key] == value for key, value in TARGET_CONFIG.items()):
            ref, ours = results["published"], results["ours-hemi"]
            if "error" in ref or "error" in ours or not check or "error" in check:
                return "Target configuration could not be measured."
            speedup = ref["both_s"] / ours["both_s"]
            memory = ours["peak_mib"] / ref["peak_mib"]
            error = max(check["hemi_output"], check["hemi_grad"])
            verdict = ("met" if speedup >= 5 and memory <= 0.3 and error < 1e-5 else "NOT met")
            return (f"Target (mixed conv, nside 8, 16->16, K = 3; forward + backward >= 5x faster "
                    f"than (a), peak memory <= 30% of (a), relative error < 1e-5): speed-up "
                    f"{speedup:.1f}x, memory {memory:.0%}, error {error:.1e}: **{verdict}**.")
    return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="nside 4 and 8, K = 3 only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--max-gib", type=float, default=6.0,
                        help="skip configurations predicted to need more memory")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOCS}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    peak = run_worker(dict(kind="matmul", repeats=5), args.threads)["gflops"]
    print(f"float32 matmul: {peak:.1f} GFLOP/s", flush=True)
    rows = layer_rows(args, peak)
    unets = {}
    for conv in ("e3so3",) if args.quick else ("e3so3", "spherical"):
        unets[conv] = run_worker(dict(kind="unet", conv=conv, nside=8, repeats=args.repeats),
                                 args.threads)
        print("unet", conv, unets[conv], flush=True)
    equivariance = {nside: run_worker(dict(kind="equivariance", nside=nside, n_rotations=4),
                                      args.threads) for nside in (4, 8, 16)}
    print("equivariance", equivariance, flush=True)

    import torch

    threads = args.threads or torch.get_num_threads()
    lines = [START, "## Spatio-spherical layers: speed, memory, equivariance", "",
             f"Generated by `python benchmarks/bench_layers.py{' --quick' if args.quick else ''}` "
             f"on {platform.machine()} with {os.cpu_count()} cores, {threads} torch threads, "
             f"torch {torch.__version__}, float32, batch {BATCH}, {GRID}^3 voxel block, "
             f"spatial kernel 3 (isotropic), zero padding. Rerun it to update this section.", "",
             f"(b) float32 matmul throughput (4096^2 `torch.matmul`): **{peak:.0f} GFLOP/s**.", "",
             "Implementations: `published` = (a), the published formulation on the full "
             "sphere (sparse Laplacian recursion with `torch.sparse.mm`, then a dense 27-tap "
             "`conv3d` per vertex, or a channel matmul for the spherical conv); `ours-full` / "
             "`ours-hemi` = `esdmri.nn` on the full / hemispherical graph (sparse Laplacian "
             "recursions as fused `addmm` on cache-sized column blocks; the mixed conv slab "
             "by slab of x-rows, 4 neighbourhood sums + one channel matmul, backward "
             "recomputing the sums). Times are the best of the repeats: this VM has slow "
             "phases of up to 1.7x, so a single row can still be out of line with its "
             "neighbours. Relative error: max of output and input-gradient errors "
             "against (a) on the same even input (hemisphere: on its kept vertices). GFLOP/s: "
             "executed matmul-type FLOP of forward + backward over its time; peak MiB: rise of "
             "resident memory during one forward + backward (method in the script's "
             "docstring).", ""]
    lines += format_layer_table(rows, peak)
    lines += ["", target_summary(rows), ""]
    lines += ["U-Net (depth 4, filter_start 8, 4 -> 3 channels, hemisphere nside 8, "
              f"{GRID}^3 block, batch {BATCH}, Adam step included in training):", "",
              "| conv | parameters | training voxels/s | inference voxels/s | training peak MiB "
              "| inference peak MiB |", "|---|---|---|---|---|---|"]
    for conv, result in unets.items():
        if "error" in result:
            lines.append(f"| {conv} | {result['error']} | | | | |")
            continue
        lines.append(f"| {conv} | {result['parameters']} | {result['train_voxels_s']:.0f} | "
                     f"{result['infer_voxels_s']:.0f} | {result['peak_train_mib']:.0f} | "
                     f"{result['peak_infer_mib']:.0f} |")
    lines += ["", "Rotation equivariance of the spherical Chebyshev conv (K = 3, 1 -> 4 "
              "channels, hemisphere) under random SO(3) rotations, measured by "
              "`esdmri.testing.rotation_equivariance_error` (`tests/test_equivariance.py` "
              "asserts it below 0.25): band-limited even input (real SH up to order 4, "
              "rotated with e3nn's Wigner-D), output of the rotated input against the rotated "
              "output "
              "(least-squares even-SH fit of the output on the grid, rotated with Wigner-D, "
              "evaluated on the grid); relative L2 error, mean and max over 4 random rotations. "
              "The interpolation floor is the same comparison for the identity rotation. The "
              "error comes from the graph Laplacian terms of the filter (the identity term is "
              "exactly equivariant). Exact symmetries (grid translations, 90-degree rotations "
              "about z of grid and sphere, grid reflections, hemisphere = full sphere on even "
              "signals) are tested to 1e-10.", "",
              "| nside | vertices | SH fit order | error mean | error max | interpolation floor |",
              "|---|---|---|---|---|---|"]
    for nside, result in equivariance.items():
        if "error" in result:
            lines.append(f"| {nside} | {result['error']} | | | | |")
            continue
        lines.append(f"| {nside} | {result['n_vertices']} | {result['fit_order']} | "
                     f"{result['mean']:.3f} | {result['max']:.3f} | {result['floor']:.3f} |")
    lines.append(END)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(table)


def write_section(section):
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


if __name__ == "__main__":
    main()
