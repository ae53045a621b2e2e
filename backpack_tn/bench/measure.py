"""Timing and peak-memory measurement for benchmarks.

Time: median of repeated calls after a warm-up (CUDA: events, synchronised). The
warm-up lasts until ``backpack_tn`` has made its choices: a long problem's candidate
contractions are measured over its first calls (:func:`settle`).
Memory: extra memory a call needs beyond what is alive before it.

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak counter.
* CPU (Linux): the process's peak resident set size (``VmHWM``), reset before each
  call via ``/proc/self/clear_refs``. glibc's ``malloc`` is told to serve every block of
  64 KiB or more with ``mmap`` (and to trim its free heap before each measurement) so
  that freed tensors really leave the resident set and the next measurement starts
  clean. As this changes allocation costs, time everything before measuring memory;
  timing itself sets one fixed allocator state (:func:`configure_malloc_for_timing`).
  The number includes temporary buffers of BLAS and other libraries — it is what the
  operating system had to provide.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import math
import statistics
import time
import warnings
from typing import Callable, Dict, Optional

import torch

from backpack_tn.tn.evaluate import exploration_runs

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: While timing, glibc serves blocks below this from its heap and keeps what is
#: freed (its largest mmap threshold on 64-bit systems, and a trim threshold above
#: it). Left to itself, glibc raises its mmap threshold to the largest block freed so
#: far, so whether a call's 14 MB result was a fresh, page-faulting mmap (15 ms for a
#: 3 ms depthwise kernel) or reused heap memory depended on what ran before in the
#: process. A long-running training process reaches the fixed state anyway.
_TIMING_MMAP_THRESHOLD = 32 << 20
_TIMING_TRIM_THRESHOLD = 256 << 20
_DEFAULT_TRIM_THRESHOLD = 128 << 10


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, loaded once (``None`` elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _configure_malloc() -> None:
    """For memory: serve blocks of 64 KiB or more by mmap, return free heap memory."""
    libc = _libc()
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)  # memory freed earlier would hide new allocations
    except AttributeError:  # not glibc: coarser, but still valid peaks
        pass


def configure_malloc_for_timing() -> None:
    """For timing: one fixed allocator state, whatever ran before (glibc only).

    Blocks below :data:`_TIMING_MMAP_THRESHOLD` come from the heap, and freed heap
    memory is kept for reuse. :func:`peak_memory` switches back to its own state.
    """
    libc = _libc()
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, _TIMING_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _TIMING_TRIM_THRESHOLD)
    except AttributeError:
        pass


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_memory_supported() -> bool:
    """Whether peak-RSS measurement works here (Linux with writable clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        _proc_status("VmHWM")
    except OSError:
        return False
    return True


#: At most this many calls of one function to let the engine finish measuring.
MAX_SETTLE_CALLS = 64


def settle(
    fn: Callable[[], object],
    max_calls: int = MAX_SETTLE_CALLS,
    measuring: Optional[list] = None,
) -> int:
    """Call ``fn`` until a call runs no candidate under measurement (warm-up).

    The engine measures a long problem's candidates over its first calls, one
    candidate per call (:func:`backpack_tn.tn.evaluate.exploration_runs`), so those
    calls do not show the steady state. The last call made here does.

    Args:
        fn: Zero-argument function (called at least once).
        max_calls: Upper bound on the calls (a warning says if it was reached).
        measuring: If given, the wall-clock seconds of each call that still ran a
            candidate under measurement are appended.

    Returns:
        The number of calls made.
    """
    for calls in range(1, max_calls + 1):
        before, start = exploration_runs(), time.perf_counter()
        fn()
        if exploration_runs() == before:
            return calls
        if measuring is not None:
            measuring.append(time.perf_counter() - start)
    warnings.warn(
        f"backpack_tn still measured candidates after {max_calls} calls: the "
        "times that follow may include such runs.",
        stacklevel=2,
    )
    return max_calls


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra memory in bytes while ``fn`` runs (its result is dropped).

    Args:
        fn: Zero-argument function to measure.
        device: Device the computation runs on.

    Returns:
        Bytes above the memory in use before the call, or ``None`` if the platform
        offers no way to measure.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return peak - base
    if not cpu_memory_supported():
        return None
    _configure_malloc()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    base = _proc_status("VmRSS")
    result = fn()
    peak = _proc_status("VmHWM")
    del result
    return max(peak - base, 0)


def min_peak_memories(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int = 2,
) -> Dict[str, Optional[int]]:
    """Peak extra memory of competing functions: the least over interleaved rounds.

    A single CPU measurement can read one result-sized buffer too high (measured:
    a 13.8 MiB input VJP read 55.2 MiB once, then 41.3 MiB four times in a row, for
    every implementation alike; the extra comes from whatever the call before left
    mapped), and which implementation happens to be measured first after a new
    problem is set up decides who pays it. Each round measures every function once,
    in the order of :func:`interleaved_medians`' rounds (rotated, reversed every
    other round); the least reading per function is taken as its steady-state peak.
    That assumes noise only adds memory; a call that frees memory alive before it
    (e.g. a cache evicting an entry) would read low, in any single reading as well.

    Args:
        fns: Zero-argument functions by name.
        device: Device the computation runs on.
        rounds: Measurements per function.

    Returns:
        Bytes per name (``None`` where the platform offers no way to measure).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be positive, got {rounds}.")
    names = list(fns)
    peaks: Dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in _round_order(names, r):
            for _ in range(MAX_SETTLE_CALLS):  # a call still measuring is no reading
                before = exploration_runs()
                peak = peak_memory(fns[name], device)
                if exploration_runs() == before:
                    break
            else:
                warnings.warn(
                    f"backpack_tn still measured candidates after {MAX_SETTLE_CALLS}"
                    f" calls of {name!r}: its memory reading may include such runs.",
                    stacklevel=2,
                )
            peaks[name].append(peak)
    return {
        name: None if None in values else min(values) for name, values in peaks.items()
    }


def add_memory_rounds_argument(parser: argparse.ArgumentParser) -> None:
    """``--memory-rounds`` for :func:`min_peak_memories` (default 2)."""
    parser.add_argument(
        "--memory-rounds",
        type=int,
        default=2,
        help="memory readings per measured call, least kept (noise only adds)",
    )


def median_time(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 1,
    loops: int = 1,
) -> float:
    """Median wall-clock time of ``fn`` in seconds.

    Args:
        fn: Zero-argument function to time.
        device: Device the computation runs on (CUDA uses events).
        repeats: Number of timed samples.
        warmup: Untimed warm-ups before (plans, caches, allocator warm-up); each
            lasts until the engine has made its choices (:func:`settle`).
        loops: Calls per timed sample (the sample is divided by it): sub-millisecond
            calls are timed in batches, single calls that short are mostly noise.

    Returns:
        The median time per call in seconds.
    """
    if device.type == "cpu":
        configure_malloc_for_timing()
    for _ in range(warmup):
        settle(fn)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(loops):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3 / loops)
        else:
            start_time = time.perf_counter()
            for _ in range(loops):
                fn()
            times.append((time.perf_counter() - start_time) / loops)
    return statistics.median(times)


#: Each timed sample of :func:`interleaved_medians` lasts at least this long: calls
#: shorter than that are repeated within the sample.
MIN_SAMPLE_SECONDS = 0.01
_MAX_LOOPS = 100

#: Samples of calls shorter than this start with untimed calls ...
WARM_BELOW_SECONDS = 0.1
#: ... for at least this long (and at least as many as the sample has calls, up to
#: five; at most :data:`_MAX_WARM_CALLS`). Three warm-up calls were not enough after
#: einconv's 165 ms run, which had allocated and freed 65 MB: the implementation
#: timed next read 15-25 % slow, so with three rounds the first-listed one (``tn``,
#: following einconv twice) lost on short rows it did not lose. MobileNet-v2's 3×3
#: stride-2 depthwise input VJP, the same torch kernel on both sides, read 0.80-0.88×
#: in three such runs; with 12 warm-up calls (36 ms) both read 3.1 ms.
WARM_SECONDS = 0.05
_MAX_WARM_CALLS = 50


def _warm_calls(single: float, loops: int) -> int:
    """Untimed calls before a sample of calls that took ``single`` seconds each."""
    if single >= WARM_BELOW_SECONDS:
        return 0
    by_time = math.ceil(WARM_SECONDS / single) if single > 0 else _MAX_WARM_CALLS
    return min(_MAX_WARM_CALLS, max(min(loops, 5), by_time))


def calls_per_sample(
    fn: Callable[[], object], device: torch.device, min_seconds: float
) -> int:
    """How many calls of ``fn`` make one sample of at least ``min_seconds``."""
    return _loops(median_time(fn, device, repeats=1, warmup=0), min_seconds)


def _loops(seconds: float, min_seconds: float) -> int:
    if seconds <= 0:
        return _MAX_LOOPS
    return max(1, min(_MAX_LOOPS, math.ceil(min_seconds / seconds)))


def _round_order(names: list, r: int) -> list:
    """Order of round ``r``: rotated, and reversed every other round.

    Rotation alone keeps the cyclic order, so every function would always follow
    the same other one (and inherit its cache and allocator state); reversing every
    second round makes each follow each other equally often.
    """
    shift = (r // 2) % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if r % 2 else order


def interleaved_medians(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 5,
    min_seconds: float = MIN_SAMPLE_SECONDS,
) -> Dict[str, float]:
    """Median times of competing functions, measured in interleaved rounds.

    Each round times every function once, in an order rotated (and reversed every
    other round) from round to round, so slow drifts of a shared machine (other
    processes, frequency scaling) hit all implementations alike instead of whichever
    happens to be measured during a busy spell. Every function is called once first
    (warm-up: plans, caches, autotuning; :func:`settle`).

    Args:
        fns: Zero-argument functions by name.
        device: Device the computation runs on (CUDA uses events).
        repeats: Number of rounds.
        min_seconds: Shortest sample: faster functions run several times per sample
            (:func:`calls_per_sample`, at most 100 calls).

    Returns:
        The median time per call in seconds per name.
    """
    if device.type == "cpu":
        configure_malloc_for_timing()
    for fn in fns.values():
        settle(fn)
    # a second call measures the steady state and sizes the samples
    single = {name: median_time(fn, device, 1, warmup=0) for name, fn in fns.items()}
    loops = {name: _loops(seconds, min_seconds) for name, seconds in single.items()}
    times: Dict[str, list] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in _round_order(names, r):
            # The first calls after another implementation's big allocations were
            # freed pay page faults and cold caches (measured: 3–4 calls of a 0.3 ms
            # convolution at up to 4× after einconv): untimed calls absorb that where
            # they are cheap (:data:`WARM_SECONDS`).
            warmup = _warm_calls(single[name], loops[name])
            sample = median_time(
                fns[name], device, repeats=1, warmup=warmup, loops=loops[name]
            )
            times[name].append(sample)
    return {name: statistics.median(values) for name, values in times.items()}
