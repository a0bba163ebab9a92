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


@pytest.fixture
def step_ops(monkeypatch):
    """The ops every trainer step dispatches, as ``(name, args)`` in order: what a step
    reads back from the device (``_local_scalar_dense``, ``nonzero``) shows there. The
    step runs as on a device whose reads wait (on the CPU a read is free, and taken)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from aecore.training import loop, state

    monkeypatch.setattr(state, "read_is_free", lambda t: False)

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func.__name__.split(".")[0], args))
            return func(*args, **(kwargs or {}))

    step = loop.TrainingRun.step

    def recorded(self, *args):
        with Record():
            return step(self, *args)

    monkeypatch.setattr(loop.TrainingRun, "step", recorded)
    return seen


# ops whose result the host reads (each waits for the device on CUDA)
READS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique")


@pytest.fixture
def step_reads(step_ops):
    """A call listing, in order, the ops in ``step_ops`` that read a result back."""
    return lambda: [op for op, _ in step_ops if op in READS]
