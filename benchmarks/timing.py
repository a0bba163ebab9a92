"""Timing implementations side by side: calls are interleaved (every implementation
runs in each round), so load from other processes on a shared machine hits all of them
alike, and medians are reported. Compare ratios from one run, not times across runs."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def time_in_turns(
    impls: dict[str, Callable[[], object]],
    *,
    rounds: int,
    block: int = 1,
    warmup: int = 1,
    lead: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    budget_s: float | None = None,
    settle_s: float = 0.0,
) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds per call of each implementation, and the errors of those that
    failed their warm-up (e.g. torch.compile without a working compiler).

    Each of ``rounds`` rounds calls every implementation ``block`` times in a row,
    after ``lead`` untimed calls: with ``lead=1`` each timed call finds its operands and
    code in cache, as an op in a training step reads what the op before it wrote,
    rather than measuring the refill after another implementation swept the caches.
    With ``budget_s``, fast cases get more rounds: up to ~budget_s of calls of the
    slowest implementation, at most 10x ``rounds``. ``sync`` runs after every call
    (``torch.cuda.synchronize`` for GPU work). ``settle_s`` pauses (untimed) after each
    call, so a thread pool that spins after its work (OpenBLAS, OpenMP) is asleep before
    the next implementation runs instead of taking its cores.
    """
    sync = sync or (lambda: None)
    errors, first = {}, {}
    for name, fn in impls.items():
        try:
            for _ in range(warmup):  # first calls allocate, plan and compile
                fn()
            sync()
            t0 = clock()
            fn()
            sync()
            first[name] = max(clock() - t0, 1e-9)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    live = [n for n in impls if n not in errors]
    if not live:
        return {}, errors
    if budget_s is not None:
        slowest = max(first[n] for n in live)
        rounds = int(min(10 * rounds, max(rounds, budget_s / slowest)))
    samples: dict[str, list[float]] = {n: [] for n in live}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land on whichever call runs then
    try:
        for _ in range(rounds):
            for name in live:
                for _ in range(lead):
                    impls[name]()
                sync()
                for _ in range(block):
                    t0 = clock()
                    impls[name]()
                    sync()
                    samples[name].append(clock() - t0)
                    if settle_s:
                        time.sleep(settle_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: statistics.median(v) for n, v in samples.items()}, errors


def print_profile(step, device: str, title: str, rows: int = 15, calls: int = 3) -> None:
    """The ops of ``calls`` calls by self time: on CUDA, device time, which says which
    kernel to work on next, and then by host time, which says where a call waits or
    launches slowly (a call that takes longer than its kernels is paying there); on the
    CPU, CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    step()  # warm
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    for clock in ["device", "cpu"] if device == "cuda" else ["cpu"]:
        print(f"\nprofile of {calls} calls by {clock} time: {title}")
        key = f"self_{clock}_time_total"
        print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=60))
