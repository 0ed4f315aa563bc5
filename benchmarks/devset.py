"""Crossing accuracy per phantom family: the dev set that chooses the defaults (issue 26).

Every family, SNR and split is one phantom; every method gets the responses
:func:`esdmri.response.estimate_response` (the package's default path) finds in
it, never the truth. Families (:data:`FAMILY_SPECS`; generator, acquisition):

- ``straight``: straight, undispersed tensor bundles crossing at 45 and 90
  degrees (:mod:`esdmri.straight_phantom`), single-fibre FA 0.7, DIPY's
  ``get_3shell_gtab()`` (b = 1000, 2000, 3500, the same 64 directions each);
- ``straight-1shell``: the same at FA 0.55, crossings at 60 and 90 degrees,
  one shell b = 1000 x 60 directions;
- ``straight-2shell``: FA 0.85, crossings at 30 and 45 degrees, b = 1000 x 30
  and b = 2500 x 60;
- ``dispersed``: :func:`esdmri.heldout_phantom.make_heldout_phantom`, Watson-
  dispersed curved tensor bundles (FA about 0.55-0.85, crossings 30-90
  degrees), its default table (b = 1000, 2000, 3000 x 64 distinct directions);
- ``stick-zeppelin``: the same geometry with a stick + zeppelin kernel, four
  shells b = 700, 1000, 2000, 3000 of 30, 60, 90, 120 directions;
- ``dispersed-acute`` and ``stick-zeppelin-acute`` (dev only): the two on a
  second dev geometry with crossings under 40 degrees (:data:`ACUTE_SEEDS`),
  which the first lacks and the test geometry has.
- ``straight-1shell-45`` and ``dispersed-1shell``: straight bundles at FA 0.7
  crossing at 45 and 90 degrees on one shell b = 2000 x 60, and the dispersed
  generator on one shell b = 1000 x 60; ``straight-1shell-40`` and
  ``dispersed-1shell-2500``: straight bundles at FA 0.8 crossing at 40 and 80
  degrees, and the dispersed generator, on one shell b = 2500 x 64
  (:data:`SINGLE_SHELL_SPECS`).

Dev phantoms (geometry and noise seeds of their own) choose each method's
relative peak threshold (highest mean success over every dev phantom, ties:
lowest crossing error); ``--split test`` scores phantoms of other seeds once
with those thresholds. ``--split transfer`` scores, once and with the same
thresholds, families that no split tunes on (:data:`TRANSFER_SPECS`): the
dispersed generator on another geometry and straight bundles crossing at 40
and 70 degrees at FA 0.75, each on five acquisitions of no dev family (one
shell b = 1000 x 30 or b = 3000 x 64, DIPY's ISBI 2013 two shells, b = 700 x
32 with b = 2000 x 64, an HCP-like three shells of 90). Scored: voxels with WM
fibres; the table gives the crossing voxels (two or more fibres): mean angular
error over true fibres (degrees), success rate (as many peaks as fibres, all
within 25 degrees) and false-negative rate (unpaired fibres / fibres), per
family and SNR.

``--report`` also gives the crossing false negatives per crossing angle
(:data:`ANGLE_EDGES`). Diagnostics of the response estimator (never
headlines): ``--response true`` fits with the generator's responses
(:func:`true_response`, an inverse crime), ``--response rician`` with
``estimate_response(rician=True)``, ``--snrs inf`` on the noise-free phantom,
and ``--compare-responses`` prints the estimated WM response against the
generator's, shell by shell.

Usage::

    python -m benchmarks.devset --out out/devset              # dev split
    python -m benchmarks.devset --split test --thresholds out/devset/results-dev.json
    python -m benchmarks.devset --split transfer --thresholds out/devset/results-dev.json
    python -m benchmarks.devset --compare-responses --snrs 10 20 inf
"""

import argparse
import inspect
import json
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.data import get_3shell_gtab, get_isbi2013_2shell_gtab

from esdmri import straight_phantom
from esdmri.atomic import staged_output
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.metrics import evaluate_peaks
from esdmri.response import (RESPONSE_SH_ORDER, TissueResponse, apparent_diffusivities,
                             estimate_response, tensor_zonal_coefficients)
from esdmri.shm import group_shells
from esdmri.sims import default_gtab

from .heldout import Scan, markdown, scan_of, text_table
from .methods import METHODS, NotApplicable, peak_sweep

