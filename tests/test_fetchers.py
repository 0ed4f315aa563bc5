"""Data fetchers, tested offline against a Range-capable HTTP server on 127.0.0.1."""

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nibabel as nib
import numpy as np
import pytest
from dipy.core.sphere import Sphere
from dipy.data import get_sphere
from dipy.io import vtk as dipy_vtk
from dipy.io.stateful_tractogram import Space, StatefulTractogram
from dipy.io.streamline import save_tractogram
from scipy.linalg import polar
from dipy.reconst.shm import sf_to_sh, sh_to_sf

import esdmri.data_fetchers.disco as disco_module
from esdmri.data_fetchers import (
    TRACTOMETER_FILES,
    DownloadError,
    RemoteFile,
    disco_remote_files,
    download_file,
    fetch_disco,
    fetch_tractometer,
    read_disco,
    read_tractometer,
)
from esdmri.workflows.fetch import FetchFlow

RNG = np.random.default_rng(0)
SPHERE = get_sphere(name="repulsion724")


# --------------------------------------------------------------------------
# Local HTTP server with Range support
# --------------------------------------------------------------------------

class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-``; logs requests."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        server.agents.append(self.headers.get("User-Agent"))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range",
                             f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path in server.cut_short:
            # Promise the whole payload, send half of it, hang up.
            server.cut_short.discard(self.path)
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests, httpd.agents, httpd.cut_short = {}, [], [], set()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(server, name, body, md5=True):
    server.files[f"/{name}"] = body
    return RemoteFile(url=f"{server.url}/{name}", filename=name,
                      md5=hashlib.md5(body).hexdigest() if md5 else None)


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------
# Small archives laid out like the real ones
# --------------------------------------------------------------------------

