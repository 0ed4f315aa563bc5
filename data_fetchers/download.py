"""Resumable, verified, atomic downloads into the esdmri cache folder.

DIPY's ``fetch_data`` writes straight to the final file name, cannot resume a
broken transfer and retries for about half a minute before failing, so a
1 GB phantom interrupted at 90 % starts again from zero and a half-written file
can look complete. This module keeps DIPY's URL/md5 tables but downloads with
``urllib`` as follows:

- bytes stream into ``<name>.part``; only a fully received and verified file is
  renamed (``os.replace``, atomic on one file system) to ``<name>``, so a file
  under its final name is always complete;
- an existing ``<name>.part`` is resumed with an HTTP ``Range`` request;
- the md5 sum is checked when published, the zip central directory and CRCs when
  the archive has no published checksum;
- a short socket timeout makes an unreachable server fail within seconds, and
  every error names the URL and the folder where a manually downloaded copy
  can be placed.
"""

import hashlib
import http.client
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from dipy.data.fetcher import FetcherError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ESDMRI_HOME_ENV = "ESDMRI_HOME"
CHUNK_SIZE = 1 << 20
USER_AGENT = "esdmri-data-fetcher (Python urllib)"


class DownloadError(FetcherError):
    """A file could not be downloaded or failed verification.

    Subclass of DIPY's ``FetcherError`` so that code catching DIPY fetch
    errors also catches these.
    """


@dataclass(frozen=True)
class RemoteFile:
    """One file to download.

    Parameters
    ----------
    url : str
        Where to download the file from.
    filename : str
        Name of the file in the destination folder.
    md5 : str or None
        Published md5 sum (lower-case hex), None where none is published.
    size : int or None
        Size in bytes where known; checked after download.
    description : str
        One line for listings.
    headers : tuple of (str, str)
        Extra HTTP request headers (e.g. a browser User-Agent for hosts that
        refuse scripts).
    """

    url: str
    filename: str
    md5: str | None = None
    size: int | None = None
    description: str = ""
    headers: tuple = ()


def esdmri_home(data_home=None):
    """Folder that holds the esdmri data sets.

    Parameters
    ----------
    data_home : str or Path, optional
        Explicit folder. Default: environment variable ``ESDMRI_HOME``, or
        ``~/.esdmri`` when it is unset.

    Returns
    -------
    home : Path
    """
    if data_home is None or str(data_home) == "":
        data_home = os.environ.get(ESDMRI_HOME_ENV, "~/.esdmri")
    return Path(data_home).expanduser()


def file_md5(path):
    """Hex md5 sum of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(n_bytes):
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


def _manual_hint(remote, destination):
    return (f"To install it by hand, save that URL as {destination}; the next fetch "
            "verifies and uses the file.")


def _check_complete(remote, path):
    """Raise DownloadError if `path` does not hold the expected content."""
    if remote.size is not None and path.stat().st_size != remote.size:
        raise DownloadError(
            f"{remote.url}: expected {remote.size} bytes, got "
            f"{path.stat().st_size}.")
    if remote.md5 is not None:
        actual = file_md5(path)
        if actual != remote.md5.lower():
            raise DownloadError(
                f"{remote.url}: md5 checksum mismatch (expected {remote.md5}, "
                f"got {actual}).")
    elif remote.filename.endswith(".zip"):
        # No published checksum: the zip CRC-32 of every member is the
        # strongest check available.
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
        except zipfile.BadZipFile as error:
            raise DownloadError(f"{remote.url}: not a valid zip archive "
                                f"({error}).") from error
        if bad_member is not None:
            raise DownloadError(f"{remote.url}: zip member {bad_member} fails "
                                "its CRC check.")


def _transfer(remote, part, timeout, quiet):
    """One HTTP request appending to `part`; returns the number of new bytes.

    Raises the underlying network error (URLError, OSError,
    http.client.HTTPException) if the transfer breaks.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **dict(remote.headers)}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(remote.url, headers=headers), timeout=timeout)
    except HTTPError as error:
        if error.code == 416 and offset:
            # Nothing left to send: the partial file is already complete.
            return 0
        raise
    with response:
        resumed = offset and response.status == 206
        if offset and not resumed:
            logger.info("%s ignored the Range request; restarting.", remote.url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else remote.size
        received = 0
        with open(part, "ab" if resumed else "wb") as stream, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True,
                desc=remote.filename, disable=quiet, leave=False) as progress:
            while chunk := response.read(CHUNK_SIZE):
                stream.write(chunk)
                received += len(chunk)
                progress.update(len(chunk))
        if length is not None and received < int(length):
            raise http.client.IncompleteRead(b"", int(length) - received)
    return received