THRESHOLDS = np.round(np.arange(2, 19) * 0.05, 2)
MATCH_ANGLE = 25.0
SNRS = (10, 20)
# Rows: label -> registered method.
ROWS = {
    "esdmri default (pretrained + refinement)": "rtesd-pretrained+refine",
    "esdmri network-free (pretrained=False)": "rtesd-prior+refine",
    "esdmri network-free, refine_tv=0": "rtesd-voxelwise",
    "esdmri linear prior alone": "prior",
    "esdmri pretrained alone": "rtesd-pretrained",
    "esdmri ESD pretrained alone": "esd-pretrained",
    "esdmri ESD pretrained + refinement": "esd-pretrained+refine",
    "esdmri C-ESD pretrained alone": "cesd-pretrained",
    "esdmri C-ESD pretrained + refinement": "cesd-pretrained+refine",
    "DIPY CSD": "csd",
    "DIPY MSMT-CSD": "msmt",
    "DIPY RUMBA-SD + TV (own ODF peaks)": "rumba-tv",
    "MRtrix3 dhollander + msmt_csd": "mrtrix3",
}
# (geometry seed, noise seed offset) of each split; test seeds are never used on dev.
# ``transfer``: the families of :data:`TRANSFER_SPECS` (acquisitions and a geometry
# that no split chose a default on), scored once like test.
SPLITS = {"dev": (1, 0), "test": (7, 1000), "transfer": (9, 3000)}
# Bins of the crossing angle (degrees) in which false negatives are counted:
# centred on the straight families' 30, 45, 60 and 90 degrees.
ANGLE_EDGES = (0.0, 37.5, 52.5, 67.5, 82.5, 90.0)
ANGLE_LABELS = ("<37.5", "37.5-52.5", "52.5-67.5", "67.5-82.5", ">=82.5")
# Responses the fits get: the package's default estimate (every table), its
# estimate with the Rician fit (``estimate_response(rician=True)``), or the
# generator's (a diagnostic of the response estimator; an inverse crime, never
# a headline).
RESPONSES = ("estimated", "rician", "true")


def shell_gtab(shells, n_b0=2, seed=0):
    """A gradient table of ``n_b0`` b0 and one repulsion-spread set of directions per shell.

    Parameters
    ----------
    shells : sequence of (float, int)
        (b-value, number of directions) of each shell.
    n_b0 : int
    seed : int
        Seeds the starting points of the repulsion (each shell its own set).

    Returns
    -------
    gtab : dipy.core.gradients.GradientTable
    """
    rng = np.random.default_rng(seed)
    bvals, bvecs = [np.zeros(n_b0)], [np.zeros((n_b0, 3))]
    for bval, n_directions in shells:
        start = rng.normal(size=(int(n_directions), 3))
        start /= np.linalg.norm(start, axis=1, keepdims=True)
        hemisphere, _ = disperse_charges(HemiSphere(xyz=start), 500)
        bvals.append(np.full(int(n_directions), float(bval)))
        bvecs.append(hemisphere.vertices)
    return gradient_table(bvals=np.concatenate(bvals), bvecs=np.concatenate(bvecs))


