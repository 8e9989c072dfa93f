"""Static GPU audit in CI: every Triton launch the model makes compiles for sm_80, sm_86 and sm_90,
fits the target's shared memory per block and spills no registers.

The audit (`python -m benchmarks.gpu_audit`) runs once per session in a subprocess without
TRITON_INTERPRET (conftest.py sets it for this process; the audit needs compiled kernels). Compiles
come from the committed cache `benchmarks/results/gpu_audit_cache_<triton>.json` where the kernels are
unchanged (keyed by kernel source and specialisation, independent of checkout path and line numbers),
so a run compiles only what changed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("sm_80", "sm_86", "sm_90")
DTYPES = ("fp32", "fp16", "bf16", "tf32")  # tf32: fp32 replayed with TF32 allowed (OSRA only, gpu_audit.TF32_OPS)
KERNELS = (
    "_dynconv_kernel",
    "_toeplitz_conv_kernel",  # IDConv's 16-bit conv passes on the tensor cores (stage 1)
    "_toeplitz_redo_kernel",  # and its planes with a non-finite output again, tap by tap
    "_toeplitz_kernel_grad_kernel",  # its dk pass on the tensor cores
    "_kernel_grad_partial_kernel",
    "_softmax_chain_kernel",
    "_mix_kernel",
    "_mixing_plane_forward_kernel",  # IDConv
    "_forward_kernel",
    "_middle_grad_kernel",
    "_dx_kernel",  # multi-scale depthwise conv, MS-FFN middle
    "_strip_forward_kernel",
    "_strip_dz_kernel",
    "_strip_dx_kernel",  # the same on strips of rows (NCHW stages 1-2)
    "_strip_dz_dx_kernel",  # the middle's backward from the saved z in one pass on whole-row strips (contiguous)
    "_plane_dz_dx_kernel",  # the middle's backward from the saved z in one pass on whole planes
    "_thread_plane_forward_kernel",
    "_thread_plane_dx_kernel",
    "_thread_plane_dz_kernel",  # the forward, dx and dz passes on small planes, a thread per plane (stage 4)
    "_plane_eval_kernel",  # ms_ffn_middle_eval in one pass on dense whole planes (stage 3)
    "_strip_eval_kernel",  # ms_ffn_middle_eval in one pass on whole-row strips (NCHW stages 1-2)
    "_batch_norm_affine_kernel",  # MS-FFN middle's BatchNorm statistics and affine map
    "_running_statistics_kernel",  # its running statistics' update
    "_batch_norm_grad_kernel",  # its BatchNorm gradient sums and coefficients
    "_pack_kernel",  # the multi-scale weights packed into one table, and their gradients unpacked
    "_osra_fwd_kernel",
    "_osra_bwd_dq_kernel",
    "_osra_bwd_dkdv_kernel",  # OSRA, flash path (M > 64)
    "_osra_fwd_short_kernel",
    "_osra_bwd_short_kernel",  # OSRA, short path (M <= 64)
    "_osra_dkdv_sum_kernel",  # OSRA, the flash path's dk/dv partials
)


# (kernel, target, dtype) the launch code routes elsewhere: the fp32 OSRA backward on sm_8x runs on the flash
# kernels (osra_attention._short_path), IDConv's fp32 conv passes and all of them on sm_86 on its FFMA stencils
# (idconv.Settings.toeplitz_dtypes, idconv._FAST_TENSOR_CORES), the fp32 MS-FFN middle's dz pass on whole planes
# (ms_ffn._THREAD_PLANE_DZ_MAX_ELEMENT_SIZE), 16-bit ms_ffn_middle_eval on sm_80 strips in two launches
# (ms_ffn._one_pass_strips); and with TF32 allowed only OSRA replays (gpu_audit.TF32_OPS). Pinned: these must have no
# launch.
_TENSOR_CORE_KERNELS = ("_toeplitz_conv_kernel", "_toeplitz_redo_kernel", "_toeplitz_kernel_grad_kernel")
NOT_LAUNCHED = (
    {("_osra_bwd_short_kernel", t, "fp32") for t in ("sm_80", "sm_86")}
    | {(k, t, "fp32") for k in _TENSOR_CORE_KERNELS for t in TARGETS}
    | {(k, "sm_86", d) for k in _TENSOR_CORE_KERNELS for d in ("fp16", "bf16")}
    | {("_thread_plane_dz_kernel", t, "fp32") for t in TARGETS}
    | {("_strip_eval_kernel", "sm_80", d) for d in ("fp16", "bf16")}
    | {(k, t, "tf32") for k in KERNELS if not k.startswith("_osra_") for t in TARGETS}
)


def _compiled_triton_env():
    """This process's environment without TRITON_INTERPRET (conftest sets it): the audit needs compiled Triton."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_compiled(check: str) -> None:
    """Run the Python source `check` in a subprocess with compiled Triton; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, env=_compiled_triton_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    pytest.importorskip("triton")
    output = tmp_path_factory.mktemp("gpu_audit") / "audit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_audit", "--targets", ",".join(TARGETS), "--output", str(output)],
        cwd=ROOT,
        env=_compiled_triton_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"gpu_audit failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(output.read_text())


def test_every_kernel_is_audited(audit):
    recorded = {e["kernel"] for e in audit["kernels"]}
    assert recorded == set(KERNELS), f"kernels recorded {sorted(recorded)}; this test covers {sorted(KERNELS)}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_launches_compile_fit_and_do_not_spill(audit, kernel, target, dtype):
    entry = next((e for e in audit["kernels"] if e["kernel"] == kernel and e["target"] == target), None)
    specs = [s for s in entry["specialisations"] if dtype in s["dtypes"]] if entry else []
    if (kernel, target, dtype) in NOT_LAUNCHED:
        assert not specs, f"{kernel} on {target}, {dtype}: launched, but NOT_LAUNCHED says it is routed away"
        return
    assert entry is not None, f"no launch of {kernel} recorded for {target}"
    assert specs, f"no {dtype} launch of {kernel} recorded for {target}"
    limit = audit["targets"][target]["smem_per_block_kb"] * 1024
    failures = [f"{s['constexprs']}: compile error {s['error']}" for s in specs if not s["ok"]]
    failures += [
        f"{s['constexprs']}: smem {s['smem_bytes']} B > {limit} B" for s in specs if s["ok"] and s["smem_bytes"] > limit
    ]
    assert not failures, (
        f"{kernel} on {target}, {dtype}: {len(failures)} of {len(specs)} specialisations fail:\n" + "\n".join(failures)
    )
    spills = [
        f"{s['constexprs']}: {s['spill_store_bytes']} B spill stores, {s['spill_load_bytes']} B spill loads "
        f"({s['registers']} registers)"
        for s in specs
        if s["spill_store_bytes"] or s["spill_load_bytes"]
    ]
    assert not spills, (
        f"{kernel} on {target}, {dtype}: {len(spills)} of {len(specs)} specialisations spill:\n" + "\n".join(spills)
    )


def test_torch_work_between_launches_is_counted(audit):
    """The OSRA short backward's bias-gradient partials (one [h, N, M] slice per batch group, at least two groups at
    these shapes) are summed with torch inside the op's custom-op wrapper, unless the kernel sums them itself
    (DBIAS_SUMMED: S stage 1 on an H100, not T stage 3): where torch sums them the estimate must carry at least those
    reads, on top of the launches, and elsewhere the backward's torch work is the padded bias copy and the arrival
    counts' fill at most, as the forward's is the copy (the bias in, [h, N, 64] out) and nothing else. (The
    int64-offset variants run the flash backward.)"""
    rows = [
        r
        for r in audit["calls"]
        if r["op"] == "osra_attention"
        and "224x224" in r["config"]
        and not r["config"].startswith("int64-offsets")
        and r["dtype"] in ("fp16", "bf16")
    ]
    assert rows, "no OSRA call at 224x224 recorded"
    summed_by = {}
    for r in rows:
        bandwidth = audit["targets"][r["target"]]["dram_tb_s"] * 1e12
        h, N = r["shape"][1:3]
        padded_bias_copy = h * N * (49 + 64) * 2
        moved = r["torch_s"] * bandwidth
        if r["phase"] == "forward":
            assert moved < padded_bias_copy + 1024, (r, padded_bias_copy)
        else:
            partial_reads = 2 * h * N * 49 * 4
            by_torch = moved >= partial_reads
            assert by_torch or moved < padded_bias_copy + 4096, (r, partial_reads)
            assert r["estimate_s"] - r["torch_s"] >= r["issue_s"] * (1 - 1e-9), r  # added on top of the launches
            summed_by[r["target"], r["config"].split()[0], N] = by_torch
    assert summed_by[("sm_90", "s", 3136)] is False and summed_by[("sm_90", "t", 196)] is True, summed_by


def test_launches_by_kernel_size_count_each_channel_once(audit):
    """The whole-plane stencil (stages 3-4 at 224x224) runs one launch per kernel size, each given the whole
    feature maps but covering only its channel blocks: the launches' DRAM bytes must add up to the op's (x read
    and out written once), not once per launch."""
    rows = [
        r
        for r in audit["calls"]
        if r["op"] == "multiscale_dwconv" and r["phase"] == "forward" and r["shape"][2] <= 16 and r["shape"][3] <= 16
    ]
    assert rows, "no multiscale_dwconv forward on a small plane recorded"
    for r in rows:
        assert r["dram_s"] <= 1.1 * r["roofline_s"], r  # + the packed weights; 4 sizes counted 4 times: ~4x


_ATTRIBUTION_CHECK = r"""
import inspect

