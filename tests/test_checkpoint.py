"""Checkpoint loading: wrapper formats, prefixes, class-count changes, mismatches."""

import warnings

import pytest
import torch
from parity import fill_deterministic

import transxnet
from transxnet import CheckpointMismatchError, load_checkpoint


@pytest.fixture(scope="module")
def released_t():
    return fill_deterministic(transxnet.transxnet_t()).state_dict()


def assert_same_state(model, state):
    own = model.state_dict()
    assert list(own) == list(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "state_dict_ema", "module_prefix", "extras"])
def test_round_trip_through_each_wrapper(tmp_path, released_t, wrap):
    state = dict(released_t)
    if wrap == "module_prefix":
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}}
    elif wrap == "extras":
        obj = {"state_dict": state, "epoch": 300, "arch": "transxnet_t", "optimizer": {"lr": [0.1]}}
    elif wrap == "raw":
        obj = state
    else:
        obj = {wrap: state}
    path = tmp_path / "ckpt.pth.tar"
    torch.save(obj, path)
    model = transxnet.transxnet_t(pretrained=str(path))
    assert_same_state(model, released_t)


def test_checkpoint_with_pickled_objects_loads_with_warning(tmp_path, released_t):
    import argparse

    path = tmp_path / "train.pth.tar"
    torch.save({"state_dict": released_t, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.warns(UserWarning, match="weights_only"):
        model = transxnet.transxnet_t(pretrained=str(path))
    assert_same_state(model, released_t)


def test_other_num_classes_drops_classifier_with_warning(tmp_path, released_t):
    path = tmp_path / "ckpt.pth"
    torch.save(released_t, path)
    with pytest.warns(UserWarning, match="dropping the checkpoint's 1000-class classifier"):
        model = transxnet.transxnet_t(pretrained=str(path), num_classes=10)
    own = model.state_dict()
    assert own["classifier.2.weight"].shape == (10, 448, 1, 1)
    for k, v in released_t.items():
        if not k.startswith("classifier.2."):
            assert torch.equal(own[k], v), k


def test_fork_feat_backbone_loads_classification_checkpoint(tmp_path, released_t):
    path = tmp_path / "ckpt.pth"
    torch.save(released_t, path)
    with pytest.warns(UserWarning, match="fork_feat"):
        model = transxnet.transxnet_t(pretrained=str(path), fork_feat=True)
    own = model.state_dict()
    for k, v in released_t.items():
        if not k.startswith("classifier."):
            assert torch.equal(own[k], v), k


def test_other_image_size_resizes_relative_pos_enc(tmp_path, released_t):
    path = tmp_path / "ckpt.pth"
    torch.save(released_t, path)
    with pytest.warns(UserWarning, match="relative_pos_enc.0: resizing"):
        model = transxnet.transxnet_t(pretrained=str(path), image_size=256)
    rpe = model.state_dict()["relative_pos_enc.0"]
    assert rpe.shape == (1, 1, 64 * 64, 64)
    expected = torch.nn.functional.interpolate(
        released_t["relative_pos_enc.0"], size=(4096, 64), mode="bicubic", align_corners=False
    )
    assert torch.equal(rpe, expected)


def test_mismatch_lists_missing_and_unexpected_keys(released_t):
    state = dict(released_t)
    del state["network.0.0.pos_embed.weight"]
    state["network.0.0.extra.weight"] = torch.zeros(1)
    model = transxnet.transxnet_t()
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, state)
    text = str(err.value)
    assert "missing keys (1): ['network.0.0.pos_embed.weight']" in text
    assert "unexpected keys (1): ['network.0.0.extra.weight']" in text


def test_wrong_variant_is_rejected(released_t):
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_checkpoint(transxnet.transxnet_s(), released_t)


def test_not_a_state_dict_and_missing_file(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="no state dict"):
        load_checkpoint(transxnet.transxnet_t(), {"epoch": 3})
    with pytest.raises(FileNotFoundError):
        transxnet.transxnet_t(pretrained=str(tmp_path / "nope.pth"))


def test_pretrained_true_uses_release_url(monkeypatch, released_t):
    seen = []

    def fake_download(url, **kwargs):
        seen.append(url)
        return {"state_dict": released_t}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = transxnet.transxnet_t(pretrained=True)
    assert seen == ["https://github.com/LMMMEng/TransXNet/releases/download/v1.0/transx-t.pth.tar"]
    assert_same_state(model, released_t)