# Acquisitions: one shell of 60 directions (a clinical DTI/CSD scan), two shells
# of 30 and 60, DIPY's get_3shell_gtab (the same 64 directions on three
# shells), the held-out phantom's default (three shells of 64 distinct
# directions) and four shells of 300 directions in all.
ACQUISITIONS = {
    "1 shell b1000 x 60": lambda: shell_gtab([(1000, 60)], seed=11),
    "2 shells b1000 x 30, b2500 x 60": lambda: shell_gtab([(1000, 30), (2500, 60)], seed=12),
    "3 shells get_3shell_gtab": get_3shell_gtab,
    "3 shells b1000-3000 x 64": default_gtab,
    "4 shells b700-3000 x 300": lambda: shell_gtab(
        [(700, 30), (1000, 60), (2000, 90), (3000, 120)], seed=14),
    # A dev split's single-shell guard's (SINGLE_SHELL_SPECS).
    "1 shell b2000 x 60": lambda: shell_gtab([(2000, 60)], n_b0=2, seed=32),
    "1 shell b2500 x 64": lambda: shell_gtab([(2500, 64)], n_b0=3, seed=33),
    # The transfer split's: a sparse clinical single shell, a high-b single shell,
    # the ISBI 2013 challenge's two shells (DIPY's table: 27 + 36 directions), two
    # shells of unequal sizes and an HCP-like three shells of 90.
    "1 shell b1000 x 30": lambda: shell_gtab([(1000, 30)], n_b0=1, seed=21),
    "1 shell b3000 x 64": lambda: shell_gtab([(3000, 64)], n_b0=4, seed=22),
    "2 shells ISBI 2013": get_isbi2013_2shell_gtab,
    "2 shells b700 x 32, b2000 x 64": lambda: shell_gtab([(700, 32), (2000, 64)], n_b0=3,
                                                         seed=24),
    "3 shells HCP-like b1000-3000 x 90": lambda: shell_gtab(
        [(1000, 90), (2000, 90), (3000, 90)], n_b0=6, seed=23),
}
# Family -> (generator, acquisition, generator options). ``straight``: straight
# undispersed tensor bundles crossing at two angles; ``dispersed``: Watson-
# dispersed curved bundles of tensors (make_heldout_phantom); ``stick-zeppelin``:
# the same geometry with a stick + zeppelin kernel. Single-fibre FA 0.55-0.85,
# crossing angles 30-90 degrees.
FAMILY_SPECS = {
    "straight": ("straight", "3 shells get_3shell_gtab", {"fa": 0.7, "angles": (45.0, 90.0)}),
    "straight-1shell": ("straight", "1 shell b1000 x 60", {"fa": 0.55, "angles": (60.0, 90.0)}),
    "straight-2shell": ("straight", "2 shells b1000 x 30, b2500 x 60",
                        {"fa": 0.85, "angles": (30.0, 45.0)}),
    "dispersed": ("heldout", "3 shells b1000-3000 x 64", {}),
    "stick-zeppelin": ("heldout", "4 shells b700-3000 x 300", {"wm_model": "stick_zeppelin"}),
}
FAMILIES = tuple(FAMILY_SPECS)
# The transfer split's families: the dispersed generator (its geometry seed 109,
# not dev's 101 or test's 107) and straight bundles at FA 0.75 crossing at 40 and
# 70 degrees (angles and FA no dev family has), each on the five acquisitions
# above that no dev family uses.
TRANSFER_ACQUISITIONS = ("1 shell b1000 x 30", "1 shell b3000 x 64", "2 shells ISBI 2013",
                         "2 shells b700 x 32, b2000 x 64", "3 shells HCP-like b1000-3000 x 90")
TRANSFER_SPECS = {
    f"{name} / {acquisition}": (generator, acquisition, options)
    for name, generator, options in (
        ("dispersed", "heldout", {}),
        ("straight 40/70", "straight", {"fa": 0.75, "angles": (40.0, 70.0)}))
    for acquisition in TRANSFER_ACQUISITIONS}
# The dev split's second geometry of the two dispersed families, with acute
# crossings: its own (geometry, noise offset) seeds. The dev geometry (101) has no
# crossing under 40 degrees where test's (107) has 19 of 182 crossing voxels; 104,
# chosen among 102-108 from the geometry alone (18 crossing voxels under 40
# degrees, 22 at 40-45, at 14^3), gives dev its share.
ACUTE_SEEDS = (4, 2000)
ACUTE_SPECS = {f"{family}-acute": FAMILY_SPECS[family] for family in ("dispersed",
                                                                     "stick-zeppelin")}
# The dev split's single-shell guards: the dev set's one single-shell family
# (straight-1shell: FA 0.55, 60 and 90 degrees) is one that SH order 8 resolves, so
# it sees only the cost of a higher order; the transfer split showed single shells
# with 40-45 degree crossings at FA 0.7-0.75 and dispersed bundles on one shell are
# where the defaults fall behind (docs/benchmarks.md, "The transfer split"). The
# test split holds them too, on its own seeds (added after the one-shell-above-b-1500
# default was chosen on dev, to score it once). ``straight-1shell-40``: 40-degree
# crossings of sharp fibres on a high-b shell, which the transfer split found order
# 10 merging and the shipped correction spoiling, where no dev phantom showed it,
# and ``dispersed-1shell-2500`` the spurious lobes a higher order may add on the same
# shell (both added after the transfer split was scored: its 40-degree crossings are
# since then an angle a dev family has; FA, second angle and acquisition differ).
# ``straight-1shell-1000-45``: 45-degree crossings on the b = 1000 shell, which the
# default's order 8 merged there (added with the WM + GM fit of such shells).
SINGLE_SHELL_SPECS = {
    "straight-1shell-45": ("straight", "1 shell b2000 x 60", {"fa": 0.7, "angles": (45.0, 90.0)}),
    "straight-1shell-40": ("straight", "1 shell b2500 x 64", {"fa": 0.8, "angles": (40.0, 80.0)}),
    "dispersed-1shell-2500": ("heldout", "1 shell b2500 x 64", {}),
    "dispersed-1shell": ("heldout", "1 shell b1000 x 60", {}),
    "straight-1shell-1000-45": ("straight", "1 shell b1000 x 60",
                                {"fa": 0.7, "angles": (45.0, 90.0)}),
}
# The families each split holds.
SPLIT_FAMILIES = {"dev": FAMILIES + tuple(ACUTE_SPECS) + tuple(SINGLE_SHELL_SPECS),
                  "test": FAMILIES + tuple(SINGLE_SHELL_SPECS), "transfer": tuple(TRANSFER_SPECS)}
