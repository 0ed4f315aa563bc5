"""Lesion segmentation: data efficiency of the SE(3)-equivariant pq-network vs 3D CNNs.

Tests the claims of Mueller et al. (ISMRM 2021) on multi-shell lesion
phantoms (:mod:`esdmri.segmentation.phantom`): the equivariant network
segments better than a non-equivariant 3D CNN of similar parameter count,
and matches it with a quarter of the training data. Every network is trained
on 25 %, 50 % and 100 % of a training set of phantoms in their canonical
orientation, for several seeds (training phantoms and initialisation change
with the seed), and scored on held-out phantoms in the canonical orientation
and on held-out phantoms rotated as a whole by random rotations. The CNN is
trained twice: as is, and with rotation augmentation (every training phantom
also rendered at random orientations, an exact rotation of the anatomy and of
q-space), the fair baseline on rotated test data. Prints a mean +- sd table,
saves a plot and writes both into ``docs/benchmarks.md`` between
``<!-- segmentation:start -->`` and ``<!-- segmentation:end -->``.

Usage::

    python benchmarks/segmentation.py --quick      # tiny, a few minutes on CPU
    python benchmarks/segmentation.py              # the full study
    python benchmarks/segmentation.py --device cuda --models pq,pq_published,cnn,cnn_aug
"""

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dipy.core.gradients import gradient_table  # noqa: E402
from dipy.core.sphere import HemiSphere, disperse_charges  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

from esdmri.metrics import average_precision, dice, roc_auc  # noqa: E402
from esdmri.nn.pq import q_from_gtab  # noqa: E402
from esdmri.segmentation import (  # noqa: E402
    CNN3DBaseline,
    PQSegmentationNetwork,
    predict_segmentation,
    signal_to_input,
    train_segmentation,
)
from esdmri.segmentation.phantom import make_lesion_dataset, make_lesion_phantom  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS_FILE = REPO / "docs" / "benchmarks.md"
START_MARKER, END_MARKER = "<!-- segmentation:start -->", "<!-- segmentation:end -->"
PLOT_NAME = "segmentation_vs_training_size.png"

FRACTIONS = (0.25, 0.5, 1.0)
# Every run takes the same number of optimiser steps, so smaller training sets
# are not also trained for less time. The full mode is sized for about 45
# minutes on one CPU core of a loaded machine with the default models (see
# docs/benchmarks.md for the measured step times).
SETTINGS = {
    "quick": dict(shape=(10, 10, 10), n_train=4, n_test=3, steps=30, seeds=(0, 1)),
    "full": dict(shape=(16, 16, 16), n_train=12, n_test=8, steps=150, seeds=(0, 1, 2)),
}
# Acquisition: 1 b0 + 3 shells x 30 directions (91 measurements).
SHELL_BVALS = (1000.0, 2000.0, 3000.0)
N_DIRECTIONS = 30
GTAB_SEED = 7
SNR = 20
BATCH_SIZE = 2
LEARNING_RATE = 3e-3
DICE_THRESHOLD = 0.5
# Extra random orientations rendered per training phantom for the augmented CNN.
N_AUGMENTED_ROTATIONS = 3
TEST_SEED_OFFSET = 1000
DEFAULT_MODELS = ("pq", "pq_choices", "cnn", "cnn_aug")
LABELS = {"pq": "pq-network (esdmri defaults)",
          "pq_choices": "pq-network, published layer choices",
          "pq_published": "pq-network, published preset",
          "cnn": "3D CNN", "cnn_aug": "3D CNN + rotation augmentation"}
COLOURS = {"pq": "tab:blue", "pq_choices": "tab:purple", "pq_published": "tab:green",
           "cnn": "tab:red", "cnn_aug": "tab:orange"}