from benchmarks import gpu_audit
from transxnet_kernels.triton import idconv, ms_ffn

loops = gpu_audit._source_loops(idconv._dynconv_kernel)
helper_loop = next(lp for lp in loops if lp.name == "_dwconv_tile_vec_k:i")
kernel_loop = next(lp for lp in loops if lp.name == "_dynconv_kernel:kh")


def sass_loop_at(path, line):
    sass = "\n".join(
        [
            f'\t//## File "{path}", line {line}',
            "        /*0000*/                   NOP ;",
            ".L_x_0:",
            "        /*0010*/                   FFMA R1, R2, R3, R1 ;",
            "        /*0020*/              @P0 BRA `(.L_x_0) ;",
        ]
    )
    (loop,) = gpu_audit.analyse_sass(sass, loops)["loops"]
    return loop["source_loop"]


ms_ffn_path, idconv_path = inspect.getsourcefile(ms_ffn), inspect.getsourcefile(idconv)
assert sass_loop_at(ms_ffn_path, helper_loop.first_line + 1) == "_dwconv_tile_vec_k:i"
assert sass_loop_at(idconv_path, kernel_loop.first_line + 1) == "_dynconv_kernel:kh"
# The helper's line numbers in the kernel's file name no loop of the helper.
assert sass_loop_at(idconv_path, helper_loop.first_line + 1) != "_dwconv_tile_vec_k:i"
# A branch whose line is hoisted out of every loop (ptxas does this to small loop bodies): the loop goes to the
# source loop the body's lines fall in.
kernel_def_line = inspect.getsourcelines(idconv._dynconv_kernel.fn)[1]
sass = "\n".join(
    [
        "        /*0000*/                   NOP ;",
        ".L_x_0:",
        f'\t//## File "{idconv_path}", line {kernel_loop.first_line + 1}',
        "        /*0010*/                   FFMA R1, R2, R3, R1 ;",
        "        /*0020*/                   FFMA R1, R2, R3, R1 ;",
        f'\t//## File "{idconv_path}", line {kernel_def_line}',
        "        /*0030*/              @P0 BRA `(.L_x_0) ;",
    ]
)
(loop,) = gpu_audit.analyse_sass(sass, loops)["loops"]
assert loop["source_loop"] == "_dynconv_kernel:kh", loop
"""


_EDITED_SOURCE_CHECK = r"""
import importlib, linecache, sys, tempfile
from pathlib import Path

