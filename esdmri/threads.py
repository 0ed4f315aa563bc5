"""Threads of esdmri's CPU work: their count and the OpenMP wait policy.

The CPU build of torch runs its intra-op parallelism (and MKL's and
oneDNN's) on one OpenMP thread pool: GNU ``libgomp`` in the Linux wheels
from PyPI, LLVM/Intel ``libomp`` in some other builds. The E(3) x SO(3)
layer and the fit issue thousands of small parallel operations
(neighbourhood sums, copies, adds), and each waits for its slowest thread.
On a shared machine (a laptop, a cluster node or CI runner running other
jobs) that thread is often one that another process has pushed off its
core, and by default the threads that are done *spin* (busy wait) for the
next operation meanwhile: about 300,000 spins in libgomp
(``GOMP_SPINCOUNT``), 200 ms in libomp (``KMP_BLOCKTIME``), holding the
cores that the straggler needs. With two threads on two cores beside one
busy process, a layer's forward + backward went from about 1 s to 5-60 s.

**The load-aware thread count.** When nobody chose the count (no
``num_threads`` or ``--num_threads``, no ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS``, no ``torch.set_num_threads`` after the first check),
esdmri adapts it to the load on Linux (:func:`adapt_num_threads`): at the
work's natural boundaries (each E(3) x SO(3) layer call, each chunk of the
folded correction, each evaluation of the refinement's objective) it
measures the CPU time that other processes took on this process's CPUs
since the previous check (``/proc/stat`` minus
``/proc/self/stat``, at most every :data:`ADAPT_INTERVAL` seconds) and runs
torch on the cores they leave free, between one thread and the count in
force at the first check. Beside a job that holds one of two cores the fit
then runs on one thread, at its one-thread speed, with no thread waiting
for another; when the job ends, the next check goes back to two.
``ESDMRI_ADAPTIVE_THREADS=0`` in the environment or :func:`set_adaptive`
turns it off. The thread count changes the order of float sums, so fits
on different counts agree to float32 round-off amplified by the
refinement's stop rule, not bit for bit: a fit that must repeat exactly
fixes its count (``--num_threads``, ``OMP_NUM_THREADS``).

**The wait policy.** Where the count adapts, no thread is left to wait for
a busy core, so the runtime's spinning stays (it is the faster one on an
idle machine). Where it cannot adapt (the user fixed the count in the
environment, ``ESDMRI_ADAPTIVE_THREADS=0``, no ``/proc``), ``import
esdmri`` asks for ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at
once; both runtimes honour it), and so does a command given
``--num_threads`` above 1 before torch loads. A user's own
``OMP_WAIT_POLICY`` always wins (``ACTIVE`` spins, ``PASSIVE`` sleeps). The
OpenMP runtime reads its environment once, when it is loaded, which is
when ``torch`` is first imported. So the policy takes effect only if
``esdmri`` (or any ``esdmri.*`` module) is imported before ``torch``; a
script that imports torch first keeps the runtime's default, and can set
the variable in its shell instead (``export OMP_WAIT_POLICY=PASSIVE``).
:data:`WAIT_POLICY_APPLIED` records which case holds. Child processes
inherit the variable. A script that fixes the count with
``torch.set_num_threads`` on a shared machine should export
``OMP_WAIT_POLICY=PASSIVE``.

**numba's threads.** The refinement's fused kernels
(:mod:`esdmri.reconst.fused_objective`) run between torch's matrix products,
on numba's threads, as many as torch's (:func:`sync_numba_threads`, before
each evaluation; on one thread they run on the calling thread, with no launch
at all). Of numba's threading layers, OpenMP comes first
(:data:`NUMBA_LAYERS`): its library calls the OpenMP runtime that is loaded
first into the process's global scope, which is torch's bundled ``libgomp``,
so its kernels run on torch's own thread pool (the process gains one thread
where the work queue adds two or three; PyPI wheels on Linux) and no second
pool spins beside it. Numba's work queue (the next choice) adds a pool of its
own whose threads sleep between kernels: waking them cost about 50 us per
kernel on a 2-core machine (2-6 us under OpenMP), and in the 40^3
refinement's objective on two threads the kernels' gain over torch's passes
was 14-22 % under OpenMP and 3 % under the work queue (docs/benchmarks.md).
numba's OpenMP layer sets the runtime's thread count to its pool's size when
it starts; the sync puts torch's back. ``NUMBA_THREADING_LAYER`` in the
environment chooses another layer (``workqueue`` where torch's runtime is not
GNU OpenMP, for example).

``num_threads`` follows DIPY's workflows (``dipy.utils.omp``): None keeps
the default (``OMP_NUM_THREADS`` if set, otherwise torch's count of the
physical cores, adapted to the load as above), a positive value is the
thread count, a negative value ``-k`` leaves ``k - 1`` of the available
CPUs unused (``-1``: all of them), and 0 is an error.
"""