MODEL_DESCRIPTIONS = {
    "pq": "`PQSegmentationNetwork` with its defaults (pq, pq, pq + q-reduction, p, p; "
          "hidden fields 4 scalars, 2 vectors, 1 l=2 tensor; hidden q-sampling = origin + "
          "6 axis directions; 3^3 kernels)",
    "pq_choices": "the defaults with `selection_rule=\"two_sided\"`, "
                  "`normalize_q_offsets=True`, `zero_offsets=\"linear\"`, "
                  "`p_radial=\"cosine\"`",
    "pq_published": "`PQSegmentationNetwork.from_preset(\"mueller2021\", q)`, the authors' "
                    "example network (see docs/methods.md)",
    "cnn": "`CNN3DBaseline`, five 3^3 convolutions with the 91 measurements as input "
           "channels, width chosen to match the default pq-network's parameter count",
    "cnn_aug": "the same CNN trained with rotation augmentation",
}
# The published layer choices on esdmri's default architecture (7-point hidden q-sampling).
PUBLISHED_LAYER_CHOICES = dict(selection_rule="two_sided", normalize_q_offsets=True,
                               zero_offsets="linear", p_radial="cosine")
METRICS = (("auc", "ROC AUC"), ("ap", "AP"), ("dice", "Dice"))
# Mueller et al., real MS data, full training set.
PAPER = {"auc": 0.982, "ap": 0.630, "dice": 0.592}
# The CNN's scores below the equivariant network's, in per cent (relative).
PAPER_CNN_GAP = {"auc": 3, "ap": 39, "dice": 22}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes, few training steps")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {sorted(LABELS)}")
    parser.add_argument("--shape", type=int, default=None, help="override the volume side")
    parser.add_argument("--n-train", type=int, default=None, help="override the training set")
    parser.add_argument("--n-test", type=int, default=None, help="override each test set")
    parser.add_argument("--steps", type=int, default=None, help="override the optimiser steps")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="with --seeds: the first seed (to add seeds to an earlier run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also save segmentation_results.json (after every run) and the plot")
    parser.add_argument("--no-write-docs", action="store_true",
                        help="do not update docs/benchmarks.md")
    parser.add_argument("--render", type=Path, nargs="+", default=None,
                        help="no training: write the table, plot and docs section from saved "
                             "segmentation_results.json files (runs of other seeds are merged)")
    return parser.parse_args(argv)


def benchmark_gtab():
    """1 b0 + 3 shells of 30 well-spread directions (rotated differently per shell)."""
    rng = np.random.default_rng(GTAB_SEED)
    start = rng.normal(size=(N_DIRECTIONS, 3))
    hemisphere, _ = disperse_charges(HemiSphere(xyz=start / np.linalg.norm(start, axis=1,
                                                                          keepdims=True)), 1000)
    shells = [rotation.apply(hemisphere.vertices)
              for rotation in Rotation.random(len(SHELL_BVALS), rng=rng)]
    bvecs = np.concatenate([np.zeros((1, 3)), *shells])
    bvals = np.concatenate([[0.0], np.repeat(SHELL_BVALS, N_DIRECTIONS)])
    return gradient_table(bvals=bvals, bvecs=bvecs)


def build_model(name, gtab, n_parameters=None):
    """A network by benchmark name; CNN widths match ``n_parameters``."""
    q = q_from_gtab(gtab)
    if name == "pq":
        return PQSegmentationNetwork(q)
    if name == "pq_choices":
        return PQSegmentationNetwork(q, **PUBLISHED_LAYER_CHOICES)
    if name == "pq_published":
        return PQSegmentationNetwork.from_preset("mueller2021", q)
    if name in ("cnn", "cnn_aug"):
        width = CNN3DBaseline.width_for_parameters(len(gtab.bvals), n_parameters)
        return CNN3DBaseline(len(gtab.bvals), width)
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(LABELS)}")


def training_phantoms(n_volumes, shape, gtab, seed, n_rotations=0):
    """Canonical training phantoms, each followed by ``n_rotations`` random re-renderings.

    A re-rendering reuses the phantom's random stream with an explicit
    rotation: the same anatomy, fibres and lesions, rotated as a whole
    together with q-space (exact rotation augmentation, no interpolation).
    """
    streams = np.random.SeedSequence(seed).spawn(n_volumes)
    rotations = Rotation.random(max(1, n_volumes * n_rotations),
                                rng=np.random.default_rng(seed + 17)).as_matrix()
    volumes = []
    for index, stream in enumerate(streams):
        for copy in range(n_rotations + 1):
            rotation = None if copy == 0 else rotations[index * n_rotations + copy - 1]
            volumes.append(make_lesion_phantom(shape, gtab, SNR, rotation=rotation,
                                               seed=np.random.default_rng(stream)))
    return volumes