ALL_SPECS = {**FAMILY_SPECS, **ACUTE_SPECS, **SINGLE_SHELL_SPECS, **TRANSFER_SPECS}


def make_family(family, side, snr, split):
    """The phantom of one family, SNR and split (geometry and noise seeds of the split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {tuple(SPLITS)}")
    if family not in SPLIT_FAMILIES[split]:
        raise ValueError(f"unknown family {family!r} for split {split!r}, expected one of "
                         f"{SPLIT_FAMILIES[split]}")
    generator, acquisition, options = ALL_SPECS[family]
    geometry_seed, noise_offset = ACUTE_SEEDS if family in ACUTE_SPECS else SPLITS[split]
    # SNR inf: the noise-free phantom.
    snr = None if np.isinf(snr) else snr
    seed = noise_offset + (0 if snr is None else int(snr))
    gtab = ACQUISITIONS[acquisition]()
    if generator == "straight":
        return straight_phantom.make_straight_phantom(
            gtab, (side,) * 3, snr, geometry_seed=geometry_seed, seed=seed, **options)
    return make_heldout_phantom((side,) * 3, gtab=gtab, snr=snr, seed=seed,
                                geometry_seed=100 + geometry_seed, **options)


def _defaults(function):
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def true_response(family, phantom, tissues, sh_order_max=RESPONSE_SH_ORDER):
    """The generator's responses of one family's phantom: for diagnostics only.

    Fitting with these is an inverse crime (the method given its phantom's own
    forward model): it separates the response estimator's errors from the
    deconvolution's, and is never a headline.

    - WM: the undispersed single-fibre kernel. ``straight``: the family's
      tensor (its FA, the generator's axial diffusivity). ``dispersed`` and
      ``stick-zeppelin``: the kernel at the median diffusivities of the
      single-fibre voxels (the generator varies them smoothly across the
      volume, so no one kernel is exact there); stick-zeppelin's intra-axonal
      fraction is ``1 - radial / axial`` of its zeppelin.
    - GM and CSF: mono-exponential at the generator's diffusivities (GM: the
      middle of ``make_heldout_phantom``'s range).

    Parameters
    ----------
    family : str
        A key of :data:`ALL_SPECS`.
    phantom : StraightPhantom or HeldoutPhantom
    tissues : sequence of str
        The tissues to give (those the estimator finds in the phantom).
    sh_order_max : int, optional
        WM response order.

    Returns
    -------
    TissueResponse
    """
    generator, _, options = ALL_SPECS[family]
    shell_bvals, _ = group_shells(phantom.gtab)
    bvals = np.concatenate([[0.0], shell_bvals[1:]])
    if generator == "straight":
        defaults = _defaults(straight_phantom.make_straight_phantom)
        axial, s0 = defaults["axial"], defaults["s0"]
        radial = straight_phantom.radial_for_fa(axial, options["fa"])
        gm, csf = straight_phantom.GM_DIFFUSIVITY, straight_phantom.CSF_DIFFUSIVITY
    else:
        defaults = _defaults(make_heldout_phantom)
        single = phantom.n_fibres == 1
        axial = float(np.median(phantom.wm_axial[single]))
        radial = float(np.median(phantom.wm_radial[single]))
        s0 = phantom.s0
        gm, csf = float(np.mean(defaults["gm_diffusivity_range"])), defaults["csf_diffusivity"]
    response = TissueResponse.from_tensors(bvals, (axial, radial, radial), gm, csf, s0,
                                           sh_order_max, tissues)
    if generator == "straight" or phantom.wm_model != "stick_zeppelin":
        return response
    # Stick + zeppelin: the tensor above is the zeppelin; the stick has the
    # intra-axonal fraction 1 - radial / axial (the generator's tortuosity).
    intra = 1.0 - radial / axial
    stick = tensor_zonal_coefficients(bvals, (axial, 0.0, 0.0), s0, sh_order_max)
    return TissueResponse(tissues, bvals, [
        intra * stick + (1.0 - intra) * response[tissue] if tissue == "wm" else response[tissue]
        for tissue in tissues])


def scan_with_response(family, phantom, response):
    """What the methods see, with the responses :data:`RESPONSES` names."""
    scan = scan_of(phantom)
    if response == "estimated":
        return scan
    if response == "rician":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rician = estimate_response(phantom.gtab, phantom.data, phantom.mask, rician=True)
        return Scan(scan.data, scan.gtab, scan.mask, rician)
    return Scan(scan.data, scan.gtab, scan.mask,
                true_response(family, phantom, scan.response.tissues))


RESPONSE_HEADER = ["family", "SNR", "b", "axial (um^2/ms) estimated / true",
                   "radial estimated / true", "FA estimated / true", "b0 signal estimated / true"]


def response_rows(args):
    """The estimated WM response against the generator's, per family, SNR and shell."""
    rows = []
    for family in phantom_families(args):
        for snr in args.snrs:
            phantom = make_family(family, args.side, snr, args.split)
            estimated = scan_with_response(family, phantom, args.response).response
            true = true_response(family, phantom, estimated.tissues)
            b0 = [r["wm"][0, 0] for r in (estimated, true)]
            (bvals, *est), (_, *tru) = (apparent_diffusivities(r) for r in (estimated, true))
            for i, bval in enumerate(bvals):
                rows.append([family, f"{snr:g}", f"{bval:.0f}",
                             f"{1e3 * est[0][i]:.2f} / {1e3 * tru[0][i]:.2f}",
                             f"{1e3 * est[1][i]:.2f} / {1e3 * tru[1][i]:.2f}",
                             f"{est[2][i]:.2f} / {tru[2][i]:.2f}",
                             f"{b0[0]:.0f} / {b0[1]:.0f}" if i == 0 else ""])
    return rows


def run(args, log):
    outcomes = []
    for family in phantom_families(args):
        for snr in args.snrs:
            phantom = make_family(family, args.side, snr, args.split)
            scan = scan_with_response(family, phantom, args.response)
            mask = phantom.mask & (phantom.n_fibres > 0)
            log(f"{family} SNR {snr} ({args.split}): {int((phantom.n_fibres >= 2).sum())} "
                f"crossing voxels, {args.response} response {scan.response.tissues}")
            for label in args.rows:
                name = ROWS[label]
                outcome = {"family": family, "snr": snr, "split": args.split, "row": label,
                           "method": name, "response": args.response, "sweep": [],
                           "seconds": float("nan"), "error": ""}
                if not METHODS[name].is_available():
                    outcome["error"] = f"skipped: needs {', '.join(METHODS[name].missing())}"
                    log(f"  {label}: {outcome['error']}")
                    outcomes.append(outcome)
                    continue
                try:
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = METHODS[name].fit(scan, mask)
                    outcome["seconds"] = time.perf_counter() - start
                    outcome["sweep"] = scored_sweep(result, phantom.fibre_dirs, mask)
                    log(f"  {label}: {outcome['seconds']:.1f} s")
                except NotApplicable as reason:
                    outcome["error"] = f"not applicable: {reason}"
                except Exception as error:  # noqa: BLE001 - one method must not stop the run
                    outcome["error"] = f"{type(error).__name__}: {error}"
                    log(traceback.format_exc())
                outcomes.append(outcome)
                save(args, outcomes)
    return outcomes


def scored_sweep(result, fibre_dirs, mask, subvertex=True):
    """A method's peaks at each of :data:`THRESHOLDS` (``methods.peak_sweep``, with or
    without ``subvertex`` refinement) scored against the true fibres: per threshold,
    the all-voxel and crossing-voxel angular error, success, FN and FP rates, and the
    crossing FN counts per angle bin."""
    sweep = []
    for _, directions in peak_sweep(result, THRESHOLDS, mask, subvertex=subvertex):
        scores = evaluate_peaks(directions, fibre_dirs, mask, threshold_deg=MATCH_ANGLE,
                                crossing_angle_edges=ANGLE_EDGES)
        sweep.append({
            **{part: {k: float(scores[part][k]) for k in
                      ("angular_error", "success_rate", "fn_rate", "fp_rate")}
               for part in ("all", "crossing")},
            "by_angle": {label: {k: int(part[k]) for k in ("fn", "n_true")}
                         for label, part in zip(ANGLE_LABELS,
                                                scores["by_crossing_angle"].values())}})
    return sweep


def at_threshold(sweep, threshold):
    """The entry of a :func:`scored_sweep` at ``threshold`` (one of :data:`THRESHOLDS`)."""
    index = np.flatnonzero(np.isclose(THRESHOLDS, threshold))
    if index.size == 0:
        raise ValueError(f"threshold must be one of the sweep's {THRESHOLDS.tolist()}, "
                         f"got {threshold}")
    return sweep[int(index[0])]


def best_threshold(sweeps):
    """Index in :data:`THRESHOLDS` of the highest mean all-voxel success over several
    phantoms' :func:`scored_sweep` results, then the lowest mean crossing error."""
    success = np.mean([[s["all"]["success_rate"] for s in sw] for sw in sweeps], axis=0)
    error = np.mean([[s["crossing"]["angular_error"] for s in sw] for sw in sweeps], axis=0)
    return int(np.lexsort((error, -success))[0])


def choose_thresholds(outcomes):
    """Per method: the threshold of highest mean success over its dev phantoms."""
    chosen = {}
    for name in {o["method"] for o in outcomes}:
        sweeps = [o["sweep"] for o in outcomes if o["method"] == name and o["sweep"]]
        if sweeps:
            chosen[name] = float(THRESHOLDS[best_threshold(sweeps)])
    return chosen


def rows_of(outcomes, thresholds):
    rows = []
    for o in outcomes:
        if o["error"] or o["method"] not in thresholds:
            rows.append([o["family"], f"{o['snr']:g}", o["row"], "-", "-", "-", "-", "-",
                         o["error"][:70] or "no threshold"])
            continue
        threshold = thresholds[o["method"]]
        crossing = o["sweep"][list(THRESHOLDS).index(threshold)]["crossing"]
        rows.append([o["family"], f"{o['snr']:g}", o["row"], f"{threshold:.2f}",
                     f"{crossing['angular_error']:.1f}", f"{crossing['success_rate']:.2f}",
                     f"{crossing['fn_rate']:.2f}", f"{crossing['fp_rate']:.2f}",
                     f"{o['seconds']:.0f}"])
    return rows


HEADER = ["family", "SNR", "method", "threshold", "AE crossing (deg)", "success crossing",
          "FN crossing", "FP crossing", "fit (s)"]


def save(args, outcomes, thresholds=None):
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"split": args.split, "side": args.side, "outcomes": outcomes,
               "thresholds": thresholds}
    suffix = "" if args.response == "estimated" else f"-{args.response}-response"
    with staged_output(args.out / f"results-{args.split}{suffix}.json") as temporary:
        temporary.write_text(json.dumps(results, indent=1))


