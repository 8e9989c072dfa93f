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


def test_tf32_precision_allows_tf32_for_each_case_and_restores_the_setting(monkeypatch, tmp_path):
    """`--precisions fp32,tf32`: the tf32 case's variants are built and run with TF32 allowed for fp32 matmuls
    (float32 matmul precision "high"), the fp32 case's with "highest"; the setting is restored afterwards, and an
    unknown precision is refused."""
    import pytest

    from benchmarks import model_benchmark

    seen = []

    def recording_variants(builder, train, amp_dtype, device, with_compile, onnx_input=None):
        seen.append(("built", torch.get_float32_matmul_precision(), amp_dtype))
        calls = []

        class PrecisionVariant(RecordingVariant):
            def step(self, x):
                seen.append(("ran", torch.get_float32_matmul_precision()))
                return super().step(x)

        return [PrecisionVariant("eager", calls)]

    monkeypatch.setattr(model_benchmark, "make_variants", recording_variants)
    monkeypatch.setattr(model_benchmark, "plot", lambda *args: None)
    argv = ["--models", "t", "--modes", "infer", "--precisions", "fp32,tf32", "--batch", "1", "--size", "8"]
    argv += ["--no-compile", "--no-detection", "--no-onnx", "--rounds", "1", "--warmup", "0", "--device", "cpu"]
    rows = model_benchmark.main(argv + ["--out", str(tmp_path)])
    assert [r["precision"] for r in rows] == ["fp32", "tf32"]
    tf32_case = seen.index(("built", "high", None))
    assert seen[0] == ("built", "highest", None) and 1 < tf32_case < len(seen) - 1
    assert set(seen[1:tf32_case]) == {("ran", "highest")} and set(seen[tf32_case + 1 :]) == {("ran", "high")}
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(SystemExit):
        model_benchmark.main(["--precisions", "fp32,bf16", "--device", "cpu", "--out", str(tmp_path)])