from benchmarks import gpu_audit

source = '''
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, n):
    acc = 0.0
    for i in range(n):
        acc += tl.load(x_ptr + i)
    tl.store(x_ptr, acc)
'''
with tempfile.TemporaryDirectory() as directory:
    path = Path(directory) / "edited_kernel_module.py"
    path.write_text(source)
    sys.path.insert(0, directory)
    module = importlib.import_module("edited_kernel_module")
    (before,) = gpu_audit._source_loops(module.kernel)
    assert (before.name, before.first_line, before.last_line) == ("kernel:i", 9, 10), before
    path.write_text("# three lines\n# added above\n# the kernel\n" + source)  # edited while the audit runs
    linecache.checkcache()
    (after,) = gpu_audit._source_loops(module.kernel)
    assert after == before, (before, after)
"""


def test_source_loops_follow_the_compiled_source_not_the_edited_file():
    """SASS line numbers come from the source Triton compiled (the module as imported), so the loop spans must
    too. Read from the file instead, an edit made while an audit ran (lines added above the kernels) shifted
    every span below it, and the strip kernels' image loops went unattributed. (In a subprocess, as below.)"""
    pytest.importorskip("triton")
    _run_compiled(_EDITED_SOURCE_CHECK)


def test_sass_loops_are_attributed_within_their_source_file():
    """Kernels inline helpers from other modules (IDConv's passes use the MS-FFN's chunked stencils), and
    nvdisasm's line info names file and line: a SASS loop must map to a source loop of its own file, never to a
    loop of another file that happens to span the same line number; a loop whose branch carries a line outside
    every loop goes by its body's lines. (In a subprocess: the audit module needs
    compiled Triton, not the interpreter this process runs.)"""
    pytest.importorskip("triton")
    _run_compiled(_ATTRIBUTION_CHECK)


