"""transxnet.accelerated(): same state dict, same math as eager, compile/AMP/DDP ready."""

import copy
import dataclasses

import pytest
import torch
import torch.multiprocessing as mp

import transxnet
import transxnet_kernels as tk
from helpers import DEVICE, assert_rel_close, rel_err, requires_cpp, requires_triton

SMALL_ARCH = dict(layers=(1, 1, 2, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2), num_groups=(2, 2, 3, 2))


def perturbed(model):
    """Give every norm, bias and layer scale non-trivial values (fresh ones are 1/0/1e-5)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.add_(torch.randn(t.shape, generator=g) * (0.2 if t.dim() <= 1 or "layer_scale" in name else 0.02))
    return model


def eager_and_accelerated(arch="t", **kwargs):
    torch.manual_seed(0)
    eager = perturbed(transxnet.TransXNet(arch, **kwargs))
    return eager, transxnet.accelerated(copy.deepcopy(eager))


@pytest.mark.parametrize("arch", ["t", "s"])
def test_train_step_matches_eager(arch):
    eager, fast = eager_and_accelerated(arch, num_classes=10)
    x = torch.randn(2, 3, 64, 96)
    outs = []
    for m in (eager, fast):
        m.train()
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
    assert_rel_close(outs[1], outs[0], 1e-5, "logits")
    for (name, p0), p1 in zip(eager.named_parameters(), fast.parameters()):
        assert_rel_close(p1.grad, p0.grad, 1e-5, f"grad {name}")
    for (name, b0), b1 in zip(eager.named_buffers(), fast.buffers()):
        assert_rel_close(b1.float(), b0.float(), 1e-6, f"buffer {name}")  # BN stats, IDConv's double update included


@pytest.mark.parametrize("arch", ["t", "s"])
def test_eval_matches_eager(arch):
    eager, fast = eager_and_accelerated(arch, num_classes=10)
    eager.eval(), fast.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert_rel_close(fast(x), eager(x), 1e-5, "eval logits (BN folded)")


def test_fork_feat_eval_and_train_match_eager():
    eager, fast = eager_and_accelerated("t", fork_feat=True)
    x = torch.randn(2, 3, 96, 64)  # training BN on IDConv's 1x1 pooled map needs batch > 1, as released
    for mode in ("train", "eval"):
        eager.train(mode == "train"), fast.train(mode == "train")
        with torch.no_grad():
            for i, (a, b) in enumerate(zip(fast(x), eager(x))):
                assert_rel_close(a, b, 1e-5, f"{mode} map {i}")


def test_state_dict_unchanged_and_revert_restores_eager():
    eager, fast = eager_and_accelerated("t", num_classes=10)
    sd0, sd1 = eager.state_dict(), fast.state_dict()
    assert list(sd0) == list(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert transxnet.is_accelerated(fast) and not transxnet.is_accelerated(eager)
    fresh = transxnet.accelerated("transxnet_t", num_classes=10)
    fresh.load_state_dict(sd0, strict=True)  # a released checkpoint loads strictly after acceleration
    transxnet.revert(fresh)
    assert not transxnet.is_accelerated(fresh)
    x = torch.randn(1, 3, 64, 64)
    eager.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), eager(x))


def test_revert_gives_back_the_original_modules_and_parameters():
    """revert(accelerated(m)) is m as it was: every module's type, the state dict's keys, order and values, and the
    very same parameter and buffer objects (nothing re-created or copied)."""
    torch.manual_seed(0)
    model = perturbed(transxnet.TransXNet(SMALL_ARCH, num_classes=3))
    types = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(name, p) for name, p in model.named_parameters()]
    buffers = [(name, b) for name, b in model.named_buffers()]
    fast = transxnet.accelerated(model)
    assert fast is model and transxnet.is_accelerated(model)
    assert [type(m) for _, m in model.named_modules()] != [t for _, t in types]
    back = transxnet.revert(fast)
    assert back is model and not transxnet.is_accelerated(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert not hasattr(model, "_rpe_cache")
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())
    assert all(a is b and n == m for (n, a), (m, b) in zip(model.named_parameters(), params))
    assert len(list(model.parameters())) == len(params)
    assert all(a is b and n == m for (n, a), (m, b) in zip(model.named_buffers(), buffers))


def test_accelerated_by_name_with_pretrained(tmp_path):
    torch.manual_seed(0)
    state = perturbed(transxnet.transxnet_t()).state_dict()
    torch.save({"state_dict_ema": state}, tmp_path / "w.pth")
    fast = transxnet.accelerated("transxnet_t", pretrained=str(tmp_path / "w.pth"))
    assert transxnet.is_accelerated(fast)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="unknown model"):
        transxnet.accelerated("transxnet_xl")
    with pytest.raises(TypeError, match="only apply when a model name"):
        transxnet.accelerated(fast, num_classes=3)


def test_relative_pos_enc_resized_once_per_stage_and_cache_tracks_updates(monkeypatch):
    import transxnet.fused as fused
    import transxnet.model as model_module

    eager, fast = eager_and_accelerated("t", num_classes=10)
    eager.eval(), fast.eval()
    calls = []
    real = model_module.resize_relative_pos_enc

    def counting_resize(bias, n, m):
        if tuple(bias.shape[-2:]) != (n, m):  # count real resizes, not the blocks' no-op checks
            calls.append((n, m))
        return real(bias, n, m)

    # the accelerated model resizes per stage (transxnet.fused); each OSRA's own resize (transxnet.model) then
    # sees the right size and is a no-op: both are counted
    monkeypatch.setattr(fused, "resize_relative_pos_enc", counting_resize)
    monkeypatch.setattr(model_module, "resize_relative_pos_enc", counting_resize)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fast(x)
        assert len(calls) == 4  # one per stage
        fast(x)
        assert len(calls) == 4  # cached for this input size
        fast.relative_pos_enc[1].mul_(2.0)  # an update bumps the version: the cache must not serve stale biases
        eager.relative_pos_enc[1].mul_(2.0)
        out = fast(x)
        assert len(calls) == 5
        assert_rel_close(out, eager(x), 1e-5, "after bias update")
        y = torch.randn(1, 3, 96, 64)
        assert_rel_close(fast(y), eager(y), 1e-5, "other input size")


def small_eval_pair():
    torch.manual_seed(0)
    eager = perturbed(transxnet.TransXNet(SMALL_ARCH, num_classes=3)).eval()
    return eager, transxnet.accelerated(copy.deepcopy(eager))


def test_inference_constants_follow_every_parameter_and_buffer():
    """Eval without gradients keeps folded (and on CPU prepacked) weights between calls: an in-place update
    of any one state tensor, as load_state_dict or an optimizer makes, must reach the next output."""
    eager, fast = small_eval_pair()
    x = torch.randn(1, 3, 64, 64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        assert_rel_close(fast(x), eager(x), 1e-5, "first call")
        for (name, t0), t1 in zip(eager.state_dict().items(), fast.state_dict().values()):
            if not t0.is_floating_point():
                continue
            delta = torch.rand(t0.shape, generator=g) * 0.5 + 0.25  # positive: running_var stays valid
            t0.mul_(delta), t1.mul_(delta)
            assert_rel_close(fast(x), eager(x), 1e-5, f"after updating {name}")


def test_stage_bias_is_key_padded_as_an_inference_constant_on_gpus(monkeypatch):
    """On a device whose OSRA kernels read key-padded biases (KEY_PADDED_DEVICES: CUDA; CPU stands in here), the
    accelerated model's stage bias, kept as an inference constant, views a -inf-padded copy of the resized values
    (`key_padded_bias`), and the model's output is unchanged; with gradients recorded, or on another device, it is
    the plain resized bias."""
    import transxnet.fused as fused
    from transxnet.model import resize_relative_pos_enc
    from transxnet_kernels.layout import key_padded_rows

    stage_input = torch.empty(1, 16, 16, 16)  # stage 1 of a 64x64 image: 256 queries, 2x2 = 4 keys (sr 8)
    _, fast = small_eval_pair()
    with torch.no_grad():
        assert key_padded_rows(fast.stage_relative_pos_enc(0, stage_input)) == 0  # CPU is not a key-padded device
    monkeypatch.setattr(fused, "KEY_PADDED_DEVICES", {"cpu"})
    eager, fast = small_eval_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        bias = fast.stage_relative_pos_enc(0, stage_input)
        assert key_padded_rows(bias) == fused.KEY_PADDED_KEYS and fast.stage_relative_pos_enc(0, stage_input) is bias
        assert torch.equal(bias, resize_relative_pos_enc(fast.relative_pos_enc[0], 256, 4))
        assert_rel_close(fast(x), eager(x), 1e-5, "eval with key-padded stage biases")
    assert key_padded_rows(fast.stage_relative_pos_enc(0, stage_input)) == 0  # recording gradients: built per call


def test_inference_constants_are_reused_and_follow_replacement_moves_and_revert(monkeypatch):
    import transxnet.fused as fused

    eager, fast = small_eval_pair()
    built = []
    real_init = fused.FoldedConv.__init__

    def counting_init(self, *args):
        built.append(1)
        real_init(self, *args)

    monkeypatch.setattr(fused.FoldedConv, "__init__", counting_init)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fast(x)
        first = len(built)
        assert first > 0
        assert_rel_close(fast(x), eager(x), 1e-5, "cached")
        assert len(built) == first, "a second call must reuse every folded conv"
    # a parameter replaced by a new tensor (not updated in place) is seen
    conv = fast.network[0][0].mlp.fc2[0]
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 1.5)
    eager.network[0][0].mlp.fc2[0].weight.data.mul_(1.5)
    with torch.no_grad():
        assert_rel_close(fast(x), eager(x), 1e-5, "replaced parameter")
        # moved to another dtype (same parameter objects, new storages)
        fast.double(), eager.double()
        out = fast(x.double())
        assert out.dtype == torch.float64
        assert_rel_close(out, eager(x.double()), 1e-10, "fp64 after .double()")
    held = [m for m in fast.modules() if m in fused._CONSTANTS]
    assert held, "inference must have cached constants"
    copied = copy.deepcopy(fast)  # the cache lives outside the modules: nothing opaque is copied
    with torch.no_grad():
        assert torch.equal(copied(x.double()), out)
    transxnet.revert(fast)
    assert not any(m in fused._CONSTANTS for m in fast.modules()), "revert drops the cached constants"


def _fingerprints():
    """The state fingerprints a checked forward may use: the C++ walk (where the extension is built), Python's."""
    import transxnet.fused as fused

    native = pytest.param(
        "native",
        marks=pytest.mark.skipif(fused._native_state_fingerprint is None, reason="the C++ extension is not built"),
    )
    return [native, "python"]


