"""The eager model: architecture, state-dict layout, shapes, input checks (timm: tests/test_timm.py)."""

import pytest
import torch
from parity import manifest

import transxnet

VARIANTS = [(a, ff) for a in "tsb" for ff in (False, True)]


@pytest.mark.parametrize("arch,fork_feat", VARIANTS)
def test_state_dict_matches_released_manifest(arch, fork_feat):
    expected = manifest()[f"transxnet_{arch}" + ("_features" if fork_feat else "")]
    sd = transxnet.TransXNet(arch, fork_feat=fork_feat).state_dict()
    assert list(sd) == list(expected), "keys or their order differ from the released layout"
    for key, shape in expected.items():
        assert list(sd[key].shape) == shape, key


@pytest.mark.parametrize("arch,millions", [("t", 12.83), ("s", 26.86), ("b", 48.01)])
def test_parameter_count(arch, millions):
    model = transxnet.MODELS[f"transxnet_{arch}"]()
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) <= 0.01, count


def test_init_follows_release():
    m = transxnet.transxnet_t()
    blk = m.network[0][0]
    assert torch.all(blk.layer_scale_1.weight == 1e-5) and torch.all(blk.layer_scale_1.bias == 0)
    assert all(torch.all(p == 0) for p in m.relative_pos_enc)
    w = blk.mlp.fc1[0].weight
    # trunc_normal_(std=.02) with the default absolute bounds of +-2, as timm's and the released code's
    assert 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 2e-3
    assert torch.all(blk.pos_embed.bias == 0)
    assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)


def test_drop_path_schedule():
    m = transxnet.TransXNet("t", drop_path_rate=0.2)
    blocks = [b for idx in m.stage_indices for b in m.network[idx]]
    rates = [getattr(b.drop_path, "p", 0.0) for b in blocks]
    expected = [0.2 * j / (len(blocks) - 1) for j in range(len(blocks))]
    assert rates == pytest.approx(expected)


@pytest.mark.parametrize("size", [(224, 224), (160, 224), (257, 193), (64, 96), (33, 47)])
def test_shapes_any_input_size(size):
    torch.manual_seed(0)
    m = transxnet.transxnet_t(num_classes=10).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, *size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_fork_feat_shapes_and_strides():
    torch.manual_seed(0)
    m = transxnet.transxnet_t(fork_feat=True).eval()
    with torch.no_grad():
        outs = m(torch.randn(2, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 48, 32, 24), (2, 96, 16, 12), (2, 224, 8, 6), (2, 448, 4, 3)]
    # each map is GroupNorm(1)-normalised: per-sample mean 0, var 1 before the affine (affine is identity at init)
    for o in outs:
        assert o.mean(dim=(1, 2, 3)).abs().max() < 1e-4


def test_forward_features_and_head_compose():
    torch.manual_seed(0)
    m = transxnet.transxnet_t(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 448, 2, 2)
        torch.testing.assert_close(m.forward_head(feats), m(x), rtol=0, atol=0)
        assert m.forward_head(feats, pre_logits=True).shape == (2, 448)


def test_train_step_batch_one_and_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    ref = transxnet.TransXNet("t", num_classes=5)
    ckpt = transxnet.TransXNet("t", num_classes=5, grad_checkpoint=True, checkpoint_stage=(3, 3, 9, 3))
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in (ref, ckpt):
        m.train()
        m(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert (
        sum(
            isinstance(b, torch.nn.Module) and b.grad_checkpoint
            for b in ckpt.modules()
            if hasattr(b, "grad_checkpoint")
        )
        == 18
    )
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)
    # the backward-time recomputation does not update the BatchNorm statistics a second time
    for (n, b0), b1 in zip(ref.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("accelerated", [False, True], ids=["eager", "accelerated"])
def test_training_on_a_batch_of_one_raises_at_the_entry(accelerated):
    """IDConv's BatchNorm sees one value per channel and sample: training on a batch of 1 is refused before any
    layer runs, with a message about the batch; eval, or the IDConv BatchNorms in eval while the rest trains
    (detection frameworks' norm_eval), run at batch 1."""
    torch.manual_seed(0)
    arch = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2))
    m = transxnet.TransXNet(arch, num_classes=3)
    if accelerated:
        m = transxnet.accelerated(m)
    entered = []
    m.patch_embed.register_forward_pre_hook(lambda *_: entered.append(True))
    x = torch.randn(1, 3, 64, 64)
    m.train()
    with pytest.raises(ValueError, match="batch"):
        m(x)
    assert not entered, "the check must come before the first layer"
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 3)  # batch 2 trains
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
    m.train()
    for module in m.modules():
        if isinstance(module, transxnet.model.IDConv):
            module.proj[0].bn.eval()
    out = m(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and out.shape == (1, 3)
    assert m.network[0][0].mlp.norm.training  # the other BatchNorms still train


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.randn(3, 64, 64), "4-D"),
        (torch.randn(1, 4, 64, 64), "3 input channels"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "floating-point"),
        (torch.randn(1, 3, 3, 64), "too small for the stem"),
        (torch.randn(1, 3, 64, 64, dtype=torch.float64), "dtype"),
        (torch.randn(0, 3, 64, 64), "empty"),
    ],
)
def test_bad_input_raises_value_error(bad, message):
    m = transxnet.transxnet_t()
    with pytest.raises(ValueError, match=message):
        m(bad)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown TransXNet arch"):
        transxnet.TransXNet("xl")
    with pytest.raises(ValueError, match="checkpoint_stage"):
        transxnet.TransXNet("t", checkpoint_stage=(1, 1))


def test_custom_arch_dict():
    m = transxnet.TransXNet(
        dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 2, 2)), num_classes=3
    ).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
