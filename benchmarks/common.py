"""Shared timing helpers for the op benchmarks (pytest-benchmark tests) and the model CLI, and the fp32 matmul
precision they (and the warm-up and the static audit) run cases under.

GPU timings are medians of `triton.testing.do_bench` (CUDA-event timed, L2 flushed) of the case called
back to back (`median_ms`: what a caller sees, host work included where it is the slower side) and of
one CUDA-graph replay of it (`graph_ms`: the GPU's time alone); CPU timings are medians of wall-clock
repeats. Peak memory is measured around one call, above what was allocated before it. With
TRANSXNET_BENCH_JSONL=path every case's record is also appended to that file as soon as it is measured (a run
cut short keeps them).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch


@contextlib.contextmanager
def tf32_matmuls(allowed: bool) -> Iterator[None]:
    """fp32 matmuls with TF32 allowed (torch's fp32 matmul precision "high", which the Triton OSRA kernels follow
    too) or not ("highest") for the block, the setting restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allowed else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of one call of fn on device."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[float], str]:
    """(median milliseconds of fn replayed as a CUDA graph, why not where it could not be captured).

    do_bench times fn called back to back, so where the host's per-call work (Python, dispatch, launches)
    outlasts the GPU's, it measures the host. One graph replay is one launch: timed the same way (L2
    flushed between calls), it gives fn's GPU time alone. A host sync or a CPU tensor in fn makes the
    capture fail: (None, the error)."""
    if device.type != "cuda":
        return None, "not CUDA"
    import triton.testing

    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return float(triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")), ""
    except Exception as exc:  # any capture failure is reported in the record, not raised
        return None, f"{type(exc).__name__}: {exc}"[:200]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory (MiB) allocated by one call of fn beyond what was live before it."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(benchmark, fn: Callable[[], object], device: torch.device, min_bytes: int, **info) -> Dict[str, float]:
    """Time fn with pytest-benchmark (synchronised) and record median, peak memory and bandwidth. With
    TRANSXNET_BENCH_COMPILE_ONLY=1 run fn once and skip the case instead: a first pass over many processes
    (pytest-xdist) then fills the on-disk Triton and Inductor caches, and the timed serial pass after it
    spends its time timing rather than compiling (on a GPU, compiling is ~15 s of a case's ~16)."""
    if os.environ.get("TRANSXNET_BENCH_COMPILE_ONLY") == "1":
        fn()
        sync(device)
        import pytest  # here, not at the top: the model CLI imports this module and needs no pytest

        pytest.skip("compile-only pass: kernels compiled, nothing timed")
    ms = median_ms(fn, device)
    graph, graph_error = graph_ms(fn, device)

    def synced():
        fn()
        sync(device)

    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
    record = {
        "median_ms": ms,
        "peak_mem_mb": peak_memory_mb(fn, device),
        "min_bytes": int(min_bytes),
        "achieved_gbps": min_bytes / (ms * 1e-3) / 1e9,
        "graph_ms": graph,
        "graph_gbps": min_bytes / (graph * 1e-3) / 1e9 if graph else None,
        **({"graph_error": graph_error} if graph_error and device.type == "cuda" else {}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **info,
    }
    benchmark.extra_info.update(record)
    jsonl = os.environ.get("TRANSXNET_BENCH_JSONL")
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps({"case": benchmark.name, **record}) + "\n")
    return record
