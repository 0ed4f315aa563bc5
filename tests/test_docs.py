"""The documentation runs: every fenced block of docs/tutorial.md, in order,
and README.md's Python example on a real DIPY ROI.

A block fenced as ``bash`` runs in ``bash -euo pipefail``, a ``python`` block
in one namespace shared by the page's Python blocks (as a reader pasting them
into one session would); blocks fenced otherwise (``text``, bare fences) are
shown, not run. Each page runs in a fresh temporary folder; nothing is
downloaded.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = ("bash", "python")
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")


def fenced_blocks(path):
    """``(language, first line number, code)`` of each fenced block of a page.

    Parameters
    ----------
    path : str or Path
        A Markdown file.

    Returns
    -------
    blocks : list of tuple (str, int, str)
        The language word after the opening fence ('' when none), the line
        number of the block's first code line and its code, dedented by the
        fence's indentation.
    """
    blocks, current = [], None
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        match = _FENCE.match(line)
        if current is None:
            if match:
                current = (match["lang"], number + 1, len(match["indent"]), [])
        elif match and len(match["indent"]) == current[2] and not match["lang"]:
            lang, first, _, lines = current
            blocks.append((lang, first, "\n".join(lines) + "\n"))
            current = None
        else:
            current[3].append(line[current[2]:])
    if current is not None:
        raise ValueError(f"{path}: the block opened at line {current[1] - 1} is not closed")
    return blocks


def _environment():
    """The commands of this interpreter's environment first on PATH, no display."""
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_page(path, workdir, namespace=None):
    """Run the bash and python blocks of a page in order in ``workdir``.

    Returns the seconds each block took; the first failing block fails the
    test with the page's line number and the block's output.
    """
    namespace = {"__name__": "__main__"} if namespace is None else namespace
    env = _environment()
    timings = []
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for lang, line, code in fenced_blocks(path):
            if lang not in RUNNABLE:
                continue
            start = time.perf_counter()
            where = f"{Path(path).name}, {lang} block at line {line}"
            if lang == "bash":
                result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env,
                                        capture_output=True, text=True)
                if result.returncode:
                    pytest.fail(f"{where} exited with status {result.returncode}:\n{code}\n"
                                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
            else:
                try:
                    exec(compile(code, where, "exec"), namespace)
                except Exception as error:  # noqa: BLE001 - reported with its block
                    pytest.fail(f"{where} raised {type(error).__name__}: {error}\n{code}")
            timings.append((where, time.perf_counter() - start))
    finally:
        os.chdir(cwd)
    return timings


def test_fenced_blocks_parse_languages_and_lines(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\necho 1\n```\n\n1. step\n\n   ```python\n   x = 1\n"
                    "   ```\n```text\nnot run\n```\n")
    assert fenced_blocks(page) == [("bash", 3, "echo 1\n"), ("python", 9, "x = 1\n"),
                                   ("text", 12, "not run\n")]
    (tmp_path / "open.md").write_text("```bash\necho 1\n")
    with pytest.raises(ValueError, match="not closed"):
        fenced_blocks(tmp_path / "open.md")


def test_a_failing_block_fails_with_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nvalue = 2\n```\n\n```bash\ntest -e missing_file\n```\n")
    with pytest.raises(pytest.fail.Exception, match="bash block at line 6"):
        run_page(page, tmp_path)
    page.write_text("```python\nvalue = 2\n```\n\n```python\nassert value == 3\n```\n")
    with pytest.raises(pytest.fail.Exception, match="python block at line 6"):
        run_page(page, tmp_path)


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ESDMRI_HOME", str(tmp_path / "esdmri_home"))
    timings = run_page(ROOT / "docs" / "tutorial.md", tmp_path)
    assert len(timings) > 20
    for where, seconds in timings:
        print(f"{seconds:6.1f} s  {where}")


def _python_block(path, after):
    """The first python block of ``path`` below the heading ``after``."""
    text = Path(path).read_text()
    heading = text.index(after)
    blocks = [code for lang, line, code in fenced_blocks(path)
              if lang == "python" and line > text[:heading].count("\n")]
    return blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs_on_a_real_roi(tmp_path, monkeypatch):
    """README's example, unchanged, on DIPY's shipped ``small_64D`` ROI."""
    import nibabel as nib
    import numpy as np
    from dipy.data import get_fnames

    dwi, bval, bvec = get_fnames(name="small_64D")
    image = nib.load(dwi)
    nib.save(image, tmp_path / "dwi.nii.gz")
    data = np.asarray(image.dataobj)
    mask = (data[..., 0] > np.percentile(data[..., 0], 10)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, image.affine), tmp_path / "mask.nii.gz")
    (tmp_path / "dwi.bval").write_text(Path(bval).read_text())
    (tmp_path / "dwi.bvec").write_text(Path(bvec).read_text())
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(_python_block(ROOT / "README.md", "## In Python"), "README.md", "exec"),
         namespace)
    fit, mask = namespace["fit"], namespace["mask"] > 0
    assert np.isfinite(fit.shm_coeff[mask]).all()
    assert namespace["peaks"].peak_dirs.shape[:3] == mask.shape
    for tissue, fraction in namespace["fractions"].items():
        assert fraction.shape == mask.shape, tissue


def test_every_console_script_is_documented():
    """README and the installation page list every command that setup.cfg installs."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = [line.split("=")[0].strip()
               for line in config["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()]
    assert "esdmri_train" in scripts
    for page in (ROOT / "README.md", ROOT / "docs" / "installation.md"):
        text = page.read_text()
        missing = [name for name in scripts if f"`{name}`" not in text]
        assert not missing, f"{page.name} does not list {missing}"
