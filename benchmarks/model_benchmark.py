"""TransXNet model benchmark: eager vs torch.compile vs accelerated (vs ONNX Runtime on CPU), in one run.

    python -m benchmarks.model_benchmark                 # what this machine has, default sizes
    python -m benchmarks.model_benchmark --models t --no-compile --batch 8
    python -m benchmarks.model_benchmark --modes infer --batch 16,1 --no-detection   # CPU: + ONNX Runtime

For each model (T/S/B), mode (inference, training step) and precision (fp32, and AMP on GPU; on request tf32:
fp32 with TF32 allowed for matmuls) it times the variants interleaved (one call of each per round), reports
the median images/s, the median and 90th-percentile latency, peak memory and the largest difference from eager
(pass several batch sizes, e.g. `--batch 16,1`, for throughput and latency), and also the
fork_feat backbone at a detection-size input (forward + backward). Results: a table on
stdout, JSON and a PNG bar chart under benchmarks/results/, tagged with device,
versions, date and git commit.

"eager" is the released model on the pure-PyTorch reference ops; "compile" is
torch.compile of that; "accelerated" is transxnet.accelerated() on the backend auto picks; "acc-compile"
(inference) is torch.compile of the accelerated model with inductor's freezing (parameters and the folded
weights become constants) and, on CPU, its C++ wrapper: the deployment a torch-only user would pick for
latency; "acc-triton" (GPU)
is accelerated() with the Triton backend forced (auto does not pick it yet); "onnxruntime"
(CPU inference, when onnxruntime is installed) runs the accelerated model's ONNX export (the folded,
BatchNorm-free graph; static batch size) in ONNX Runtime's CPU execution provider, all graph
optimisations on, with as many intra-op threads as torch uses.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch._inductor.config
from tqdm import tqdm

import transxnet
import transxnet_kernels as tk
from benchmarks.common import sync, tf32_matmuls

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, cwd=os.path.dirname(RESULTS_DIR)
        ).strip()
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "backends": tk.available_backends(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


# --precisions: "fp32"; "tf32", fp32 with TF32 allowed for fp32 matmuls (`torch.set_float32_matmul_precision("high")`)
# in every variant, so the baselines' matmuls and the Triton OSRA kernels take it; "amp", autocast to bf16 (fp16
# where the GPU lacks bf16).
PRECISIONS = ("fp32", "tf32", "amp")


class Variant:
    """One way of running the model: a callable step plus the backend it runs under."""

    def __init__(self, name, model, backend, train, amp_dtype, device, inductor_config=None):
        """inductor_config: None runs the model as it is, a dict runs torch.compile of it with those inductor config
        settings in force at every call (so at the compile, which happens at the first). Not torch.compile's
        `options`: Dynamo reads `freezing` from the global config when it traces, to take the parameters as
        constants, and under `options` it does not see it (T, batch 1: 90 ms compiled that way against 56 ms)."""
        self.name, self.train, self.device, self.backend, self.amp_dtype = name, train, device, backend, amp_dtype
        self.model = model.train(train)
        self.fn = self.model if inductor_config is None else torch.compile(self.model)
        self.inductor_config = inductor_config or {}
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-6) if train else None

    def autocast(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, x):
        with tk.use_backend(self.backend), torch._inductor.config.patch(self.inductor_config):
            if not self.train:
                with torch.no_grad(), self.autocast():
                    return self.fn(x)
            with self.autocast():
                out = self.fn(x)
            loss = (
                out.float().square().mean()
                if isinstance(out, torch.Tensor)
                else sum(o.float().square().mean() for o in out)
            )
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return out


class OnnxRuntimeVariant:
    """Inference in ONNX Runtime (CPU execution provider) of the model's ONNX export for x's shape."""

    name, train, backend = "onnxruntime", False, "auto"

    def __init__(self, model, x, threads):
        import onnxruntime as ort

        self.device = x.device
        path = os.path.join(tempfile.mkdtemp(prefix="transxnet-onnx-"), "model.onnx")
        log(f"exporting to ONNX ({tuple(x.shape)})")
        with torch.no_grad():
            torch.onnx.export(model.eval(), (x,), path, dynamo=True, verbose=False)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def step(self, x):
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def peak_mb(variant, x):
    if variant.device.type != "cuda":
        return None
    sync(variant.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(variant.device)
    base = torch.cuda.memory_allocated(variant.device)
    variant.step(x)
    sync(variant.device)
    return (torch.cuda.max_memory_allocated(variant.device) - base) / 2**20


def max_rel_diff(a, b):
    if isinstance(a, (list, tuple)):
        return max(max_rel_diff(x, y) for x, y in zip(a, b))
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def percentile(values, q: float) -> float:
    """The q-quantile of values (linear interpolation between order statistics)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bench_case(case: dict, variants, x, rounds: int, warmup: int, settle: int = 0):
    """Interleaved timing: each round runs every variant once, each timed call right after `settle` untimed
    calls of the same variant.

    Settling matters for short CPU calls: after a call, its engine's worker threads spin for a while (OpenMP's
    and ONNX Runtime's pools both do), so on a 2-core machine the next variant's call would share the cores
    with them. Measured on T at batch 1 (2026-12-03): alternating single calls made accelerated 1.5x and ONNX
    Runtime 1.5x slower than runs of calls of one engine. With a settling call each timed call sees its own
    pool warm and the other idle, as in a process serving one engine."""
    device = x.device
    log(f"{case['label']}: warm-up ({', '.join(v.name for v in variants)})")
    outputs = {}
    for v in variants:
        for _ in range(warmup):
            outputs[v.name] = v.step(x)
    sync(device)
    times = {v.name: [] for v in variants}
    for _ in tqdm(range(rounds), desc=case["label"], unit="round", file=sys.stderr, leave=False):
        for v in variants:
            for _ in range(settle):
                v.step(x)
            sync(device)
            t0 = time.perf_counter()
            outputs[v.name] = v.step(x)
            sync(device)
            times[v.name].append(time.perf_counter() - t0)
    log(f"{case['label']}: {rounds} rounds done")
    eager_out = outputs["eager"]
    rows = []
    for v in variants:
        med = statistics.median(times[v.name])
        rows.append(
            {
                **case,
                "variant": v.name,
                "median_s": med,
                "images_per_s": x.shape[0] / med,
                "median_ms": 1e3 * med,
                "p90_ms": 1e3 * percentile(times[v.name], 0.9),
                "peak_mem_mb": peak_mb(v, x),
                "max_rel_diff_vs_eager": max_rel_diff(outputs[v.name], eager_out),
            }
        )
    base = next(r for r in rows if r["variant"] == "eager")["median_s"]
    for r in rows:
        r["speedup_vs_eager"] = base / r["median_s"]
    return rows


