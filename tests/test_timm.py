"""timm integration: registration with pretrained cfgs, checkpoint loading through timm, feature extraction.

timm is a test dependency (scripts/setup_env.sh installs it): a missing timm fails here, it does not skip.
"""

import pytest
import timm
import torch
from parity import fill_deterministic

import transxnet
from transxnet.timm_models import TimmTransXNet

CROP_PCT = {"t": 0.9, "s": 0.9, "b": 0.95}


@pytest.mark.parametrize("arch", ["t", "s", "b"])
def test_pretrained_cfg_of_each_model(arch):
    name = f"transxnet_{arch}"
    assert f"{name}.in1k" in timm.list_models(name, pretrained=True)
    cfg = timm.models.get_pretrained_cfg(f"{name}.in1k").to_dict()
    assert cfg["url"] == f"https://github.com/LMMMEng/TransXNet/releases/download/v1.0/transx-{arch}.pth.tar"
    assert cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == CROP_PCT[arch] and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["first_conv"] == "patch_embed.proj.conv" and cfg["classifier"] == "classifier.2"
    model = timm.create_model(name)
    assert isinstance(model, TimmTransXNet) and model.pretrained_cfg["tag"] == "in1k"
    # the cfg's module names exist in the model
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["crop_pct"] == CROP_PCT[arch] and data_cfg["input_size"] == (3, 224, 224)


@pytest.fixture(scope="module")
def released_t():
    return fill_deterministic(transxnet.transxnet_t()).state_dict()


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "state_dict_ema", "module_prefix"])
def test_timm_loads_each_released_checkpoint_format(tmp_path, released_t, wrap):
    state = {"module." + k: v for k, v in released_t.items()} if wrap == "module_prefix" else dict(released_t)
    obj = state if wrap in ("raw", "module_prefix") else {wrap: state}
    path = tmp_path / "transx-t.pth.tar"
    torch.save(obj, path)
    model = timm.create_model("transxnet_t.in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = model.state_dict()
    assert list(own) == list(released_t)
    assert all(torch.equal(own[k], v) for k, v in released_t.items())


def test_checkpoint_filter_on_a_loaded_url_checkpoint(released_t):
    """The URL path hands the filter the file's raw content (wrapped, prefixed)."""
    from transxnet.timm_models import checkpoint_filter_fn

    model = timm.create_model("transxnet_t")
    state = checkpoint_filter_fn({"state_dict": {"module." + k: v for k, v in released_t.items()}}, model)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()["classifier.2.weight"], released_t["classifier.2.weight"])


def test_timm_pretrained_with_another_class_count_or_image_size(tmp_path, released_t):
    path = tmp_path / "transx-t.pth.tar"
    torch.save({"state_dict": released_t}, path)
    model = timm.create_model(
        "transxnet_t.in1k", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert model.get_classifier().out_channels == 10
    assert torch.equal(model.state_dict()["network.0.0.pos_embed.weight"], released_t["network.0.0.pos_embed.weight"])
    with pytest.warns(UserWarning, match="bicubic"):
        model = timm.create_model(
            "transxnet_t.in1k", pretrained=True, image_size=256, pretrained_cfg_overlay=dict(file=str(path))
        )
    assert model.relative_pos_enc[0].shape[-2:] == (64 * 64, 8 * 8)


def test_features_only_through_forward_intermediates(tmp_path, released_t):
    path = tmp_path / "transx-t.pth.tar"
    torch.save(released_t, path)
    feats = timm.create_model(
        "transxnet_t.in1k", pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    assert feats.feature_info.channels() == [48, 96, 224, 448]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    ref = transxnet.transxnet_t(pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = feats(x)
        final = ref.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 48, 16, 24), (2, 96, 8, 12), (2, 224, 4, 6), (2, 448, 2, 3)]
    torch.testing.assert_close(maps[-1], final)

    # out_indices prunes the later stages; the kept maps are unchanged
    two = timm.create_model(
        "transxnet_t.in1k",
        pretrained=True,
        features_only=True,
        out_indices=(0, 1),
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    assert two.feature_info.channels() == [48, 96] and len(two.model.network) == 3
    with torch.no_grad():
        kept = two(x)
    for a, b in zip(kept, maps[:2]):
        torch.testing.assert_close(a, b)


def test_forward_intermediates_convention():
    model = timm.create_model("transxnet_t").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=2)
        assert len(inter) == 2 and inter[-1].shape == (1, 448, 2, 2)
        torch.testing.assert_close(final, model.forward_features(x))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, model.classifier[0](final))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert early[0].shape == (1, 48, 16, 16)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_fork_feat_backbone_through_timm():
    model = timm.create_model("transxnet_s", fork_feat=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True), model(x))


def test_reset_classifier():
    model = timm.create_model("transxnet_t", num_classes=5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 448)
    model.reset_classifier(3)
    assert model.get_classifier().out_channels == 3 and model.num_classes == 3


def test_accelerated_on_timm_models():
    """accelerated() takes timm's models, the features_only wrapper included, with unchanged results."""
    torch.manual_seed(0)
    model = timm.create_model("transxnet_t").eval()
    feats = timm.create_model("transxnet_t", features_only=True).eval()
    feats.model.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager_logits, eager_maps = model(x), feats(x)
        assert transxnet.accelerated(model) is model and transxnet.is_accelerated(model)
        assert transxnet.accelerated(feats) is feats and transxnet.is_accelerated(feats)
        fast_logits, fast_maps = model(x), feats(x)
    torch.testing.assert_close(fast_logits, eager_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast_maps, eager_maps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    transxnet.revert(feats)
    assert not transxnet.is_accelerated(feats)
