"""What one benchmark case costs: median wall time, peak tensor memory, the machine's matmul rate, a model's
decoding rate."""

import copy
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Tuple

import torch
import torch.utils.benchmark as benchmark
from torch.profiler import ProfilerActivity, profile


STABLE_IQR = 0.1  # stop timing once the interquartile range is within 10% of the median
MAX_RUN_TIMES = 10  # give up on stability after this many times the minimum run time
DECODE_STEPS = 16  # tokens per timed decoding run


def median_seconds(fn: Callable[[], object], min_run_time: float) -> Tuple[float, float, int]:
    """Median and interquartile range of the seconds per call of `fn`, and the number of calls timed.

    `torch.utils.benchmark` adaptive autorange: untimed calls size the blocks and warm up (lazy
    imports, allocator growth, first-call dispatch), then blocks of calls are timed until at least
    four blocks and `min_run_time` seconds are spent and IQR/median < STABLE_IQR, or until
    MAX_RUN_TIMES x `min_run_time` seconds have passed (so a call slower than that is timed once).
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.adaptive_autorange(
        threshold=STABLE_IQR, min_run_time=min_run_time, max_run_time=MAX_RUN_TIMES * min_run_time
    )
    calls = len(measurement.times) * measurement.number_per_run
    return measurement.median, measurement.iqr, calls


@contextmanager
def _native_stderr_silenced():
    """Kineto logs two lines to file descriptor 2 at every profiler start and stop, whatever its log
    level; only those calls are wrapped, so errors and warnings of the measured code still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_tensor_bytes(fn: Callable[[], object]) -> Tuple[int, object]:
    """Peak bytes of CPU tensor storage live at once during one call of `fn` above what was live before,
    and the call's result.

    Counted from the profiler's allocation and free events of torch's CPU allocator, so it is the
    working set of the op (intermediates, saved activations, outputs, gradients) and excludes the inputs,
    the Python interpreter and anything malloc keeps cached. The call is untimed: the profiler slows it.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():
        prof.start()
    try:
        result = fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # frees are recorded with negative sizes
        peak = max(peak, live)
    return peak, result


def matmul_flops_per_second(n: int = 2048, min_run_time: float = 1.0) -> Tuple[float, float]:
    """fp32 GEMM rate of this machine at the current thread count: (FLOP/s, median seconds) of [n,n]@[n,n]."""
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    seconds = median_seconds(lambda: torch.mm(a, b), min_run_time)[0]
    return 2.0 * n**3 / seconds, seconds


@torch.no_grad()
def decode_tokens_per_second(model, context: int, vocab: int, runs: int, steps: int = DECODE_STEPS) -> dict:
    """Prefill `context` tokens once (untimed), then time `steps` one-token steps from a copy of that state (the
    model's own cache: a `FastWeightCache` for ours, a `transformers` cache for others)."""
    model.eval()
    prefilled = model(torch.randint(0, vocab, (1, context)), use_cache=True).cache
    token = torch.randint(0, vocab, (1, 1))
    seconds = []
    for _ in range(runs):
        cache = copy.deepcopy(prefilled)  # every run starts at the same context
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"tokens_per_s": steps / median, "median_s": median, "runs": runs}
