"""The static GPU audit's estimates, as tables in the Triton op modules' docstrings.

Each module under transxnet_kernels/triton states its ops' static estimates in a table generated from the
committed audit results (`benchmarks/results/gpu_audit_<triton>.json`, the newest Triton version there): the
TransXNet-T/S/B stage shapes at 224x224 and batch 128, fp32 and bf16 (and fp32 with TF32 allowed, for the ops that
follow that setting), A100 and H100, forward and backward, each cell the estimate / the DRAM roofline in µs, the
worst over the layouts and modes the audit replays. After an audit,

    python -m benchmarks.audit_tables

rewrites the tables in place; tests/test_gpu_audit.py fails while a docstring disagrees with the results. Plain
JSON to text: no torch or Triton needed.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# The module whose docstring holds each op's table.
MODULES = {
    "idconv": ROOT / "transxnet_kernels" / "triton" / "idconv.py",
    "multiscale_dwconv": ROOT / "transxnet_kernels" / "triton" / "ms_ffn.py",
    "ms_ffn_middle": ROOT / "transxnet_kernels" / "triton" / "ms_ffn.py",
    "ms_ffn_middle_eval": ROOT / "transxnet_kernels" / "triton" / "ms_ffn.py",
    "osra_attention": ROOT / "transxnet_kernels" / "triton" / "osra_attention.py",
}
MODELS = ("t", "s", "b")
COLUMNS = (("fp32", "sm_80"), ("fp32", "sm_90"), ("bf16", "sm_80"), ("bf16", "sm_90"))
# Ops whose kernels follow the user's TF32 setting also show their fp32 calls with TF32 allowed (the audit's "tf32").
TF32_COLUMNS = (("tf32", "sm_80"), ("tf32", "sm_90"))
SIZE = "128x224x224"
WIDTH = 120


def newest_results(results: Path = RESULTS) -> Path:
    """The audit results of the newest Triton version in `results`."""
    found = {}
    for path in results.glob("gpu_audit_*.json"):
        match = re.fullmatch(r"gpu_audit_(\d+)\.(\d+)\.(\d+)\.json", path.name)
        if match:
            found[tuple(int(g) for g in match.groups())] = path
    if not found:
        raise FileNotFoundError(f"no gpu_audit_<triton>.json in {results}")
    return found[max(found)]


def worst_calls(report: Dict[str, Any], models: Sequence[str] = MODELS) -> Dict[Tuple, Dict[str, Any]]:
    """(op, model, shape, dtype, target, phase) -> the call row with the largest estimate / roofline among the
    model's 224x224 batch-128 configurations (layouts, plain or accelerated, train or eval); the audit's markdown
    report takes its T table from it too."""
    worst: Dict[Tuple, Dict[str, Any]] = {}
    for row in report["calls"]:
        model = row["config"].split()[0]
        if model not in models or SIZE not in row["config"]:
            continue
        key = (row["op"], model, tuple(row["shape"]), row["dtype"], row["target"], row["phase"])
        kept = worst.get(key)
        if kept is None or row["estimate_s"] / row["roofline_s"] > kept["estimate_s"] / kept["roofline_s"]:
            worst[key] = row
    return worst


def _worst(report: Dict[str, Any], op: str) -> Dict[Tuple, Dict[str, Any]]:
    """worst_calls of one op, keyed (model, shape, dtype, target, phase)."""
    return {key[1:]: row for key, row in worst_calls(report).items() if key[0] == op}


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def _header(report: Dict[str, Any], op: str, source: str, tf32: bool) -> str:
    text = (
        f"Static audit of `{op}` (`python -m benchmarks.audit_tables` writes this table from {source}: Triton "
        f"{report['triton']}, batch 128 at 224x224, the worst over layouts and modes;"
        + (" tf32: fp32 inputs with TF32 allowed for matmuls;" if tf32 else "")
        + " estimate / DRAM roofline, µs):"
    )
    return textwrap.fill(text, WIDTH)


def table(report: Dict[str, Any], op: str, source: str) -> str:
    """The docstring block of `op`: a header paragraph, a blank line and the table indented by 4, a row per
    (model, stage, phase)."""
    worst = _worst(report, op)
    phases = [p for p in ("forward", "backward") if any(k[4] == p for k in worst)]
    tf32 = any(k[2] == "tf32" for k in worst)
    columns = COLUMNS + (TF32_COLUMNS if tf32 else ())
    rows: List[List[str]] = [["stage", "shape", "phase"] + [f"{dtype} {_gpu_name(report, t)}" for dtype, t in columns]]
    for model in MODELS:
        shapes = sorted({k[1] for k in worst if k[0] == model}, key=lambda s: -s[2])
        for stage, shape in enumerate(shapes, 1):
            for phase in phases:
                cells = []
                for dtype, target in columns:
                    row = worst.get((model, shape, dtype, target, phase))
                    cells.append("-" if row is None else f"{_us(row['estimate_s'])}/{_us(row['roofline_s'])}")
                rows.append([f"{model.upper()}{stage}", "x".join(map(str, shape[1:])), phase] + cells)
    if len(rows) == 1:
        raise ValueError(f"no {op} calls at {SIZE} in the audit results")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return _header(report, op, source, tf32) + "\n\n" + "\n".join(lines) + "\n"


def _gpu_name(report: Dict[str, Any], target: str) -> str:
    name = report["targets"][target]["name"]
    return name.split()[0]  # "A100 SXM 80GB" -> "A100"


def _block_span(text: str, op: str) -> Optional[Tuple[int, int]]:
    """[start, end) of op's block in a module's text: its header paragraph, one blank line, then the lines
    indented by 4 up to the first that is not."""
    start = text.find(f"Static audit of `{op}` (")
    if start < 0:
        return None
    end = text.index("\n\n", start) + 2
    while text.startswith("    ", end):
        end = text.index("\n", end) + 1
    return start, end


def rewrite(report: Dict[str, Any], source: str, modules: Dict[str, Path] = MODULES) -> List[Path]:
    """Replace every op's block in its module by the table of `report`; the modules changed."""
    changed = []
    for path in sorted(set(modules.values())):
        text = original = path.read_text()
        for op in (o for o, p in modules.items() if p == path):
            span = _block_span(text, op)
            if span is None:
                raise ValueError(f"{path}: no 'Static audit of `{op}` (' block in the docstring")
            text = text[: span[0]] + table(report, op, source) + text[span[1] :]
        if text != original:
            path.write_text(text)
            changed.append(path)
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    results = newest_results()
    changed = rewrite(json.loads(results.read_text()), results.name)
    for path in changed:
        print(f"[audit_tables] rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    if not changed:
        print(f"[audit_tables] the tables already match {results.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
