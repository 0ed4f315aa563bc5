"""Speed and memory of the pq-layers on a real-shaped block: 3 shells x 30 directions, 16^3.

Each configuration runs in a fresh process: it builds the layer and its
input, then times the forward pass (no autograd) and the forward + backward
pass (gradient of the output sum) and records the peak memory of the first
call of each. On CPU the peak is the rise of the process's peak resident
memory (``ru_maxrss``) over its level after building layer and input; on
CUDA it is ``torch.cuda.max_memory_allocated`` above the memory allocated
before the call. Prints a markdown table.

Usage::

    python benchmarks/bench_pq.py                  # CPU, all configurations
    python benchmarks/bench_pq.py --device cuda --repeats 10
    python benchmarks/bench_pq.py --only pq-first pq-hidden
"""

import argparse
import multiprocessing
import resource
import time

import numpy as np

SHELL_BVALS = (1000.0, 2000.0, 3000.0)
N_DIRECTIONS = 30
BLOCK = 16
HIDDEN = (4, 2, 1)
GATED = (7, 2, 1)  # HIDDEN with one gate per l > 0 channel

# Configuration name -> description.
CONFIGS = {
    "pq-first": "pq-layer, 1 scalar -> (7, 2, 1), 91 -> 91 q-samples (dense)",
    "pq-reduce": "pq-layer, 1 scalar -> (7, 2, 1), 91 -> 7 q-samples (network's first layer)",
    "pq-hidden": "pq-layer, (4, 2, 1) -> (7, 2, 1), 7 -> 7 q-samples (network's hidden layer)",
    "pq-full": "pq-layer, (4, 2, 1) -> (7, 2, 1), 91 -> 91 q-samples (dense)",
    "pq-local": "pq-layer, (4, 2, 1) -> (7, 2, 1), 91 -> 91 q-samples, q_radius 0.5",
    "p-conv": "3D steerable conv, (4, 2, 1) -> (7, 2, 1)",
    "conv3d": "plain Conv3d, 91 -> 32 channels (CNN's first layer)",
    "sphere-pq": "PQSphereConv, 8 -> 8 channels, HEALPix nside 4 (192 vertices), auto radius",
    "pq-network": "PQSegmentationNetwork (5 layers), batch 1",
    "cnn-network": "CNN3DBaseline (5 layers, matched parameters), batch 1",
    "pq-published-first": "published preset's pq-layer, 1 scalar -> (11, 4), 91 -> 91 "
                          "q-samples, 5^3 kernel, linear zero offsets",
    "pq-published-network": "PQSegmentationNetwork.from_preset('mueller2021'), batch 1",
}