def score(probabilities, phantoms):
    labels = np.stack([p.labels for p in phantoms])
    masks = np.stack([p.mask for p in phantoms])
    return {"auc": roc_auc(probabilities, labels, masks),
            "ap": average_precision(probabilities, labels, masks),
            "dice": dice(probabilities >= DICE_THRESHOLD, labels, masks)}


def _as_batch(phantoms, gtab):
    inputs = signal_to_input(np.stack([p.data for p in phantoms]), gtab)
    return inputs, torch.from_numpy(np.stack([p.labels for p in phantoms]))


def run(settings, models, device, out=None, command=None):
    gtab = benchmark_gtab()
    shape = settings["shape"]
    tests = {
        "canonical": make_lesion_dataset(settings["n_test"], shape, gtab, SNR, rotate=False,
                                         seed=TEST_SEED_OFFSET),
        "rotated": make_lesion_dataset(settings["n_test"], shape, gtab, SNR, rotate=True,
                                       seed=TEST_SEED_OFFSET + 1),
    }
    test_inputs = {name: _as_batch(split, gtab)[0] for name, split in tests.items()}
    # CNN widths match the default pq-network's parameter count.
    n_parameters = sum(p.numel() for p in build_model("pq", gtab).parameters())
    results = []
    for seed in settings["seeds"]:
        augmented = "cnn_aug" in models
        volumes = training_phantoms(settings["n_train"], shape, gtab, seed,
                                    N_AUGMENTED_ROTATIONS if augmented else 0)
        per_volume = N_AUGMENTED_ROTATIONS + 1 if augmented else 1
        canonical = volumes[::per_volume]
        for fraction in FRACTIONS:
            n_volumes = max(1, math.ceil(fraction * settings["n_train"]))
            for name in models:
                chosen = volumes[:n_volumes * per_volume] if name == "cnn_aug" else \
                    canonical[:n_volumes]
                inputs, labels = _as_batch(chosen, gtab)
                epochs = max(1, round(settings["steps"] * BATCH_SIZE / len(chosen)))
                torch.manual_seed(seed)
                model = build_model(name, gtab, n_parameters)
                start = time.perf_counter()
                history = train_segmentation(
                    model, inputs, labels, epochs=epochs, batch_size=BATCH_SIZE,
                    learning_rate=LEARNING_RATE, device=device, seed=seed, verbose=False)
                seconds = time.perf_counter() - start
                row = {"seed": seed, "fraction": fraction, "n_volumes": n_volumes,
                       "n_training_inputs": len(chosen), "epochs": epochs, "model": name,
                       "n_parameters": sum(p.numel() for p in model.parameters()),
                       "train_seconds": seconds, "final_loss": history[-1]}
                for split, split_inputs in test_inputs.items():
                    row[split] = score(predict_segmentation(model, split_inputs, device=device),
                                       tests[split])
                results.append(row)
                print(f"seed {seed} {fraction:4.0%} ({n_volumes:2d} volumes) {name:>12}: "
                      + " | ".join(f"{split} AUC {row[split]['auc']:.3f} AP {row[split]['ap']:.3f}"
                                   f" Dice {row[split]['dice']:.3f}" for split in tests)
                      + f" | {seconds:.0f} s", flush=True)
                if out is not None:
                    save_results(out, settings, results, gtab, tests, device, command)
    return results, gtab, tests


def _training_command(command):
    """The command of a saved run without its output options."""
    words = (command or "python benchmarks/segmentation.py").split()
    kept = []
    for word in words:
        if word == "--no-write-docs" or (kept and kept[-1] == "--out"):
            if kept and kept[-1] == "--out":
                kept.pop()
            continue
        kept.append(word)
    return " ".join(kept)


def save_results(out, settings, results, gtab, tests, device="cpu", command=None):
    out.mkdir(parents=True, exist_ok=True)
    lesion_fraction = {split: float(np.mean([p.labels.mean() for p in phantoms]))
                       for split, phantoms in tests.items()}
    path = out / "segmentation_results.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(
        {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
         "n_measurements": len(gtab.bvals), "lesion_fraction": lesion_fraction,
         "device": str(device), "command": command, "results": results}, indent=2))
    temporary.replace(path)


