"""The model benchmark's timing loop (benchmarks/model_benchmark.py)."""

import torch

from benchmarks.model_benchmark import bench_case


class RecordingVariant:
    def __init__(self, name, calls, scale=1.0):
        self.name, self.calls, self.scale, self.device = name, calls, scale, torch.device("cpu")

    def step(self, x):
        self.calls.append(self.name)
        return x * self.scale


def test_each_timed_call_follows_settling_calls_of_the_same_variant():
    calls = []
    variants = [RecordingVariant("eager", calls), RecordingVariant("accelerated", calls, scale=1.5)]
    rows = bench_case({"label": "case"}, variants, torch.ones(2, 3), rounds=3, warmup=1, settle=2)
    assert calls == ["eager", "accelerated"] + (["eager"] * 3 + ["accelerated"] * 3) * 3
    by_name = {r["variant"]: r for r in rows}
    assert by_name["eager"]["speedup_vs_eager"] == 1.0
    assert abs(by_name["accelerated"]["max_rel_diff_vs_eager"] - 0.5) < 1e-12
    assert all(r["median_s"] > 0 and r["images_per_s"] > 0 for r in rows)


def test_without_settling_the_variants_alternate_call_by_call():
    calls = []
    variants = [RecordingVariant("eager", calls), RecordingVariant("onnxruntime", calls)]
    bench_case({"label": "case"}, variants, torch.ones(1), rounds=2, warmup=0)
    assert calls == ["eager", "onnxruntime"] * 2
