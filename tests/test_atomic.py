"""Atomic outputs: temporary files renamed into place, one transaction per command.

Each test writes through :mod:`esdmri.atomic` (directly or through a save
helper) and makes the writer fail or get interrupted, then checks the folder
holds exactly what it should: the complete files, or nothing at all (no
partial file under a final name, no temporary file left behind).
"""

import os
import signal
import stat

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from esdmri import atomic  # noqa: E402
from esdmri.atomic import PARTIAL_PREFIX, output_transaction, staged_output  # noqa: E402
from esdmri.sims import load_phantom, make_phantom  # noqa: E402
from esdmri.viz import save_figure  # noqa: E402


def listing(folder):
    """Every entry of ``folder``, hidden ones included."""
    return sorted(os.listdir(folder))


def test_a_finished_write_is_renamed_with_normal_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        with staged_output(tmp_path / "map.nii.gz") as temporary:
            assert temporary.parent == tmp_path
            assert temporary.name.startswith(PARTIAL_PREFIX)
            assert temporary.name.endswith("map.nii.gz")  # writers read the extension
            nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), temporary)
    finally:
        os.umask(old_umask)
    assert listing(tmp_path) == ["map.nii.gz"]
    assert stat.S_IMODE(os.stat(tmp_path / "map.nii.gz").st_mode) == 0o644
    assert nib.load(tmp_path / "map.nii.gz").get_fdata().sum() == 8


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_output(target) as temporary:
            temporary.write_text("half a tab")
            raise RuntimeError("disk full")
    assert listing(tmp_path) == ["table.csv"]
    assert target.read_text() == "old\n"


def test_a_transaction_writes_all_outputs_or_none(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with output_transaction():
            for name in ("a.txt", "b.txt"):
                with staged_output(tmp_path / name) as temporary:
                    temporary.write_text(name)
            assert listing(tmp_path) != []  # staged, under temporary names only
            assert not (tmp_path / "a.txt").exists()
            raise KeyboardInterrupt
    assert listing(tmp_path) == []

    with output_transaction():
        with output_transaction():  # nested: joins the outer one
            with staged_output(tmp_path / "a.txt") as temporary:
                temporary.write_text("a")
        assert not (tmp_path / "a.txt").exists()
        with staged_output(tmp_path / "checkpoint.pt", detached=True) as temporary:
            temporary.write_text("c")
        assert (tmp_path / "checkpoint.pt").read_text() == "c"  # detached: already there
    assert listing(tmp_path) == ["a.txt", "checkpoint.pt"]


def test_an_interrupt_during_the_renames_waits_for_them(tmp_path, monkeypatch):
    # Ctrl-C arriving between two renames must not leave one output without
    # the other: it is delivered once every file is in place.
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with output_transaction():
            for name in ("a.txt", "b.txt", "c.txt"):
                with staged_output(tmp_path / name) as temporary:
                    temporary.write_text(name)
    assert listing(tmp_path) == ["a.txt", "b.txt", "c.txt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_missing_or_unwritable_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .*nowhere does not exist"):
        with staged_output(tmp_path / "nowhere" / "x.txt"):
            pass
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        with staged_output(tmp_path / "folder"):
            pass


def test_save_helpers_leave_nothing_when_the_writer_fails(tmp_path, monkeypatch):
    # A figure whose rendering fails half-way.
    figure, ax = plt.subplots()
    ax.plot([0, 1])

    def failing_savefig(path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="No space left"):
        save_figure(figure, tmp_path / "curve.png")
    plt.close(figure)
    assert listing(tmp_path) == []

    # A phantom whose fourth file fails: none of the five appears.
    phantom = make_phantom((8, 8, 8), seed=0)
    real_savez = np.savez_compressed

    def failing_savez(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez_compressed", failing_savez)
    with pytest.raises(OSError):
        phantom.save(tmp_path / "phantom")
    assert listing(tmp_path / "phantom") == []
    monkeypatch.setattr(np, "savez_compressed", real_savez)
    phantom.save(tmp_path / "phantom")
    assert load_phantom(tmp_path / "phantom") == phantom