def complete_seeds(results):
    """The rows of the seeds that ran every (model, fraction) (drops an interrupted seed)."""
    cells = {(row["model"], row["fraction"]) for row in results}
    done = {seed for seed in {row["seed"] for row in results}
            if {(row["model"], row["fraction"]) for row in results if row["seed"] == seed}
            == cells}
    return [row for row in results if row["seed"] in done]


def summarise(results):
    """Mean and sd over seeds per (model, fraction, split, metric)."""
    summary = {}
    for row in results:
        key = (row["model"], row["fraction"])
        entry = summary.setdefault(key, {"n_volumes": row["n_volumes"],
                                         "n_parameters": row["n_parameters"],
                                         "seconds": [], "scores": {}})
        entry["seconds"].append(row["train_seconds"])
        for split in ("canonical", "rotated"):
            for metric, _ in METRICS:
                entry["scores"].setdefault((split, metric), []).append(row[split][metric])
    for entry in summary.values():
        entry["n_seeds"] = len(entry["seconds"])
        entry["seconds"] = float(np.mean(entry["seconds"]))
        entry["scores"] = {key: (float(np.mean(values)), float(np.std(values, ddof=1))
                                 if len(values) > 1 else 0.0)
                           for key, values in entry["scores"].items()}
    return summary


def format_table(results):
    summary = summarise(results)
    header = ("| training volumes | model | parameters | "
              + " | ".join(f"{title} ({split})" for split in ("canonical", "rotated")
                           for _, title in METRICS) + " | training time |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    models = list(dict.fromkeys(row["model"] for row in results))
    for fraction in FRACTIONS:
        for name in models:
            entry = summary.get((name, fraction))
            if entry is None:
                continue
            cells = [f"{entry['scores'][split, metric][0]:.3f} +- "
                     f"{entry['scores'][split, metric][1]:.3f}"
                     for split in ("canonical", "rotated") for metric, _ in METRICS]
            lines.append(f"| {entry['n_volumes']} ({fraction:.0%}) | {LABELS[name]} "
                         f"| {entry['n_parameters']} | " + " | ".join(cells)
                         + f" | {entry['seconds']:.0f} s |")
    return "\n".join(lines)


def claims(results):
    """The paper's two comparative claims, as a markdown table.

    Per test orientation, pq-network and CNN: the CNN's relative difference
    to the pq-network with all the training data (the paper: -3 / -39 / -22 %
    in AUC / AP / Dice), and whether the pq-network on 25 % of the data
    reaches the CNN on 100 % on every metric: "yes" by the means, "within 1 sd
    only" when only its mean + sd does, else "no".
    """
    summary = summarise(results)
    models = {row["model"] for row in results}
    lines = ["| test | pq-network | CNN | CNN vs pq-network, all data (AUC / AP / Dice) "
             "| pq-network on 25 % vs CNN on 100 % (AUC / AP / Dice) | 4x less data enough? |",
             "|---|---|---|---|---|---|"]
    for split in ("canonical", "rotated"):
        for pq in [name for name in ("pq", "pq_choices", "pq_published") if name in models]:
            for cnn in [name for name in ("cnn", "cnn_aug") if name in models]:
                if any(key not in summary for key in ((pq, 1.0), (cnn, 1.0), (pq, FRACTIONS[0]))):
                    continue
                full_pq, full_cnn = summary[pq, 1.0]["scores"], summary[cnn, 1.0]["scores"]
                quarter_pq = summary[pq, FRACTIONS[0]]["scores"]
                gaps = " / ".join(_relative_gap(full_cnn[split, metric][0],
                                                full_pq[split, metric][0])
                                  for metric, _ in METRICS)
                pairs = " / ".join(f"{quarter_pq[split, metric][0]:.3f} vs "
                                   f"{full_cnn[split, metric][0]:.3f}" for metric, _ in METRICS)
                if all(quarter_pq[split, metric][0] >= full_cnn[split, metric][0]
                       for metric, _ in METRICS):
                    verdict = "yes"
                elif all(quarter_pq[split, metric][0] + quarter_pq[split, metric][1]
                         >= full_cnn[split, metric][0] for metric, _ in METRICS):
                    verdict = "within 1 sd only"
                else:
                    verdict = "no"
                lines.append(f"| {split} | {LABELS[pq]} | {LABELS[cnn]} | {gaps} | {pairs} "
                             f"| {verdict} |")
    return lines if len(lines) > 2 else []


def _relative_gap(value, reference):
    if reference < 1e-6:
        return "n/a"
    percent = round(100 * (value - reference) / reference)
    return f"{percent:+d} %" if percent else "0 %"


def plot(results, path):
    summary = summarise(results)
    models = list(dict.fromkeys(row["model"] for row in results))
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharex=True)
    for row_axes, split in zip(axes, ("canonical", "rotated")):
        for axis, (metric, title) in zip(row_axes, METRICS):
            for name in models:
                entries = [summary[name, fraction] for fraction in FRACTIONS
                           if (name, fraction) in summary]
                sizes = [entry["n_volumes"] for entry in entries]
                means = np.array([entry["scores"][split, metric][0] for entry in entries])
                sds = np.array([entry["scores"][split, metric][1] for entry in entries])
                axis.errorbar(sizes, means, yerr=sds, fmt="o-", capsize=3,
                              color=COLOURS[name], label=LABELS[name])
            axis.axhline(PAPER[metric], color="grey", ls=":", lw=1, label="paper (real MS data)")
            axis.set_title(f"{title}, {split} test")
            axis.grid(alpha=0.3)
            axis.set_xticks(sorted({row["n_volumes"] for row in results}))
    for axis in axes[1]:
        axis.set_xlabel("training volumes")
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def network_costs(gtab):
    """Parameters and multiply-adds per voxel of one forward pass, by pq model name."""
    costs = {}
    for name in ("pq", "pq_choices", "pq_published"):
        model = build_model(name, gtab)
        with torch.no_grad():
            macs = sum(layer.kernel().numel() for layer in [*model.pq_layers, *model.p_layers])
        costs[name] = (sum(p.numel() for p in model.parameters()), macs)
    return costs