_UNROLLED_LOOP_CHECK = r"""
from benchmarks.gpu_audit import trip_instructions

# Unrolled by 4 (the OSRA short backward's partial sum, Triton 3.8, sm_90): the main loop does 4 trips a pass,
# with one hoisted constant load the remainder loop repeats per trip.
assert trip_instructions([{"load": 33, "total": 135}, {"load": 9, "total": 38}]) == 135 / 4
assert trip_instructions([{"load": 20, "total": 140}, {"load": 5, "total": 39}]) == 140 / 4
# By 2, each pass doing exactly two trips' loads.
assert trip_instructions([{"load": 6, "total": 50}, {"load": 12, "total": 90}]) == 90 / 2
# Copies per kernel size (K = 3, 5, 7 taps unrolled), one runs per trip: the largest counts.
assert trip_instructions([{"load": 15, "total": 121}, {"load": 25, "total": 171}, {"load": 35, "total": 227}]) == 227
# Peeled or unswitched copies of one body, and a loop without loads.
assert trip_instructions([{"load": 28, "total": 286}, {"load": 28, "total": 300}]) == 300
assert trip_instructions([{"total": 40}, {"total": 12}]) == 40
"""


def test_unrolled_loops_count_their_instructions_per_trip():
    """LLVM and ptxas unroll runtime loops: one source loop becomes a main loop doing k trips per pass and a
    remainder loop. Counting the main body per trip, the audit charged 4x the instructions of such loops (the
    MS-FFN statistics sweeps, IDConv's softmax chain, OSRA's partial sums); copies per kernel size must still
    count their largest body. (In a subprocess: the audit module needs compiled Triton.)"""
    pytest.importorskip("triton")
    _run_compiled(_UNROLLED_LOOP_CHECK)


_ISSUE_TIME_CHECK = r"""
import dataclasses

from benchmarks.gpu_audit import GPUS, Launch, issue_seconds, launch_seconds

h100 = GPUS["sm_90"]
clock = h100.clock_ghz * 1e9


def cycles(programs, num_warps, registers=64):
    launch = Launch("kernel", "forward", (programs, 1, 1), num_warps, "", {}, {}, ())
    result = {"registers": registers, "smem_bytes": 0, "sass": {"outside_loops": {"total": 100}, "loops": []}}
    return round(issue_seconds(launch, result, h100) * clock, 6)


# One 8-warp program per SM: 800 warp-instructions on 4 schedulers.
assert cycles(132, 8) == 200
# One program more: the busiest SM runs two, whether or not both fit (a partial wave costs a whole one).
assert cycles(133, 8) == 400 and cycles(133, 8, registers=255) == 400
# One-warp programs: a warp issues at most once a clock, so one or two resident warps leave schedulers idle ...
assert cycles(132, 1) == 100 and cycles(264, 1) == 100
# ... and 16 of them keep all four busy.
assert cycles(132 * 16, 1) == 400

# The FP32-pipe bound: on A100 (16 FP32 lanes per scheduler) an fp-category instruction holds 2 issue slots, so a
# body of 100 instructions, 80 of them fp, costs 160 slots there (and 100 where fp is under half); on H100 it is the
# estimate itself.
a100 = GPUS["sm_80"]
launch = Launch("kernel", "forward", (108, 1, 1), 8, "", {}, {"kernel:i": 108 * 10}, ())
loop = {"source_loop": "kernel:i", "body": {"total": 50, "fp": 10}}
sass = {"outside_loops": {"total": 100, "fp": 80}, "loops": [loop]}
result = {"registers": 64, "smem_bytes": 0, "sass": sass, "unused_pointer_args": []}
assert (a100.fp32_pipe_slots, h100.fp32_pipe_slots) == (2, 1)
assert round(issue_seconds(launch, result, a100) * a100.clock_ghz * 1e9, 6) == (100 + 10 * 50) * 8 / 4
assert round(issue_seconds(launch, result, a100, a100.fp32_pipes) * a100.clock_ghz * 1e9, 6) == (160 + 10 * 50) * 8 / 4
times = launch_seconds(launch, result, a100)
assert times["fp32_pipe_estimate_s"] > times["estimate_s"] == times["issue_s"]
times = launch_seconds(launch, result, h100)
assert times["fp32_pipe_estimate_s"] == times["estimate_s"]

# A last-arriver tail (LAST_PROGRAM_TRIPS: the loops one program runs once the rest of its group is done) is issued
# by that program's warps alone, after the spread work: 10 trips of a 50-instruction body, 500 per warp, 8 warps on 4
# schedulers; averaged over 132 programs as the spread work is, it weighed 1/132 of that.
launch = Launch("kernel", "backward", (132, 1, 1), 8, "", {}, {"kernel:i": 10}, (), {"kernel:i": 10})
loop = {"source_loop": "kernel:i", "body": {"total": 50}}
result = {"registers": 64, "smem_bytes": 0, "sass": {"outside_loops": {"total": 100}, "loops": [loop]}}
spread = (100 * 132 + 10 * 50) * 8 / 132 / 4
assert round(issue_seconds(launch, result, h100) * clock, 6) == round(spread + 500 * 8 / 4, 6)
# Two warps issue at most one instruction a clock each.
launch = dataclasses.replace(launch, num_warps=2)
assert round(issue_seconds(launch, result, h100) * clock, 6) == round(spread / 2 + 500, 6)
"""


