"""Group training on several scans: streaming blocks, DDP under torchrun, resume, CLI.

References are independent of the code under test: blocks are compared with
slices of the whole volume normalised by ``normalize_by_b0`` and
interpolated by ``ShellInterpolator``; two torchrun processes must end with
bit-identical weights; a resumed run must equal an uninterrupted one bit for
bit; the applied group model must equal a model loaded per scan.
"""

import os
import socket
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table

from esdmri import RTESDModel, load_model
from esdmri.reconst.inputs import normalize_by_b0
from esdmri.reconst.subjects import SubjectBlocks, Subject
from esdmri.response import estimate_response
from esdmri.reconst.tiling import cut_window
from esdmri.response import TissueResponse
from esdmri.shm import ShellInterpolator
from esdmri.sims import load_phantom, make_phantom
from esdmri.sphere import HealpixSphere
from esdmri.reconst.group import train_group
from esdmri.workflows.apply import ApplyFlow
from esdmri.workflows.io import run_workflow
from esdmri.workflows.train import TrainFlow, read_subjects_table

# Smallest RT-ESD: 24-vertex hemisphere (nside 2) > 15 coefficients of order 4.
TINY = dict(model="rtesd", sh_order_max=4, nside=2, depth=1, filter_start=4, block_size=4,
            batch_size=2, lr=5e-3, verbose=False)
