"""``esdmri_demo``: the whole pipeline on the offline phantom, RT-ESD against CSD.

Examples
--------
``esdmri_demo --quick`` (a 16^3 phantom, about 10 s on an idle 2-core machine) or
``esdmri_demo --out_dir esdmri_demo`` (the 40^3 default phantom, a few
minutes). Nothing is downloaded.

Steps: build the crossing-fibre phantom of :func:`esdmri.sims.make_phantom`
(multi-shell, WM/GM/CSF partial volume, Rician noise at SNR 30); fit RT-ESD
with the phantom's true multi-tissue response; fit DIPY's single-shell CSD
(order 8) on the b = 3000 shell with the phantom's true WM response (of the
three shells, the one where CSD resolves crossings best on this phantom);
extract peaks of both with the same function; score them against the true
fibres, at DIPY's default relative peak threshold 0.5 and at each method's
best threshold of a sweep; track both with DIPY's deterministic tracker from
the same seeds and stopping map (the true WM fraction, so that only the fODFs
differ); write every map, the tractograms, a results table and figures.
"""

import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from dipy.io.stateful_tractogram import Space, StatefulTractogram
from dipy.reconst.shm import sh_to_sf_matrix
from dipy.tracking.streamline import length

from esdmri.baselines import fit_csd
from esdmri.metrics import (angular_errors, crossing_angles, evaluate_fractions,
                            evaluate_peaks, threshold_sweep)
from esdmri.peaks import default_peak_sphere, peaks_from_sh, peaks_to_dipy, sh_order_from_coeffs
from esdmri.reconst.config import option_defaults
from esdmri.shm import descoteaux_to_legacy
from esdmri.sims import make_phantom
from esdmri.tracking import track
from esdmri.viz import (plot_angular_error_vs_crossing, plot_fraction_maps, plot_odf_slice,
                        plot_peaks_slice, plot_streamlines_slice, plot_training_curves,
                        save_figure)

from .fit import write_fit_outputs
from .io import (EsdmriWorkflow, check_out_dir, check_outputs, display_name, run_workflow,
                 save_map, save_peaks, save_streamlines, save_table, save_text,
                 verbose_logging)
from .io import logger
from .track import reference_header

SNR = 30.0
CSD_BVAL = 3000.0
CSD_SH_ORDER = 8
# One fixed relative peak threshold for every method of the demo's table (DIPY's
# default), beside each method's best of SWEEP_THRESHOLDS; not the fit's PEAK_THRESHOLD.
COMPARISON_THRESHOLD = 0.5
# Sweep of relative peak thresholds for each method's best score.
SWEEP_THRESHOLDS = np.round(np.arange(1, 10) * 0.1, 1)
# Tracking: seeds where the true WM fraction is >= 0.5, stop below 0.25.
SEED_WM_FRACTION = 0.5
STOP_WM_FRACTION = 0.25
# Shortest streamline kept, mm (a quarter of the grid on small grids).
MIN_LENGTH_MM = 10.0
# A streamline step agrees with the truth within this angle of a true fibre.
STEP_MATCH_DEG = 25.0

# Grid and RT-ESD hyperparameters of the two modes, chosen for the time
# limits on 2 CPU cores (full under 10 minutes, quick under 2) should
# --epochs train the network. Both use a coarse sphere (nside 4: 96
# hemisphere vertices, still more than the 45 coefficients of order 8) and a
# two-level U-Net with 4 starting channels: on 2 cores one epoch over the
# 40^3 phantom takes about 30 s of CPU time there, against about 140 s at
# nside 8. Without --epochs the model's default (no training) is fitted.
MODES = {
    "full": {"size": 40,
             "model": {"sh_order_max": 8, "nside": 4, "depth": 2, "filter_start": 4,
                       "block_size": 12, "batch_size": 4}},
    "quick": {"size": 16,
              "model": {"sh_order_max": 8, "nside": 4, "depth": 2, "filter_start": 4,
                        "block_size": 8, "batch_size": 4}},
}

RESULT_COLUMNS = ("method", "peak_threshold", "angular_error", "angular_error_crossing",
                  "success_rate", "success_rate_crossing", "fp_rate", "fn_rate",
                  "fraction_mae", "streamlines", "mean_length_mm", "steps_on_fibre")