def report(files, thresholds=None):
    """Print the table of several runs: each method's threshold chosen on the dev outcomes
    among them, or the ``thresholds`` given (a dev run's choice, method -> threshold)."""
    outcomes = [_relabelled(o) for path in files
                for o in json.loads(path.read_text())["outcomes"]]

    def key(o):
        return o["split"], o["family"], o["snr"], o["row"]

    # A row that failed or was skipped in one part and ran in another is shown once.
    ran = {key(o) for o in outcomes if o["sweep"]}
    outcomes = [o for o in outcomes if o["sweep"] or key(o) not in ran]
    # A row run in two parts is shown once: the later run's.
    outcomes = list({key(o): o for o in outcomes}.values())
    if thresholds is None:
        # Thresholds are chosen on fits with estimated responses only.
        thresholds = choose_thresholds([o for o in outcomes if o["split"] == "dev"
                                        and o.get("response", "estimated") == "estimated"])
    order = {name: i for i, name in enumerate(ROWS.values())}
    outcomes.sort(key=lambda o: (o["split"], o["family"], -o["snr"],
                                 o.get("response", "estimated"), order[o["method"]]))
    for split in SPLITS:
        rows = rows_of([o for o in outcomes if o["split"] == split], thresholds)
        if rows:
            print(f"\n{split}\n" + markdown(HEADER, rows))
    angles = angle_rows(outcomes, thresholds)
    if angles:
        print("\ncrossing false negatives by crossing angle (FN / fibres)\n"
              + markdown(ANGLE_HEADER, angles))
    for split in ("test", "transfer"):
        goals = goal_rows([o for o in outcomes if o["split"] == split
                           and o.get("response", "estimated") == "estimated"], thresholds)
        if goals:
            print(f"\nissue 26's goals ({split})\n" + markdown(GOAL_HEADER, goals))
        goals = network_goal_rows([o for o in outcomes if o["split"] == split
                                   and o.get("response", "estimated") == "estimated"],
                                  thresholds)
        if goals:
            print(f"\nissue 27's accuracy goals ({split})\n"
                  + markdown(NETWORK_GOAL_HEADER, goals))