GRID = HealpixSphere(2, hemisphere=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny networks run faster on one thread, and results are reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_gtab():
    """2 b0 + 3 shells x 30 random directions: other directions than the default."""
    rng = np.random.default_rng(5)
    directions = rng.normal(size=(90, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bvals = np.concatenate([np.zeros(2), np.repeat([1000.0, 2000.0, 3000.0], 30)])
    return gradient_table(bvals, bvecs=np.concatenate([np.zeros((2, 3)), directions]))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two 8^3 phantoms with different gradient tables, saved as NIfTI."""
    root = tmp_path_factory.mktemp("cohort")
    for name, gtab, seed in (("a", None, 0), ("b", sparse_gtab(), 1)):
        make_phantom((8, 8, 8), gtab=gtab, seed=seed).save(root / name)
    return root


def subjects_of(root, names="ab"):
    return [Subject(root / n / "dwi.nii.gz", root / n / "bvals", root / n / "bvecs",
                    mask=root / n / "mask.nii.gz") for n in names]


@pytest.fixture(scope="module")
def response(cohort):
    return load_phantom(cohort / "a").response


def weights_of(model):
    return model.network.state_dict()


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --------------------------------------------------------------------------
# streaming dataset
# --------------------------------------------------------------------------

def test_blocks_equal_slices_of_the_normalised_interpolated_volume(cohort, monkeypatch):
    # Reading a whole volume goes through ArrayProxy.__array__: forbid it for
    # the 4D scans (3D masks are read whole).
    whole = nib.arrayproxy.ArrayProxy.__array__

    def no_whole_scan(proxy, *args, **kwargs):
        assert len(proxy.shape) < 4, "the dataset read a whole 4D scan"
        return whole(proxy, *args, **kwargs)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_whole_scan)
    dataset = SubjectBlocks(subjects_of(cohort), GRID, block_size=5)
    assert dataset.n_shells == 4
    blocks = np.array([[0, -2, 3, 1], [1, 4, 4, 4], [1, 0, -1, 6], [0, 3, 0, 2]])
    batch = dataset.read(blocks)
    monkeypatch.undo()
    signals = {}
    for group in batch["groups"]:
        for position, row in enumerate(group["rows"].tolist()):
            signals[row] = group["signal"][position]
    for row, (subject, *start) in enumerate(blocks):
        phantom = load_phantom(cohort / "ab"[subject])
        normalized, mask = normalize_by_b0(phantom.data, phantom.gtab, phantom.mask)
        grid = ShellInterpolator(phantom.gtab, GRID.vertices)(normalized)
        np.testing.assert_array_equal(batch["mask"][row].numpy(), cut_window(mask, start, 5))
        np.testing.assert_allclose(signals[row].numpy(),
                                   np.moveaxis(cut_window(normalized, start, 5), -1, 0),
                                   rtol=1e-6)
        np.testing.assert_allclose(batch["grid"][row].numpy(),
                                   cut_window(grid, start, 5).transpose(3, 4, 0, 1, 2),
                                   rtol=1e-5, atol=1e-6)
        assert signals[row].shape[0] == len(phantom.gtab.bvals)


def test_epoch_plan_covers_each_masked_voxel_and_batches_mix_gtabs(cohort):
    dataset = SubjectBlocks(subjects_of(cohort), GRID, block_size=3)
    blocks = dataset.plan_epoch(np.random.default_rng(0))
    for subject, mask in enumerate(dataset.masks):
        covered = np.zeros(np.array(mask.shape) + 6, dtype=int)
        own = blocks[blocks[:, 0] == subject]
        for _, x, y, z in own:
            covered[x + 3:x + 6, y + 3:y + 6, z + 3:z + 6] += 1
        assert (covered[3:-3, 3:-3, 3:-3][mask] >= 1).all()
        assert mask[tuple((own[:, 1:] + 1).T)].all()  # centred on masked voxels
    first = [i for i, b in enumerate(blocks) if b[0] == 0][:2]
    second = [i for i, b in enumerate(blocks) if b[0] == 1][:1]
    batch = dataset.read(blocks[[first[0], second[0], first[1]]])
    assert batch["grid"].shape == (3, 4, GRID.n_vertices, 3, 3, 3)
    groups = {group["subject"]: group for group in batch["groups"]}
    assert groups[0]["rows"].tolist() == [0, 2] and groups[1]["rows"].tolist() == [1]
    assert groups[0]["signal"].shape[1] == 196 and groups[1]["signal"].shape[1] == 92


# --------------------------------------------------------------------------
# train_group
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_single_process_training_lowers_the_loss_and_saves_a_loadable_model(
        cohort, response, tmp_path):
    model = train_group(subjects_of(cohort), response, epochs=4, out_file=tmp_path / "m.pt",
                        **TINY)
    totals = [record["total"] for record in model.training_history]
    assert len(totals) == 4 and totals[-1] < totals[0]
    loaded = load_model(tmp_path / "m.pt", verbose=False)
    assert isinstance(loaded, RTESDModel) and isinstance(model, RTESDModel)
    assert_same_weights(weights_of(loaded), weights_of(model))
    assert loaded.training_history == model.training_history


@pytest.mark.slow
def test_resumed_training_equals_an_uninterrupted_run(cohort, response, tmp_path):
    # The uninterrupted run reads blocks in a DataLoader worker process, the
    # interrupted one in this process: that must not change a bit either.
    whole = train_group(subjects_of(cohort), response, epochs=4, num_workers=1,
                        checkpoint=tmp_path / "whole.pt", **TINY)
    train_group(subjects_of(cohort), response, epochs=2, checkpoint=tmp_path / "cut.pt", **TINY)
    resumed = train_group(subjects_of(cohort), response, epochs=4,
                          checkpoint=tmp_path / "cut.pt", resume=True, **TINY)
    assert_same_weights(weights_of(resumed), weights_of(whole))
    assert resumed.training_history == whole.training_history
    # Checkpoints are written like every other file (not 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "cut.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    # A finished checkpoint resumes to the same model without training.
    again = train_group(subjects_of(cohort), response, epochs=4,
                        checkpoint=tmp_path / "cut.pt", resume=True, **TINY)
    assert_same_weights(weights_of(again), weights_of(whole))
    with pytest.raises(ValueError, match="other settings.*nside"):
        train_group(subjects_of(cohort), response, epochs=4, checkpoint=tmp_path / "cut.pt",
                    resume=True, **{**TINY, "nside": 4})


@pytest.mark.slow
def test_masked_group_training_resumes_exactly_and_old_checkpoints_resume(
        cohort, response, tmp_path):
    # mask_fraction (ported from branch i15) hides voxels of every subject's blocks; the
    # hidden voxels' random state is part of the checkpoint.
    masked = {**TINY, "mask_fraction": 0.25}
    whole = train_group(subjects_of(cohort), response, epochs=3, **masked)
    train_group(subjects_of(cohort), response, epochs=2, checkpoint=tmp_path / "cut.pt",
                **masked)
    resumed = train_group(subjects_of(cohort), response, epochs=3,
                          checkpoint=tmp_path / "cut.pt", resume=True, **masked)
    assert_same_weights(weights_of(resumed), weights_of(whole))
    assert resumed.training_history == whole.training_history
    with pytest.raises(ValueError, match="other settings.*mask_fraction"):
        train_group(subjects_of(cohort), response, epochs=3, checkpoint=tmp_path / "cut.pt",
                    resume=True, **TINY)
    # A checkpoint of an esdmri without mask_fraction (no such option, no hiding state)
    # resumes as one without masking.
    from esdmri import serialization
    first = train_group(subjects_of(cohort), response, epochs=1,
                        checkpoint=tmp_path / "old.pt", **TINY)
    state = serialization.read_checkpoint(tmp_path / "old.pt")
    del state["config"]["mask_fraction"], state["hiding_rng"], state["format"]
    serialization.write_checkpoint(state, tmp_path / "old.pt")
    again = train_group(subjects_of(cohort), response, epochs=1,
                        checkpoint=tmp_path / "old.pt", resume=True, **TINY)
    assert_same_weights(weights_of(again), weights_of(first))


WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from esdmri.sims import load_phantom
    from esdmri.reconst.subjects import Subject
    from esdmri.reconst.group import train_group

    root, out = sys.argv[1], sys.argv[2]
    subjects = [Subject(f"{root}/{n}/dwi.nii.gz", f"{root}/{n}/bvals", f"{root}/{n}/bvecs",
                        mask=f"{root}/{n}/mask.nii.gz") for n in "ab"]
    model = train_group(subjects, load_phantom(f"{root}/a").response, model="rtesd",
                        epochs=3, batch_size=1, sh_order_max=4, nside=2, depth=1,
                        filter_start=4, block_size=4, lr=5e-3, verbose=False,
                        out_file=f"{out}/model.pt", checkpoint=f"{out}/checkpoint.pt")
    torch.save({"weights": model.network.state_dict(), "history": model.training_history},
               f"{out}/rank{os.environ['RANK']}.pt")
""")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_processes_keep_identical_weights(cohort, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
         str(cohort), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["history"] == ranks[1]["history"]
    totals = [record["total"] for record in ranks[0]["history"]]
    assert totals[-1] < totals[0]
    # Rank 0 alone wrote the model and the checkpoint, with its weights.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt", "model.pt", "rank0.pt", "rank1.pt", "worker.py"]
    assert_same_weights(weights_of(load_model(tmp_path / "model.pt", verbose=False)),
                        ranks[0]["weights"])


def test_group_response_averages_own_and_estimated_responses(tmp_path):
    # 12^3 is the smallest phantom where DIPY's estimator finds CSF voxels.
    phantom = make_phantom((12, 12, 12), seed=2)
    phantom.save(tmp_path / "c")
    own = TissueResponse.from_tensors(phantom.response.bvals, wm_evals=(1.5e-3, 0.4e-3, 0.4e-3),
                                      sh_order_max=8)
    files = [tmp_path / "c" / name for name in ("dwi.nii.gz", "bvals", "bvecs")]
    subjects = [Subject(*files, mask=tmp_path / "c" / "mask.nii.gz", response=own),
                Subject(*files, mask=tmp_path / "c" / "mask.nii.gz")]
    model = train_group(subjects, epochs=1, **{**TINY, "block_size": 12})
    estimated = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    expected = TissueResponse.average([own.normalized(), estimated.normalized()])
    for ours, theirs in zip(model.response.coefficients, expected.coefficients):
        # The b0 row's l > 0 terms are round-off (1e-15 of its l = 0 term), which moves
        # with the memory layout of the gtab read from disk: an absolute floor for them.
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12 * np.abs(theirs).max())


def test_bad_input_is_refused_before_training(cohort, response, tmp_path):
    subjects = subjects_of(cohort)
    with pytest.raises(ValueError, match="subjects is empty"):
        train_group([], response, **TINY)
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        Subject(cohort / "nothere.nii.gz", cohort / "a" / "bvals", cohort / "a" / "bvecs")
    swapped = Subject(cohort / "a" / "dwi.nii.gz", gtab=sparse_gtab())
    with pytest.raises(ValueError, match=r"subjects\[1\].*196 volumes.*92 b-values"):
        train_group([subjects[1], swapped], response, **TINY)
    other_shells = TissueResponse.from_tensors([0, 1000, 2500, 3000])
    with pytest.raises(ValueError, match=r"subjects\[0\].*response shells"):
        train_group(subjects, other_shells, **TINY)
    with pytest.raises(ValueError, match="precision='fp16' needs device='cuda'"):
        train_group(subjects, response, precision="fp16", **TINY)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train_group(subjects, response, device="cuda", **TINY)
    with pytest.raises(ValueError, match="out_file .* folder .* does not exist"):
        with pytest.warns(UserWarning, match="bf16.*float32"):  # CPU falls back to fp32
            train_group(subjects, response, precision="bf16",
                        out_file=tmp_path / "missing" / "m.pt", **TINY)
    (tmp_path / "old.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="checkpoint .*resume=True"):
        train_group(subjects, response, checkpoint=tmp_path / "old.pt", **TINY)
    with pytest.raises(TypeError, match="unknown model option.*nsides"):
        train_group(subjects, response, nsides=4, **TINY)


# --------------------------------------------------------------------------
# esdmri_train -> esdmri_apply
# --------------------------------------------------------------------------

def run_flow(flow, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [flow.get_short_name()])
    return run_workflow(flow, [str(arg) for arg in args])


def test_subjects_table_errors_name_the_problem(cohort, tmp_path):
    table = tmp_path / "subjects.tsv"
    table.write_text("dwi\tbval\n a/dwi.nii.gz\ta/bvals\n")
    with pytest.raises(ValueError, match="missing bvec"):
        read_subjects_table(table)
    table.write_text(f"dwi\tbval\tbvec\n{cohort}/a/dwi.nii.gz\t{cohort}/a/bvals\tnone.bvec\n")
    with pytest.raises(FileNotFoundError, match="subject 1: bvecs file .*none.bvec"):
        read_subjects_table(table)


def test_train_workflow_model_applies_to_two_scans(cohort, response, tmp_path, monkeypatch,
                                                   capsys):
    table = cohort / "subjects.tsv"
    table.write_text("# two phantoms with different gradient tables\n"
                     "dwi\tbval\tbvec\tmask\n"
                     + "".join(f"{n}/dwi.nii.gz\t{n}/bvals\t{n}/bvecs\t{n}/mask.nii.gz\n"
                               for n in "ab"))
    files = [tmp_path / f"{tissue}.txt" for tissue in response.tissues]
    response.to_mrtrix(files)
    trained = run_flow(TrainFlow(), monkeypatch, table,
                       *[arg for tissue, path in zip(response.tissues, files)
                         for arg in (f"--response_{tissue}", path)],
                       "--sh_order_max", 4, "--nside", 2, "--depth", 1, "--filter_start", 4,
                       "--block_size", 4, "--epochs", 2, "--out_dir", tmp_path / "group")
    assert {p.name for p in (tmp_path / "group").iterdir()} == {
        "model.pt", "checkpoint.pt", "training_curve.png"}
    model_file = tmp_path / "group" / "model.pt"
    assert_same_weights(weights_of(load_model(model_file, verbose=False)), weights_of(trained))

    # Both scans in one call, laid out as sub-*/ folders: --out_strat append
    # writes each scan's outputs next to it (not next to the shared model file).
    scans = tmp_path / "scans"
    for name in "ab":
        (scans / f"sub-{name}").mkdir(parents=True)
        for source, target in (("dwi.nii.gz", "dwi.nii.gz"), ("bvals", "dwi.bval"),
                               ("bvecs", "dwi.bvec"), ("mask.nii.gz", "mask.nii.gz")):
            (scans / f"sub-{name}" / target).symlink_to(cohort / name / source)
    capsys.readouterr()
    fits = run_flow(ApplyFlow(), monkeypatch, model_file, scans / "sub-*" / "dwi.nii.gz",
                    scans / "sub-*" / "dwi.bval", scans / "sub-*" / "dwi.bvec",
                    "--mask", scans / "sub-*" / "mask.nii.gz", "--out_strat", "append",
                    "--out_dir", "esdmri")
    assert "esdmri_apply" in capsys.readouterr().err  # the progress bar over scans
    assert len(fits) == 2
    for name, fit in zip("ab", fits):
        phantom = load_phantom(cohort / name)
        # Reference: the model loaded for this scan's gtab, as load_model documents.
        expected = load_model(model_file, gtab=phantom.gtab, verbose=False).fit(
            phantom.data, mask=phantom.mask)
        written = nib.load(scans / f"sub-{name}" / "esdmri" / "fodf_sh.nii.gz").get_fdata()
        np.testing.assert_allclose(written, expected.shm_coeff, atol=1e-6)
        np.testing.assert_allclose(fit.predict(), expected.predict(), atol=1e-6)
