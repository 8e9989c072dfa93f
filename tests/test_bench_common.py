"""benchmarks/common.py's run_case on this CPU machine: the compile-only pass of scripts/gpu_validate.sh and
the record a timed case leaves."""

import json

import pytest
import torch

from benchmarks.common import run_case


class RecordingBenchmark:
    """The part of pytest-benchmark's fixture run_case uses."""

    name = "case"

    def __init__(self):
        self.extra_info = {}
        self.rounds = 0

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        for _ in range(rounds + warmup_rounds):
            fn()
        self.rounds += rounds


def test_compile_only_pass_runs_the_case_once_and_records_nothing(monkeypatch, tmp_path):
    jsonl = tmp_path / "ops.jsonl"
    monkeypatch.setenv("TRANSXNET_BENCH_COMPILE_ONLY", "1")
    monkeypatch.setenv("TRANSXNET_BENCH_JSONL", str(jsonl))
    calls = []
    with pytest.raises(pytest.skip.Exception, match="compile-only"):
        run_case(RecordingBenchmark(), lambda: calls.append(1), torch.device("cpu"), 8)
    assert calls == [1]
    assert not jsonl.exists()


def test_timed_case_records_its_median_and_no_graph_time_off_cuda(monkeypatch, tmp_path):
    jsonl = tmp_path / "ops.jsonl"
    monkeypatch.delenv("TRANSXNET_BENCH_COMPILE_ONLY", raising=False)
    monkeypatch.setenv("TRANSXNET_BENCH_JSONL", str(jsonl))
    bench = RecordingBenchmark()
    record = run_case(bench, lambda: torch.ones(4).sum(), torch.device("cpu"), 1000, impl="x")
    assert record["median_ms"] > 0 and record["graph_ms"] is None and "graph_error" not in record
    assert bench.rounds == 10 and bench.extra_info["impl"] == "x"
    assert json.loads(jsonl.read_text())["case"] == "case"