def _use_fingerprint(monkeypatch, which: str):
    import transxnet.fused as fused

    if which == "python":
        monkeypatch.setattr(fused, "_native_state_fingerprint", None)


@pytest.mark.parametrize("which", _fingerprints())
def test_state_fingerprint_sees_every_change_of_parameters_and_buffers(monkeypatch, which):
    """Equal while nothing changes; different after an in-place update (version), a `.data` swap (address), a
    replaced parameter or buffer, a replaced or added submodule; an inference-mode parameter raises RuntimeError
    (no version counter: the checked forward then checks at each use)."""
    import transxnet.fused as fused

    _use_fingerprint(monkeypatch, which)
    model = transxnet.TransXNet("t", num_classes=10).eval()
    block = model.network[0][0]
    changes = [
        lambda: block.mlp.fc2[1].running_var.mul_(1.5),
        lambda: setattr(block.pos_embed.weight, "data", block.pos_embed.weight.data.clone()),
        lambda: setattr(block.pos_embed, "weight", torch.nn.Parameter(block.pos_embed.weight.detach().clone())),
        lambda: setattr(block.mlp.norm, "running_mean", block.mlp.norm.running_mean.clone()),
        lambda: setattr(block.mlp, "fc2", copy.deepcopy(block.mlp.fc2)),
        lambda: block.mlp.add_module("extra", torch.nn.Linear(2, 2)),
    ]
    last = fused.state_fingerprint(model)
    assert fused.state_fingerprint(model) == last
    for i, change in enumerate(changes):
        change()
        now = fused.state_fingerprint(model)
        assert now != last, f"change {i} not seen"
        assert fused.state_fingerprint(model) == now
        last = now
    with torch.inference_mode():
        block.layer_scale_1.bias = torch.nn.Parameter(torch.zeros_like(block.layer_scale_1.bias))
    with pytest.raises(RuntimeError):
        fused.state_fingerprint(model)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="checked forwards are oneDNN inference only")