def _relabelled(outcome):
    """An outcome under its method's current row label (runs of older labels); fits
    given the generator's responses are labelled so."""
    labels = {name: label for label, name in ROWS.items()}
    label = labels.get(outcome["method"], outcome["row"])
    response = outcome.get("response", "estimated")
    return {**outcome, "row": label if response == "estimated" else f"{label} [{response} "
            "response]"}


ANGLE_HEADER = ["split", "family", "SNR", "method", "threshold", "FN crossing",
                *(f"FN {label} deg" for label in ANGLE_LABELS)]


def angle_rows(outcomes, thresholds):
    """Crossing false negatives per crossing-angle bin (:data:`ANGLE_EDGES`), at each
    method's chosen threshold; ``-`` where a phantom has no crossing in a bin."""
    rows = []
    for o in outcomes:
        if o["error"] or o["method"] not in thresholds or "by_angle" not in o["sweep"][0]:
            continue
        threshold = thresholds[o["method"]]
        scores = o["sweep"][list(THRESHOLDS).index(threshold)]
        cells = [f"{part['fn'] / part['n_true']:.2f} ({part['fn']}/{part['n_true']})"
                 if part["n_true"] else "-" for part in scores["by_angle"].values()]
        rows.append([o["split"], o["family"], f"{o['snr']:g}", o["row"], f"{threshold:.2f}",
                     f"{scores['crossing']['fn_rate']:.2f}", *cells])
    return rows