def cost_note(models, gtab):
    costs = network_costs(gtab)
    lines = [f"{LABELS[name]}: {n_parameters} parameters, {macs / 1e6:.1f} M multiply-adds "
             f"per voxel per forward pass" for name, (n_parameters, macs) in costs.items()]
    note = "Cost of the pq-networks on this acquisition: " + "; ".join(lines) + "."
    if "pq_published" not in models:
        ratio = costs["pq_published"][1] / costs["pq"][1]
        note += (f" The published preset, whose pq-layer couples all 91 x 91 q-samples through"
                 f" 5^3 kernels, needs {ratio:.0f}x the default network's multiply-adds; too slow"
                 " to train for every size and seed on a shared 2-core CPU (see the pq-network"
                 " cost table below), it is not in the table (run it with"
                 " `--models pq_published,... --device cuda`). The row with the published layer"
                 " choices carries its kernel choices (two-sided selection rule, unit q offsets,"
                 " linear map of zero offsets, cosine radial basis) on esdmri's default"
                 " architecture.")
    return note


def docs_section(results, mode, settings, lesion_fraction, command, device):
    shape = "x".join(str(n) for n in settings["shape"])
    models = list(dict.fromkeys(row["model"] for row in results))
    model_list = "\n".join(textwrap.fill(f"- {LABELS[name]}: {MODEL_DESCRIPTIONS[name]}", 88,
                                          subsequent_indent="  ") for name in models)
    cost = textwrap.fill(cost_note(models, benchmark_gtab()), 88)
    timing = ("\n\nTraining times are wall-clock means per run on a shared 2-core machine\n"
              "loaded by other jobs (one torch thread, nice 5, up to two runs at once): they\n"
              "show the order of magnitude only." if str(device) == "cpu" else "")
    caveat = (" The quick mode's training sets are tiny: its scores move a lot with the seed;"
              " draw conclusions from the full mode." if mode == "quick" else "")
    claim_lines = "\n".join(claims(results))
    return f"""{START_MARKER}
## Lesion segmentation: data efficiency of the pq-network vs 3D CNNs

Generated by {command} ({mode} mode, device `{device}`); rerun it to update
this section.{caveat}

Multi-shell lesion phantoms from `esdmri.segmentation.phantom` ({shape} voxels, SNR {SNR},
1 b0 + 3 shells x {N_DIRECTIONS} directions at b = 1000/2000/3000): curved and crossing
fibre bundles, free-water patches and smoothly varying diffusivities, with 1 to 3
ellipsoidal lesions of partial demyelination (radial diffusivity up to 2.2x, axial down
to 0.88x, free water up to +0.12); {lesion_fraction['canonical']:.1%} of the canonical
and {lesion_fraction['rotated']:.1%} of the rotated test voxels are lesion. On such data
DTI's radial diffusivity alone scores ROC AUC 0.92 and AP 0.54 (FA 0.84 / 0.31), so the
task is informative but not trivial. Training: for each of {len(settings['seeds'])}
seeds, {settings['n_train']} new phantoms in the canonical orientation, of which the
first 25 %, 50 % and 100 % are used, and a new initialisation; {settings['steps']} steps
of Adam (lr {LEARNING_RATE}, batch {BATCH_SIZE}) on BCE + soft Dice for every
training-set size. The augmented CNN sees each training phantom and
{N_AUGMENTED_ROTATIONS} re-renderings of it at random orientations (the same anatomy and
noise stream rotated together with q-space: exact augmentation), for the same number
of steps. Test (the same for every seed): {settings['n_test']} held-out phantoms in the
canonical orientation and {settings['n_test']} rotated as a whole by uniformly random
rotations. Scores pool all test voxels; Dice at probability {DICE_THRESHOLD}; mean +-
sd over seeds.{timing}

{model_list}

{cost}

Paper (Mueller et al., real MS data, full training set): AUC {PAPER['auc']}, AP {PAPER['ap']},
Dice {PAPER['dice']}; the CNN {PAPER_CNN_GAP['auc']} % / {PAPER_CNN_GAP['ap']} % / \
{PAPER_CNN_GAP['dice']} % lower, and the equivariant network trained on a quarter of the
scans as good as the CNN on all of them.

{format_table(results)}

The paper's claims, as measured here (the augmented CNN is the fair baseline on rotated
test data; "4x less data enough" asks whether the pq-network on 25 % of the data reaches
the CNN on 100 % on every metric: "yes" by the means, "within 1 sd only" when only the
pq-network's mean + sd over seeds does):

{claim_lines}

![segmentation scores vs training-set size]({PLOT_NAME})
{END_MARKER}"""