def nifti_bytes(array, affine, tmp_path, name="image.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, affine), path)
    return path.read_bytes()


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def tractometer_gradients():
    directions = SPHERE.vertices[:32]
    bvals = np.r_[0, np.full(32, 1000.0)]
    bvecs = np.vstack([np.zeros(3), directions])
    return bvals, bvecs


def gradient_text(bvals, bvecs):
    def rows(array):
        return "\n".join(" ".join(f"{v:.8f}" for v in row)
                         for row in np.atleast_2d(array))
    return rows(bvals[None]) + "\n", rows(bvecs.T) + "\n"


def tractometer_archives(tmp_path):
    """Four zips shaped like the organisers' ones, plus what they contain."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-4, -5, -3]
    bvals, bvecs = tractometer_gradients()
    bvals_text, bvecs_text = gradient_text(bvals, bvecs)
    dwi = RNG.random((4, 5, 3, 33)).astype(np.float32)
    clean = RNG.random((4, 5, 3, 33)).astype(np.float32)
    t1 = RNG.random((8, 10, 6)).astype(np.float32)
    t1_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    t1_affine[:3, 3] = [-4.5, -5.5, -3.5]
    top = "ISMRM_2015_Tracto_challenge_data/"
    gt_top = "ISMRM_2015_Tracto_challenge_ground_truth_dwi_v2/"
    streamlines = {"CA": [np.array([[0.0, 0, 0], [1, 1, 0], [2, 1, 1]])],
                   "CST_left": [np.array([[-1.0, 0, 0], [-1, 0, 2]]),
                                np.array([[-2.0, 1, 0], [-2, 1, 1], [-2, 1, 2]])]}
    t1_path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(t1, t1_affine), t1_path)
    scoring_top = "scoring_data_Renauld2023/"
    scoring = {scoring_top + "t1.nii.gz": t1_path.read_bytes(),
               scoring_top + "config_file_segmentation.json": json.dumps({"CA": {}}),
               scoring_top + "config_file_tractometry.json": json.dumps({"CA": {}})}
    for name, lines in streamlines.items():
        path = tmp_path / f"{name}.trk"
        save_tractogram(StatefulTractogram(lines, str(t1_path), Space.RASMM), str(path))
        scoring[f"scoring_data_Renauld2023/bundles/{name}.trk"] = path.read_bytes()
    fib = ("# vtk DataFile Version 3.0\nCA\nASCII\nDATASET POLYDATA\nPOINTS 3 float\n"
           "0 0 0 1 1 0 2 1 1\nLINES 1 4\n3 0 1 2\n")
    archives = {
        "dwi": zip_bytes({
            top + "Diffusion.nii.gz": nifti_bytes(dwi, affine, tmp_path),
            top + "Diffusion.bvals": bvals_text, top + "Diffusion.bvecs": bvecs_text,
            top + "T1.nii.gz": t1_path.read_bytes(), top + "README.txt": "readme"}),
        "ground_truth_dwi": zip_bytes({
            gt_top + "NoArtifacts_Relaxation.nii.gz":
                nifti_bytes(clean, affine, tmp_path),
            gt_top + "NoArtifacts_Relaxation.bvals": bvals_text,
            gt_top + "NoArtifacts_Relaxation.bvecs": bvecs_text}),
        "bundles": zip_bytes({
            "ISMRM_2015_Tracto_challenge_ground_truth_bundles_VTK_v2/bundles/CA.fib":
                fib}),
        "scoring": zip_bytes(scoring),
    }
    return archives, {"dwi": dwi, "clean": clean, "bvals": bvals, "bvecs": bvecs,
                      "streamlines": streamlines}


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "esdmri_home"
    monkeypatch.setenv("ESDMRI_HOME", str(folder))
    return folder


@pytest.fixture
def served_tractometer(server, home, tmp_path, monkeypatch):
    archives, truth = tractometer_archives(tmp_path)
    for part, body in archives.items():
        real = TRACTOMETER_FILES[part]
        local = serve(server, real.filename, body, md5=real.md5 is not None)
        monkeypatch.setitem(TRACTOMETER_FILES, part, local)
    return truth


# --------------------------------------------------------------------------
# download_file
# --------------------------------------------------------------------------

def test_download_verifies_md5_and_leaves_no_part_file(server, tmp_path):
    body = RNG.bytes(300_000)
    remote = serve(server, "archive.zip", body)
    path = download_file(remote, tmp_path / "cache", quiet=True)
    assert path == tmp_path / "cache" / "archive.zip"
    assert path.read_bytes() == body
    assert not (tmp_path / "cache" / "archive.zip.part").exists()
    assert server.requests == [("/archive.zip", None)]


def test_cached_file_is_used_without_request(server, tmp_path):
    remote = serve(server, "archive.zip", RNG.bytes(1000))
    download_file(remote, tmp_path, quiet=True)
    download_file(remote, tmp_path, quiet=True)
    assert len(server.requests) == 1
    download_file(remote, tmp_path, quiet=True, force=True)
    assert len(server.requests) == 2


def test_corrupted_checksum_leaves_nothing_that_looks_complete(server, tmp_path):
    remote = serve(server, "archive.zip", RNG.bytes(5000))
    corrupted = RemoteFile(remote.url, remote.filename, md5="0" * 32)
    with pytest.raises(DownloadError, match="md5 checksum mismatch.*removed"):
        download_file(corrupted, tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_zip_without_md5_is_checked_for_integrity(server, tmp_path):
    archive = zip_bytes({"scoring/a.txt": "x" * 5000})
    broken = bytearray(archive)
    broken[60] ^= 0xFF  # inside the compressed member: its CRC check fails
    remote = serve(server, "scoring.zip", bytes(broken), md5=False)
    with pytest.raises(DownloadError, match="CRC|zip"):
        download_file(remote, tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []
    good = serve(server, "good.zip", archive, md5=False)
    assert download_file(good, tmp_path, quiet=True).read_bytes() == archive


def test_interrupted_transfer_keeps_part_and_resumes_with_range(server, tmp_path):
    body = RNG.bytes(400_000)
    remote = serve(server, "archive.zip", body)
    server.cut_short.add("/archive.zip")
    with pytest.raises(DownloadError, match=re.escape(remote.url) + ".*partial file"):
        download_file(remote, tmp_path, quiet=True, retries=0)
    part = tmp_path / "archive.zip.part"
    assert part.stat().st_size == len(body) // 2
    assert not (tmp_path / "archive.zip").exists()

    path = download_file(remote, tmp_path, quiet=True, retries=0)
    assert server.requests[-1] == ("/archive.zip", f"bytes={len(body) // 2}-")
    assert path.read_bytes() == body
    assert not part.exists()


def test_interrupted_transfer_resumes_within_one_call(server, tmp_path):
    body = RNG.bytes(200_000)
    remote = serve(server, "archive.zip", body)
    server.cut_short.add("/archive.zip")
    assert download_file(remote, tmp_path, quiet=True).read_bytes() == body
    assert [r for _, r in server.requests] == [None, f"bytes={len(body) // 2}-"]


def test_unreachable_server_fails_fast_naming_url_and_folder(tmp_path):
    remote = RemoteFile(f"http://127.0.0.1:{closed_port()}/data.zip", "data.zip")
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download_file(remote, tmp_path / "cache", quiet=True)
    assert time.monotonic() - start < 5
    assert remote.url in str(error.value)
    assert str(tmp_path / "cache" / "data.zip") in str(error.value)
    assert not (tmp_path / "cache" / "data.zip.part").exists()


def test_extra_headers_are_sent(server, tmp_path):
    remote = serve(server, "a.bin", b"abc")
    browser = RemoteFile(remote.url, remote.filename, remote.md5,
                         headers=(("User-Agent", "Mozilla/5.0 test"),))
    download_file(browser, tmp_path, quiet=True)
    assert server.agents == ["Mozilla/5.0 test"]


def test_download_file_rejects_a_plain_url(tmp_path):
    with pytest.raises(TypeError, match="remote must be a RemoteFile"):
        download_file("http://127.0.0.1/x.zip", tmp_path)


# --------------------------------------------------------------------------
# Tractometer
# --------------------------------------------------------------------------

def test_fetch_and_read_tractometer(served_tractometer, server, home):
    truth = served_tractometer
    folders = fetch_tractometer(quiet=True)
    assert set(folders) == {"dwi", "ground_truth_dwi", "bundles", "scoring"}
    assert all(folder.parent == home / "tractometer" for folder in folders.values())
    n_requests = len(server.requests)
    fetch_tractometer(parts=("dwi",), quiet=True)
    assert len(server.requests) == n_requests

    challenge = read_tractometer(dwi="challenge", bundles="2023")
    np.testing.assert_array_equal(challenge.data, truth["dwi"])
    np.testing.assert_allclose(challenge.gtab.bvals, truth["bvals"])
    np.testing.assert_allclose(challenge.gtab.bvecs, truth["bvecs"], atol=1e-7)
    assert challenge.paths["t1"].name == "T1.nii.gz"
    assert challenge.paths["scoring_config_segmentation"].is_file()
    assert set(challenge.bundles) == set(truth["streamlines"])
    for name, lines in truth["streamlines"].items():
        sft = challenge.bundles[name]
        sft.to_rasmm()
        for loaded, written in zip(sft.streamlines, lines, strict=True):
            np.testing.assert_allclose(loaded, written, atol=1e-4)

    clean = read_tractometer(dwi="ground_truth", bundles=None)
    np.testing.assert_array_equal(clean.data, truth["clean"])
    assert clean.bundles == {}

    if not dipy_vtk.have_fury:
        with pytest.raises(ImportError, match="fury"):
            read_tractometer(bundles="2015")


def test_tractometer_fetch_workflow_in_process(served_tractometer, tmp_path):
    out_dir = tmp_path / "elsewhere"
    folders = FetchFlow().run(["tractometer"], parts=["dwi"], quiet=True,
                              out_dir=str(out_dir))
    assert folders == {"tractometer:dwi": out_dir / "tractometer" / "dwi"}
    archives = out_dir / "tractometer" / "archives"
    assert (archives / TRACTOMETER_FILES["dwi"].filename).is_file()


def test_reading_absent_tractometer_names_the_fetch_call(home):
    call = "fetch_tractometer(parts=('dwi',))"
    with pytest.raises(FileNotFoundError, match=re.escape(call)):
        read_tractometer()


def test_tractometer_arguments_are_checked(home):
    with pytest.raises(ValueError, match="parts must be"):
        fetch_tractometer(parts=("t2",))
    with pytest.raises(ValueError, match="dwi must be"):
        read_tractometer(dwi="noisy")
    with pytest.raises(ValueError, match="bundles must be"):
        read_tractometer(bundles="2016")


# --------------------------------------------------------------------------
# DiSCo
# --------------------------------------------------------------------------

def test_disco_table_comes_from_dipy():
    files = disco_remote_files(1)
    assert len(files) == 41
    assert files["DiSCo_gradients.bvals"].md5 == "c03cfec8ee605a54866ef09c3c8ba31d"
    mendeley = "https://data.mendeley.com/public-files/datasets/fgf86jdfg6/"
    assert all(f.url.startswith(mendeley) for f in files.values())
    assert "highRes_DiSCo1_Strand_ODFs.nii.gz" in files
    # DIPY flags Mendeley as needing a browser User-Agent.
    agent = dict(files["DiSCo_gradients.bvals"].headers)["User-Agent"]
    assert agent.startswith("Mozilla")


def fibre_function(vertices, directions, weights, kappa=20.0):
    """Sum of sharp antipodally symmetric lobes along `directions`."""
    return sum(w * np.exp(kappa * ((vertices @ d) ** 2 - 1))
               for d, w in zip(directions, weights, strict=True))


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


VOXEL_FIBRES = {  # voxel -> (voxel-frame directions, weights)
    (0, 0, 0): ([unit([1, 0.2, 0.1])], [1.0]),
    (1, 0, 0): ([unit([1, 0, 0]), unit([np.cos(np.pi / 3), np.sin(np.pi / 3), 0])],
                [1.0, 0.6]),
    (2, 1, 0): ([unit([0.1, 0.3, 1])], [1.0]),
}


def write_fake_disco(folder, affine, bvecs_flip=None):
    """Highres phantom-1 files with known fibres; returns the gradient table.

    The ground-truth SH follow MRtrix: tournier07 basis, scanner frame.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # The affine's orthogonal part, by scipy's polar decomposition.
    rotation = polar(np.asarray(affine, dtype=float)[:3, :3])[0]
    directions = SPHERE.vertices[::36][:20]
    bvals = np.r_[np.zeros(4), np.full(20, 1000.0), np.full(20, 3000.0)]
    bvecs = np.vstack([np.zeros((4, 3)), directions, directions])
    dipy_bvecs = bvecs * (np.where(np.arange(3) == bvecs_flip, -1, 1)
                          if bvecs_flip is not None else 1)
    bvals_text, bvecs_text = gradient_text(bvals, dipy_bvecs)
    (folder / "DiSCo_gradients.bvals").write_text(bvals_text)
    (folder / "DiSCo_gradients_dipy.bvecs").write_text(bvecs_text)
    np.savetxt(folder / "DiSCo_gradients_mrtrix.b",
               np.column_stack([bvecs @ rotation.T, bvals]), header="mrtrix b table")
    shape = (3, 2, 2)
    data = RNG.random(shape + (bvals.size,)).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[(0, 0, 0)] = mask[(1, 0, 0)] = mask[(2, 1, 0)] = 1
    mask[(0, 1, 1)] = 1  # in the mask but empty: no peak
    fodf = np.zeros(shape + (91,))
    scanner_vertices = SPHERE.vertices
    for voxel, (dirs, weights) in VOXEL_FIBRES.items():
        values = fibre_function(scanner_vertices, [rotation @ d for d in dirs], weights)
        fodf[voxel] = sf_to_sh(values, SPHERE, sh_order_max=12, basis_type="tournier07",
                               legacy=False)
    fodf[(2, 0, 1)] = fodf[(0, 0, 0)]  # outside the mask: no peaks reported
    nib.save(nib.Nifti1Image(data, affine), folder / "highRes_DiSCo1_DWI.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), folder / "highRes_DiSCo1_mask.nii.gz")
    nib.save(nib.Nifti1Image(fodf, affine),
             folder / "highRes_DiSCo1_Strand_ODFs.nii.gz")
    return data, bvals, bvecs, fodf


def assert_peaks_match(disco):
    for voxel, (dirs, _) in VOXEL_FIBRES.items():
        found = disco.gt_peak_dirs[voxel]
        found = found[~np.isnan(found[:, 0])]
        assert len(found) == len(dirs), voxel
        cosines = np.abs(found @ np.array(dirs).T).max(axis=0)
        assert np.all(cosines > np.cos(np.radians(3))), (voxel, cosines)
    assert np.all(np.isnan(disco.gt_peak_dirs[0, 1, 1]))
    assert np.all(np.isnan(disco.gt_peak_dirs[2, 0, 1]))


def test_read_disco_converts_mrtrix_basis(home):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    data, bvals, bvecs, fodf = write_fake_disco(home / "disco" / "disco_1", affine)
    disco = read_disco(1, resolution="high", snr=None)
    np.testing.assert_array_equal(disco.data, data)
    np.testing.assert_allclose(disco.gtab.bvals, bvals)
    np.testing.assert_allclose(disco.gtab.bvecs, bvecs, atol=1e-7)
    assert "agrees" in disco.bvec_check
    assert disco.mask.dtype == bool and disco.mask.sum() == 4
    # Same function on a sphere: MRtrix basis in the file, DIPY descoteaux07 out.
    expected = sh_to_sf(fodf, SPHERE, sh_order_max=12, basis_type="tournier07",
                        legacy=False)
    actual = sh_to_sf(disco.gt_fodf_sh, SPHERE, sh_order_max=12,
                      basis_type="descoteaux07", legacy=False)
    np.testing.assert_allclose(actual, expected, atol=1e-10)
    assert not np.allclose(disco.gt_fodf_sh, fodf)  # the bases do differ
    assert_peaks_match(disco)


def test_read_disco_maps_scanner_frame_to_voxel_frame(home):
    # 2 mm voxels, voxel axes cyclically permuted and one flipped (R != R^-1).
    affine = np.array([[0.0, 0, 2, 10], [-2, 0, 0, 5], [0, 2, 0, -3], [0, 0, 0, 1]])
    rotation = affine[:3, :3] / 2
    _, _, bvecs, fodf = write_fake_disco(home / "disco" / "disco_1", affine)
    disco = read_disco(1)
    assert "agrees" in disco.bvec_check
    np.testing.assert_allclose(disco.gtab.bvecs, bvecs, atol=1e-7)
    # f_voxel(u) == f_scanner(R u)
    rotated = Sphere(xyz=SPHERE.vertices @ rotation.T)
    expected = sh_to_sf(fodf, rotated, sh_order_max=12, basis_type="tournier07",
                        legacy=False)
    actual = sh_to_sf(disco.gt_fodf_sh, SPHERE, sh_order_max=12,
                      basis_type="descoteaux07", legacy=False)
    np.testing.assert_allclose(actual, expected, atol=1e-8)
    assert_peaks_match(disco)


def test_read_disco_prefers_mrtrix_table_when_bvecs_disagree(home):
    _, _, bvecs, _ = write_fake_disco(home / "disco" / "disco_1", np.eye(4),
                                      bvecs_flip=1)
    with pytest.warns(UserWarning, match="flip of voxel axis 1"):
        disco = read_disco(1)
    assert "disagreed" in disco.bvec_check
    np.testing.assert_allclose(disco.gtab.bvecs, bvecs, atol=1e-7)


def test_read_disco_also_finds_dipy_folder(home, tmp_path, monkeypatch):
    dipy_folder = tmp_path / "dipy_home" / "disco" / "disco_1"
    data, *_ = write_fake_disco(dipy_folder, np.eye(4))
    monkeypatch.setattr(disco_module, "dipy_disco_folder", lambda phantom: dipy_folder)
    np.testing.assert_array_equal(read_disco(1).data, data)


def test_reading_absent_disco_names_the_fetch_call(home):
    call = "fetch_disco(phantom=2, resolution='low', snr=30)"
    with pytest.raises(FileNotFoundError, match=re.escape(call)):
        read_disco(2, resolution="low", snr=30)


def test_disco_arguments_are_checked(home):
    with pytest.raises(ValueError, match="phantom must be 1, 2 or 3"):
        read_disco(4)
    with pytest.raises(ValueError, match="snr must be"):
        read_disco(1, snr=15)
    with pytest.raises(ValueError, match="resolution must be"):
        read_disco(1, resolution="medium")
    with pytest.raises(ValueError, match="snr must be"):
        fetch_disco(1, snr="some")


def test_fetch_disco_downloads_the_selection(server, home, monkeypatch):
    real_names = list(disco_remote_files(1))
    table = {name: serve(server, name, name.encode() * 10) for name in real_names}
    monkeypatch.setattr(disco_module, "disco_remote_files", lambda phantom: table)
    files, folder = fetch_disco(1, resolution="high", snr=30, quiet=True)
    assert folder == home / "disco" / "disco_1"
    assert "highRes_DiSCo1_DWI_RicianNoise-snr30.nii.gz" in files
    assert "highRes_DiSCo1_Strand_ODFs.nii.gz" in files
    assert "DiSCo_gradients_mrtrix.b" in files
    assert not any(name.startswith("lowRes") for name in files)
    assert not any("snr10" in name or name.endswith("_DWI.nii.gz") for name in files)
    assert sorted(path for path, _ in server.requests) == sorted(f"/{n}" for n in files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def test_fetch_workflow_lists_datasets(home):
    result = subprocess.run(
        [sys.executable, "-m", "esdmri.workflows.fetch", "--list"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "ESDMRI_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert "disco --phantom 3" in result.stdout
    assert "tractometer --parts scoring" in result.stdout
    assert str(home) in result.stdout


def test_fetch_workflow_rejects_unknown_dataset(home):
    with pytest.raises(ValueError, match="datasets must be among"):
        FetchFlow().run(["hcp"])