def download_file(remote, folder, *, force=False, quiet=False, timeout=10.0,
                  retries=3):
    """Download `remote` into `folder`, resumable, verified and atomic.

    Parameters
    ----------
    remote : RemoteFile
        What to download.
    folder : str or Path
        Destination folder (created if needed).
    force : bool, optional
        Download again even if a verified file is present.
    quiet : bool, optional
        Hide the progress bar.
    timeout : float, optional
        Seconds to wait for the connection and for each read.
    retries : int, optional
        How many times an interrupted transfer that had made progress is
        resumed automatically within this call. A request that receives
        nothing is not retried, so an unreachable server fails at once.

    Returns
    -------
    path : Path
        The complete, verified file ``folder / remote.filename``.

    Raises
    ------
    DownloadError
        On network failure (the ``.part`` file is kept for resuming) or on a
        failed verification (the ``.part`` file is removed). The message names
        the URL and where a manual download goes.
    """
    if not isinstance(remote, RemoteFile):
        raise TypeError(f"remote must be a RemoteFile, got {type(remote).__name__}")
    folder = Path(folder)
    destination = folder / remote.filename
    part = destination.with_name(destination.name + ".part")
    if destination.exists() and not force:
        try:
            _check_complete(remote, destination)
            logger.info("%s is already present.", destination)
            return destination
        except DownloadError as error:
            logger.warning("%s; downloading it again.", error)
    if force:
        part.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)

    attempts_left = retries
    while True:
        size_before = part.stat().st_size if part.exists() else 0
        try:
            received = _transfer(remote, part, timeout, quiet)
            break
        except (OSError, http.client.HTTPException) as error:
            size_after = part.stat().st_size if part.exists() else 0
            if size_after > size_before and attempts_left > 0:
                attempts_left -= 1
                logger.info("Transfer of %s interrupted (%s); resuming.",
                            remote.url, error)
                continue
            if size_after == 0:
                part.unlink(missing_ok=True)
            kept = (f" The partial file {part} is kept; fetching again resumes it."
                    if size_after else "")
            if isinstance(error, HTTPError):
                reason = f"the server answered {error.code} {error.reason}"
            else:
                # Name resolution or connection failure: usually no network.
                reason = getattr(error, "reason", error)
                reason = (f"the server could not be reached ("
                          f"{getattr(reason, 'strerror', None) or reason}; is this "
                          "machine online?)")
            raise DownloadError(
                f"Could not download {remote.filename} from {remote.url}: {reason}."
                f"{kept} " + _manual_hint(remote, destination)) from error
    logger.debug("Received %d bytes for %s.", received, remote.url)
    try:
        _check_complete(remote, part)
    except DownloadError as error:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{error} The corrupted download was removed. "
                            + _manual_hint(remote, destination)) from None
    os.replace(part, destination)
    return destination


def extract_zip(archive, destination, *, force=False):
    """Unpack a zip archive atomically into `destination`.

    The members are extracted into a sibling temporary folder that is renamed
    to `destination` once complete, so an existing `destination` is always a
    complete extraction.

    Parameters
    ----------
    archive : str or Path
        Zip file.
    destination : str or Path
        Folder to create.
    force : bool, optional
        Replace an existing `destination`.

    Returns
    -------
    destination : Path
    """
    archive, destination = Path(archive), Path(destination)
    if destination.exists():
        if not force:
            return destination
        shutil.rmtree(destination)
    staging = destination.with_name(destination.name + ".extracting")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zipped:
        root = staging.resolve()
        for member in zipped.namelist():
            target = (staging / member).resolve()
            if root not in target.parents and target != root:
                raise DownloadError(
                    f"{archive}: member {member!r} would be written outside "
                    f"{destination}; refusing to extract.")
        zipped.extractall(staging)
    os.replace(staging, destination)
    return destination