def acc_compile_config(device) -> dict:
    """Inductor config of the acc-compile variant (inference): freezing makes the parameters and folded weights
    constants; on CPU the C++ wrapper calls the graph's kernels from C++, not from a generated Python function,
    whose per-call cost is what batch 1 pays (T, batch 1, 2 threads, one script, 2026-12-04: accelerated 70.9 ms,
    acc-compile 56.3 ms, ONNX Runtime 55.3 ms)."""
    return {"freezing": True, "cpp_wrapper": True} if device.type == "cpu" else {"freezing": True}


def make_variants(builder, train, amp_dtype, device, with_compile, onnx_input=None):
    """The variants to time; with `onnx_input`, also ONNX Runtime on an export for that input."""
    torch.manual_seed(0)
    eager = builder().to(device)
    variants = [Variant("eager", eager, "reference", train, amp_dtype, device)]
    if with_compile:
        variants.append(Variant("compile", copy.deepcopy(eager), "reference", train, amp_dtype, device, {}))
    variants.append(
        Variant("accelerated", transxnet.accelerated(copy.deepcopy(eager)), "auto", train, amp_dtype, device)
    )
    if with_compile and not train:
        accelerated = transxnet.accelerated(copy.deepcopy(eager))
        config = acc_compile_config(device)
        variants.append(Variant("acc-compile", accelerated, "auto", train, amp_dtype, device, config))
    if device.type == "cuda":
        # auto leaves Triton out until its kernels measure faster (transxnet_kernels.backend.AUTO_ORDER)
        variants.append(
            Variant("acc-triton", transxnet.accelerated(copy.deepcopy(eager)), "triton", train, amp_dtype, device)
        )
    if onnx_input is not None:
        exported = transxnet.accelerated(copy.deepcopy(eager))
        variants.append(OnnxRuntimeVariant(exported, onnx_input, torch.get_num_threads()))
    return variants