@pytest.mark.parametrize("which", _fingerprints())
def test_checked_forward_serves_constants_without_reading_their_sources(monkeypatch, which):
    """CPU inference checks the model's state once per forward: with nothing changed since the last forward no
    constant reads its sources; an in-place update, a replaced parameter or a direct submodule call (no checked
    forward) are still seen."""
    import transxnet.fused as fused

    _use_fingerprint(monkeypatch, which)
    eager, fast = small_eval_pair()
    reads = []
    real_state_of = fused.state_of

    def counting_state_of(*sources):
        reads.append(1)
        return real_state_of(*sources)

    monkeypatch.setattr(fused, "state_of", counting_state_of)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(fast(x), eager(x), 1e-5, "first forward")
        assert reads, "the first forward checks every constant"
        reads.clear()
        assert_rel_close(fast(x), eager(x), 1e-5, "second forward")
        assert not reads, "an unchanged model's constants are served without reading their sources"
        for step, (a, b) in enumerate([(eager.network[2][0].mlp.fc2[1], fast.network[2][0].mlp.fc2[1])] * 2):
            a.running_var.mul_(1.5), b.running_var.mul_(1.5)  # in place: the fingerprint's version changes
            assert_rel_close(fast(x), eager(x), 1e-5, f"after update {step}")
            assert reads, "a changed model checks its constants again"
            reads.clear()
        conv = fast.network[0][0].token_mixer.proj[3]
        conv.weight = torch.nn.Parameter(conv.weight.detach() * 0.5)
        eager.network[0][0].token_mixer.proj[3].weight.mul_(0.5)
        assert_rel_close(fast(x), eager(x), 1e-5, "replaced parameter")
        block_in = torch.randn(1, 16, 16, 16).contiguous(memory_format=torch.channels_last)
        eager.network[0][0].pos_embed.weight.mul_(2.0), fast.network[0][0].pos_embed.weight.mul_(2.0)
        assert_rel_close(fast.network[0][0](block_in), eager.network[0][0](block_in), 1e-5, "block called alone")