def demo_files(out_dir, trained):
    """Every file the demo writes, by role (the training curve only if ``trained``)."""
    out_dir = Path(out_dir)
    phantom, rtesd, csd, figures = (out_dir / name for name in
                                    ("phantom", "rtesd", "csd", "figures"))
    files = {f"phantom_{name.split('.')[0]}": phantom / name for name in
             ("dwi.nii.gz", "bvals", "bvecs", "mask.nii.gz", "ground_truth.npz")}
    files.update({
        "rtesd_shm": rtesd / "fodf_sh.nii.gz", "rtesd_fractions": rtesd / "fractions.nii.gz",
        "rtesd_peaks": rtesd / "peaks.pam5", "rtesd_model": rtesd / "model.pt",
        "rtesd_tractogram": rtesd / "tractogram.trk",
        "csd_shm": csd / "fodf_sh.nii.gz", "csd_peaks": csd / "peaks.pam5",
        "csd_tractogram": csd / "tractogram.trk",
        "figure_truth": figures / "peaks_truth.png",
        "figure_rtesd": figures / "odf_rtesd.png", "figure_csd": figures / "odf_csd.png",
        "figure_fractions": figures / "fractions_rtesd.png",
        "figure_crossing": figures / "angular_error_vs_crossing.png",
        "figure_tracks": figures / "tractography.png",
        "results_md": out_dir / "results.md", "results_csv": out_dir / "results.csv",
        **({"rtesd_curve": rtesd / "training_curve.png"} if trained else {}),
    })
    return files


def sh_peaks(shm_coeff, affine, mask, relative_peak_threshold=COMPARISON_THRESHOLD):
    """DIPY ``PeaksAndMetrics`` of non-legacy SH fODFs, stored DIPY-style.

    The ``.pam5`` convention (DIPY's ``peaks_from_model``, ``dipy_track``)
    keeps ``shm_coeff`` and ``B`` in DIPY's default legacy basis.
    """
    sh_order_max = sh_order_from_coeffs(shm_coeff.shape[-1])
    sphere = default_peak_sphere()
    directions, values = peaks_from_sh(shm_coeff, sphere=sphere, mask=mask,
                                       relative_peak_threshold=relative_peak_threshold)
    pam = peaks_to_dipy(directions, values, shm_coeff, sphere, affine=affine)
    pam.shm_coeff = descoteaux_to_legacy(shm_coeff, sh_order_max)
    pam.B = sh_to_sf_matrix(sphere, sh_order_max=sh_order_max, basis_type="descoteaux07",
                            legacy=True, return_inv=False)
    return pam, directions


def steps_on_fibre(streamlines, affine, fibre_dirs, max_angle=STEP_MATCH_DEG):
    """Share of streamline steps within ``max_angle`` of a true fibre of their voxel.

    Parameters
    ----------
    streamlines : Streamlines
        World (RAS mm) coordinates.
    affine : ndarray, shape (4, 4)
    fibre_dirs : ndarray, shape (X, Y, Z, K, 3)
        NaN-padded true directions in voxel axes.
    max_angle : float

    Returns
    -------
    share : float
        NaN without steps.
    """
    if len(streamlines) == 0:
        return np.nan
    inverse = np.linalg.inv(affine)
    starts, steps = [], []
    for line in streamlines:
        voxel = line @ inverse[:3, :3].T + inverse[:3, 3]
        starts.append((voxel[1:] + voxel[:-1]) / 2)
        steps.append(np.diff(voxel, axis=0))
    midpoints, steps = np.concatenate(starts), np.concatenate(steps)
    index = np.clip(np.rint(midpoints).astype(int), 0, np.array(fibre_dirs.shape[:3]) - 1)
    truth = fibre_dirs[index[:, 0], index[:, 1], index[:, 2]]  # (n, K, 3)
    unit = steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    cosine = np.nan_to_num(np.abs(np.einsum("nkc,nc->nk", truth, unit)), nan=0.0)
    return float(np.mean(cosine.max(axis=-1) >= np.cos(np.radians(max_angle))))