_LAST_ARRIVER_CHECK = r"""
from benchmarks.gpu_audit import GPUS, Launch, analyse_sass, issue_seconds

def line(address, text):
    return f"        /*{address:04x}*/                   {text} ;"

# Two last-arriver branches, as the OSRA one-pass backward's: after an atomic, the first conditional forward branch
# leaves its region (to the branch's target) to the last program; a conditional exit leaves all the rest to it. A
# loop inside a region keeps its trip count; a branch before the atomic (the warp's lane election) starts none.
sass = "\n".join(
    [
        line(0x00, "FFMA R1, R2, R3, R1"),
        line(0x10, "@P2 BRA `(.L_x_0)"),
        line(0x20, "FADD R1, R1, R1"),
        ".L_x_0:",
        line(0x30, "@P0 ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR4][R2.64], R5"),
        line(0x40, "ISETP.NE.U32.AND P0, PT, R5, R6, PT"),
        line(0x50, "@P0 BRA `(.L_x_1)"),
        line(0x60, "LDG.E R7, desc[UR4][R8.64]"),
        ".L_x_2:",
        line(0x70, "FADD R9, R9, R7"),
        line(0x80, "@P3 BRA `(.L_x_2)"),
        line(0x90, "STG.E desc[UR4][R8.64], R9"),
        ".L_x_1:",
        line(0xA0, "FFMA R1, R2, R3, R1"),
        line(0xB0, "@P0 ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR4][R2.64], R5"),
        line(0xC0, "@P1 EXIT"),
        line(0xD0, "IMAD R4, R4, R5, RZ"),
        line(0xE0, "EXIT"),
    ]
)
analysed = analyse_sass(sass, [])
assert analysed["outside_loops"]["total"] == 13, analysed
assert analysed["last_arrivers"] == [
    {"load": 1, "store": 1, "total": 2},  # the loop's FADD and branch are the loop's
    {"int": 1, "other": 1, "total": 2},
], analysed["last_arrivers"]
assert analyse_sass(sass.replace("ATOMG", "LDG"), [])["last_arrivers"] == []

# 8 programs of one warp; the first region runs in 2 of them, the second in 4: the straight code is 9 instructions
# per program and 2 and 2 per run, where counting it all per program charged 13 each. The tail adds both regions once.
h100 = GPUS["sm_90"]
clock = h100.clock_ghz * 1e9
result = {"registers": 64, "smem_bytes": 0, "sass": {**analysed, "loops": []}}
launch = Launch("kernel", "backward", (8, 1, 1), 1, "", {}, {}, (), {}, (2, 4))
assert round(issue_seconds(launch, result, h100) * clock, 6) == (9 * 8 + 2 * 2 + 2 * 4) / 8 + 4
# Run counts that do not match the regions found are an error, not a guess.
try:
    issue_seconds(Launch("kernel", "backward", (8, 1, 1), 1, "", {}, {}, (), {}, (2,)), result, h100)
except ValueError:
    pass
else:
    raise AssertionError("one run count for two last-arriver regions was accepted")
"""


