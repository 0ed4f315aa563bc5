"""Threads of esdmri's CPU work: the OpenMP wait policy and ``num_threads``.

The CPU build of torch runs its intra-op parallelism (and MKL's and
oneDNN's) on one OpenMP thread pool: GNU ``libgomp`` in the Linux wheels
from PyPI, LLVM/Intel ``libomp`` in some other builds. By default an OpenMP
thread that has finished its share of a parallel operation *spins* (busy
waits) for the next one before it sleeps: about 300,000 spins in libgomp
(``GOMP_SPINCOUNT``), 200 ms in libomp (``KMP_BLOCKTIME``). On an idle
machine that saves a wake-up per operation. On a shared machine (a laptop, a
cluster node or CI runner running other jobs) it is a collapse: the
spinning threads hold the cores that the straggler thread, the one still
owing its share, needs, and every small operation waits for it. The
E(3) x SO(3) layer and the fit issue thousands of small parallel operations
(neighbourhood sums, copies, adds); with two threads on two cores beside one
busy process, a layer's forward + backward went from about 1 s to 5-60 s.

esdmri therefore asks for ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads
sleep at once; both runtimes honour it) when ``esdmri`` is imported, unless
the environment already sets ``OMP_WAIT_POLICY``: a user's own value always
wins (``OMP_WAIT_POLICY=ACTIVE`` restores spinning, for a dedicated
machine). The OpenMP runtime reads its environment once, when it is loaded,
which is when ``torch`` is first imported. So the policy takes effect only
if ``esdmri`` (or any ``esdmri.*`` module) is imported before ``torch``; a
script that imports torch first keeps the runtime's default, and can set
the variable in its shell instead (``export OMP_WAIT_POLICY=PASSIVE``).
:data:`WAIT_POLICY_APPLIED` records which case holds. Child processes
inherit the variable.

``num_threads`` follows DIPY's workflows (``dipy.utils.omp``): None keeps
the default (``OMP_NUM_THREADS`` if set, otherwise torch's count of the
physical cores), a positive value is the thread count, a negative value
``-k`` leaves ``k - 1`` of the available CPUs unused (``-1``: all of them),
and 0 is an error.
"""

import os
import sys

__all__ = ["WAIT_POLICY", "WAIT_POLICY_APPLIED", "apply_wait_policy", "resolve_num_threads",
           "set_num_threads"]

# The environment variable and the value esdmri asks for.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def apply_wait_policy(environ=None, modules=None):
    """Ask for sleeping (not spinning) OpenMP threads unless the user chose.

    Parameters
    ----------
    environ : mapping, optional
        The environment to update (default ``os.environ``).
    modules : mapping, optional
        The loaded modules (default ``sys.modules``), to tell whether the
        OpenMP runtime is loaded already.

    Returns
    -------
    applied : bool
        True when the OpenMP runtime will run with ``environ``'s wait policy
        (torch not imported yet); False when torch was imported first, so
        that the runtime read its environment before this call.
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    name, value = WAIT_POLICY
    environ.setdefault(name, value)
    return "torch" not in modules


WAIT_POLICY_APPLIED = apply_wait_policy()


def resolve_num_threads(num_threads):
    """The thread count that ``num_threads`` asks for, DIPY's convention.

    Parameters
    ----------
    num_threads : int or None
        None: the default (None is returned); n > 0: n threads; n < 0: the
        available CPUs minus ``|n + 1|`` (at least 1); 0 raises ValueError
        (``dipy.utils.omp.determine_num_threads``).

    Returns
    -------
    threads : int or None
    """
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int or None, got {num_threads!r}")
    from dipy.utils.omp import determine_num_threads

    return determine_num_threads(num_threads)


def set_num_threads(num_threads):
    """Set torch's intra-op thread count from ``num_threads``.

    Parameters
    ----------
    num_threads : int or None
        As in :func:`resolve_num_threads`; None changes nothing.

    Returns
    -------
    previous : int
        torch's thread count before the call, to restore it.
    """
    import torch

    threads = resolve_num_threads(num_threads)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return previous
