"""The load-aware thread count of esdmri.threads (issue 31)."""

import os
import subprocess
import sys

import pytest
import torch

from esdmri import threads
from esdmri.threads import ADAPT_INTERVAL, LoadProbe, adapt_num_threads, fixed_num_threads

# /proc/stat with 3 CPUs; fields: user nice system idle iowait irq softirq steal guest ...
STAT = """cpu  {total}
cpu0 {cpu0} 0 {system0} 900 50 1 2 3 7 0
cpu1 {cpu1} 0 0 800 60 0 0 0 0 0
cpu2 5000 0 0 0 0 0 0 0 0 0
intr 1 2 3
"""
# A process name with a space and a parenthesis: the fields after the last ")" count.
SELF = "4242 (my (odd) name) R 1 1 1 0 -1 4194304 101 0 0 0 {utime} {stime} 0 0 20 0 1 0\n"


class FakeProc:
    """``/proc/stat`` and ``/proc/self/stat`` at a fake time, for LoadProbe."""

    def __init__(self):
        self.now, self.stat, self.own = 100.0, (0, 0, 0), (0, 0)

    def set(self, now, cpu0, system0, cpu1, utime, stime):
        self.now, self.stat, self.own = now, (cpu0, system0, cpu1), (utime, stime)

    def read(self, path):
        cpu0, system0, cpu1 = self.stat
        if path == "/proc/stat":
            return STAT.format(total="1 2 3 4 5 6 7 8 0 0", cpu0=cpu0, system0=system0,
                               cpu1=cpu1)
        return SELF.format(utime=self.own[0], stime=self.own[1])

    def clock(self):
        return self.now


def test_probe_counts_other_processes_on_this_process_cpus_from_proc_text():
    fake = FakeProc()
    probe = LoadProbe(cpus={0, 1}, read=fake.read, clock=fake.clock)
    probe.tick = 100
    before = probe.sample()
    # user + nice + system + irq + softirq + steal of cpu0 and cpu1 (not cpu2, idle, iowait)
    assert before == (100.0, 0 + 0 + 0 + 1 + 2 + 3 + 0, 0)
    # Over 2 s: 300 busy ticks on the two CPUs, 100 of them this process's (60 + 40).
    fake.set(102.0, cpu0=150, system0=50, cpu1=100, utime=60, stime=40)
    after = probe.sample()
    assert after[1] - before[1] == 300 and after[2] == 100
    assert probe.others(before, after) == pytest.approx(200 / 100 / 2.0)  # one core
    # Accounting jitter never makes the others' load negative; no time, no load.
    assert probe.others(after, (103.0, after[1], after[2] + 50)) == 0.0
    assert probe.others(after, after) == 0.0


@pytest.fixture
def adaptation(monkeypatch):
    """A fresh adaptation state on a fake two-CPU /proc; torch's count restored."""
    fake = FakeProc()
    probe = LoadProbe(cpus={0, 1}, read=fake.read, clock=fake.clock)
    probe.tick = 100
    state = threads._Adaptation(environ={}, probe=probe)
    monkeypatch.setattr(threads, "_ADAPTATION", state)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield fake, state
    torch.set_num_threads(before)


def _load(fake, seconds, others, own=0.0):
    """Advance the fake clock by ``seconds`` with ``others`` and ``own`` cores busy."""
    now = fake.now + seconds
    cpu0, system0, cpu1 = fake.stat
    busy = round((others + own) * 100 * seconds)
    utime = fake.own[0] + round(own * 100 * seconds)
    fake.set(now, cpu0 + busy, system0, cpu1, utime, fake.own[1])


def test_a_job_on_one_of_two_cores_leaves_one_thread_and_its_end_gives_two_back(adaptation):
    fake, state = adaptation
    _load(fake, 1.0, others=1.0, own=1.0)
    assert adapt_num_threads() == 1
    assert torch.get_num_threads() == 1
    # Rate-limited: within ADAPT_INTERVAL nothing is read or changed.
    _load(fake, ADAPT_INTERVAL / 2, others=0.0)
    assert adapt_num_threads() is None and torch.get_num_threads() == 1
    _load(fake, 1.0, others=0.05, own=1.0)  # the job ended; a little background load
    assert adapt_num_threads() == 2
    assert torch.get_num_threads() == 2
    # Never above the count in force at the first call.
    _load(fake, 1.0, others=0.0)
    assert adapt_num_threads() is None and torch.get_num_threads() == 2
    # Other processes on both cores: still one thread, never zero.
    _load(fake, 1.0, others=2.0)
    assert adapt_num_threads() == 1


