"""benchmarks/gpu_warmup.py: choosing a model's captured op calls and replaying them (here on the CPU, the
Triton backend through its interpreter; on a GPU the same code fills Triton's compile cache)."""

import json

import pytest
import torch

from benchmarks import gpu_warmup
from helpers import requires_triton


def _spec(shape, requires_grad=True, dtype="float32"):
    stride, step = [], 1
    for n in reversed(shape):
        stride.insert(0, step)
        step *= n
    return {"tensor": {"shape": shape, "stride": stride, "offset": 0, "dtype": dtype, "requires_grad": requires_grad}}


# A small IDConv call (x, the per-sample kernel logits, the kernel bank, the bias logits, the bias bank) and an
# inference MS-FFN middle (x, the group weights and biases, BatchNorm scale, shift, running mean and variance).
SMALL_CALLS = {
    "key": "test",
    "calls": [
        {
            "op": "idconv",
            "config": "t plain train 2x12x12 nchw",
            "args": [_spec([2, 4, 6, 5]), _spec([2, 2, 4, 3, 3]), _spec([2, 4, 3, 3]), _spec([2, 2, 4]), _spec([2, 4])],
        },
        {
            "op": "multiscale_dwconv",
            "config": "t accelerated eval 2x12x12 channels_last",
            "args": [_spec([1, 4, 5, 5]), [_spec([2, 1, 1, 1]), _spec([2, 1, 3, 3])], [_spec([2]), _spec([2])]],
        },
        {"op": "idconv", "config": "s plain train 2x12x12 nchw", "args": []},
        {"op": "idconv", "config": "t plain train 1x16x16 nchw", "args": []},
    ],
}


def test_select_calls_keeps_one_model_at_one_input_in_every_mode_and_layout():
    chosen = gpu_warmup.select_calls(SMALL_CALLS, "t", "2x12x12")
    assert [c["config"] for c in chosen] == ["t plain train 2x12x12 nchw", "t accelerated eval 2x12x12 channels_last"]


def test_the_committed_capture_holds_every_op_of_t_at_224():
    chosen = gpu_warmup.select_calls(json.loads(gpu_warmup.CALLS_FILE.read_text()), "t", "128x224x224")
    assert {c["op"] for c in chosen} == {
        "idconv",
        "multiscale_dwconv",
        "ms_ffn_middle",
        "ms_ffn_middle_eval",
        "osra_attention",
    }


def test_replayed_tensors_keep_the_captured_layout_and_valid_values():
    spec = {"shape": [2, 3, 4], "stride": [1, 8, 2], "offset": 5, "dtype": "float32", "requires_grad": True}
    t = gpu_warmup._tensor(spec, torch.float16, torch.device("cpu"))
    assert t.shape == (2, 3, 4) and t.stride() == (1, 8, 2) and t.storage_offset() == 5
    assert t.dtype == torch.float16 and t.requires_grad and bool(((t >= 0.5) & (t <= 1.5)).all())


@requires_triton
@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_warm_replays_each_call_forward_and_backward_on_triton(precision, monkeypatch):
    calls = gpu_warmup.select_calls(SMALL_CALLS, "t", "2x12x12")
    ran = []
    real = gpu_warmup.replay
    monkeypatch.setattr(gpu_warmup, "replay", lambda call, *a: (ran.append(call["op"]), real(call, *a)))
    done, failures = gpu_warmup.warm(calls, [precision], jobs=1, device="cpu", backend="triton")
    assert failures == [] and done == 2 and ran == ["idconv", "multiscale_dwconv"]


def test_a_failing_call_is_reported_and_the_others_still_run():
    broken = dict(SMALL_CALLS["calls"][0], args=SMALL_CALLS["calls"][0]["args"][:2])
    calls = [broken, SMALL_CALLS["calls"][1]]
    done, failures = gpu_warmup.warm(calls, ["fp32"], jobs=2, device="cpu", backend="reference")
    assert done == 1 and len(failures) == 1 and failures[0].startswith("idconv fp32 t plain train")
