"""Loop trip counts of the project's Triton kernels, for the static time estimate of `gpu_audit`.

One entry per kernel (by function name): given one recorded launch (`args`: the kernel's arguments by
name, ints and tensors as launched; `grid`: three program-grid sizes), it returns, for each runtime
`for` loop of the kernel and of the jit helpers it inlines, the number of times that loop's body runs
summed over all programs of the launch. A loop is named `<function>:<loop variable>`, which is how
`gpu_audit` names the source loops it finds in the kernel's Python source; `tl.static_range` loops
are unrolled at compile time and have no entry. Every formula restates the loop bounds of the kernel
source it is named after: keep them in step when a kernel changes (`gpu_audit` reports a loop it
finds in the SASS but not here as an error).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

Trips = Dict[str, int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_range_trips(total: int, per_split: int, step: int, splits: int) -> int:
    """Σ over splits s of the trips of `range(s·per_split, min((s+1)·per_split, total), step)`."""
    return sum(_cdiv(max(0, min(per_split, total - s * per_split)), step) for s in range(splits))


# ------------------------------------------------------------------------------------------- IDConv


def _idconv_positions(args: Mapping, grid: Sequence[int]) -> int:
    """Position-tile trips of a (sample, channel block, chunk) program grid over H·W positions."""
    planes = grid[0] // args["n_chunks"]
    hw = args["H"] * args["W"]
    return planes * _split_range_trips(hw, args["chunk_len"], args["BLOCK_P"], args["n_chunks"])


def _dynconv(args, grid) -> Trips:
    if args["PLANE_W"] or args["STRIP"]:  # the whole-plane and strip stencils: no runtime loop
        return {}
    tiles = _idconv_positions(args, grid)
    rows = "_dwconv_tile_vec_k:i" if args["VEC"] else "_dynconv_kernel:kh"
    return {"_dynconv_kernel:p0": tiles, rows: tiles * args["K"]}


def _toeplitz(kernel: str) -> Callable[[Mapping, Sequence[int]], Trips]:
    """IDConv's tensor-core kernels: a program per plane, row tiles of BLOCK_M, in each column tiles of BLOCK_N."""

    def trips(args, grid) -> Trips:
        row_tiles = grid[0] * _cdiv(args["H"], args["BLOCK_M"])
        column_tiles = _cdiv(args["W_vectors"] * args["VECTOR"], args["BLOCK_N"])
        return {f"{kernel}:h0": row_tiles, f"{kernel}:w0": row_tiles * column_tiles}

    return trips


def _toeplitz_redo(args, grid) -> Trips:
    # Only planes with a non-finite output run the tap-by-tap loops: none of the audit's (finite) maps.
    return {f"_toeplitz_redo_kernel:{loop}": 0 for loop in ("h0", "w0", "t")}


def _kernel_grad_partial(args, grid) -> Trips:
    if args["PLANE_W"] or args["STRIP"]:  # _wgrad_plane_k over one image (a literal 1: its loop folds away); strips
        return {}
    return {"_kernel_grad_partial_kernel:p0": _idconv_positions(args, grid)}


def _mix(args, grid) -> Trips:
    return {}  # the G groups are a static_range (and the mixing whole-plane forward's stencil is unrolled)


def _softmax_chain(args, grid) -> Trips:
    samples = args["B"] * args["n_cblocks"]  # every (sample, channel block) once, whatever the grouping
    return {"_softmax_chain_kernel:b": samples, "_softmax_chain_kernel:chunk": samples * args["n_chunks"]}


# --------------------------------------------------------------------- multi-scale depthwise conv