def test_last_arriver_regions_count_once_per_program_that_runs_them():
    """The straight code after a conditional branch or exit on an atomic's count (a last-arriver sum, which one program
    of a group runs) is charged per program that runs it (gpu_audit_trips.LAST_ARRIVER_RUNS) and once in the tail, not
    once per program of the launch. (In a subprocess: the audit module needs compiled Triton.)"""
    pytest.importorskip("triton")
    _run_compiled(_LAST_ARRIVER_CHECK)


_TENSOR_PIPE_CHECK = r"""
from benchmarks.gpu_audit import GPUS, Launch, Pipes, analyse_sass, issue_seconds, launch_seconds

# MMAs are their own category; their FMAs per warp are kept per input class.
sass = "\n".join(
    [
        "        /*0000*/                   HMMA.16816.F32.BF16 R16, R20, R12, R16 ;",
        "        /*0010*/                   HMMA.16816.F32 R16, R20, R12, R16 ;",
        "        /*0020*/                   HMMA.1688.F32.TF32 R16, R20, R12, R16 ;",
        "        /*0030*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "        /*0040*/                   FFMA R1, R2, R3, R1 ;",
    ]
)
body = analyse_sass(sass, [])["outside_loops"]
assert body["mma"] == 4 and body["fp"] == 1 and body["total"] == 5, body
# m16n8k16 per warp; HMMA.16816.F32 without a type names fp16 inputs; m16n8k8 tf32; m64n32k16 per 4-warp group.
assert body["mma_fma_f16"] == 2 * 16 * 8 * 16 + 64 * 32 * 16 // 4 and body["mma_fma_tf32"] == 16 * 8 * 8, body

# A body of 20 instructions, 16 of them m16n8k16 bf16 MMAs: the A100's tensor core takes 8 clocks each (256 FMAs a
# clock), so 128 slots; the H100's 4 each, 64; counted as instructions only, 20.
a100, h100 = GPUS["sm_80"], GPUS["sm_90"]
body = {"total": 20, "mma": 16, "mma_fma_f16": 16 * 2048}
assert (a100.issue_pipes.slots(body), h100.issue_pipes.slots(body), Pipes().slots(body)) == (128, 64, 20)
# The estimate charges them: one 4-warp program per SM (one warp per scheduler) running 10 trips of that body.
launch = Launch("kernel", "forward", (108, 1, 1), 4, "", {}, {"kernel:i": 108 * 10}, ())
result = {"registers": 64, "smem_bytes": 0, "unused_pointer_args": [],
          "sass": {"outside_loops": {"total": 0}, "loops": [{"source_loop": "kernel:i", "body": body}]}}
assert round(issue_seconds(launch, result, a100) * a100.clock_ghz * 1e9, 6) == 10 * 128
times = launch_seconds(launch, result, a100)
assert times["estimate_s"] == times["issue_s"] == times["fp32_pipe_estimate_s"]
# A class without a rate for the model is an error, not zero clocks.
try:
    Pipes(1, (("f16", 256),)).slots({"total": 1, "mma_fma_tf32": 1024})
except KeyError:
    pass
else:
    raise AssertionError("an MMA class without a rate was charged nothing")
"""


def test_mma_instructions_hold_the_tensor_core_for_their_fmas():
    """An HMMA is one issued instruction but holds its scheduler's tensor core for several clocks (m16n8k16 bf16: 8 on
    an A100, 4 on an H100); counted as one slot, the tensor-core stencils and OSRA's dots looked up to 8x cheaper than
    they are. (In a subprocess: the audit module needs compiled Triton.)"""
    pytest.importorskip("triton")
    _run_compiled(_TENSOR_PIPE_CHECK)


def test_issue_time_is_the_busiest_sms():
    """The issue term: the busiest SM's programs (wave tails) at min(4 schedulers, resident warps) instructions
    a clock. Thread-plane launches of one-warp programs, two per SM, issue at half the rate the audit charged
    them before this term. The FP32-pipe bound beside it: fp-category instructions at 2 slots on A100, none on
    H100. A last-arriver sum's tail after the spread work, at its own program's issue rate. (In a subprocess: the
    audit module needs compiled Triton.)"""
    pytest.importorskip("triton")
    _run_compiled(_ISSUE_TIME_CHECK)


