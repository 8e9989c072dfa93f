"""benchmarks/host_overhead.py: the Triton ops' Python launch path timed with launches counted, not run (in a
subprocess without TRITON_INTERPRET, as it plans launches for a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_host_overhead_times_each_op_call_of_the_model_forward_and_backward(tmp_path):
    pytest.importorskip("triton")
    rows_file = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_overhead", "--ops", "idconv,ms_ffn_middle_eval", "--reps", "2"]
        + ["--json", str(rows_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    idconv = [r for r in rows if r["op"] == "idconv"]
    # T's four stages, each without and with gradients; the inference middle has no backward
    assert sorted(r["shape"][1] for r in idconv if r["mode"] == "forward") == [24, 48, 112, 224]
    assert {r["mode"] for r in idconv} == {"forward", "forward+backward"}
    assert {r["mode"] for r in rows if r["op"] == "ms_ffn_middle_eval"} == {"forward"}
    for r in rows:
        assert r["shape"][0] == 1 and r["launches"] > 0 and r["host_us"] > 0
    fwd = {r["shape"][1]: r["launches"] for r in idconv if r["mode"] == "forward"}
    assert all(r["launches"] > fwd[r["shape"][1]] for r in idconv if r["mode"] == "forward+backward")


_MODEL_BIAS_CHECK = r"""
import torch
from benchmarks.host_overhead import _as_the_model_passes
from transxnet_kernels.layout import key_padded_rows

q = torch.zeros(1, 2, 37, 8)
shared, per_batch = torch.randn(1, 2, 37, 49), torch.randn(1, 2, 37, 49).expand(3, 2, 37, 49)
args = [q, q, q, shared, 0.5]
passed = _as_the_model_passes("osra_attention", args, False, True)
assert key_padded_rows(passed[3]) == 64 and torch.equal(passed[3], shared) and passed[4] == 0.5
for gradients, key_padded, bias in [(True, True, shared), (False, False, shared), (False, True, per_batch)]:
    assert _as_the_model_passes("osra_attention", [q, q, q, bias, 0.5], gradients, key_padded)[3] is bias
wide = torch.randn(1, 2, 37, 65)
assert _as_the_model_passes("osra_attention", [q, q, q, wide, 0.5], False, True)[3] is wide
"""


def test_host_overhead_passes_eval_osra_calls_the_key_padded_stage_bias():
    """As the accelerated model does on a GPU: a forward-only OSRA call's batch-shared bias of at most 64 keys views
    a key-padded copy; with gradients, with --unpadded-bias, per-batch or wider biases go as captured."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _MODEL_BIAS_CHECK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


_DISPATCHER_CHECK = r"""
import sys, torch
from benchmarks import host_overhead
from transxnet_kernels import library

assert not library.dispatcher_needed(torch.zeros(1))
assert host_overhead.main(["--ops", "idconv", "--reps", "1", "--through-dispatcher", "--json", sys.argv[1]]) == 0
assert library.dispatcher_needed(torch.zeros(1))
"""


def test_host_overhead_through_the_dispatcher(tmp_path):
    """--through-dispatcher times every op call as a traced call goes, through torch.library's dispatcher."""
    pytest.importorskip("triton")
    rows_file = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _DISPATCHER_CHECK, str(rows_file)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert {r["op"] for r in rows} == {"idconv"} and all(r["host_us"] > 0 for r in rows)
