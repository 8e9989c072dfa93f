"""Shared timing helpers for the op benchmarks (pytest-benchmark tests) and the model CLI.

GPU timings are medians of `triton.testing.do_bench` (CUDA-event timed, L2 flushed);
CPU timings are medians of wall-clock repeats. Peak memory is measured around one
call, above what was allocated before it. With TRANSXNET_BENCH_JSONL=path every case's
record is also appended to that file as soon as it is measured (a run cut short keeps them).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Dict

import torch


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
    """Time fn with pytest-benchmark (synchronised) and record median, peak memory and bandwidth."""
    ms = median_ms(fn, device)

    def synced():
        fn()
        sync(device)

    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
    record = {
        "median_ms": ms,
        "peak_mem_mb": peak_memory_mb(fn, device),
        "min_bytes": int(min_bytes),
        "achieved_gbps": min_bytes / (ms * 1e-3) / 1e9,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **info,
    }
    benchmark.extra_info.update(record)
    jsonl = os.environ.get("TRANSXNET_BENCH_JSONL")
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps({"case": benchmark.name, **record}) + "\n")
    return record