def test_eval_with_gradients_reaches_parameters_and_input():
    """Eval mode with autograd on (saliency maps, fine-tuning a frozen-BN backbone) builds folded weights per
    call from the live parameters, so gradients reach the parameters and the input as in eager (fp64: any
    difference is a bug, not rounding)."""
    eager, fast = (m.double() for m in small_eval_pair())
    grads = []
    for m in (eager, fast):
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        x.requires_grad_()
        m(x).square().sum().backward()
        grads.append((x.grad, [p.grad for p in m.parameters()]))
    assert_rel_close(grads[1][0], grads[0][0], 1e-10, "input grad")
    for (name, _), g0, g1 in zip(eager.named_parameters(), grads[0][1], grads[1][1]):
        assert_rel_close(g1, g0, 1e-10, f"grad {name}")


def test_drop_path_and_grad_checkpointing_match_eager():
    torch.manual_seed(0)
    kw = dict(num_classes=5, drop_path_rate=0.3, grad_checkpoint=True, checkpoint_stage=(1, 1, 2, 1))
    eager = perturbed(transxnet.TransXNet(SMALL_ARCH, **kw)).train()
    fast = transxnet.accelerated(copy.deepcopy(eager))
    x = torch.randn(4, 3, 64, 64)
    grads = []
    for m in (eager, fast):
        torch.manual_seed(123)  # same drop-path masks
        m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for g0, g1 in zip(*grads):
        assert_rel_close(g1, g0, 1e-5, "grad with drop path + checkpointing")


