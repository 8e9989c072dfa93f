"""Access to the shared parity data (../shared/parity beside the checkout)."""
import importlib.util
import json
import os

import pytest
import torch

PARITY_DIR = os.environ.get(
    "TRANSXNET_PARITY_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "parity"))

if not os.path.isdir(PARITY_DIR):
    pytest.exit(f"parity data not found at {PARITY_DIR} (set TRANSXNET_PARITY_DIR)", returncode=3)


def _load_weights_module():
    spec = importlib.util.spec_from_file_location("parity_weights", os.path.join(PARITY_DIR, "weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_weights = _load_weights_module()
fill_deterministic = _weights.fill_deterministic
golden_input = _weights.golden_input


def manifest():
    with open(os.path.join(PARITY_DIR, "state_dict_keys.json")) as f:
        return json.load(f)


def golden(name: str):
    return torch.load(os.path.join(PARITY_DIR, "golden", f"{name}.pt"), map_location="cpu")