def _stencil(args, grid, loops: Sequence[str]) -> Trips:
    """Row loops of the stencil helpers in `loops` over a (spatial tile, channel block, batch split) grid,
    k read per channel block from the launch's block table.

    A helper holds one compiled copy of its row loop per odd kernel size K <= KMAX (K taps unrolled in the
    body), all tied to the same source loop, and the audit counts the largest body (KMAX taps) per trip.
    A row of a k-wide block runs k of those KMAX taps, so it counts as k / KMAX trips: Σ k · k / KMAX rows
    per image (the per-row loop overhead is then undercounted for small k; the taps are exact)."""
    ksizes = [int(k) for k in args["blocks_ptr"].reshape(-1, 3)[:, 2].tolist()]
    images = args["B"] * grid[0]  # every (spatial tile, image) pair of one channel block, over all splits
    rows = images * sum(k * k for k in ksizes) // args["KMAX"]
    return {f"{name}:i": rows for name in loops}


def _conv_loops(args) -> List[str]:
    """The row loop of the stencil helper a launch runs: chunks of 4 pixels (VEC) or one load per tap; none for
    the whole-plane stencil (PLANE_W: a launch per kernel size, its taps unrolled in the caller's per-image
    loop, whose body then counts exactly once per image)."""
    if args["PLANE_W"]:
        return []
    return ["_dwconv_tile_vec_k" if args["VEC"] else "_dwconv_tile_k"]


def _wgrad_loops(args) -> List[str]:
    """The tiled weight-gradient helper's row loop; none on chunks of 4 pixels (rows and taps unrolled, so its
    body counts once per image in the caller's loop) or whole planes (see _wgrad_plane)."""
    return [] if args["VEC"] or args["PLANE_W"] else ["_wgrad_tile_k"]


def _wgrad_plane(args, grid) -> Trips:
    """_wgrad_plane_k's image loop, after the caller's: every image of every channel block once (its K^2 taps
    unrolled in the body)."""
    if not args["PLANE_W"]:
        return {}
    return {"_wgrad_plane_k:_image": grid[0] * grid[1] * args["B"]}


def _msdw_forward(args, grid) -> Trips:
    return {"_forward_kernel:_": grid[0] * grid[1] * args["B"], **_stencil(args, grid, _conv_loops(args))}


def _middle_grad(args, grid) -> Trips:
    loops = [*_conv_loops(args), *_wgrad_loops(args)] if args["DZ"] else _conv_loops(args)
    trips = {"_middle_grad_kernel:_": grid[0] * grid[1] * args["B"], **_stencil(args, grid, loops)}
    return {**trips, **_wgrad_plane(args, grid)} if args["DZ"] else trips


def _dx(args, grid) -> Trips:
    loops = [*_conv_loops(args), *_wgrad_loops(args)] if args["WGRAD"] else _conv_loops(args)
    trips = {"_dx_kernel:_": grid[0] * grid[1] * args["B"], **_stencil(args, grid, loops)}
    return {**trips, **_wgrad_plane(args, grid)} if args["WGRAD"] else trips


def _strips(kernel: str) -> Callable[[Mapping, Sequence[int]], Trips]:
    """The strip, thread-plane and one-pass whole-plane kernels: every image once per (strip, channel block),
    whatever the batch splits (a thread-plane or whole-plane grid has one spatial tile); their stencils and
    weight-gradient sweeps are unrolled (static_range) in the image loop's body."""
    return lambda args, grid: {f"{kernel}:_": grid[0] * grid[1] * args["B"]}


def _whole_row_strips(kernel: str) -> Callable[[Mapping, Sequence[int]], Trips]:
    """The one-pass whole-row strip kernels: every image once per channel block, and in it every strip of STRIP rows,
    top to bottom."""

    def trips(args, grid) -> Trips:
        images = grid[0] * grid[1] * args["B"]
        return {f"{kernel}:_": images, f"{kernel}:h0": images * _cdiv(args["H"], args["STRIP"])}

    return trips


# --------------------------------------------------------------------------------------------- OSRA


def _osra_fwd(args, grid) -> Trips:
    return {"_osra_fwd_kernel:start_m": grid[0] * grid[1] * _cdiv(args["M"], args["BLOCK_M"])}


def _osra_bwd_dq(args, grid) -> Trips:
    batches = grid[0] * grid[1] * args["B"]  # every group's batch range, over all (query block, head)
    return {
        "_osra_bwd_dq_kernel:b": batches,
        "_osra_bwd_dq_kernel:start_m": batches * _cdiv(args["M"], args["BLOCK_M"]),
    }


