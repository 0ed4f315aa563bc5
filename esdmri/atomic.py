"""Files written atomically: a temporary file in the target folder, renamed into place.

Every file esdmri writes (NIfTI maps, ``.pam5`` peaks, tractograms, response
text files, tables, figures, model files, checkpoints) goes through
:func:`staged_output`: the writer gets a temporary path in the target's
folder, and only a complete file is renamed (``os.replace``, atomic on one
file system) to the target name. A writer that fails, or a process that is
interrupted (Ctrl-C, ``SIGTERM`` in the command-line tools), leaves no
partial file under the target name, so a rerun is not refused because of
one.

Inside :func:`output_transaction` the renames wait for the end of the block:
a command's outputs appear together, or none of them does. Temporary files
are hidden (their names start with :data:`PARTIAL_PREFIX`) and end with the
target's name, so writers that pick the format from the extension (nibabel,
DIPY's ``save_pam`` and ``save_tractogram``, matplotlib) work unchanged and
input globs such as ``*.nii.gz`` never match them. Only a process killed
outright (``SIGKILL``, power loss) can leave one behind; it never blocks a
rerun and may be deleted.
"""

import contextlib
import contextvars
import os
import signal
import threading
import uuid
from pathlib import Path

PARTIAL_PREFIX = ".esdmri-partial-"

# Signals held back while a transaction renames its files, so that an
# interruption cannot leave some outputs renamed and others not.
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_transaction = contextvars.ContextVar("esdmri_output_transaction", default=None)


def partial_path(path):
    """A fresh hidden temporary path next to ``path``, ending with its name."""
    path = Path(path)
    return path.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"


def _reserve(path):
    """Create the temporary file of ``path`` (empty, permissions as a normal file)."""
    temporary = partial_path(path)
    try:
        # 0o666 minus the umask: what open(path, "w") would give the final file.
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not "
                                "exist") from None
    except PermissionError:
        raise PermissionError(f"cannot write {path}: folder {path.parent} is not "
                              "writable") from None
    return temporary


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM back during the block, then deliver them.

    Only the main thread can set signal handlers; elsewhere the block runs
    unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {number: signal.signal(number, lambda number, _: received.append(number))
                for number in _DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            # None: a handler installed from C, which Python cannot reinstall.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def _commit(pending):
    """Rename every (temporary, final) pair; on failure remove the temporaries left."""
    with _signals_deferred():
        try:
            for temporary, final in pending:
                os.replace(temporary, final)
        finally:
            for temporary, _ in pending:
                _remove(temporary)


@contextlib.contextmanager
def staged_output(path, detached=False):
    """A temporary path to write ``path`` through, renamed into place when done.

    Overwrite rules are the caller's: an existing ``path`` is replaced.

    Parameters
    ----------
    path : str or path-like
        Final file. Its folder must exist.
    detached : bool
        Rename as soon as the block ends even inside
        :func:`output_transaction` (checkpoints that must survive an
        interrupted command).

    Yields
    ------
    temporary : pathlib.Path
        Where to write: an empty file in the folder of ``path`` whose name
        ends with the name of ``path``.

    Examples
    --------
    >>> with staged_output("fodf.nii.gz") as temporary:  # doctest: +SKIP
    ...     nib.save(image, temporary)
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    temporary = _reserve(path)
    pending = None if detached else _transaction.get()
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    if pending is None:
        _commit([(temporary, path)])
    else:
        pending.append((temporary, path))


@contextlib.contextmanager
def output_transaction():
    """Make the outputs staged inside the block appear together at its end.

    On an exception (``KeyboardInterrupt`` included) every staged file is
    removed and no output appears. Nested transactions join the outermost.
    """
    if _transaction.get() is not None:
        yield
        return
    pending = []
    token = _transaction.set(pending)
    try:
        yield
    except BaseException:
        for temporary, _ in pending:
            _remove(temporary)
        raise
    finally:
        _transaction.reset(token)
    _commit(pending)
