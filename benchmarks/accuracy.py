"""Accuracy of fODF methods on synthetic phantoms with known fibres.

Runs every registered method (``benchmarks/methods.py``) on a list of
phantoms from :func:`esdmri.sims.make_phantom`, extracts peaks with the one
shared :func:`esdmri.peaks.peaks_from_sh` over a sweep of relative peak
thresholds, scores them with :mod:`esdmri.metrics`, prints one table, saves a
plot of angular error against crossing angle and writes the table into
``docs/benchmarks.md`` between ``<!-- accuracy:start -->`` and
``<!-- accuracy:end -->``.

Usage::

    python benchmarks/accuracy.py --quick           # small phantoms, < 3 min
    python benchmarks/accuracy.py                   # 40^3 phantoms, < 30 min
    python benchmarks/accuracy.py --methods csd --out out/accuracy --no-write-docs
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from dipy.data import get_3shell_gtab  # noqa: E402

from esdmri.metrics import DEFAULT_THRESHOLDS, evaluate_fractions, threshold_sweep  # noqa: E402
from esdmri.sims import make_phantom  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import METHODS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS_FILE = REPO / "docs" / "benchmarks.md"
START_MARKER, END_MARKER = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
PLOT_NAME = "accuracy_vs_crossing_angle.png"

QUICK_THRESHOLDS = np.round(np.arange(1, 10) * 0.1, 1)
DEFAULT_THRESHOLD = 0.5
# 5-degree crossing-angle bins for the plot; bins with fewer voxels are not drawn.
PLOT_ANGLE_EDGES = np.arange(0.0, 91.0, 5.0)
MIN_VOXELS_PER_BIN = 5
# Voxels on which a slow method (DIPY MSMT-CSD: one cvxpy QP per voxel) is scored.
SLOW_METHOD_VOXELS = {"quick": 150, "full": 1500}
SUBSET_SEED = 0


@dataclass(frozen=True)
class PhantomSpec:
    """A named phantom: ``make_phantom(shape, **kwargs)``."""

    name: str
    description: str
    kwargs: dict = field(default_factory=dict)

    def build(self, shape):
        kwargs = dict(self.kwargs)
        if kwargs.pop("gtab", None) == "3shell":
            kwargs["gtab"] = get_3shell_gtab()
        return make_phantom(shape=shape, **kwargs)


PHANTOMS = (
    PhantomSpec("snr10", "default phantom, SNR 10", {"snr": 10}),
    PhantomSpec("snr20", "default phantom, SNR 20", {"snr": 20}),
    PhantomSpec("snr30", "default phantom, SNR 30", {"snr": 30}),
    PhantomSpec("hard", "up to 3 fibres crossing at 30-45 degrees, SNR 30",
                {"snr": 30, "max_fibres": 3, "crossing_angles": (30, 45)}),
    PhantomSpec("3shell", "DIPY's get_3shell_gtab (b 1000/2000/3500, 64 dirs each), SNR 30",
                {"snr": 30, "gtab": "3shell"}),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="20^3 phantoms, thresholds 0.1..0.9 (under 3 minutes)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help=f"methods to run (default: all available of {sorted(METHODS)})")
    parser.add_argument("--phantoms", nargs="+", default=None, metavar="NAME",
                        help=f"phantoms to use (default: all of {[p.name for p in PHANTOMS]})")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "accuracy",
                        help="folder for the plot and results.json")
    parser.add_argument("--no-write-docs", action="store_true",
                        help=f"do not update {DOCS_FILE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods or ()) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}, choose from {sorted(METHODS)}")
    known_phantoms = [p.name for p in PHANTOMS]
    unknown = sorted(set(args.phantoms or ()) - set(known_phantoms))
    if unknown:
        parser.error(f"--phantoms: unknown {unknown}, choose from {known_phantoms}")
    return args


def select_methods(names):
    """Registered methods to run; unavailable ones are reported and skipped."""
    chosen = [METHODS[name] for name in (names or METHODS)]
    for method in chosen:
        if not method.is_available():
            print(f"skipping {method.name}: needs {', '.join(method.requires)}")
    return [method for method in chosen if method.is_available()]


def fit_mask(phantom, method, mode):
    """Voxels a method is fitted and scored on: WM voxels, a fixed subset if slow."""
    wm_voxels = phantom.mask & (phantom.n_fibres >= 1)
    if not method.slow:
        return wm_voxels
    rng = np.random.default_rng(SUBSET_SEED)
    chosen = rng.permutation(np.flatnonzero(wm_voxels))[:SLOW_METHOD_VOXELS[mode]]
    subset = np.zeros(wm_voxels.size, dtype=bool)
    subset[chosen] = True
    return subset.reshape(wm_voxels.shape)


def score(phantom, method, mode, thresholds):
    """Fit one method on one phantom and score it over the threshold sweep."""
    mask = fit_mask(phantom, method, mode)
    start = time.perf_counter()
    result = method.fit(phantom, mask)
    fit_seconds = time.perf_counter() - start
    if np.shape(result.shm_coeff)[:-1] != mask.shape:
        raise ValueError(f"method {method.name!r} returned shm_coeff of shape "
                         f"{np.shape(result.shm_coeff)}, expected {mask.shape} + (C,)")
    sweep = threshold_sweep(result.shm_coeff, phantom.fibre_dirs, mask, thresholds,
                            crossing_angle_edges=PLOT_ANGLE_EDGES)
    default_index = int(np.flatnonzero(np.isclose(sweep["thresholds"], DEFAULT_THRESHOLD))[0])
    fractions = None
    if result.tissue_fractions is not None:
        fractions = evaluate_fractions(result.tissue_fractions, phantom.tissue_fractions, mask)
    return {
        "fit_seconds": fit_seconds,
        "n_voxels": int(mask.sum()),
        "best_threshold": sweep["best_threshold"],
        "best": sweep["results"][sweep["best_index"]],
        "default": sweep["results"][default_index],
        "sweep": [{"threshold": float(t), **r["all"]}
                  for t, r in zip(sweep["thresholds"], sweep["results"])],
        "fractions": fractions,
    }


def table_rows(results):
    """One row per (phantom, method, threshold choice)."""
    rows = []
    for phantom_name, by_method in results.items():
        for method_name, scores in by_method.items():
            mae = "-" if scores["fractions"] is None else f"{scores['fractions']['mae']:.3f}"
            for label, key in ((f"best {scores['best_threshold']:.2f}", "best"),
                               (f"{DEFAULT_THRESHOLD:.2f}", "default")):
                overall, crossing = scores[key]["all"], scores[key]["crossing"]
                rows.append([
                    phantom_name, method_name, label, str(scores["n_voxels"]),
                    f"{overall['angular_error']:.1f}", f"{crossing['angular_error']:.1f}",
                    f"{overall['success_rate']:.3f}", f"{overall['fp_rate']:.3f}",
                    f"{overall['fn_rate']:.3f}", mae])
    return rows


HEADER = ["phantom", "method", "threshold", "voxels", "AE all (deg)", "AE crossing (deg)",
          "success", "FP rate", "FN rate", "fraction MAE"]


def format_text_table(rows):
    widths = [max(len(row[i]) for row in [HEADER] + rows) for i in range(len(HEADER))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*HEADER), line.format(*("-" * w for w in widths))]
                     + [line.format(*row) for row in rows])


def format_markdown_table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_error_vs_angle(results, path):
    """Mean angular error of crossing voxels per crossing-angle bin, one panel per phantom.

    Solid lines: each method at its best threshold; dashed: at 0.5.
    """
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False,
                             sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, phantom_name in zip(axes[0], names):
        for colour, (method_name, scores) in zip(colours, results[phantom_name].items()):
            for key, style, label in (
                    ("best", "-", f"{method_name} (best, {scores['best_threshold']:.2f})"),
                    ("default", "--", f"{method_name} ({DEFAULT_THRESHOLD:.2f})")):
                bins = scores[key]["by_crossing_angle"]
                points = [((low + high) / 2, s["angular_error"])
                          for (low, high), s in bins.items()
                          if s["n_voxels"] >= MIN_VOXELS_PER_BIN]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, style, color=colour, marker="o", markersize=3, label=label)
        ax.set_title(phantom_name)
        ax.set_xlabel("crossing angle (deg)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("mean angular error (deg)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def docs_section(rows, methods, phantoms, mode, shape, thresholds):
    method_lines = "\n".join(f"- `{m.name}`: {m.description}"
                             + (f" (scored on {SLOW_METHOD_VOXELS[mode]} random WM voxels)"
                                if m.slow else "") for m in methods)
    phantom_lines = "\n".join(f"- `{p.name}`: {p.description}" for p in phantoms)
    command = "python benchmarks/accuracy.py" + (" --quick" if mode == "quick" else "")
    return f"""{START_MARKER}