import contextlib
import math
import numbers
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["ADAPT_INTERVAL", "NUMBA_LAYERS", "WAIT_POLICY", "WAIT_POLICY_APPLIED", "LoadProbe",
           "adapt_num_threads", "apply_wait_policy", "fixed_num_threads",
           "note_default_num_threads", "resolve_num_threads", "run_chunks", "set_adaptive",
           "set_num_threads", "sync_numba_threads"]


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


@contextlib.contextmanager
def fixed_num_threads(num_threads):
    """``num_threads`` for the ``with`` block, then the previous count.

    A count given here is the caller's choice: :func:`adapt_num_threads`
    leaves it alone inside the block. None keeps the count in force (and the
    adaptation, if on).

    Parameters
    ----------
    num_threads : int or None
        As in :func:`resolve_num_threads`.
    """
    if num_threads is None:
        yield
        return
    if resolve_num_threads(num_threads) > 1:  # fixed threads wait for busy cores: sleep
        apply_wait_policy()
    previous = set_num_threads(num_threads)
    _ADAPTATION.pinned += 1
    try:
        yield
    finally:
        _ADAPTATION.pinned -= 1
        set_num_threads(previous)
        if _ADAPTATION.last_set is not None:
            _ADAPTATION.last_set = previous


# --- the load-aware thread count ---------------------------------------------------------

# Seconds between two looks at the load: the shortest window over which the
# other processes' CPU time is measured (the kernel counts it in ticks of
# 1/100 s per CPU), and the longest a new job runs beside too many threads.
ADAPT_INTERVAL = 0.25
# Environment variable that turns the adaptation off ("0").
ADAPT_ENV = "ESDMRI_ADAPTIVE_THREADS"
# A user's thread count from the environment (torch reads both).
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Fields of a /proc/stat "cpuN" line counted as busy: user, nice, system,
# irq, softirq, steal (not idle or iowait; guest time is inside user).
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def _read_text(path):
    """The text of a ``/proc`` file; of ``/proc/stat`` only the ``cpu`` lines at its top."""
    with open(path) as file:
        if path != "/proc/stat":
            return file.read()
        lines = []
        for line in file:  # the lines after them (interrupt counts) are long
            if not line.startswith("cpu"):
                break
            lines.append(line)
        return "".join(lines)


class LoadProbe:
    """CPU time that other processes take on this process's CPUs (Linux).

    Parameters
    ----------
    cpus : iterable of int, optional
        The CPUs to watch (default: this process's affinity).
    read : callable, optional
        ``read(path) -> str``; a test passes fake ``/proc`` text.
    clock : callable, optional
        Wall-clock seconds (``time.monotonic``).
    """

    def __init__(self, cpus=None, read=_read_text, clock=time.monotonic):
        self.cpus = frozenset(os.sched_getaffinity(0) if cpus is None else cpus)
        self.read, self.clock = read, clock
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self):
        """``(seconds, busy ticks of the CPUs, this process's ticks)``."""
        busy = 0
        for line in self.read("/proc/stat").splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                busy += sum(int(fields[index]) for index in _BUSY_FIELDS)
        # utime and stime, the 14th and 15th fields; the name before them may hold spaces.
        own = self.read("/proc/self/stat").rpartition(")")[2].split()
        return self.clock(), busy, int(own[11]) + int(own[12])

    def others(self, before, after):
        """Cores used by other processes between two :meth:`sample` results."""
        seconds = after[0] - before[0]
        if seconds <= 0:
            return 0.0
        ticks = (after[1] - before[1]) - (after[2] - before[2])
        return max(0.0, ticks / self.tick / seconds)