def print_table(rows):
    header = (
        f"{'case':46s} {'variant':12s} {'img/s':>10s} {'x eager':>8s} {'med ms':>9s} {'p90 ms':>9s} "
        f"{'peak MiB':>9s} {'max rel diff':>12s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        print(
            f"{r['label']:46s} {r['variant']:12s} {r['images_per_s']:10.1f} {r['speedup_vs_eager']:8.2f} "
            f"{r['median_ms']:9.1f} {r['p90_ms']:9.1f} {mem:>9s} {r['max_rel_diff_vs_eager']:12.2e}"
        )


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart")
        return None
    labels = list(dict.fromkeys(r["label"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.5))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [
            next((r["speedup_vs_eager"] for r in rows if r["label"] == lab and r["variant"] == v), 0) for lab in labels
        ]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=v)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("throughput relative to eager (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="t,s,b", help="comma list of t,s,b")
    p.add_argument(
        "--batch",
        default=None,
        help="comma list of batch sizes (e.g. 16,1: throughput and latency); default 128 on GPU, 16 on CPU",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", default="infer,train")
    p.add_argument(
        "--precisions", default=None, help="comma list of fp32,tf32,amp (default: fp32+amp on GPU, fp32 on CPU)"
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile variants (compile, acc-compile: slow to build)",
    )
    p.add_argument("--no-detection", action="store_true", help="skip the fork_feat detection-size case")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime column (CPU inference)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--settle",
        type=int,
        default=None,
        help="untimed calls of a variant right before each of its timed calls (default: 1 on CPU at batch <= 4, "
        "where another engine's spinning threads would share the cores with a short call; else 0)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    batches = [int(b) for b in args.batch.split(",")] if args.batch else [128 if on_gpu else 16]
    rounds = args.rounds or (10 if on_gpu else 5)
    with_onnx = not on_gpu and not args.no_onnx and onnxruntime_available()
    if not on_gpu and not args.no_onnx and not with_onnx:
        log("onnxruntime is not installed: no ONNX Runtime column")
    precisions = (args.precisions or ("fp32,amp" if on_gpu else "fp32")).split(",")
    if unknown := sorted(set(precisions) - set(PRECISIONS)):
        p.error(f"unknown precision {', '.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    amp_dtype = torch.bfloat16 if (on_gpu and torch.cuda.is_bf16_supported()) else torch.float16
    env = environment(device)
    log(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, backends {env['backends']}")
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out, f"model_{device.type}_{stamp}.json")
    os.makedirs(args.out, exist_ok=True)

    def save(rows):
        # after every case, so that a run cut short (a GPU lease's time limit) keeps what it measured
        with open(json_path, "w") as f:
            json.dump({"environment": env, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)

    rows = []
    for arch in args.models.split(","):
        for mode in args.modes.split(","):
            for prec in precisions:
                for batch in batches:
                    label = f"{arch.upper()} {mode} {prec} b{batch} {args.size}px"
                    x = torch.randn(batch, 3, args.size, args.size, device=device)
                    onnx_input = x if with_onnx and mode == "infer" and prec == "fp32" else None
                    # a variant compiles at its first call, so inside the block too
                    with tf32_matmuls(prec == "tf32"):
                        variants = make_variants(
                            lambda: transxnet.TransXNet(arch),
                            mode == "train",
                            amp_dtype if prec == "amp" else None,
                            device,
                            not args.no_compile,
                            onnx_input,
                        )
                        # small batches: more rounds for a stable latency distribution
                        case_rounds = min(50, rounds * max(1, max(batches) // batch))
                        settle = args.settle if args.settle is not None else int(not on_gpu and batch <= 4)
                        rows += bench_case(
                            {
                                "label": label,
                                "model": arch,
                                "mode": mode,
                                "precision": prec,
                                "batch": batch,
                                "size": args.size,
                            },
                            variants,
                            x,
                            case_rounds,
                            args.warmup,
                            settle,
                        )
                    save(rows)
                    del variants
    if not args.no_detection:
        det_batch, det_size = 2, (800, 1216)
        label = f"T fork_feat fwd+bwd b{det_batch} {det_size[0]}x{det_size[1]}"
        x = torch.randn(det_batch, 3, *det_size, device=device)
        variants = make_variants(
            lambda: transxnet.TransXNet("t", fork_feat=True), True, None, device, not args.no_compile and on_gpu
        )
        rows += bench_case(
            {
                "label": label,
                "model": "t_fork_feat",
                "mode": "train",
                "precision": "fp32",
                "batch": det_batch,
                "size": list(det_size),
            },
            variants,
            x,
            max(3, rounds // 2),
            1,
        )

    save(rows)
    print_table(rows)
    chart = plot(
        rows,
        json_path[: -len(".json")] + ".png",
        f"TransXNet on {env['device']} (torch {env['torch']}, commit {env['commit']}, {env['date']})",
    )
    log(f"wrote {json_path}" + (f" and {chart}" if chart else ""))
    return rows


if __name__ == "__main__":
    main()