DEFAULT_ROW = "esdmri default (pretrained + refinement)"
RUMBA_ROW = "DIPY RUMBA-SD + TV (own ODF peaks)"
CSD_ROWS = ("DIPY CSD", "DIPY MSMT-CSD")
GOAL_HEADER = ["family", "SNR", "default AE / success / FN / s",
               "RUMBA-SD + TV AE / success / FN / s", "better of CSD, MSMT-CSD: AE",
               "AE <= RUMBA+TV", "AE <= 0.75 x CSD/MSMT", "success >= RUMBA+TV - 0.02",
               "FN <= 0.05", "time <= RUMBA+TV / 2"]


def _crossing_scores(outcomes, thresholds, family, snr, row):
    """(crossing AE, success, FN, seconds) of one row on one phantom at its threshold,
    or None where it did not run."""
    found = [o for o in outcomes if (o["family"], o["snr"], o["row"]) == (family, snr, row)
             and o["sweep"] and o["method"] in thresholds]
    if not found:
        return None
    o = found[-1]
    crossing = o["sweep"][list(THRESHOLDS).index(thresholds[o["method"]])]["crossing"]
    return (crossing["angular_error"], crossing["success_rate"], crossing["fn_rate"],
            o["seconds"])


def _verdict(ok, distance):
    return "yes" if ok else f"no ({distance})"


def goal_rows(outcomes, thresholds):
    """Issue 26's goals per test phantom: the default against RUMBA-SD + TV and CSD/MSMT-CSD.

    Each cell says ``yes`` or ``no`` with the distance to the goal; ``-`` where
    the baseline did not run.
    """
    rows = []
    for family in dict.fromkeys(o["family"] for o in outcomes):
        for snr in sorted({o["snr"] for o in outcomes}, reverse=True):
            default = _crossing_scores(outcomes, thresholds, family, snr, DEFAULT_ROW)
            if default is None:
                continue
            ae, success, fn, seconds = default
            rumba = _crossing_scores(outcomes, thresholds, family, snr, RUMBA_ROW)
            others = [s for s in (_crossing_scores(outcomes, thresholds, family, snr, row)
                                  for row in CSD_ROWS) if s]
            best = min(s[0] for s in others) if others else None
            cells = [family, f"{snr:g}", f"{ae:.1f} / {success:.2f} / {fn:.2f} / {seconds:.0f}"]
            cells.append("{:.1f} / {:.2f} / {:.2f} / {:.0f}".format(*rumba) if rumba else "not run")
            cells.append(f"{best:.1f}" if best is not None else "not run")
            cells.append(_verdict(ae <= rumba[0], f"+{ae - rumba[0]:.1f}") if rumba else "-")
            cells.append(_verdict(ae <= 0.75 * best, f"+{ae - 0.75 * best:.1f}")
                         if best is not None else "-")
            cells.append(_verdict(success >= rumba[1] - 0.02, f"{success - rumba[1] + 0.02:+.2f}")
                         if rumba else "-")
            cells.append(_verdict(fn <= 0.05, f"+{fn - 0.05:.2f}"))
            cells.append(_verdict(seconds <= rumba[3] / 2,
                                  f"{seconds:.0f} s > {rumba[3] / 2:.0f} s") if rumba else "-")
            rows.append(cells)
    return rows


