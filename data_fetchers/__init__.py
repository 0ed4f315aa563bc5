"""Dataset fetchers (DiSCo, Tractometer) for esdmri.

Downloads are resumable, md5-verified where a checksum is published, and
atomic; they go to ``$ESDMRI_HOME`` (default ``~/.esdmri``).
"""

from .disco import DiscoData, disco_remote_files, fetch_disco, read_disco
from .download import DownloadError, RemoteFile, download_file, esdmri_home, extract_zip
from .tractometer import (
    TRACTOMETER_FILES,
    TractometerData,
    fetch_tractometer,
    read_tractometer,
)

__all__ = [
    "TRACTOMETER_FILES",
    "DiscoData",
    "DownloadError",
    "RemoteFile",
    "TractometerData",
    "disco_remote_files",
    "download_file",
    "esdmri_home",
    "extract_zip",
    "fetch_disco",
    "fetch_tractometer",
    "read_disco",
    "read_tractometer",
]