class _Adaptation:
    """State of :func:`adapt_num_threads` (one per process)."""

    def __init__(self, environ=os.environ, probe=None):
        self.enabled = (environ.get(ADAPT_ENV, "1") != "0"
                        and not any(environ.get(name) for name in _THREAD_ENV))
        self.probe, self.last = None, None
        if self.enabled:
            try:
                self.probe = probe or LoadProbe()
                self.last = self.probe.sample()
            except (OSError, ValueError, IndexError, AttributeError):
                self.enabled = False  # not Linux, or no /proc: the count stays as set
        self.default = None  # torch's count when esdmri's layers loaded
        self.ceiling = None  # the count in force at the first check
        self.last_set = None  # the count this module set last
        self.pinned = 0  # depth of fixed_num_threads blocks


_ADAPTATION = _Adaptation()


def note_default_num_threads():
    """Record torch's thread count, once, as the one nobody chose.

    Called when esdmri's layers load (``esdmri.nn.e3so3``, which imports
    torch): a count that differs from it at the first
    :func:`adapt_num_threads` is the user's (``torch.set_num_threads``) and
    is never adapted. If torch was imported and its count set before
    esdmri, that count is taken as the default.
    """
    if _ADAPTATION.default is None and "torch" in sys.modules:
        _ADAPTATION.default = sys.modules["torch"].get_num_threads()


note_default_num_threads()  # torch imported before esdmri