NETWORK_FREE_ROW = "esdmri network-free (pretrained=False)"
ALONE_ROW = "esdmri pretrained alone"
NETWORK_GOAL_HEADER = ["family", "SNR", "default AE / FN", "network-free AE / FN",
                       "default / network-free", "pretrained alone AE / success",
                       "DIPY CSD AE / success", "AE <= 0.9 x network-free",
                       "FN <= network-free + 0.02", "alone beats CSD"]


def network_goal_rows(outcomes, thresholds):
    """Issue 27's accuracy goals per phantom: the default (pretrained) against the
    network-free fit, and the pretrained network alone against DIPY's CSD (lower
    crossing error, success at least CSD's)."""
    rows = []
    for family in dict.fromkeys(o["family"] for o in outcomes):
        for snr in sorted({o["snr"] for o in outcomes}, reverse=True):
            default, free, alone, csd = (
                _crossing_scores(outcomes, thresholds, family, snr, row)
                for row in (DEFAULT_ROW, NETWORK_FREE_ROW, ALONE_ROW, "DIPY CSD"))
            if default is None or free is None:
                continue
            ratio = default[0] / free[0]
            cells = [family, f"{snr:g}", f"{default[0]:.1f} / {default[2]:.2f}",
                     f"{free[0]:.1f} / {free[2]:.2f}", f"{ratio:.2f}",
                     f"{alone[0]:.1f} / {alone[1]:.2f}" if alone else "not run",
                     f"{csd[0]:.1f} / {csd[1]:.2f}" if csd else "not run",
                     _verdict(ratio <= 0.9, f"{ratio:.2f}x"),
                     _verdict(default[2] <= free[2] + 0.02, f"+{default[2] - free[2]:.2f}")]
            cells.append(_verdict(alone[0] < csd[0] and alone[1] >= csd[1],
                                  f"{alone[0] - csd[0]:+.1f} deg, {alone[1] - csd[1]:+.2f}")
                         if alone and csd else "-")
            rows.append(cells)
    return rows


def add_phantom_arguments(parser):
    """``--split``, ``--families`` and ``--snrs``: which devset phantoms a command fits
    (:func:`phantom_families` resolves the families' default, the split's own)."""
    parser.add_argument("--split", choices=tuple(SPLITS), default="dev")
    parser.add_argument("--families", nargs="+", choices=tuple(ALL_SPECS),
                        help="default: every family of the split")
    parser.add_argument("--snrs", nargs="+", type=float, default=list(SNRS))


def phantom_families(args):
    """The families a command given :func:`add_phantom_arguments` fits."""
    return list(args.families or SPLIT_FAMILIES[args.split])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_phantom_arguments(parser)
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    parser.add_argument("--side", type=int, default=16, help="phantom edge (voxels)")
    parser.add_argument("--response", choices=RESPONSES, default="estimated",
                        help="responses the fits get: estimated from the data (every table), "
                             "estimated with the Rician fit (estimate_response(rician=True)), "
                             "or the generator's (a diagnostic of the estimator only: an "
                             "inverse crime); SNR inf is the noise-free phantom")
    parser.add_argument("--thresholds", type=Path,
                        help="a dev run's results JSON whose chosen thresholds to use (also "
                             "with --report)")
    parser.add_argument("--out", type=Path, default=Path("out/devset"))
    parser.add_argument("--compare-responses", action="store_true",
                        help="only print the estimated WM responses against the generator's "
                             "(apparent diffusivities and FA per shell)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="only tabulate these runs' results (dev and test runs, run in "
                             "parts): thresholds chosen on their dev outcomes")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report, args.thresholds and json.loads(args.thresholds.read_text())[
            "thresholds"])
        return
    if args.compare_responses:
        print(markdown(RESPONSE_HEADER, response_rows(args)))
        return
    log_file = (args.out.mkdir(parents=True, exist_ok=True)
                or open(args.out / f"log-{args.split}.txt", "w"))

    def log(message):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    outcomes = run(args, log)
    if args.thresholds:
        thresholds = json.loads(args.thresholds.read_text())["thresholds"]
    else:
        thresholds = choose_thresholds(outcomes)
    save(args, outcomes, thresholds)
    rows = rows_of(outcomes, thresholds)
    log("\n" + text_table(HEADER, rows) + "\n\n" + markdown(HEADER, rows))


if __name__ == "__main__":
    main()
