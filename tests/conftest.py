"""Shared test configuration.

Markers
-------
slow
    Tests that take more than about 10 s on two cores, fixtures included
    (end-to-end training, whole workflows, the tutorial and the README
    example), marked ``@pytest.mark.slow`` where they are defined and
    registered in setup.cfg. They run by default, in CI too;
    ``pytest -m "not slow"`` leaves them out while iterating.
"""

import os

import pytest

os.environ.setdefault("ESDMRI_ADAPTIVE_THREADS", "0")  # results must not follow the load
import esdmri  # noqa: E402, F401  (before torch: the OpenMP wait policy of esdmri.threads)
import torch  # noqa: E402

# Figures are written to files, never shown.
os.environ.setdefault("MPLBACKEND", "Agg")


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
