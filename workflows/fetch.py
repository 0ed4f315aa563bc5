"""``esdmri_fetch``: download the benchmark data sets from the command line.

Examples
--------
``esdmri_fetch --list``, ``esdmri_fetch disco --phantom 1 --resolution high
--snr 30``, ``esdmri_fetch tractometer --parts dwi scoring``,
``esdmri_fetch disco tractometer --out_dir /data/esdmri``.
"""

import sys

from dipy.workflows.base import format_key_value_table
from dipy.workflows.workflow import Workflow

from esdmri.data_fetchers.disco import (
    PHANTOMS,
    disco_data_size,
    disco_folder,
    disco_remote_files,
    fetch_disco,
)
from esdmri.data_fetchers.download import DownloadError, esdmri_home
from esdmri.data_fetchers.tractometer import (
    TRACTOMETER_FILES,
    fetch_tractometer,
    tractometer_folder,
)

from .io import logger, one_line, run_workflow

DATASETS = ("disco", "tractometer")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _parse_snr(snr):
    """Command-line SNR words -> fetch_disco's `snr` argument."""
    words = [str(word).lower() for word in _as_list(snr)]
    if "all" in words:
        return "all"
    try:
        return [None if word in ("none", "clean") else int(word) for word in words]
    except ValueError:
        raise ValueError(
            f"snr must be 'all', 'none' or integers, got {snr!r}") from None


def dataset_table(data_home=None):
    """One line per downloadable item: size, destination and whether present.

    Parameters
    ----------
    data_home : str or Path, optional
        Cache folder; default ``$ESDMRI_HOME`` or ``~/.esdmri``.

    Returns
    -------
    rows : dict
        Item name -> description.
    """
    rows = {}
    for phantom in PHANTOMS:
        folder = disco_folder(phantom, data_home)
        names = disco_remote_files(phantom)
        present = sum((folder / name).is_file() for name in names)
        rows[f"disco --phantom {phantom}"] = (
            f"{disco_data_size(phantom)} in {len(names)} files (DIPY's estimate, "
            f"both resolutions, all SNRs) -> {folder} [{present}/{len(names)} "
            "files present]")
    root = tractometer_folder(data_home)
    for part, remote in TRACTOMETER_FILES.items():
        archive = root / "archives" / remote.filename
        size = (f"{archive.stat().st_size / 1e9:.2f} GB on disk" if archive.is_file()
                else "size not published")
        state = "unpacked" if (root / part).is_dir() else "absent"
        rows[f"tractometer --parts {part}"] = (
            f"{remote.description}; {size} -> {root / part} [{state}]")
    return rows


class FetchFlow(Workflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_fetch"

    def run(self, datasets, phantom=1, resolution="both", snr="all",
            parts=tuple(TRACTOMETER_FILES), quiet=False, out_dir=None):
        """Download the DiSCo phantoms or the ISMRM 2015 Tractometer data.

        Files go to $ESDMRI_HOME (default ~/.esdmri) unless out_dir is given.
        Downloads resume after an interruption, are verified (md5 where
        published) and only appear under their final name once complete;
        --force downloads again. "--list" prints every data set with its
        size and destination without downloading anything. Example:
        esdmri_fetch --list, then esdmri_fetch disco --phantom 1.

        Parameters
        ----------
        datasets : variable string
            Data sets to fetch: disco and/or tractometer; "list" (or --list)
            prints what can be fetched.
        phantom : variable int, optional
            DiSCo phantom(s): 1, 2 and/or 3.
        resolution : string, optional
            DiSCo grid: high (40^3), low (20^3) or both.
        snr : variable string, optional
            DiSCo DWIs: all, or any of none (noise-free), 10, 20, 30, 40, 50.
        parts : variable string, optional
            Tractometer parts: dwi, ground_truth_dwi, bundles and/or scoring.
        quiet : bool, optional
            Hide progress bars.
        out_dir : string, optional
            Cache folder to use instead of $ESDMRI_HOME.

        Returns
        -------
        folders : dict
            Fetched item -> folder.

        References
        ----------
        .. [1] Rafael-Patino J, Girard G, Truffet R, Pizzolato M, Caruyer E,
           Thiran JP. The Diffusion-Simulated Connectivity (DiSCo) dataset.
           Data in Brief 38:107429, 2021.

        .. [2] Maier-Hein KH, Neher PF, Houde JC, et al. The challenge of mapping
           the human connectome based on diffusion tractography. Nature
           Communications 8:1349, 2017.
        """
        data_home = out_dir or None
        names = [name.lower() for name in _as_list(datasets)]
        if "list" in names:
            print(format_key_value_table(dataset_table(data_home), "data set",
                                         f"size -> destination (home: "
                                         f"{esdmri_home(data_home)})", sort=False))
            return {}
        unknown = sorted(set(names) - set(DATASETS))
        if unknown:
            raise ValueError(f"datasets must be among {DATASETS} or 'list', got "
                             f"{unknown}")
        if resolution not in ("high", "low", "both"):
            raise ValueError(
                f"resolution must be high, low or both, got {resolution!r}")
        folders = {}
        if "disco" in names:
            for number in _as_list(phantom):
                _, folder = fetch_disco(
                    int(number),
                    resolution=None if resolution == "both" else resolution,
                    snr=_parse_snr(snr), data_home=data_home,
                    force=self._force_overwrite, quiet=quiet)
                folders[f"disco{number}"] = folder
                logger.info(f"DiSCo phantom {number} is in {folder}")
        if "tractometer" in names:
            for part, folder in fetch_tractometer(
                    _as_list(parts), data_home=data_home,
                    force=self._force_overwrite, quiet=quiet).items():
                folders[f"tractometer:{part}"] = folder
                logger.info(f"Tractometer part {part} is in {folder}")
        return folders


def main():
    """Entry point of ``esdmri_fetch``."""
    # DIPY's argument parser makes positional arguments mandatory, so a bare
    # "--list" is passed on as the data set name "list".
    sys.argv[1:] = ["list" if arg == "--list" else arg for arg in sys.argv[1:]]
    try:
        run_workflow(FetchFlow())
    except DownloadError as error:
        # Offline or a server down: one line that says what to do, not the
        # chain of network tracebacks (kept at --log_level DEBUG).
        logger.debug("traceback:", exc_info=True)
        sys.exit(f"esdmri_fetch: error: {one_line(error)}")


if __name__ == "__main__":
    main()