def _osra_short(kernel: str) -> Callable[[Mapping, Sequence[int]], Trips]:
    """The short-path kernels: every batch once per (query block, head), whatever the batch groups."""
    return lambda args, grid: {f"{kernel}:b": grid[0] * grid[1] * args["B"]}


def _osra_bwd_short(args, grid) -> Trips:
    """Every batch once per (query block, head); then the last query-block program of each (head, batch group)
    sums the group's dk and dv partials (two _store_partials_sum calls, each over one partial per query block),
    unless one query block stored dk and dv in place (DKV_DIRECT); and the last program writing each query block's
    rows of the bias gradient's group slices sums them (DBIAS_SUMMED: over the groups, and the heads where the bias is
    broadcast over them)."""
    trips = _osra_short("_osra_bwd_short_kernel")(args, grid)
    if not args["DKV_DIRECT"]:
        reduced = grid[1] * args["B"]  # (head, batch) pairs, each summed once
        trips.update({"_osra_bwd_short_kernel:group_b": reduced, "_store_partials_sum:_partial": 2 * reduced * grid[0]})
    if args["DBIAS_SUMMED"]:  # every (query block, head, group) slice block summed once, into the bias gradient
        trips["_osra_bwd_short_kernel:_dbias_part"] = grid[0] * grid[1] * grid[2]
    return trips


def _osra_bwd_short_last_program(args, grid) -> Trips:
    """The sums a program runs after the others it waits for: its (head, batch group)'s dk/dv partials (the trips
    `_osra_bwd_short` counts, of one group of BATCHES_PER_PROGRAM batches), its query block's bias-gradient slices (one
    per group of its set, DBIAS_SET_GROUPS, and per head where they are summed). Counted as one program's, the
    launch's last."""
    trips: Trips = {}
    if not args["DKV_DIRECT"]:
        batches = min(args["BATCHES_PER_PROGRAM"], args["B"])
        trips.update({"_osra_bwd_short_kernel:group_b": batches, "_store_partials_sum:_partial": 2 * batches * grid[0]})
    if args["DBIAS_SUMMED"]:
        set_groups = min(args["DBIAS_SET_GROUPS"], grid[2])
        trips["_osra_bwd_short_kernel:_dbias_part"] = set_groups * (grid[1] if args["DBIAS_HEADS_SUMMED"] else 1)
    return trips


def _osra_bwd_dkdv(args, grid) -> Trips:
    rows = _split_range_trips(args["N"], args["ROWS_PER_SPLIT"], args["BLOCK_N"], grid[2])
    return {"_osra_bwd_dkdv_kernel:start_n": grid[0] * grid[1] * rows}


