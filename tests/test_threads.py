"""Thread policy (OMP_WAIT_POLICY) and ``--num_threads`` of the workflows."""

import os
import subprocess
import sys

import pytest
import torch

from esdmri.threads import apply_wait_policy, resolve_num_threads, set_num_threads
from esdmri.workflows.io import EsdmriWorkflow, run_workflow


def _policy_in_fresh_interpreter(code, **environ):
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                          "ESDMRI_ADAPTIVE_THREADS")}
    env.update(environ)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True)
    return result.stdout.split()


@pytest.mark.parametrize("environ", [{"ESDMRI_ADAPTIVE_THREADS": "0"},
                                     {"OMP_NUM_THREADS": "2"}])
def test_importing_esdmri_asks_for_passive_waiting_before_torch_loads(environ):
    # Where the thread count cannot adapt to the load, idle threads must sleep.
    code = ("import os, sys; import esdmri; "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules, "
            "esdmri.threads.WAIT_POLICY_APPLIED)")
    assert _policy_in_fresh_interpreter(code, **environ) == ["PASSIVE", "False", "True"]
    # Every entry point imports the package first.
    code = ("import os; import esdmri.workflows.fit; import torch; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    assert _policy_in_fresh_interpreter(code, **environ) == ["PASSIVE"]


@pytest.mark.slow  # a fresh Python process with torch: about 4 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="adapts on Linux only")
def test_where_the_count_adapts_the_runtimes_own_policy_stays():
    code = ("import os; import esdmri; "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), "
            "esdmri.threads.WAIT_POLICY_APPLIED)")
    assert _policy_in_fresh_interpreter(code) == ["unset", "True"]
    # A command given a fixed count above one sleeps, if torch is not loaded yet.
    code = ("import os, sys; from esdmri.threads import fixed_num_threads; "
            "ctx = fixed_num_threads(2); ctx.__enter__(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), __import__('torch').get_num_threads())")
    assert _policy_in_fresh_interpreter(code) == ["PASSIVE", "2"]
    code = ("import os; from esdmri.threads import fixed_num_threads; "
            "ctx = fixed_num_threads(1); ctx.__enter__(); "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")
    assert _policy_in_fresh_interpreter(code) == ["unset"]


def test_a_users_wait_policy_wins():
    code = "import os; import esdmri; print(os.environ['OMP_WAIT_POLICY'])"
    assert _policy_in_fresh_interpreter(code, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE"]
    environ = {"OMP_WAIT_POLICY": "active"}
    assert apply_wait_policy(environ, modules={})
    assert environ == {"OMP_WAIT_POLICY": "active"}
    environ = {}
    assert apply_wait_policy(environ, modules={}, adaptive=True)
    assert environ == {}


def test_the_policy_is_reported_as_late_when_torch_came_first():
    # The OpenMP runtime reads its environment when torch loads it.
    environ = {}
    assert not apply_wait_policy(environ, modules={"torch": torch})
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {}
    assert apply_wait_policy(environ, modules={})
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_num_threads_follows_dipys_convention():
    available = len(os.sched_getaffinity(0))
    assert resolve_num_threads(None) is None
    assert resolve_num_threads(3) == 3
    assert resolve_num_threads(-1) == available
    assert resolve_num_threads(-2) == max(1, available - 1)
    assert resolve_num_threads(-1000) == 1
    with pytest.raises(ValueError, match="num_threads"):
        resolve_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        resolve_num_threads("2")
    with pytest.raises(TypeError, match="num_threads"):
        resolve_num_threads(True)


def test_set_num_threads_returns_the_previous_count():
    before = torch.get_num_threads()
    try:
        assert set_num_threads(1) == before
        assert torch.get_num_threads() == 1
        assert set_num_threads(None) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _ThreadsFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_threads_check"

    def run(self, value=1, out_dir=""):
        """Record torch's thread count while the command runs.

        Parameters
        ----------
        value : int, optional
            Unused.
        out_dir : string or Path, optional
            Output directory.
        """
        self.seen = torch.get_num_threads()
        return self.seen


@pytest.mark.parametrize("argv, expected", [(["--num_threads", "1"], "one"),
                                            (["--num_threads=-1"], "all CPUs"),
                                            ([], "unchanged")])
def test_num_threads_option_is_parsed_and_applied_for_the_run(monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "argv", ["esdmri_threads_check"])
    before = torch.get_num_threads()
    counts = {"one": 1, "all CPUs": len(os.sched_getaffinity(0)), "unchanged": before}
    try:
        assert run_workflow(_ThreadsFlow(), argv) == counts[expected]
        assert torch.get_num_threads() == before  # restored afterwards
    finally:
        torch.set_num_threads(before)


def test_num_threads_zero_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["esdmri_threads_check"])
    with pytest.raises(SystemExit) as exit_info:
        run_workflow(_ThreadsFlow(), ["--num_threads", "0"])
    assert exit_info.value.code == "esdmri_threads_check: error: num_threads cannot be 0"


def test_every_computing_command_offers_num_threads(monkeypatch, capsys):
    from esdmri.workflows import apply, demo, evaluate, fit, plot, response, track, train

    flows = [module_flow for module in (apply, demo, evaluate, fit, plot, response, track, train)
             for module_flow in vars(module).values()
             if isinstance(module_flow, type) and issubclass(module_flow, EsdmriWorkflow)
             and module_flow is not EsdmriWorkflow]
    assert len(flows) == 8
    for flow in flows:
        monkeypatch.setattr(sys, "argv", [flow.get_short_name()])
        with pytest.raises(SystemExit) as exit_info:
            run_workflow(flow(), ["--help"])
        assert exit_info.value.code == 0
        assert "--num_threads" in capsys.readouterr().out, flow.__name__
