"""Accuracy of fODF methods on synthetic phantoms with known fibres.

Runs every registered method (``benchmarks/methods.py``) on a list of
phantoms from :func:`esdmri.sims.make_phantom`, extracts peaks with the one
shared :func:`esdmri.peaks.peaks_from_sh` over a sweep of relative peak
thresholds, scores them with :mod:`esdmri.metrics`, prints one table, saves a
plot of angular error against crossing angle and writes the table into
``docs/benchmarks.md`` between ``<!-- accuracy:start -->`` and
``<!-- accuracy:end -->``.

With ``--disco N ...`` the same table is computed on fetched DiSCo phantoms
(:func:`esdmri.data_fetchers.read_disco`) against the peaks of their
ground-truth strand fODFs, with responses estimated from the data (DiSCo has
no ground-truth response or tissue fractions), and written between
``<!-- accuracy-disco:start -->`` and ``<!-- accuracy-disco:end -->``.

Usage::

    python -m benchmarks.accuracy --quick           # small phantoms, < 3 min
    python -m benchmarks.accuracy                   # 40^3 phantoms, < 30 min
    python -m benchmarks.accuracy --methods csd --out out/accuracy --no-write-docs
    python -m benchmarks.accuracy --disco 1 2 3 --snr 30   # after esdmri_fetch disco
"""

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from dipy.data import get_3shell_gtab  # noqa: E402

from esdmri.data_fetchers.disco import PHANTOMS as DISCO_PHANTOMS  # noqa: E402
from esdmri.data_fetchers.disco import RESOLUTIONS as DISCO_RESOLUTIONS  # noqa: E402
from esdmri.data_fetchers.disco import SNRS as DISCO_SNRS  # noqa: E402
from esdmri.data_fetchers.disco import read_disco  # noqa: E402
from esdmri.metrics import (  # noqa: E402
    DEFAULT_THRESHOLDS,
    count_directions,
    crossing_angles,
    evaluate_fractions,
)
from esdmri.response import TissueResponse, estimate_response  # noqa: E402
from esdmri.shm import group_shells  # noqa: E402
from esdmri.sims import make_phantom  # noqa: E402

from .methods import METHODS, NotApplicable, score_sweep  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS_FILE = REPO / "docs" / "benchmarks.md"
START_MARKER, END_MARKER = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
DISCO_MARKERS = ("<!-- accuracy-disco:start -->", "<!-- accuracy-disco:end -->")
PLOT_NAME = "accuracy_vs_crossing_angle.png"
DISCO_PLOT_NAME = "accuracy_disco_vs_crossing_angle.png"
# Relative threshold of read_disco's ground-truth peaks (its default).
DISCO_GT_PEAK_THRESHOLD = 0.1

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


@dataclass
class DiscoPhantom:
    """A DiSCo phantom with the attributes of :class:`esdmri.sims.Phantom` that
    the methods and the scoring read.

    Attributes
    ----------
    name, description : str
    data : ndarray (X, Y, Z, N) float32
    gtab : dipy GradientTable
    mask : ndarray (X, Y, Z) bool
    fibre_dirs : ndarray (X, Y, Z, K, 3)
        Ground-truth peaks of the strand fODFs, NaN-padded.
    n_fibres : ndarray (X, Y, Z) int
    crossing_angle : ndarray (X, Y, Z)
        Smallest angle between two ground-truth peaks (degrees), NaN with < 2.
    response : TissueResponse
        Estimated from the data (DiSCo has no ground-truth response).
    response_note : str
        How the response was estimated.
    tissue_fractions : None
        DiSCo has no ground-truth tissue fractions.
    """

    name: str
    description: str
    data: np.ndarray
    gtab: object
    mask: np.ndarray
    fibre_dirs: np.ndarray
    n_fibres: np.ndarray
    crossing_angle: np.ndarray
    response: TissueResponse
    response_note: str
    tissue_fractions: None = None