_POINTER_USE_CHECK = r"""
import importlib, sys, tempfile
from pathlib import Path

from benchmarks import gpu_audit

source = '''
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, skipped_ptr, carried_ptr, out_ptr, n, SKIP: tl.constexpr):
    acc = tl.load(x_ptr)
    if not SKIP:
        acc += tl.load(skipped_ptr)
    base = carried_ptr  # advanced through the loop, never loaded: no DRAM traffic
    for i in range(n):
        acc += tl.load(x_ptr + i)
        base += 1
    tl.store(out_ptr, acc)
'''
with tempfile.TemporaryDirectory() as directory:
    (Path(directory) / "pointer_use_module.py").write_text(source)
    sys.path.insert(0, directory)
    module = importlib.import_module("pointer_use_module")
    signature = {"x_ptr": "*fp32", "skipped_ptr": "*fp32", "carried_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                 "SKIP": "constexpr"}
    for skip, unused in ((True, ["skipped_ptr", "carried_ptr"]), (False, ["carried_ptr"])):
        spec = dict(fn="pointer_use_module:kernel", signature=signature, constexprs={(5,): skip}, attrs={},
                    options={"num_warps": 1}, cc=90)
        assert gpu_audit.compile_spec(spec)["unused_pointer_args"] == unused, skip
    launch = gpu_audit.Launch("kernel", "forward", (1, 1, 1), 1, "", {}, {}, ((("x_ptr",), 8), (("skipped_ptr",
             "carried_ptr"), 16), (("out_ptr",), 4)))
    assert launch.dram_bytes() == 28 and launch.dram_bytes(["skipped_ptr"]) == 28
    assert launch.dram_bytes(["skipped_ptr", "carried_ptr"]) == 12
    # A cache entry from before the field (compiled, no unused_pointer_args) is left out, so it compiles again.
    import json, triton
    cache = Path(directory) / "cache.json"
    entries = {"old": {"ok": True}, "failed": {"ok": False}, "new": {"ok": True, "unused_pointer_args": []}}
    cache.write_text(json.dumps({"triton": triton.__version__, "entries": entries}))
    assert sorted(gpu_audit.load_cache(cache)) == ["failed", "new"]
"""


def test_dram_bytes_count_only_the_tensors_a_kernel_dereferences():
    """A pass may be handed tensors its constexpr branches never touch (the training statistics pass of the MS-FFN
    backward gets x and dz): the TTIR's data flow from each pointer parameter to a load or store decides, also
    through a loop-carried pointer that is only advanced; a tensor counts while any argument naming it is used. A
    cached result without that field is recompiled. (In a subprocess, as above.)"""
    pytest.importorskip("triton")
    _run_compiled(_POINTER_USE_CHECK)


def test_statistics_pass_is_charged_for_what_it_reads(audit):
    """The training MS-FFN backward's statistics pass reads the saved z and the output gradient only: with the dz
    pass (z, go, x read, dz written) and the dx pass (dz read, dx written), 8 passes over the map, not 10 (x and dz
    are passed to the statistics pass but not touched)."""
    rows = [
        r
        for r in audit["calls"]
        if r["op"] == "ms_ffn_middle" and r["phase"] == "backward" and "train" in r["config"] and r["shape"][2] == 56
    ]
    assert rows, "no training ms_ffn_middle backward at 56x56 recorded"
    for r in rows:
        assert r["dram_s"] <= 8.5 / 3 * r["roofline_s"], r  # the roofline: 3 passes


def test_each_op_is_audited_in_plain_and_accelerated_training_and_eval(audit):
    """The audit spies on the transxnet_kernels ops by replacing the module attributes: a model path that bound
    an op earlier (e.g. as a default argument) would drop out of every estimate silently."""
    families = {}
    for row in audit["calls"]:
        families.setdefault(row["op"], set()).add(" ".join(row["config"].split()[2:4]))
    # A call equal to an earlier configuration's is recorded under the earlier one (plain before accelerated).
    for op in ("idconv", "osra_attention", "multiscale_dwconv"):
        assert {"plain train", "plain eval"} <= families.get(op, set()), (op, families.get(op))
    # (OSRA's accelerated eval calls equal the plain model's; the accelerated eval MS-FFN runs ms_ffn_middle_eval)
    for op in ("idconv", "ms_ffn_middle_eval"):
        assert "accelerated eval" in families.get(op, set()), (op, families.get(op))
    assert "accelerated train" in families["ms_ffn_middle"], families["ms_ffn_middle"]