def _batch_norm_affine(args, grid) -> Trips:
    # both sweeps over the partials, BLOCK_P rows a trip, run in the training form only (P = 0 in eval)
    sweeps = grid[0] * -(-args["P"] // args["BLOCK_P"])
    return {"_batch_norm_affine_kernel:p0": sweeps, "_batch_norm_affine_kernel:q0": sweeps}


def _batch_norm_grad(args, grid) -> Trips:
    # the sweep over the partials, BLOCK_P rows a trip, where the launch sums them (P = 0 otherwise)
    return {"_batch_norm_grad_kernel:p0": grid[0] * -(-args["P"] // args["BLOCK_P"])}


def _no_loop(args, grid) -> Trips:
    return {}


def _osra_dkdv_sum(args, grid) -> Trips:
    return {"_store_partials_sum:_partial": grid[0] * grid[1] * grid[2] * args["PARTIALS"]}


LOOP_TRIPS: Dict[str, Callable[[Mapping, Sequence[int]], Trips]] = {
    "_dynconv_kernel": _dynconv,
    "_toeplitz_conv_kernel": _toeplitz("_toeplitz_conv_kernel"),
    "_toeplitz_kernel_grad_kernel": _toeplitz("_toeplitz_kernel_grad_kernel"),
    "_toeplitz_redo_kernel": _toeplitz_redo,
    "_kernel_grad_partial_kernel": _kernel_grad_partial,
    "_softmax_chain_kernel": _softmax_chain,
    "_mix_kernel": _mix,
    "_mixing_plane_forward_kernel": _mix,
    "_forward_kernel": _msdw_forward,
    "_middle_grad_kernel": _middle_grad,
    "_dx_kernel": _dx,
    "_strip_forward_kernel": _strips("_strip_forward_kernel"),
    "_strip_dz_kernel": _strips("_strip_dz_kernel"),
    "_strip_dx_kernel": _strips("_strip_dx_kernel"),
    "_thread_plane_forward_kernel": _strips("_thread_plane_forward_kernel"),
    "_thread_plane_dx_kernel": _strips("_thread_plane_dx_kernel"),
    "_thread_plane_dz_kernel": _strips("_thread_plane_dz_kernel"),
    "_plane_eval_kernel": _strips("_plane_eval_kernel"),
    "_strip_eval_kernel": _whole_row_strips("_strip_eval_kernel"),
    "_strip_dz_dx_kernel": _whole_row_strips("_strip_dz_dx_kernel"),
    "_plane_dz_dx_kernel": _strips("_plane_dz_dx_kernel"),
    "_batch_norm_affine_kernel": _batch_norm_affine,
    "_batch_norm_grad_kernel": _batch_norm_grad,
    "_running_statistics_kernel": _no_loop,
    "_pack_kernel": _no_loop,
    "_osra_fwd_kernel": _osra_fwd,
    "_osra_bwd_dq_kernel": _osra_bwd_dq,
    "_osra_bwd_dkdv_kernel": _osra_bwd_dkdv,
    "_osra_fwd_short_kernel": _osra_short("_osra_fwd_short_kernel"),
    "_osra_bwd_short_kernel": _osra_bwd_short,
    "_osra_dkdv_sum_kernel": _osra_dkdv_sum,
}

# Loops that one program of a launch runs after the others it waits for (a last-arriver sum): their trips per such
# program, a serial tail the launch's busiest SM cannot spread (`gpu_audit.tail_seconds`).
LAST_PROGRAM_TRIPS: Dict[str, Callable[[Mapping, Sequence[int]], Trips]] = {
    "_osra_bwd_short_kernel": _osra_bwd_short_last_program,
}


def _osra_bwd_short_last_arrivers(args, grid) -> Tuple[int, ...]:
    """The programs that run each of the kernel's last-arriver branches, in SASS order: the bias gradient's sum (one
    per query block, and per head unless the heads are summed too), then the dk/dv sum (one per (head, batch
    group))."""
    runs: Tuple[int, ...] = ()
    if args["DBIAS_SUMMED"]:
        sets = _cdiv(grid[2], args["DBIAS_SET_GROUPS"])
        runs += (sets * grid[0] * (1 if args["DBIAS_HEADS_SUMMED"] else grid[1]),)
    if not args["DKV_DIRECT"]:
        runs += (grid[1] * grid[2],)
    return runs


# Kernels with last-arriver branches (`gpu_audit.analyse_sass`: the straight code after a conditional branch or exit
# on an atomic's count, which one program of a group runs): how many programs run each, in SASS order. Their
# straight code is counted that many times, not once per program (`gpu_audit.issued_warp_instructions`), and once
# more in the launch's tail.
LAST_ARRIVER_RUNS: Dict[str, Callable[[Mapping, Sequence[int]], Tuple[int, ...]]] = {
    "_osra_bwd_short_kernel": _osra_bwd_short_last_arrivers,
}

# Pointer parameters a kernel dereferences only on a path the audit's maps (finite values) never take, with the loops
# of that path at 0 trips above: their tensors are not charged to the launch's DRAM bytes (`gpu_audit.launch_seconds`).
RARE_PATH_POINTERS: Dict[str, Tuple[str, ...]] = {
    "_toeplitz_redo_kernel": ("src_ptr", "dst_ptr", "kernel_ptr", "beta_ptr"),
}
