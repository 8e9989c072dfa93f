"""benchmarks/gpu_warmup.py: capturing a model's fused-op calls on meta and replaying them (here on the CPU, the
Triton backend through its interpreter; on a GPU the same code fills Triton's compile cache)."""

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


# A failing call (IDConv without its kernel bank and bias logits) and a small multiscale_dwconv call (x, the
# group weights and biases).
SMALL_CALLS = [
    {
        "op": "idconv",
        "config": "train 2x3x12x12 nchw",
        "args": [_spec([2, 4, 6, 5]), _spec([2, 2, 4, 3, 3])],
    },
    {
        "op": "multiscale_dwconv",
        "config": "train 1x3x20x20 nchw",
        "args": [_spec([1, 4, 5, 5]), [_spec([2, 1, 1, 1]), _spec([2, 1, 3, 3])], [_spec([2]), _spec([2])]],
    },
]


@pytest.fixture(scope="module")
def captured():
    """The calls of the accelerated TransXNet-T on a 2x3x32x32 input, training and eval, NCHW."""
    import transxnet

    with torch.device("meta"):
        model = transxnet.accelerated(transxnet.TransXNet("t"))
    return gpu_warmup.capture_calls(model, (2, 3, 32, 32))


def test_capture_records_each_distinct_call_of_training_and_inference(captured):
    train = [c for c in captured if c["config"] == "train 2x3x32x32 nchw"]
    infer = [c for c in captured if c["config"] == "eval 2x3x32x32 nchw"]
    assert len(train) + len(infer) == len(captured)
    assert {c["op"] for c in train} == {"idconv", "osra_attention", "ms_ffn_middle"}
    assert {c["op"] for c in infer} == {"idconv", "osra_attention", "ms_ffn_middle_eval"}
    # four stages of each op (calls repeat within a stage and are recorded once)
    assert sorted(c["args"][0]["tensor"]["shape"][1] for c in train if c["op"] == "idconv") == [24, 48, 112, 224]
    # gradients as the model asks for them: x of every training call, nothing in eval
    assert all(c["args"][0]["tensor"]["requires_grad"] for c in train)
    assert not any(a["tensor"]["requires_grad"] for c in infer for a in c["args"] if isinstance(a, dict))


def test_replayed_tensors_keep_the_captured_layout_and_valid_values():
    spec = {"shape": [2, 3, 4], "stride": [1, 8, 2], "offset": 5, "dtype": "float32", "requires_grad": True}
    t = gpu_warmup._tensor(spec, torch.float16, torch.device("cpu"))
    assert t.shape == (2, 3, 4) and t.stride() == (1, 8, 2) and t.storage_offset() == 5
    assert t.dtype == torch.float16 and t.requires_grad and bool(((t >= 0.5) & (t <= 1.5)).all())


@requires_triton
@pytest.mark.parametrize("precision", ["fp32", "tf32", "amp"])
def test_warm_replays_every_captured_call_on_triton(captured, precision, monkeypatch):
    ran = []
    real = gpu_warmup.replay
    monkeypatch.setattr(gpu_warmup, "replay", lambda call, *a: (ran.append(call["op"]), real(call, *a)))
    done, failures = gpu_warmup.warm(captured, [precision], jobs=1, device="cpu", backend="triton")
    assert failures == [] and done == len(captured) and ran == [c["op"] for c in captured]


def test_tf32_replays_the_fp32_calls_with_tf32_allowed(monkeypatch):
    """`tf32` replays each call's tensors in fp32 with TF32 allowed for fp32 matmuls (what OSRA's kernels follow),
    `fp32` without; the setting is restored after each call."""
    seen = []

    def recording_call(op, args, inputs):
        dtypes = {t.dtype for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)}
        seen.append((torch.get_float32_matmul_precision(), dtypes))

    monkeypatch.setattr(gpu_warmup, "run_call", recording_call)
    done, failures = gpu_warmup.warm(SMALL_CALLS[1:], ["tf32", "fp32"], jobs=1, device="cpu", backend="reference")
    assert (done, failures) == (2, [])
    assert seen == [("high", {torch.float32}), ("highest", {torch.float32})]
    assert torch.get_float32_matmul_precision() == "highest"


def test_a_failing_call_is_reported_and_the_others_still_run():
    done, failures = gpu_warmup.warm(SMALL_CALLS, ["fp32"], jobs=2, device="cpu", backend="reference")
    assert done == 1 and len(failures) == 1 and failures[0].startswith("idconv fp32 train 2x3x12x12 nchw")


def test_amp_replay_builds_channel_slices_in_half_and_leaves_dense_tensors_to_the_ops_autocast(captured):
    dtype_of = gpu_warmup.replay_dtypes("amp", torch.device("cpu"))
    idconv = next(c for c in captured if c["op"] == "idconv")
    middle = next(c for c in captured if c["op"] == "ms_ffn_middle")
    # IDConv's x is a channel half of the block's map (the model's x.chunk(2, dim=1)): a view with gaps, which
    # under autocast arrives in half precision with its own strides
    assert dtype_of(idconv["args"][0]["tensor"]) == torch.bfloat16
    # the MS-FFN map and every BatchNorm tensor are dense: fp32 here, cast (or not) by the op itself
    assert dtype_of(middle["args"][0]["tensor"]) == torch.float32
    assert all(dtype_of(a["tensor"]) == torch.float32 for a in middle["args"][3:7] if isinstance(a, dict))
    assert gpu_warmup.replay_dtypes("fp16", torch.device("cpu"))(idconv["args"][0]["tensor"]) == torch.float16