def estimate_disco_response(gtab, data, mask):
    """Responses of a DiSCo scan with esdmri's estimator.

    DiSCo simulates strands only, so :func:`esdmri.response.estimate_response`
    usually finds no GM/CSF voxel and returns the WM response alone.

    Returns
    -------
    response : TissueResponse
    note : str
        Which tissues were estimated.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        response = estimate_response(gtab, data, mask)
    return response, f"{', '.join(response.tissues)} from estimate_response"


def disco_name(number, resolution, snr):
    """Table name of a DiSCo phantom, e.g. ``disco1-snr30`` or ``disco2-low-clean``."""
    return (f"disco{number}" + ("-low" if resolution == "low" else "")
            + ("-clean" if snr is None else f"-snr{snr}"))


def load_disco(number, resolution, snr, data_home=None):
    """Read a fetched DiSCo phantom and adapt it to the benchmark.

    Parameters
    ----------
    number : {1, 2, 3}
    resolution : {"high", "low"}
    snr : {None, 10, 20, 30, 40, 50}
    data_home : Path, optional
        See :func:`esdmri.data_fetchers.read_disco`.

    Returns
    -------
    DiscoPhantom

    Raises
    ------
    FileNotFoundError
        If the data are not there; the message names the fetch call.
    """
    disco = read_disco(number, resolution, snr, data_home=data_home,
                       relative_peak_threshold=DISCO_GT_PEAK_THRESHOLD)
    response, note = estimate_disco_response(disco.gtab, disco.data, disco.mask)
    shells, _ = group_shells(disco.gtab)
    shape = "x".join(str(n) for n in disco.data.shape[:3])
    noise = "noise-free" if snr is None else f"Rician SNR {snr}"
    description = (f"DiSCo phantom {number}, {resolution} resolution ({shape}), {noise}, "
                   f"{disco.data.shape[-1]} volumes (shells b = "
                   f"{', '.join(f'{b:.0f}' for b in shells)}); responses: {note}")
    return DiscoPhantom(
        name=disco_name(number, resolution, snr), description=description,
        data=disco.data, gtab=disco.gtab, mask=disco.mask, fibre_dirs=disco.gt_peak_dirs,
        n_fibres=count_directions(disco.gt_peak_dirs),
        crossing_angle=crossing_angles(disco.gt_peak_dirs), response=response,
        response_note=note)


def fetch_command(number, resolution, snr, data_home=None):
    """The ``esdmri_fetch`` call that downloads what :func:`load_disco` reads."""
    command = (f"esdmri_fetch disco --phantom {number} --resolution {resolution} --snr "
               + ("none" if snr is None else str(snr)))
    return command + (f" --out_dir {data_home}" if data_home is not None else "")


PHANTOMS = (
    PhantomSpec("snr10", "default phantom, SNR 10", {"snr": 10}),
    PhantomSpec("snr20", "default phantom, SNR 20", {"snr": 20}),
    PhantomSpec("snr30", "default phantom, SNR 30", {"snr": 30}),
    PhantomSpec("hard", "up to 3 fibres crossing at 30-45 degrees, SNR 30",
                {"snr": 30, "max_fibres": 3, "crossing_angles": (30, 45)}),
    PhantomSpec("3shell", "DIPY's get_3shell_gtab (b 1000/2000/3500, 64 dirs each), SNR 30",
                {"snr": 30, "gtab": "3shell"}),
)


def parse_disco_snr(text):
    """``--snr`` word: 'none' (noise-free) or one of DiSCo's SNRs."""
    if text.lower() in ("none", "clean"):
        return None
    if text.isdigit() and int(text) in DISCO_SNRS:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"expected 'none' (noise-free) or one of {', '.join(map(str, DISCO_SNRS))}, "
        f"got {text!r}")


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
    disco = parser.add_argument_group(
        "DiSCo", "score on fetched DiSCo phantoms instead of the synthetic ones "
        "(esdmri_fetch disco --phantom N --resolution high --snr 30)")
    disco.add_argument("--disco", nargs="+", action="extend", type=int,
                       choices=DISCO_PHANTOMS, metavar="N",
                       help="DiSCo phantoms to score (1, 2 and/or 3)")
    disco.add_argument("--snr", type=parse_disco_snr, default=30,
                       help="DiSCo DWI: 'none' (noise-free) or Rician SNR "
                            f"{', '.join(map(str, DISCO_SNRS))} (default 30)")
    disco.add_argument("--resolution", choices=DISCO_RESOLUTIONS, default="high",
                       help="DiSCo grid: high (40^3, default) or low (20^3)")
    disco.add_argument("--data-home", type=Path, default=None,
                       help="esdmri data home holding disco/disco_N (default "
                            "$ESDMRI_HOME or ~/.esdmri; DIPY's ~/.dipy/disco is searched "
                            "next)")
    args = parser.parse_args(argv)
    if args.disco and args.phantoms:
        parser.error("--phantoms and --disco: choose synthetic phantoms or DiSCo, not both")
    if args.disco:
        args.disco = list(dict.fromkeys(args.disco))
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
            print(f"skipping {method.name}: needs {', '.join(method.missing())}")
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
    # RUMBA-SD's peaks come from its own sphere (methods.peak_sweep).
    sweep = score_sweep(result, phantom.fibre_dirs, mask, thresholds,
                        crossing_angle_edges=PLOT_ANGLE_EDGES)
    default_index = int(np.flatnonzero(np.isclose(sweep["thresholds"], DEFAULT_THRESHOLD))[0])
    fractions = None
    if result.tissue_fractions is not None and phantom.tissue_fractions is not None:
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
    command = "python -m benchmarks.accuracy" + (" --quick" if mode == "quick" else "")
    return f"""{START_MARKER}
## Same-model phantom with true responses: accuracy on `esdmri.sims` phantoms

Not an accuracy claim: the signal of these phantoms is the deconvolution model the
methods invert, and the methods get the phantom's true responses and the best threshold
of a sweep on the scored data (an inverse crime, issue 14). The held-out section above
holds the accuracy numbers.

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


def disco_docs_section(rows, methods, datasets, mode, thresholds, command):
    """The DiSCo section of ``docs/benchmarks.md``, between ``DISCO_MARKERS``."""
    method_lines = "\n".join(f"- `{m.name}`: {m.describe(ground_truth=False)}"
                             + (f" (scored on {SLOW_METHOD_VOXELS[mode]} random voxels)"
                                if m.slow else "") for m in methods)
    data_lines = "\n".join(f"- `{d.name}`: {d.description}" for d in datasets)
    start, end = DISCO_MARKERS
    return f"""{start}