def score(name, shm_coeff, pam_dirs, truth_dirs, wm_mask, fractions=None, truth_fractions=None,
          brain=None):
    """Result rows of one method: at the fixed threshold and at its best one."""
    fixed = evaluate_peaks(pam_dirs, truth_dirs, wm_mask)
    sweep = threshold_sweep(shm_coeff, truth_dirs, mask=wm_mask, thresholds=SWEEP_THRESHOLDS)
    best = sweep["results"][sweep["best_index"]]
    mae = np.nan
    if fractions is not None:
        mae = evaluate_fractions(fractions, truth_fractions, brain)["mae"]
    rows = []
    for threshold, summary in ((COMPARISON_THRESHOLD, fixed), (sweep["best_threshold"], best)):
        rows.append({
            "method": name, "peak_threshold": threshold,
            "angular_error": summary["all"]["angular_error"],
            "angular_error_crossing": summary["crossing"]["angular_error"],
            "success_rate": summary["all"]["success_rate"],
            "success_rate_crossing": summary["crossing"]["success_rate"],
            "fp_rate": summary["all"]["fp_rate"], "fn_rate": summary["all"]["fn_rate"],
            "fraction_mae": mae})
    return rows


def _cell(value):
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.3g}"
    return str(value)


def results_markdown(rows, settings, timings):
    """The results table and the settings that produced it, as Markdown."""
    lines = ["# esdmri demo results", "",
             f"Phantom {settings['shape']}, SNR {SNR:g}, default gradient table "
             "(4 b0 + 3 x 64 directions at b = 1000, 2000, 3000). RT-ESD "
             f"({', '.join(f'{k}={v}' for k, v in settings['model'].items())}) with the "
             f"true multi-tissue response; DIPY CSD (order {CSD_SH_ORDER}, b = "
             f"{CSD_BVAL:g} shell) with the true WM response. Peaks scored in voxels with "
             "a true fibre; the second row of each method uses its best relative peak "
             f"threshold of the sweep {SWEEP_THRESHOLDS.tolist()}. Angles in degrees; "
             "rates are fractions; fraction_mae is the mean absolute error of the WM/GM/CSF "
             "fractions in the brain; streamlines from the same seeds (true WM fraction >= "
             f"{SEED_WM_FRACTION}) and stopping map (true WM fraction > {STOP_WM_FRACTION}); "
             f"steps_on_fibre: share of tracking steps within {STEP_MATCH_DEG:g} degrees of "
             "a true fibre.", "",
             "| " + " | ".join(RESULT_COLUMNS) + " |",
             "|" + "---|" * len(RESULT_COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in RESULT_COLUMNS) + " |"
              for row in rows]
    lines += ["", "Run times (s, this machine; not benchmarks): "
              + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items()), ""]
    return "\n".join(lines)


class DemoFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_demo"

    def run(self, quick=False, size=None, epochs=None, device="cpu", seed=0,
            out_dir="esdmri_demo"):
        """Run the whole pipeline offline on a synthetic phantom: RT-ESD vs CSD.

        Builds the crossing-fibre phantom (multi-shell, WM/GM/CSF partial
        volume, Rician noise), fits RT-ESD and DIPY's CSD, extracts and
        scores peaks against the true fibres, tracks both, and writes the
        phantom, fODF/fraction NIfTI maps, .pam5 peaks, .trk tractograms, a
        results table (results.md, results.csv) and figures (among them a
        tractography quick-look) into out_dir. Example: esdmri_demo --quick
        --out_dir esdmri_demo (about 10 s on an idle 2-core machine).

        Parameters
        ----------
        quick : bool, optional
            16^3 phantom (about 10 s on an idle 2-core machine) instead of
            the 40^3 phantom.
        size : int, optional
            Edge of the phantom grid in voxels, at least 8 (default 40, or 16
            with --quick).
        epochs : int, optional
            RT-ESD training epochs (default: the model's, 0, no training;
            e.g. 12, or 5 with --quick, train a small network in minutes).
        device : string, optional
            cpu, cuda or cuda:N for RT-ESD.
        seed : int, optional
            Seed of the phantom's noise and of the network.
        out_dir : string, optional
            Output folder.

        Returns
        -------
        files : dict
            Role -> path of every file written.

        References
        ----------
        .. [1] Elaldi A, Dey N, Kim H, Gerig G. Equivariant Spherical Deconvolution:
           Learning Sparse Orientation Distribution Functions from Spherical Data.
           Information Processing in Medical Imaging (IPMI), 2021.

        .. [2] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-Equivariant Networks for
           Spherical Deconvolution in Diffusion MRI. Medical Imaging with Deep
           Learning (MIDL), 2023.
        """
        mode = MODES["quick" if quick else "full"]
        size = mode["size"] if size is None else size
        settings = {"shape": (size,) * 3, "model": dict(mode["model"])}
        # Windows larger than the grid only add padding.
        settings["model"]["block_size"] = min(settings["model"]["block_size"], size)
        # Stated in the results table either way.
        epochs = option_defaults()["epochs"] if epochs is None else epochs
        settings["model"]["epochs"] = epochs
        files = demo_files(out_dir, trained=epochs > 0)
        check_out_dir(out_dir)
        check_outputs(files.values(), self._force_overwrite)
        for folder in sorted({path.parent for path in files.values()}):
            folder.mkdir(parents=True, exist_ok=True)
        timings = {}
        clock = time.perf_counter()

        logger.info(f"building a {settings['shape']} phantom (SNR {SNR:g})")
        phantom = make_phantom(settings["shape"], snr=SNR, seed=seed)
        phantom.save(files["phantom_dwi"].parent, force=True)
        affine = phantom.affine
        truth = phantom.fibre_dirs
        wm_mask = phantom.n_fibres > 0
        timings["phantom"], clock = time.perf_counter() - clock, time.perf_counter()

        logger.info(f"fitting RT-ESD ({epochs} training epochs on {device})")
        from esdmri.reconst.models import RTESDModel  # torch: only when the demo runs

        model = RTESDModel(phantom.gtab, phantom.response, device=device, seed=seed,
                           verbose=verbose_logging(), **settings["model"])
        fit = model.fit(phantom.data, mask=phantom.mask)
        timings["RT-ESD fit"], clock = time.perf_counter() - clock, time.perf_counter()
        rtesd_pam = write_fit_outputs(
            fit, affine, files["rtesd_shm"], files["rtesd_fractions"], files["rtesd_peaks"],
            relative_peak_threshold=COMPARISON_THRESHOLD)
        model.save(files["rtesd_model"], force=True)
        if epochs:
            curve = plot_training_curves(fit.training_history)
            curve.set_title(f"RT-ESD training on the phantom ({epochs} epochs)")
            self._save(curve, files["rtesd_curve"])
        rtesd_sh = fit.shm_coeff_descoteaux07
        rtesd_dirs = rtesd_pam.peak_dirs
        rtesd_fractions = np.stack(list(fit.volume_fractions.values()), axis=-1)

        logger.info(f"fitting DIPY CSD (order {CSD_SH_ORDER}, b = {CSD_BVAL:g})")
        csd_sh = fit_csd(phantom.gtab, phantom.data, phantom.response, mask=phantom.mask,
                         bval=CSD_BVAL, sh_order_max=CSD_SH_ORDER)
        timings["CSD fit"], clock = time.perf_counter() - clock, time.perf_counter()
        csd_pam, csd_dirs = sh_peaks(csd_sh, affine, phantom.mask)
        save_map(files["csd_shm"], csd_pam.shm_coeff, affine,
                 f"DIPY CSD fODF SH order {CSD_SH_ORDER} descoteaux07 legacy")
        save_peaks(files["csd_peaks"], csd_pam, affine)

        logger.info("scoring peaks against the true fibres")
        brain = phantom.mask
        rows = (score("RT-ESD", rtesd_sh, rtesd_dirs, truth, wm_mask, rtesd_fractions,
                      phantom.tissue_fractions, brain)
                + score("CSD", csd_sh, csd_dirs, truth, wm_mask))
        timings["scoring"], clock = time.perf_counter() - clock, time.perf_counter()

        logger.info("tracking (deterministic) through both fODFs")
        wm_fraction = phantom.tissue_fractions[..., 0]
        header = reference_header(settings["shape"], affine)
        tracts = {}
        for method, coefficients in (("RT-ESD", rtesd_sh), ("CSD", csd_sh)):
            streamlines = track(
                descoteaux_to_legacy(coefficients, sh_order_from_coeffs(coefficients.shape[-1])),
                affine, wm_fraction, threshold=STOP_WM_FRACTION,
                seed_mask=wm_fraction >= SEED_WM_FRACTION, tracker="det",
                min_length=min(MIN_LENGTH_MM, size / 4), random_seed=seed)
            key = "rtesd_tractogram" if method == "RT-ESD" else "csd_tractogram"
            save_streamlines(files[key], StatefulTractogram(streamlines, header, Space.RASMM))
            tracts[method] = streamlines
            lengths = length(streamlines) if len(streamlines) else np.array([np.nan])
            tracking = {"streamlines": len(streamlines),
                        "mean_length_mm": float(np.mean(lengths)),
                        "steps_on_fibre": steps_on_fibre(streamlines, affine, truth)}
            for row in rows:
                if row["method"] == method:
                    row.update(tracking)
        timings["tracking"], clock = time.perf_counter() - clock, time.perf_counter()

        self._figures(files, phantom, rtesd_sh, csd_sh, fit, rtesd_dirs, csd_dirs, tracts)
        timings["figures"] = time.perf_counter() - clock

        markdown = results_markdown(rows, settings, timings)
        save_text(files["results_md"], markdown)
        save_table(files["results_csv"], rows, RESULT_COLUMNS)
        print(markdown)
        width = max(map(len, files))
        print(f"Everything is in {out_dir}:")
        print("\n".join(f"  {role:<{width}}  {path}" for role, path in files.items()))
        return files

    @staticmethod
    def _save(ax_or_figure, path):
        figure = getattr(ax_or_figure, "figure", ax_or_figure)
        save_figure(figure, path, force=True)
        plt.close(figure)

    def _figures(self, files, phantom, rtesd_sh, csd_sh, fit, rtesd_dirs, csd_dirs, tracts):
        truth = phantom.fibre_dirs
        wm_fraction = phantom.tissue_fractions[..., 0]
        affine = phantom.affine
        true_wm = f"true WM fraction ({files['phantom_ground_truth'].name})"
        ax = plot_peaks_slice(truth, phantom.fibre_fractions, background=wm_fraction,
                              color="direction", affine=affine, background_label=true_wm,
                              linewidth=2.0)
        ax.set_title(f"true fibres of the phantom, {ax.get_title()}")
        self._save(ax, files["figure_truth"])
        for method, coefficients, background, label in (
                ("rtesd", rtesd_sh, fit.volume_fractions["wm"],
                 f"RT-ESD WM fraction ({display_name(files['rtesd_fractions'])})"),
                ("csd", csd_sh, wm_fraction, true_wm)):
            # Glyph sizes show fODF amplitude, so partial-volume voxels look small.
            ax = plot_odf_slice(coefficients, mask=phantom.mask, background=background,
                                norm="global", legacy=False, affine=affine,
                                background_label=label)
            what = "RT-ESD" if method == "rtesd" else f"DIPY CSD (b = {CSD_BVAL:g})"
            ax.set_title(f"{what} fODFs, {display_name(files[f'{method}_shm'])}\n"
                         f"{ax.get_title()}")
            self._save(ax, files[f"figure_{method}"])
        figure = plot_fraction_maps(fit.volume_fractions, affine=affine)
        figure.suptitle(f"RT-ESD tissue fractions, {display_name(files['rtesd_fractions'])}")
        self._save(figure, files["figure_fractions"])
        crossing = phantom.n_fibres >= 2
        angles = crossing_angles(truth)[crossing]
        results = {name: (angles, angular_errors(directions, truth)[crossing])
                   for name, directions in (("RT-ESD", rtesd_dirs), ("CSD", csd_dirs))}
        ax = plot_angular_error_vs_crossing(
            results, threshold=COMPARISON_THRESHOLD,
            title=f"Crossing voxels of the {phantom.data.shape[0]}^3 phantom (SNR {SNR:g})")
        self._save(ax, files["figure_crossing"])
        self._save(self._tractography(files, phantom, tracts, true_wm), files["figure_tracks"])

    def _tractography(self, files, phantom, tracts, background_label):
        """Both methods' streamlines over the true WM fraction, side by side."""
        figure, axes = plt.subplots(1, len(tracts), figsize=(6.2 * len(tracts), 5.6),
                                    layout="constrained", squeeze=False)
        for ax, (method, streamlines) in zip(axes[0], tracts.items()):
            plot_streamlines_slice(streamlines, phantom.affine, phantom.data.shape[:3],
                                   background=phantom.tissue_fractions[..., 0],
                                   background_label=background_label, ax=ax)
            key = "rtesd_tractogram" if method == "RT-ESD" else "csd_tractogram"
            ax.set_title(f"{method}: {len(streamlines)} streamlines, "
                         f"{display_name(files[key])}\nprojected onto the {ax.get_title()}")
        figure.suptitle("Deterministic tractography (DIPY LocalTracking), colour = direction")
        return figure


def main():
    """Entry point of ``esdmri_demo``."""
    run_workflow(DemoFlow())


if __name__ == "__main__":
    main()
