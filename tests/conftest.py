import os

# small models on 2 cores: one thread per process avoids OpenMP oversubscription (and
# subprocesses the tests start inherit it)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI has 2 cores: keep property tests modest and free of wall-clock deadlines
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile(
    "aecore",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # CI (CI=true) replays the same examples every run: a landing never hinges on luck;
    # local runs keep exploring new ones
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "aecore"))


@pytest.fixture
def one_thread():
    """One torch thread for this test even when OMP_NUM_THREADS says otherwise: tiny
    GEMMs only gain contention from a second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