def write_docs_section(section, path=DOCS_FILE):
    """Replace the marked section of ``path`` (create it or append the section if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START_MARKER in text and END_MARKER in text:
        before = text[:text.index(START_MARKER)]
        after = text[text.index(END_MARKER) + len(END_MARKER):]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    settings = dict(SETTINGS[mode])
    if args.shape:
        settings["shape"] = (args.shape,) * 3
    for key, value in (("n_train", args.n_train), ("n_test", args.n_test),
                       ("steps", args.steps)):
        if value:
            settings[key] = value
    if args.seeds:
        settings["seeds"] = tuple(range(args.first_seed, args.first_seed + args.seeds))
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    for name in models:
        if name not in LABELS:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(LABELS)}")
    start = time.perf_counter()
    if args.render is not None:
        runs = [json.loads(path.read_text()) for path in args.render]
        saved = runs[0]
        results = complete_seeds([row for run_ in runs for row in run_["results"]])
        lesion_fraction = saved["lesion_fraction"]
        settings = {key: tuple(value) if isinstance(value, list) else value
                    for key, value in saved["settings"].items()}
        settings["seeds"] = tuple(sorted({row["seed"] for row in results}))
        device = saved.get("device", args.device)
        command = ", ".join(f"`{_training_command(run_.get('command'))}`" for run_ in runs)
        if len(runs) > 1:
            command += " (seeds merged by `--render` of their results files)"
    else:
        command = "python " + " ".join(["benchmarks/segmentation.py", *(argv or sys.argv[1:])])
        results, _, tests = run(settings, models, args.device, args.out, command)
        command = f"`{_training_command(command)}`"
        lesion_fraction = {split: float(np.mean([p.labels.mean() for p in phantoms]))
                           for split, phantoms in tests.items()}
        device = args.device
    print()
    print(format_table(results))
    print()
    print("\n".join(claims(results)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(results, args.out / PLOT_NAME)
    if not args.no_write_docs:
        plot(results, DOCS_FILE.parent / PLOT_NAME)
        write_docs_section(docs_section(results, mode, settings, lesion_fraction, command,
                                        device))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