def test_the_ceiling_is_the_count_at_the_first_call(adaptation):
    fake, state = adaptation
    torch.set_num_threads(1)
    _load(fake, 1.0, others=0.0)
    assert adapt_num_threads() is None
    assert torch.get_num_threads() == 1 and state.ceiling == 1


def test_a_count_set_before_the_first_call_wins(adaptation):
    fake, state = adaptation
    state.default = 2  # torch's count when the layers loaded
    torch.set_num_threads(1)  # the user's, before fitting
    _load(fake, 1.0, others=0.0)
    assert adapt_num_threads() is None
    assert torch.get_num_threads() == 1 and not state.enabled
    # The same count as the default is nobody's choice: adapted.
    state.__init__(environ={}, probe=state.probe)
    state.default = 2
    torch.set_num_threads(2)
    _load(fake, 1.0, others=1.0)
    assert adapt_num_threads() == 1


def test_a_later_torch_set_num_threads_wins_for_good(adaptation):
    fake, state = adaptation
    _load(fake, 1.0, others=1.0)
    assert adapt_num_threads() == 1
    torch.set_num_threads(2)  # the user's own choice
    _load(fake, 1.0, others=1.0)
    assert adapt_num_threads() is None
    assert torch.get_num_threads() == 2 and not state.enabled


def test_num_threads_given_to_a_run_is_left_alone(adaptation):
    fake, state = adaptation
    _load(fake, 1.0, others=0.0)
    assert adapt_num_threads() is None  # first call: ceiling 2
    with fixed_num_threads(2):
        _load(fake, 1.0, others=1.5)
        assert adapt_num_threads() is None
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2 and state.enabled
    with fixed_num_threads(None):  # the default: adapted
        _load(fake, 1.0, others=1.5)
        assert adapt_num_threads() == 1


@pytest.mark.parametrize("environ", [{"OMP_NUM_THREADS": "2"}, {"MKL_NUM_THREADS": "3"},
                                     {"ESDMRI_ADAPTIVE_THREADS": "0"}])
def test_the_users_environment_turns_adaptation_off(environ):
    assert not threads._Adaptation(environ=environ).enabled
    assert threads._Adaptation(environ={"OMP_NUM_THREADS": ""}).enabled == (
        sys.platform.startswith("linux"))


def test_without_proc_the_count_stays_as_set():
    def missing(path):
        raise FileNotFoundError(path)

    state = threads._Adaptation(environ={}, probe=LoadProbe(read=missing))
    assert not state.enabled


# Two CPUs for this process, a busy loop on the second one, and the count seen at
# each look.
CHILD = """
import os, sys, time, subprocess
first, second = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {first, second})
import esdmri.threads
import torch
from esdmri.threads import ADAPT_INTERVAL, adapt_num_threads
torch.set_num_threads(2)
esdmri.threads.set_adaptive(True)  # from the count in force: the ceiling
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    os.sched_setaffinity(busy.pid, {second})
    seen = []
    for _ in range(8):
        time.sleep(ADAPT_INTERVAL * 1.2)
        adapt_num_threads()
        seen.append(torch.get_num_threads())
finally:
    busy.terminate()
    busy.wait()
print(*seen)
"""


@pytest.mark.slow  # a fresh Python process with torch: about 4 s
@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="the probe reads Linux's /proc; needs two CPUs")
def test_a_real_busy_process_lowers_torchs_thread_count():
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ESDMRI_ADAPTIVE_THREADS")}
    cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2]]
    result = subprocess.run([sys.executable, "-c", CHILD, *cpus], capture_output=True, text=True,
                            env=env, timeout=120, check=True)
    seen = [int(count) for count in result.stdout.split()]
    # The first look may still see the time before the busy loop started.
    assert seen[-1] == 1 and all(count == 1 for count in seen[2:]), seen