## Accuracy on synthetic phantoms

Generated by `{command}` ({mode} mode: {shape[0]}x{shape[1]}x{shape[2]} phantoms,
relative peak thresholds {', '.join(f'{t:g}' for t in thresholds)}); rerun it to update
this section. Phantoms from `esdmri.sims.make_phantom`:

{phantom_lines}

Methods (fODF SH order 8):

{method_lines}

Every method's peaks come from `esdmri.peaks.peaks_from_sh` (DIPY `peak_directions`,
minimum separation 25 degrees, at most 5 peaks). Scored voxels: the brain voxels with at
least one ground-truth fibre (a slow method: a fixed random subset of them, so its numbers
carry more sampling noise). Angular error (AE): per voxel, mean over true fibres of the
angle to the nearest peak (antipodal), averaged over voxels; "crossing" = voxels with 2+
fibres. Peaks and fibres are paired one to one within 25 degrees: success = as many peaks
as fibres, all paired; FP rate = unpaired peaks / peaks; FN rate = unpaired fibres /
fibres. Each method is shown at the threshold of the sweep with the highest success rate
("best") and at DIPY's default 0.5. Fraction MAE: mean absolute error of the (WM, GM,
CSF) fractions over the scored voxels, for methods that estimate them.

{format_markdown_table(rows)}