# The environment variable and the value esdmri asks for.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def apply_wait_policy(environ=None, modules=None, adaptive=False):
    """Ask for sleeping (not spinning) OpenMP threads unless the user chose.

    Parameters
    ----------
    environ : mapping, optional
        The environment to update (default ``os.environ``).
    modules : mapping, optional
        The loaded modules (default ``sys.modules``), to tell whether the
        OpenMP runtime is loaded already.
    adaptive : bool, optional
        True when the thread count adapts to the load: then the runtime's
        own (spinning) policy stays, and ``environ`` is left as it is.

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
    if not adaptive:
        environ.setdefault(name, value)
    return "torch" not in modules


WAIT_POLICY_APPLIED = apply_wait_policy(adaptive=_ADAPTATION.enabled)


def set_adaptive(enabled):
    """Turn the load-aware thread count on or off for this process.

    The wait policy was chosen when esdmri was imported and stays: turning
    the adaptation off in a process that spins (the default where it
    adapts) leaves fixed threads spinning on a shared machine.

    Parameters
    ----------
    enabled : bool
        True starts afresh, with the count in force at the next check as
        the ceiling (on a system without ``/proc`` it stays off).

    Returns
    -------
    previous : bool
    """
    previous = _ADAPTATION.enabled
    if enabled:
        pinned = _ADAPTATION.pinned
        _ADAPTATION.__init__({})
        _ADAPTATION.pinned = pinned
    else:
        _ADAPTATION.enabled = False
    return previous


def adapt_num_threads():
    """Run torch on the CPUs that other processes leave free, if nobody chose.

    Cheap enough for every layer call: it returns at once unless
    :data:`ADAPT_INTERVAL` seconds have passed since the last look. Then it
    measures the cores other processes used on this process's CPUs since
    that look, and sets torch's thread count to the free cores, rounded,
    between 1 and the count in force at the first call. A count that anyone
    else set (``torch.set_num_threads`` after esdmri's layers loaded, before
    or after the first call) turns the adaptation off for good: the user's
    choice wins.

    Returns
    -------
    threads : int or None
        The count set by this call, or None when it changed nothing.
    """
    state = _ADAPTATION
    if not state.enabled or state.pinned:
        return None
    now = state.probe.clock()
    if now - state.last[0] < ADAPT_INTERVAL:
        return None
    import torch

    current = torch.get_num_threads()
    if state.ceiling is None:
        state.ceiling = state.last_set = current
        if state.default is not None and current != state.default:
            state.enabled = False  # set by the user before the first check
            return None
    elif current != state.last_set:  # someone else set it: theirs wins
        state.enabled = False
        return None
    sample = state.probe.sample()
    others = state.probe.others(state.last, sample)
    state.last = sample
    free = len(state.probe.cpus) - others
    threads = max(1, min(state.ceiling, math.floor(free + 0.5)))
    if threads == current:
        return None
    torch.set_num_threads(threads)
    state.last_set = threads
    return threads


# --- numba's threads ------------------------------------------------------------------------

# numba's threading layers in order of preference (numba asks for all three),
# unless the user names one in NUMBA_THREADING_LAYER: OpenMP first, whose kernels
# run on torch's own OpenMP threads (see the module docstring), then numba's work
# queue, then TBB (a third pool).
NUMBA_LAYERS = ("omp", "workqueue", "tbb")


def sync_numba_threads():
    """Run numba's parallel kernels on as many threads as torch runs now.

    The refinement's fused kernels (:mod:`esdmri.reconst.fused_objective`)
    run on numba's thread pool between torch's products: called before each
    evaluation, after :func:`adapt_num_threads`, this gives them torch's
    current count (the user's, or the one adapted to the load), capped at the
    pool's size (``NUMBA_NUM_THREADS``, the CPUs when numba loaded). numba's
    count is per calling thread, so the call belongs in the thread that runs
    the kernels.

    Returns
    -------
    threads : int
        numba's thread count after the call.
    """
    import numba
    import torch

    current = torch.get_num_threads()
    # Read when numba starts its threads (the first parallel kernel or the
    # get_num_threads below); a layer numba runs already stays.
    numba.config.THREADING_LAYER_PRIORITY = list(NUMBA_LAYERS)
    numba.get_num_threads()
    if torch.get_num_threads() != current:
        # numba's OpenMP layer starts by setting the runtime's count to its pool's
        # size: torch's count, when they share the runtime.
        torch.set_num_threads(current)
    threads = max(1, min(current, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return threads


# Chunks per worker between two looks at the load (run_chunks).
CHUNKS_PER_LOOK = 8


def run_chunks(work, count, chunk):
    """Call ``work(part)`` on slices of ``chunk`` of ``range(count)``, on torch's threads.

    Each of torch's threads runs whole chunks, with torch (and MKL) on one
    thread inside: a chunk's products are too small to split across threads,
    and independent chunks never wait for one another, where a split product
    waits for its slowest thread. The chunks' bounds do not depend on the
    thread count, so neither do results that each chunk computes alone. Every
    :data:`CHUNKS_PER_LOOK` chunks per thread the count is adapted to the
    load (:func:`adapt_num_threads`) and read again; torch's count is restored
    after each batch of chunks.

    Parameters
    ----------
    work : callable
        Takes a ``slice``. It should release the GIL in its heavy parts
        (torch's operations, numba's ``nogil`` kernels and numpy's linear
        algebra do), and chunks must not overlap in what they write.
    count : int
    chunk : int
        Elements per slice, at least 1.
    """
    import torch

    if not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    parts = [slice(start, start + chunk) for start in range(0, count, chunk)]
    helpers = max(1, (os.cpu_count() or 1) - 1)
    modes = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    with ThreadPoolExecutor(helpers) as pool:
        while parts:
            adapt_num_threads()
            current = torch.get_num_threads()
            threads = max(1, min(current, helpers + 1))
            size = threads * CHUNKS_PER_LOOK
            batch, parts = parts[:size], parts[size:]
            if threads == 1:
                _run_all(work, batch, *modes)
                continue
            torch.set_num_threads(1)
            try:
                # Thread t runs chunks t, t + threads, ...; the calling thread is one.
                futures = [pool.submit(_run_all, work, batch[t::threads], *modes)
                           for t in range(1, threads)]
                _run_all(work, batch[::threads], *modes)
                for future in futures:
                    future.result()
            finally:
                torch.set_num_threads(current)


def _run_all(work, parts, inference, grad):
    """``work`` on each of ``parts`` under the caller's autograd modes (they are per thread)."""
    import torch

    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        for part in parts:
            work(part)