def test_channels_last_input():
    _, fast = eager_and_accelerated("t", num_classes=10)
    fast.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert_rel_close(fast(x.to(memory_format=torch.channels_last)), fast(x), 1e-5, "channels_last")
        fast_cl = copy.deepcopy(fast).to(memory_format=torch.channels_last)
        assert_rel_close(fast_cl(x.to(memory_format=torch.channels_last)), fast(x), 1e-5, "channels_last model")


def test_autocast_bfloat16_cpu():
    eager, fast = eager_and_accelerated(SMALL_ARCH, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    out.float().sum().backward()
    with torch.no_grad():
        ref = eager.train()(x)
    assert rel_err(out.float(), ref) < 5e-2
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


@requires_triton
def test_autocast_inference_casts_the_weights_once(monkeypatch):
    """Eval under autocast without gradients: ms_ffn_middle_eval gets the multi-scale weights and idconv its weight
    bank already in the autocast dtype, the same tensors at every forward (cast once, kept as inference constants:
    so the ops do not cast them per call, nor the Triton ms_ffn_middle_eval repack them), and new ones after a
    weight changes."""
    torch.manual_seed(0)
    arch = dict(SMALL_ARCH, layers=(1, 1, 1, 1))
    fast = transxnet.accelerated(perturbed(transxnet.TransXNet(arch, num_classes=4))).eval().to(DEVICE)
    triton_eval, triton_idconv = tk.ms_ffn_middle_eval._impls["triton"], tk.idconv._impls["triton"]
    passed, banks = [], []

    def recording_eval(*args):
        passed.append((args[3], args[4]))
        return triton_eval.fn(*args)

    def recording_idconv(*args):
        banks.append((args[2], args[4]))
        return triton_idconv.fn(*args)

    monkeypatch.setitem(tk.ms_ffn_middle_eval._impls, "triton", dataclasses.replace(triton_eval, fn=recording_eval))
    monkeypatch.setitem(tk.idconv._impls, "triton", dataclasses.replace(triton_idconv, fn=recording_idconv))
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    outs = []
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16), tk.use_backend("triton"):
        for step in range(3):
            if step == 2:
                fast.network[0][0].mlp.dwconv.proj[1].weight.mul_(0.5)
            outs.append(fast(x))
    blocks = len(passed) // 3
    assert blocks == 4
    first, second, third = passed[:blocks], passed[blocks : 2 * blocks], passed[2 * blocks :]
    for (w1, b1), (w2, b2) in zip(first, second):
        assert all(t.dtype == torch.bfloat16 for t in (*w1, *b1))
        assert all(a is b for a, b in zip((*w1, *b1), (*w2, *b2)))
    assert third[0][0][1] is not first[0][0][1] and all(a is b for a, b in zip(third[1][0], first[1][0]))
    assert len(banks) == 3 * blocks
    for (w1, b1), (w2, b2) in zip(banks[:blocks], banks[blocks : 2 * blocks]):
        assert w1.dtype == b1.dtype == torch.bfloat16 and w1 is w2 and b1 is b2
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph_reference_backend_matches_eager_without_batch_recompiles(mode):
    import transxnet_kernels as tk

    torch.manual_seed(0)
    eager = perturbed(transxnet.TransXNet(SMALL_ARCH, num_classes=3)).train(mode == "train")
    fast = transxnet.accelerated(copy.deepcopy(eager))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fast, backend=counting_backend, fullgraph=True)
    with tk.use_backend("reference"):
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 64, 96)
            torch._dynamo.mark_dynamic(x, 0)
            with torch.no_grad():
                out = compiled(x)
                ref = eager(x)
            assert_rel_close(out, ref, 1e-5, f"compiled batch {batch}")
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled: batch size changes must not recompile"