def acquisition_q():
    """q-vectors of 1 b0 + 3 shells x 30 random directions (|q| = sqrt(b / 3000))."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(len(SHELL_BVALS) * N_DIRECTIONS, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = np.sqrt(np.repeat(SHELL_BVALS, N_DIRECTIONS) / max(SHELL_BVALS))
    return np.concatenate([np.zeros((1, 3)), directions * lengths[:, None]])


def build(name, device):
    """Layer (or network) and its input for configuration ``name``."""
    import torch

    from esdmri.nn.pq import PConv, PQConv, PQSphereConv, symmetric_q_sampling
    from esdmri.nn.tensor_field import TensorFieldType
    from esdmri.segmentation import CNN3DBaseline, PQSegmentationNetwork
    from esdmri.sphere import HealpixSphere

    q = acquisition_q()
    hidden_q = symmetric_q_sampling(6)
    grid = (BLOCK,) * 3
    hidden_dim = TensorFieldType(HIDDEN).dim
    if name == "pq-first":
        layer, shape = PQConv(1, GATED, q), (1, 1, len(q), *grid)
    elif name == "pq-reduce":
        layer, shape = PQConv(1, GATED, q, hidden_q), (1, 1, len(q), *grid)
    elif name == "pq-hidden":
        layer, shape = PQConv(HIDDEN, GATED, hidden_q), (1, hidden_dim, len(hidden_q), *grid)
    elif name == "pq-full":
        layer, shape = PQConv(HIDDEN, GATED, q), (1, hidden_dim, len(q), *grid)
    elif name == "pq-local":
        layer, shape = PQConv(HIDDEN, GATED, q, q_radius=0.5), (1, hidden_dim, len(q), *grid)
    elif name == "p-conv":
        layer, shape = PConv(HIDDEN, GATED), (1, hidden_dim, *grid)
    elif name == "conv3d":
        layer, shape = torch.nn.Conv3d(len(q), 32, 3, padding=1), (1, len(q), *grid)
    elif name == "sphere-pq":
        sphere = HealpixSphere(4)
        layer = PQSphereConv(8, 8, sphere.vertices)
        shape = (1, 8, sphere.n_vertices, *grid)
    elif name == "pq-network":
        layer, shape = PQSegmentationNetwork(q), (1, 1, len(q), *grid)
    elif name == "pq-published-first":
        layer = PQSegmentationNetwork.from_preset("mueller2021", q).pq_layers[0]
        shape = (1, 1, len(q), *grid)
    elif name == "pq-published-network":
        layer, shape = PQSegmentationNetwork.from_preset("mueller2021", q), (1, 1, len(q), *grid)
    elif name == "cnn-network":
        n_parameters = sum(p.numel() for p in PQSegmentationNetwork(q).parameters())
        layer = CNN3DBaseline(len(q), CNN3DBaseline.width_for_parameters(len(q), n_parameters))
        shape = (1, 1, len(q), *grid)
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {sorted(CONFIGS)}")
    return layer.to(device), torch.rand(shape, device=device)


def _peak_memory(device, before, torch):
    if device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20


def _memory_level(device, torch):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name, mode, device, repeats, threads):
    """Timing (ms, median) and peak memory (MiB) of one configuration and mode.

    ``mode`` is "forward" (no autograd) or "forward_backward". Meant to run
    in a fresh process, so that the first call's peak is its own.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    layer, x = build(name, device)
    kernel = getattr(layer, "kernel", None)

    def synchronise():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            layer(x)
        synchronise()

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        synchronise()

    step = forward if mode == "forward" else forward_backward
    before = _memory_level(device, torch)
    step()  # first call: peak memory (and warm-up)
    peak = _peak_memory(device, before, torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"parameters": sum(p.numel() for p in layer.parameters()),
            "kernel_entries": kernel().numel() if kernel is not None else None,
            f"{mode}_ms": 1000 * float(np.median(times)), f"{mode}_peak_mib": peak}


def _child(queue, *args):
    queue.put(measure(*args))


def run_isolated(name, device, repeats, threads):
    """Measure both modes of one configuration, each in a fresh process."""
    context = multiprocessing.get_context("spawn")
    result = {"name": name}
    for mode in ("forward", "forward_backward"):
        queue = context.Queue()
        process = context.Process(target=_child,
                                  args=(queue, name, mode, device, repeats, threads))
        process.start()
        result.update(queue.get())
        process.join()
    return result


def format_table(results):
    lines = ["| configuration | parameters | kernel entries | forward ms | forward+backward ms "
             "| peak MiB forward | peak MiB forward+backward |",
             "|---|---|---|---|---|---|---|"]
    for row in results:
        entries = "-" if row["kernel_entries"] is None else f"{row['kernel_entries'] / 1e6:.2f} M"
        lines.append(
            f"| {row['name']}: {CONFIGS[row['name']]} | {row['parameters']} | {entries} "
            f"| {row['forward_ms']:.1f} | {row['forward_backward_ms']:.1f} "
            f"| {row['forward_peak_mib']:.0f} | {row['forward_backward_peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=None)
    args = parser.parse_args(argv)
    names = args.only or list(CONFIGS)
    results = []
    for name in names:
        results.append(run_isolated(name, args.device, args.repeats, args.threads))
        row = results[-1]
        print(f"{name:>12}: forward {row['forward_ms']:9.1f} ms, forward+backward "
              f"{row['forward_backward_ms']:9.1f} ms, "
              f"peak {row['forward_backward_peak_mib']:7.0f} MiB", flush=True)
    print(f"\nblock {BLOCK}^3, 1 b0 + {len(SHELL_BVALS)} shells x {N_DIRECTIONS} directions, "
          f"device {args.device}, median of {args.repeats}\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