Mean angular error of crossing voxels against crossing angle (5-degree bins with at
least {MIN_VOXELS_PER_BIN} voxels), each method at its best threshold (solid) and at 0.5
(dashed). A fibre without a peak of its own is scored by the angle to the nearest other
peak, so high thresholds that drop the weaker fibre raise the error most at wide crossings:

![angular error vs crossing angle]({PLOT_NAME})
{END_MARKER}"""


def write_docs_section(section, path=DOCS_FILE):
    """Replace the marked section of ``path`` (create or append it if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START_MARKER in text and END_MARKER in text:
        before = text[:text.index(START_MARKER)]
        after = text[text.index(END_MARKER) + len(END_MARKER):]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def to_json(value):
    if isinstance(value, dict):
        return {(f"{k[0]:g}-{k[1]:g}" if isinstance(k, tuple) else str(k)): to_json(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    shape = (20, 20, 20) if args.quick else (40, 40, 40)
    thresholds = QUICK_THRESHOLDS if args.quick else DEFAULT_THRESHOLDS
    methods = select_methods(args.methods)
    phantoms = [p for p in PHANTOMS if args.phantoms is None or p.name in args.phantoms]
    if not methods:
        raise SystemExit("no available method to run")

    start = time.perf_counter()
    results = {}
    for spec in phantoms:
        phantom = spec.build(shape)
        results[spec.name] = {}
        for method in methods:
            scores = score(phantom, method, mode, thresholds)
            results[spec.name][method.name] = scores
            print(f"{spec.name:>7} {method.name:>6}: fit {scores['fit_seconds']:6.1f} s on "
                  f"{scores['n_voxels']} voxels, best threshold {scores['best_threshold']:.2f}, "
                  f"AE {scores['best']['all']['angular_error']:.1f} deg", flush=True)

    rows = table_rows(results)
    print()
    print(format_text_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    plot_error_vs_angle(results, args.out / PLOT_NAME)
    (args.out / "results.json").write_text(json.dumps(to_json(results), indent=1))
    print(f"\nplot and results.json in {args.out}")
    if not args.no_write_docs:
        write_docs_section(docs_section(rows, methods, phantoms, mode, shape, thresholds))
        plot_error_vs_angle(results, DOCS_FILE.parent / PLOT_NAME)
        print(f"updated {DOCS_FILE}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