## Accuracy on DiSCo phantoms

Generated by `{command}` ({mode} mode, relative peak thresholds
{', '.join(f'{t:g}' for t in thresholds)}) on DiSCo data fetched with `esdmri_fetch disco`
(see docs/datasets.md); rerun it to update this section, which is separate from the
synthetic-phantom section. Data read with `esdmri.data_fetchers.read_disco`:

{data_lines}

Ground truth: the peaks of DiSCo's strand fODFs (SH order 12) found by
`esdmri.peaks.peaks_from_sh` at a relative threshold of {DISCO_GT_PEAK_THRESHOLD:g}
(25 degrees separation, at most 5). DiSCo has no ground-truth response: every method uses
the responses estimated from the scan by `esdmri.response.estimate_response`
(DIPY's MSMT estimator; WM only when GM or CSF has no voxel passing DIPY's thresholds, as
DiSCo simulates strands only). Methods (fODF SH order 8):

{method_lines}

Scored voxels: the mask voxels with at least one ground-truth peak. Peaks, angular error,
pairing (25 degrees), success, FP and FN rates and the two thresholds ("best" and 0.5)
are as in the synthetic-phantom section. DiSCo has no tissue fractions, so there is no
fraction MAE.

{format_markdown_table(rows)}

Mean angular error of crossing voxels against the crossing angle of the ground-truth
peaks (5-degree bins with at least {MIN_VOXELS_PER_BIN} voxels), best threshold solid,
0.5 dashed:

![DiSCo angular error vs crossing angle]({DISCO_PLOT_NAME})
{end}"""


def write_docs_section(section, path=DOCS_FILE, markers=(START_MARKER, END_MARKER)):
    """Replace the section of ``path`` between ``markers`` (append it if absent)."""
    start_marker, end_marker = markers
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start_marker in text and end_marker in text:
        before = text[:text.index(start_marker)]
        after = text[text.index(end_marker) + len(end_marker):]
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


def score_methods(name, phantom, methods, mode, thresholds):
    """Scores of every method on one phantom; methods that do not apply are skipped."""
    results = {}
    for method in methods:
        try:
            scores = score(phantom, method, mode, thresholds)
        except NotApplicable as reason:
            print(f"{name:>7} {method.name:>6}: skipped, {reason}", flush=True)
            continue
        results[method.name] = scores
        print(f"{name:>7} {method.name:>6}: fit {scores['fit_seconds']:6.1f} s on "
              f"{scores['n_voxels']} voxels, best threshold {scores['best_threshold']:.2f}, "
              f"AE {scores['best']['all']['angular_error']:.1f} deg", flush=True)
    return results


def report(results, out, plot_name):
    """Print the table, save the plot and results.json; return the table rows."""
    rows = table_rows(results)
    print()
    print(format_text_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    plot_error_vs_angle(results, out / plot_name)
    (out / "results.json").write_text(json.dumps(to_json(results), indent=1))
    print(f"\nplot and results.json in {out}")
    return rows


def disco_command(args):
    """The command line that reproduces a DiSCo run (for the docs)."""
    snr = "none" if args.snr is None else str(args.snr)
    return ("python -m benchmarks.accuracy --disco " + " ".join(map(str, args.disco))
            + f" --snr {snr}" + (" --resolution low" if args.resolution == "low" else "")
            + (" --quick" if args.quick else "")
            + (" --methods " + " ".join(args.methods) if args.methods else ""))


def run_disco(args, methods, mode, thresholds):
    """Score the methods on the DiSCo phantoms of ``args.disco``."""
    datasets = []
    # Read every phantom before fitting anything, so that missing data stop
    # the run at once rather than after hours of fits.
    for number in args.disco:
        try:
            datasets.append(load_disco(number, args.resolution, args.snr, args.data_home))
        except FileNotFoundError as error:
            raise SystemExit(
                f"{error}\nThe DiSCo benchmark needs the data on disk; fetch it with: "
                f"{fetch_command(number, args.resolution, args.snr, args.data_home)}"
            ) from None
    results = {}
    for dataset in datasets:
        print(f"{dataset.name}: {dataset.description}", flush=True)
        results[dataset.name] = score_methods(dataset.name, dataset, methods, mode,
                                              thresholds)
    rows = report(results, args.out, DISCO_PLOT_NAME)
    if not args.no_write_docs:
        scored = [m for m in methods if any(m.name in r for r in results.values())]
        write_docs_section(
            disco_docs_section(rows, scored, datasets, mode, thresholds, disco_command(args)),
            markers=DISCO_MARKERS)
        plot_error_vs_angle(results, DOCS_FILE.parent / DISCO_PLOT_NAME)
        print(f"updated {DOCS_FILE}")


def run_phantoms(args, methods, mode, thresholds):
    """Score the methods on the synthetic phantoms of ``args.phantoms``."""
    shape = (20, 20, 20) if args.quick else (40, 40, 40)
    phantoms = [p for p in PHANTOMS if args.phantoms is None or p.name in args.phantoms]
    results = {}
    for spec in phantoms:
        results[spec.name] = score_methods(spec.name, spec.build(shape), methods, mode,
                                           thresholds)
    rows = report(results, args.out, PLOT_NAME)
    if not args.no_write_docs:
        write_docs_section(docs_section(rows, methods, phantoms, mode, shape, thresholds))
        plot_error_vs_angle(results, DOCS_FILE.parent / PLOT_NAME)
        print(f"updated {DOCS_FILE}")


def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    thresholds = QUICK_THRESHOLDS if args.quick else DEFAULT_THRESHOLDS
    methods = select_methods(args.methods)
    if not methods:
        raise SystemExit("no available method to run")

    start = time.perf_counter()
    if args.disco:
        run_disco(args, methods, mode, thresholds)
    else:
        run_phantoms(args, methods, mode, thresholds)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