def test_inductor_freezing_with_cpp_wrapper_cpu_inference_matches_eager():
    """The README's lowest-latency CPU recipe: torch.compile of the accelerated model under inductor's freezing and
    C++ wrapper config, which folds the weights into constants and calls the graph's kernels (the transxnet_kernels
    custom ops among them, on the backend auto picks) from generated C++. Its outputs must be eager's."""
    import torch._inductor.config

    eager, fast = small_eval_pair()
    x = torch.randn(1, 3, 64, 96)
    torch._dynamo.reset()
    compiled = torch.compile(fast)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True, cpp_wrapper=True):
        ref = eager(x)
        assert_rel_close(compiled(x), ref, 1e-5, "first call")
        assert_rel_close(compiled(x), ref, 1e-5, "second call")
    torch._dynamo.reset()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    from ddp_worker import ddp_step

    world = 2
    batch = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mp.spawn(ddp_step, args=(world, str(tmp_path / "init"), str(tmp_path), SMALL_ARCH, batch), nprocs=world, join=True)
    ddp_grads = [torch.load(tmp_path / f"grads{r}.pt") for r in range(world)]

    # Without SyncBatchNorm each rank normalises its own shard, so the DDP gradient is the mean
    # of the single-process gradients of the shards.
    single = []
    for shard in batch.chunk(world):
        torch.manual_seed(0)
        model = transxnet.accelerated(transxnet.TransXNet(SMALL_ARCH, num_classes=3)).train()
        model(shard).square().mean().backward()
        single.append({n: p.grad for n, p in model.named_parameters()})
    for name in single[0]:
        expected = (single[0][name] + single[1][name]) / 2
        for rank in range(world):
            assert_rel_close(ddp_grads[rank][name], expected, 1e-5, f"rank {rank} grad {name}")


@requires_cpp
def test_cpu_inference_runs_the_cpp_kernels_in_channels_last(monkeypatch):
    from transxnet_kernels.cpp import ops as cpp_ops

    # Count the C++ entry points themselves (torch 2.14's profiler omits custom ops with list arguments).
    ran = {}

    class CountingExtension:
        def __getattr__(self, name):
            kernel = getattr(real_extension, name)

            def counted(*args):
                ran[name] = ran.get(name, 0) + 1
                return kernel(*args)

            return counted

    real_extension = cpp_ops._C
    monkeypatch.setattr(cpp_ops, "_C", CountingExtension())
    _, fast = eager_and_accelerated("t", num_classes=10)
    fast.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fast(x)
    for kernel in (
        "idconv_eval",  # IDConv from its input: pooling, proj and the conv in one call
        "osra_attention_forward",
        "ms_ffn_middle_eval_overwriting",  # the MS-FFN middle, which may take fc1's output storage
        "multiscale_dwconv_forward",
        "strided_dwconv_forward",  # OSRA's reductions
        "gelu_",  # the GELUs after matmuls and depthwise convs
    ):
        assert ran.get(kernel), f"{kernel} did not run; ran: {ran}"
    with torch.no_grad():
        feats = fast.forward_features(x)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    # The kernels run unchecked on this path, but still on the backend the user chose.
    ran.clear()
    with torch.no_grad(), tk.use_backend("reference"):
        on_reference = fast(x)
    assert not ran, f"the reference backend ran C++ kernels: {ran}"
    with torch.no_grad():
        assert_rel_close(fast(x), on_reference, 1e-5, "cpp vs reference backend")


@requires_cpp
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN inference paths need mkldnn")
def test_cpu_inference_middle_overwrites_fc1_output_and_matches_eager(monkeypatch):
    """At a batch of at least the thread count the MS-FFN middle's result takes fc1's output storage in every
    block, and the model's output is still eager's (nothing else reads fc1's output)."""
    from transxnet_kernels.cpp import ops as cpp_ops

    in_place = []
    real = cpp_ops.ms_ffn_middle_eval_overwriting

    def recording(x, *args):
        out = real(x, *args)
        in_place.append(out.data_ptr() == x.data_ptr())
        return out

    monkeypatch.setattr(cpp_ops, "ms_ffn_middle_eval_overwriting", recording)
    eager, fast = eager_and_accelerated("t", num_classes=10)
    eager.eval(), fast.eval()
    x = torch.randn(max(2, torch.get_num_threads()), 3, 64, 96)
    with torch.no_grad():
        out, expected = fast(x), eager(x)
    assert len(in_place) == sum(fast.arch["layers"]) and all(in_place), in_place
    assert_rel_close(out, expected, 1e-5, "accelerated vs eager")


