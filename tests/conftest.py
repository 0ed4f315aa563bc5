"""Shared test configuration.

Markers
-------
slow
    Tests that take more than about 10 s on two cores (end-to-end training,
    whole workflows). They run by default, in CI too; ``pytest -m "not slow"``
    leaves them out while iterating.
"""

import os

import pytest

import esdmri  # noqa: F401  (before torch: the OpenMP wait policy of esdmri.threads)
import torch  # noqa: E402

# Figures are written to files, never shown.
os.environ.setdefault("MPLBACKEND", "Agg")


# Tests measured above 10 s on a loaded two-core machine (pytest --durations),
# marked here until their modules carry ``@pytest.mark.slow`` themselves.
_SLOW = {
    "test_train_group.py::test_two_torchrun_processes_keep_identical_weights",
    "test_workflows.py::test_demo_runs_end_to_end",
    "test_workflows.py::test_fit_writes_consistent_outputs",
    "test_workflows.py::test_apply_reproduces_the_fit",
    "test_workflows.py::test_response_matches_truth_and_respects_force",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes more than about 10 s on two cores; deselect with "
                   "-m 'not slow'")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in _SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def float64():
    """torch in float64 on one thread, seeded, restored afterwards.

    Exact symmetries are asserted to 1e-10, which float32 cannot resolve; one
    thread keeps reductions in a fixed order.
    """
    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
    torch.set_num_threads(threads)
