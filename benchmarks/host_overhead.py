"""Host-side time of the Triton ops' Python launch path, per op call, measured without a GPU.

A GPU op benchmark that calls the op back to back (`triton.testing.do_bench`) measures the host, not the GPU,
wherever the host's per-call work outlasts the kernels: argument checks, launch planning, small torch ops
(allocations, weight packing), and Triton's own launch binding. This replays a model's op calls (captured on
the meta device by `gpu_warmup.capture_calls`, train and eval) through each op's Triton implementation on CPU
tensors of batch 1 (the host work does not depend on the batch), planning launches as for an sm_90 GPU
(`gpu_audit.plan_for_gpu`), with `JITFunction.run` replaced by a counter: the time is the Python launch path
minus Triton's launch itself (binding and the driver call, a further ~10-30 us per launch on a GPU host).
The torch ops between launches run here on the CPU on one sample's tensors: where a GPU host pays one dispatch
each, this also pays their arithmetic (filling the output gradient, summing partials: up to a few hundred us
at stage 1 on a slow core), so stage-1 backward times overstate the host's share most.

    python -m benchmarks.host_overhead [--model t] [--plain] [--ops idconv,ms_ffn_middle] [--reps 50] [--unpadded-bias]
                                       [--through-dispatcher]

--through-dispatcher sends every op call through torch.library's dispatcher (the custom ops themselves), as
traced calls go, rather than the plain eager route (`transxnet_kernels.library`): the cost of that layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("host_overhead plans launches for a GPU: unset TRITON_INTERPRET")

import torch
from triton.runtime.jit import JITFunction

from benchmarks import gpu_audit, gpu_warmup


def _batch_one(args: List[Any]) -> List[Any]:
    """The call's arguments with each batched tensor (a top-level argument whose first dim is the batch of the
    first, x or q; weight lists and per-channel tensors are not batched) cut to its first sample: a view, so
    strides, and with them the launch plan's layout, are unchanged."""
    batch = args[0].shape[0]

    def first_sample(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == batch:
            return t[:1].detach().requires_grad_(t.requires_grad)
        return t

    return [first_sample(a) for a in args]


def _median_us(fn: Callable[[], Any], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _as_the_model_passes(op: str, args: List[Any], gradients: bool, key_padded: bool) -> List[Any]:
    """The call's arguments as the accelerated model hands them to the op on a GPU: without gradients, a batch-shared
    OSRA bias of at most KEY_PADDED_KEYS keys views a key-padded copy (its stage bias is an inference constant,
    `AcceleratedTransXNet.stage_relative_pos_enc`), which the Triton short path reads in place."""
    from transxnet.fused import KEY_PADDED_KEYS
    from transxnet_kernels.layout import key_padded_bias

    bias = args[3] if op == "osra_attention" and len(args) > 3 else None
    if not key_padded or gradients or bias is None or bias.shape[0] != 1 or bias.shape[-1] > KEY_PADDED_KEYS:
        return args
    return args[:3] + [key_padded_bias(bias, KEY_PADDED_KEYS)] + args[4:]


def measure(
    calls: Sequence[Dict[str, Any]], reps: int, target: str = "sm_90", key_padded: bool = True
) -> List[Dict[str, Any]]:
    """Per distinct (op, input layout, grad mode): median host microseconds of one call and its launch count.
    key_padded: forward-only OSRA calls get the key-padded stage bias the accelerated model keeps on a GPU
    (`_as_the_model_passes`); False times the bias as captured (a padded copy per call)."""
    launches = [0]

    def count(fn, *args, grid, warmup, **kwargs):
        launches[0] += 1

    rows, seen = [], set()
    fp32 = gpu_warmup.replay_dtypes("fp32", torch.device("cpu"))
    real_run = JITFunction.run
    JITFunction.run = count
    try:
        with gpu_audit.plan_for_gpu(gpu_audit.GPUS[target]):
            for call in calls:
                op = gpu_audit.triton_op(call["op"])
                args = _batch_one([gpu_warmup._arguments(a, fp32, torch.device("cpu")) for a in call["args"]])
                inputs = gpu_warmup.gradient_inputs(call["op"], args)
                args = _as_the_model_passes(call["op"], args, bool(inputs), key_padded)
                mode = "forward+backward" if inputs else "forward"
                key = (call["op"], tuple(args[0].shape[1:]), args[0].stride(), mode)
                if key in seen:
                    continue
                seen.add(key)

                def step():
                    gpu_warmup.run_call(op, args, inputs)

                step()
                launches[0] = 0
                step()
                rows.append(
                    {
                        "op": call["op"],
                        "shape": list(args[0].shape),
                        "config": call["config"],
                        "mode": mode,
                        "launches": launches[0],
                        "host_us": _median_us(step, reps),
                    }
                )
    finally:
        JITFunction.run = real_run
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t")
    p.add_argument("--input", default="128x224x224", help="BxHxW of the captured model call (batch 1 is timed)")
    p.add_argument("--plain", action="store_true", help="the released model's forms, not transxnet.accelerated's")
    p.add_argument("--ops", default="", help="comma list of ops (default: all)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument(
        "--unpadded-bias", action="store_true", help="OSRA eval calls get the bias as captured, not key-padded"
    )
    p.add_argument("--through-dispatcher", action="store_true", help="every op call through torch.library's dispatcher")
    args = p.parse_args(argv)
    if args.through_dispatcher:
        from transxnet_kernels import library

        library.dispatcher_needed = lambda first: True
    torch.set_num_threads(1)
    import transxnet

    with torch.device("meta"):
        model = transxnet.TransXNet(args.model)
    if not args.plain:
        transxnet.accelerated(model)
    batch, height, width = (int(n) for n in args.input.split("x"))
    calls = gpu_warmup.capture_calls(model, (batch, 3, height, width))
    if args.ops:
        calls = [c for c in calls if c["op"] in args.ops.split(",")]
    rows = measure(calls, args.reps, key_padded=not args.unpadded_bias)
    print(f"{'op':20s} {'shape (batch 1)':22s} {'mode':17s} {'launches':>8s} {'host us':>8s}  first config")
    for r in rows:
        print(
            f"{r['op']:20s} {tuple(r['shape'])!s:22s} {r['mode']:17s} {r['launches']:8d} {r['host_us']:8.0f}  "
            f"{r['config']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