def test_cpu_inference_feeds_every_conv_channels_last(monkeypatch):
    """On CPU inference every conv reads a channels_last map (any other layout costs a copy inside the conv):
    OSRA's input, a channel slice, is made channels_last once; its reduction's affine map and its attention
    output keep the layout, and so does the concatenation of the two halves."""
    from transxnet import fused

    seen = []
    folded_call = fused.FoldedConv.__call__

    def recording_call(self, x, gelu=False, affine=None):
        seen.append((tuple(self.weight.shape), x.is_contiguous(memory_format=torch.channels_last)))
        return folded_call(self, x, gelu, affine)

    monkeypatch.setattr(fused.FoldedConv, "__call__", recording_call)
    eager, fast = eager_and_accelerated("t", num_classes=10)
    eager.eval(), fast.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = fast(x)
    assert len(seen) > 100, f"only {len(seen)} conv calls recorded"
    not_channels_last = [shape for shape, ok in seen if not ok]
    assert not not_channels_last, f"{len(not_channels_last)} convs read other layouts: {not_channels_last[:5]}"
    with torch.no_grad():
        assert_rel_close(out, eager(x), 1e-5, "accelerated vs eager")


@requires_cpp
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN inference paths need mkldnn")
@pytest.mark.parametrize(
    "gelu,affine", [(False, False), (True, False), (True, True)], ids=["plain", "gelu", "gelu-affine"]
)
def test_cpu_inference_runs_small_convs_without_onednn(monkeypatch, gelu, affine):
    """On CPU inference a 1x1 conv of at most MATMUL_MAX_MACS runs as one matmul on the channels_last map's
    [pixels, channels] view (larger ones, and other backends' choices, as the prepacked oneDNN conv); a
    depthwise conv with stride 1 and 'same' padding runs the cpp multiscale_dwconv kernel, and other depthwise
    convs (strided, other padding) the cpp strided_dwconv kernel, unless the reference backend is chosen; the
    GELU after a matmul or a cpp kernel runs the cpp gelu_, not torch's. Each against F.conv2d (then GELU,
    then the affine map), output in channels_last."""
    import torch.nn.functional as F

    from transxnet import fused

    calls = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a: calls.append("addmm") or real_addmm(*a))
    real_pointwise = torch.ops.mkldnn._convolution_pointwise

    real_gelu = F.gelu
    monkeypatch.setattr(F, "gelu", lambda *a: calls.append("torch gelu") or real_gelu(*a))

    def run(conv, x):
        calls.clear()
        weight, bias = conv.weight.detach() * 1.5, conv.bias.detach() + 0.25  # as a fold would change them
        channels = conv.out_channels
        scale_shift = (torch.randn(1, channels, 1, 1), torch.randn(1, channels, 1, 1)) if affine else None
        folded = fused.FoldedConv(conv, weight, bias, x)
        out = folded(x, gelu=gelu, affine=scale_shift)
        expected = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        expected = real_gelu(expected) if gelu else expected
        expected = expected * scale_shift[0] + scale_shift[1] if affine else expected
        assert_rel_close(out, expected, 1e-5, f"{conv}")
        assert out.is_contiguous(memory_format=torch.channels_last)
        return list(calls)

    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(24, 40, 1)
    depthwise = torch.nn.Conv2d(24, 24, 5, padding=2, groups=24)
    strided = torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24)
    small = torch.randn(1, 24, 7, 9).contiguous(memory_format=torch.channels_last)
    torch_gelu = ["torch gelu"] if gelu else []
    with torch.no_grad():
        assert run(pointwise, small) == ["addmm"]
        with tk.use_backend("reference"):
            assert run(pointwise, small) == ["addmm"] + torch_gelu
        monkeypatch.setattr(fused.FoldedConv, "MATMUL_MAX_MACS", 7 * 9 * 24 * 40 - 1)
        assert run(pointwise, small) == []
        monkeypatch.setattr(
            torch.ops.mkldnn, "_convolution_pointwise", lambda *a: calls.append("onednn") or real_pointwise(*a)
        )
        assert run(pointwise, small) == ["onednn"]  # GELU as its post-op
        assert run(depthwise, small) == []  # the cpp kernels only
        assert run(strided, small) == []
        with tk.use_backend("reference"):
            assert run(depthwise, small) == ["onednn"]
            assert run(strided, small) == ["onednn"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN inference paths need mkldnn")
def test_cpu_inference_packs_conv_weights_per_input_shape(monkeypatch):
    """oneDNN's blocked weight layout depends on the input shape (weights packed for a 2x2-pixel input ran a
    14x14 3x3/2 conv ~50x slower): a FoldedConv prepacks its weight once per input shape, keeps the
    PACKED_SHAPES most recently used, and is right at every shape."""
    import torch.nn.functional as F

    from transxnet import fused

    packed_for = []
    real_reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(
        torch._C._nn, "mkldnn_reorder_conv2d_weight", lambda *a: packed_for.append(a[-1][-1]) or real_reorder(*a)
    )
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)
    weight, bias = conv.weight.detach() * 1.5, conv.bias.detach() + 0.25
    maps = {s: torch.randn(1, 16, s, s).contiguous(memory_format=torch.channels_last) for s in (2, 5, 6, 7, 8, 14)}
    with torch.no_grad():
        folded = fused.FoldedConv(conv, weight, bias, maps[2])
        assert folded.onednn
        for s in (2, 14, 2, 5, 6, 7, 8, 14):
            expected = F.conv2d(maps[s], weight, bias, stride=2, padding=1)
            assert_rel_close(folded(maps[s]), expected, 1e-5, f"{s}x{s} input")
    # 2 is reused while kept; 14 is dropped (least recently used) when the fifth shape arrives, packed again
    assert packed_for == [2, 14, 5, 6, 7, 8, 14]
    assert len(folded.packed) == fused.FoldedConv.PACKED_SHAPES