def _call_key(row):
    return (row["op"], row["phase"], row["target"], row["config"], row["dtype"], tuple(row["shape"]))


def test_committed_results_are_the_audit_of_this_code(audit):
    """benchmarks/results/gpu_audit_<triton>.json, for the Triton installed here, holds what the audit computes for
    the code as it is: a kernel or launch change that moves an estimate must come with the audit's new results."""
    import triton

    committed_path = ROOT / "benchmarks" / "results" / f"gpu_audit_{triton.__version__}.json"
    if not committed_path.exists():
        pytest.skip(f"no committed audit results for Triton {triton.__version__}")
    committed = {_call_key(r): r for r in json.loads(committed_path.read_text())["calls"]}
    fresh = {_call_key(r): r for r in audit["calls"]}
    assert committed.keys() == fresh.keys(), "the audited calls differ: rerun python -m benchmarks.gpu_audit"
    moved = [
        (key, committed[key][field], fresh[key][field])
        for key in fresh
        for field in ("estimate_s", "roofline_s")
        if not math.isclose(committed[key][field], fresh[key][field], rel_tol=1e-9)
    ]
    assert not moved, f"{len(moved)} estimates moved, e.g. {moved[:3]}: rerun python -m benchmarks.gpu_audit"


def test_op_docstrings_state_the_committed_audit_estimates():
    """Each Triton op module's docstring holds its ops' estimate tables as benchmarks.audit_tables writes them from
    the newest committed audit results (run `python -m benchmarks.audit_tables` after an audit)."""
    from benchmarks import audit_tables

    results = audit_tables.newest_results()
    report = json.loads(results.read_text())
    for op, module in audit_tables.MODULES.items():
        block = audit_tables.table(report, op, results.name)
        stale = f"{module.name}: the {op} table is stale; run python -m benchmarks.audit_tables"
        assert block in module.read_text(), stale


def test_audit_tables_rewrite_only_their_blocks(tmp_path):
    """The rewrite replaces an op's block (header paragraph, blank line, indented table) and nothing around it,
    and is idempotent; a module without the block is an error."""
    from benchmarks import audit_tables

    report = json.loads(audit_tables.newest_results().read_text())
    module = tmp_path / "kernels.py"
    before = '"""Kernels.\n\nMath.\n\n'
    after = '\nMore text.\n"""\n\nimport triton\n'
    stale = "Static audit of `idconv` (an old table,\nwrapped:\n\n    T1  1/1\n    T2  2/2\n"
    module.write_text(before + stale + after)
    assert audit_tables.rewrite(report, "r.json", {"idconv": module}) == [module]
    assert module.read_text() == before + audit_tables.table(report, "idconv", "r.json") + after
    assert audit_tables.rewrite(report, "r.json", {"idconv": module}) == []
    with pytest.raises(ValueError, match="no 'Static audit of `osra_attention`"):
        audit_tables.rewrite(report, "r.json", {"osra_attention": module})


_SECTOR_CHECK = r"""
import torch
from benchmarks.gpu_audit import _moved_bytes
padded = torch.empty(2, 3, 5, 64, dtype=torch.bfloat16)
assert _moved_bytes(padded[..., :49]) == 2 * 3 * 5 * 128
assert _moved_bytes(padded.float()[..., :49]) == 2 * 3 * 5 * 224
assert _moved_bytes(torch.empty(4, 40, dtype=torch.bfloat16)[:, :33]) == 4 * 80  # capped at the 80-byte rows
assert _moved_bytes(padded) == padded.numel() * 2
nchw = torch.empty(2, 8, 7, 7)
assert _moved_bytes(nchw[:, :3]) == 2 * 3 * 7 * 7 * 4  # a channel slice: its rows have no gaps
assert _moved_bytes(nchw.transpose(-1, -2)) == nchw.numel() * 4
"""


def test_torch_work_reads_padded_rows_in_whole_sectors():
    """The torch work's bytes: a slice of padded rows moves each row's 32-byte sectors (98-byte rows of 49 bf16
    keys: 128, fp32's 196: 224, never more than the padded row); dense tensors and gapless views their elements.
    (In a subprocess: the audit module needs compiled Triton, this process runs the interpreter.)"""
    _run_compiled(_SECTOR_CHECK)