@requires_triton
@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
def test_accelerated_on_forced_triton_backend_matches_eager(mode, monkeypatch):
    """The whole model on the Triton kernels (the interpreter on CPU), in fp64 so that any
    difference is a bug, not rounding: the model's real strides (channel slices, transposed
    q/k/v views) and its BatchNorm bookkeeping; eval with gradients (ms_ffn_middle, which has a
    backward) and without (ms_ffn_middle_eval, forward-only)."""
    import transxnet_kernels as tk

    torch.manual_seed(0)
    arch = dict(SMALL_ARCH, layers=(1, 1, 1, 1))
    eager = perturbed(transxnet.TransXNet(arch, num_classes=4)).double().train(mode == "train")
    fast = transxnet.accelerated(copy.deepcopy(eager))
    x = torch.randn(2, 3, 32, 40, device=DEVICE, dtype=torch.float64)
    eager.to(DEVICE), fast.to(DEVICE)
    calls = []
    triton_eval = tk.ms_ffn_middle_eval._impls["triton"]

    def counting_eval(*args):
        calls.append(args[0].shape)
        return triton_eval.fn(*args)

    monkeypatch.setitem(tk.ms_ffn_middle_eval._impls, "triton", dataclasses.replace(triton_eval, fn=counting_eval))
    outs = []
    with torch.set_grad_enabled(mode != "inference"):
        with tk.use_backend("reference"):
            outs.append(eager(x))
        with tk.use_backend("triton"):
            outs.append(fast(x))
    assert_rel_close(outs[1], outs[0], 1e-10, f"{mode} logits")
    assert len(calls) == (4 if mode == "inference" else 0)  # one per block
    if mode == "train":
        for out in outs:
            (out * torch.linspace(-1, 1, out.numel(), device=DEVICE, dtype=out.dtype).view_as(out)).sum().backward()
        # Biases that feed a training BatchNorm have gradients that vanish analytically (pure
        # rounding noise on both sides): the floor is relative to the largest gradient.
        scale = max(p.grad.norm().item() for p in eager.parameters())
        for (name, p0), p1 in zip(eager.named_parameters(), fast.parameters()):
            diff = (p1.grad - p0.grad).norm().item()
            assert diff <= 1e-10 * p0.grad.norm().item() + 1e-13 * scale, f"grad {name}: diff {diff:.3e}"
        for (name, b0), b1 in zip(eager.named_buffers(), fast.buffers()):
            assert_rel_close(b1.double(), b0.double(), 1e-12, f"buffer {name}")
