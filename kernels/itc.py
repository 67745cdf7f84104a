"""Fused image-text contrastive loss: ITC (both directions), GRIT consistency, DiHT HN-NCE, uniform-target terms
and ITM negatives.

Same contract as ``reference.itc_terms`` (see the docstring of kernels/spec.py). Nothing of size B x N is
ever stored: the similarity tiles are recomputed on the fly from the features. Each program handles both
directions of its tile (image i . text j and text i . image j), since the consistency term couples them.
Positives are per direction: P^d_i = the group / caption matches (shared by both directions) and the row's extra
positive column of direction d. The ids reach the kernels as int32 dense ranks (_dense_ids: a sort, no host
synchronisation), which keeps the comparisons and the rows' ids in 32-bit registers.

Launches (tiled over [BLOCK_M local rows] x [BLOCK_N gathered columns], fp32 accumulators):
  1. ``_itc_fwd_kernel``, grid (row blocks, column splits): online log-sum-exp of S_i2t and S_t2i over the
     split's columns, over each direction's negatives ((1 + beta) s and beta s for HN-NCE), the consistency cross
     term sum_j p_t2i[i, j] * s_i2t[i, j] (and symmetric) relative to the running maxima, and the split's ITM
     negative (argmax of s, or of s + Gumbel noise drawn in-kernel by Philox) among the local columns that are
     not positives of that direction. The columns are split across programs (as flash-decoding does) so that a
     large B x N keeps every SM busy. It does not count the positives (that would spill its registers).
  2. ``_itc_merge_kernel``, one program per row block: merges the splits' partial states; counts the positives
     (|P^d_i| = group / caption matches + 1 where the extra positive is not one of them); the uniform-target
     terms lse_i - (1/N) sum_j s_ij, with sum_j s_ij = q_i . (sum_j k_j) / temp (the key sum is taken on the
     host, [2, D]); then the positive terms log(e^s_ip / (alpha e^s_ip + e^NT_i)), which need the final NT_i.
     Column tiles holding no group / caption positive skip the dot products, so with in-batch positives this
     costs about one tile per row block; the extra positives, anywhere among the N columns, are per-row dot
     products with the named key rows instead.
  3. ``_itc_dq_kernel`` (backward), grid (row blocks, column splits, feature chunks): recomputes each tile once
     for both directions, forms dS and accumulates dQ = dS @ K and the rows' share of d loss / d temp; the
     splits' partial dQ are summed afterwards. Its tiles treat the extra positive columns as negatives (keeping
     them out of its registers); after the loop each row adds the difference at its extra column (its similarity
     saved by the merge), times that key row, in the split that holds the column.
  4. ``_itc_dk_kernel`` (backward, only without stop_grad_keys): dK = dS^T @ Q, one column block per program;
     its tiles mask the extra positives directly.

The feature width D is held whole in a tile when it fits (D <= 256 in 16-bit, 128 in fp32) in the forward kernel;
elsewhere, and for wider features, the dot products are summed over chunks of D, and the backward splits the
output dQ / dK over chunks of D (grid axis 2).

Gradient of the loss w.r.t. one similarity s_ij of direction d (o = the other direction), per local row i,
with P_i = P^d_i:
  positives     -(1/|P_i|) (1 - e^{s_ij + log alpha - D_ij}),  D_ij = logaddexp(s_ij + log alpha, NT_i)
  negatives     G_i ((1 + beta) e^{(1+beta) s_ij - LSE1_i} - beta e^{beta s_ij - LSE2_i}),
                G_i = (1/|P_i|) sum_p (1 - e^{s_ip + log alpha - D_ip})
  consistency   p_d[i, j] - p_o[i, j]   (the target distribution is under stop-gradient)
  uniform       p_d[i, j] - 1/N
each scaled by the upstream gradient of its term / B (p = softmax over all N columns). dS is normalised by the sum
of the absolute coefficients of its direction before the low-precision dot products, the sum applied after.
The consistency and uniform rows cost nothing when their outputs get no gradient (HAS_CONS, HAS_UNI).

Autotuning is keyed on B and N rounded up to powers of two (and on D, the flags and the dtype), so a short
last batch reuses the tuned configuration and its summation order.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .spec import ITCInputs, ITCTerms

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NEG_MODES = {"none": 0, "hardest": 1, "sample": 2}
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: keeps (m_new - m_old) * 0 == 0
# rows of the per-row statistics [_N_STATS, 2 directions, B]: log-sum-exp over all columns, over the negatives
# of (1 + beta) s and of beta s, the negative term NT, the consistency and contrastive losses, G (see above) and
# the uniform-target term, and s at the extra positive column (0 where that is no new positive; for the dQ kernel)
_N_STATS = 9
_LSE, _LSE1, _LSE2, _NT, _CONS, _LOSS, _GNEG, _UNI, _SX = (tl.constexpr(i) for i in range(_N_STATS))
# rows of a column split's partial state [splits, _N_PART, 2 directions, B]: (max, sum) over all columns, the
# consistency cross term, (max, sum) over the negatives of (1 + beta) s and of beta s, the best ITM key
_N_PART = 8
_P_M, _P_L, _P_A, _P_NM, _P_NS, _P_BM, _P_BS, _P_BEST = (tl.constexpr(i) for i in range(_N_PART))
_PART_FIELDS = tl.constexpr(_N_PART)
# Feature rows up to this many bytes are held whole in registers across the column loop; wider ones are summed
# over chunks of _CHUNK_BYTES per row, streamed from L2 (holding a [64, 256] bf16 query tile of both directions
# costs 128+ registers per thread and spills on sm_90)
_WHOLE_ROW_BYTES = 64 if _INTERPRET else 512
_CHUNK_BYTES = 64 if _INTERPRET else 128
_SMEM_BUDGET = 224 * 1024  # of the H100's 227 KiB per block: what the pipelined tiles may take
_MIN_SPLIT_COLUMNS = 16 if _INTERPRET else 256


def _configs(shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages[, BLOCK_DO]) tuples."""
    if _INTERPRET:  # the interpreter runs on CPU: small tiles, so that tests cross tile edges
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_DO": 16})]
    configs = []
    for m, n, w, s, *do in shapes:
        configs.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n, **({"BLOCK_DO": do[0]} if do else {})}, w, s))
    return configs


# Candidates by element size (16-bit, fp32); each compiles for sm_90 within the shared-memory limit and without
# register spills at D = 64 ... 1024 (fp32: a few bytes; scripts/check_kernels_sm90.py reports them all). _prune
# keeps, for a launch, those of its dtype whose pipelined tiles fit. BLOCK_DO (dQ / dK): the chunk of D accumulated
# per program, in two fp32 [rows, BLOCK_DO] accumulators.
_CANDIDATES = {
    "fwd": {2: _configs([(64, 32, 8, 3)]), 4: _configs([(32, 64, 8, 3)])},
    "merge": {2: _configs([(64, 32, 8, 2)]), 4: _configs([(64, 32, 8, 2)])},
    "dq": {2: _configs([(64, 32, 8, 3, 128), (32, 64, 8, 2, 256), (32, 32, 4, 3, 128)]), 4: _configs([(64, 32, 8, 3, 64)])},
    "dk": {2: _configs([(32, 64, 8, 3, 128), (32, 32, 4, 3, 128)]), 4: _configs([(64, 32, 8, 3, 32)])},
}  # fmt: skip


def _tile_bytes(config, elt: int, block_d: int, block_k: int, kernel: str) -> int:
    """Shared memory the software pipeline needs for one config. Forward: the key tiles of both directions per
    stage (and the query tiles when D is chunked), plus the query tiles held for the launch when D fits whole
    (the merge kernel streams its query tiles, so this bounds it from above).
    Backward: the query and key chunks of S, and the slices multiplied by dS, per stage."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if kernel in ("fwd", "merge"):
        per_stage = 2 * bn * block_k * elt + (2 * bm * block_k * elt if block_k < block_d else 0)
        return config.num_stages * per_stage + (2 * bm * block_d * elt if block_k == block_d else 0)
    slices = bn if kernel == "dq" else bm  # dQ multiplies dS by key rows, dK by query rows
    per_stage = 2 * (bm + bn) * block_k * elt + 2 * slices * config.kwargs["BLOCK_DO"] * elt
    return config.num_stages * per_stage


def _fitting(kernel: str, elt: int, block_d: int, block_k: int) -> list:
    """The candidates of one launch: those of its element size, BLOCK_DO clamped to D, duplicates dropped, those
    whose tiles fit _SMEM_BUDGET kept (at least the smallest one)."""
    clamped = {}
    for c in _CANDIDATES[kernel][elt]:
        kwargs = dict(c.kwargs)
        if "BLOCK_DO" in kwargs:
            kwargs["BLOCK_DO"] = min(kwargs["BLOCK_DO"], block_d)
        key = (tuple(sorted(kwargs.items())), c.num_warps, c.num_stages)
        clamped.setdefault(key, triton.Config(kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
    configs = list(clamped.values())
    size = functools.partial(_tile_bytes, elt=elt, block_d=block_d, block_k=block_k, kernel=kernel)
    return [c for c in configs if size(c) <= _SMEM_BUDGET] or [min(configs, key=size)]


def _autotuned(kernel: str, fn, key: list):
    """fn autotuned over the union of its candidates; each launch keeps those of its dtype and D (_fitting)."""

    def prune(configs, nargs, **kwargs):
        return _fitting(kernel, nargs["q_ptr"].element_size(), kwargs["BLOCK_D"], kwargs["BLOCK_K"])

    configs = [c for by_size in _CANDIDATES[kernel].values() for c in by_size]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)


@triton.jit
def _tile(ptr, part, idx, n, D, dims):
    """Rows idx of part `part` of a stacked [2, n, D] tensor, as a [len(idx), len(dims)] tile, zero outside."""
    mask = (idx < n)[:, None] & (dims < D)[None, :]
    return tl.load(ptr + (part * n + idx[:, None]) * D + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _sim(q_ptr, k_ptr, part, rows, cols, B, N, D, q_whole, HELD: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
         PRECISION: tl.constexpr):  # fmt: skip
    """Raw similarity tile [rows, cols] of direction `part` (fp32). HELD: q_whole is the caller's preloaded
    [rows, BLOCK_D] query tile; otherwise D is summed over chunks of BLOCK_K, both sides loaded chunk by chunk."""
    if HELD:
        k = _tile(k_ptr, part, cols, N, D, tl.arange(0, BLOCK_D))
        return tl.dot(q_whole, tl.trans(k), input_precision=PRECISION)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, BLOCK_D, BLOCK_K):
        dims = kk + tl.arange(0, BLOCK_K)
        q = _tile(q_ptr, part, rows, B, D, dims)
        acc = tl.dot(q, tl.trans(_tile(k_ptr, part, cols, N, D, dims)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _whole(ptr, part, idx, n, D, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The preloaded [len(idx), BLOCK_D] tile when D is held whole, else a placeholder _sim ignores."""
    if BLOCK_K == BLOCK_D:  # a compile-time branch: one return type per specialisation
        tile = _tile(ptr, part, idx, n, D, tl.arange(0, BLOCK_D))
    else:
        tile = 0.0
    return tile


@triton.jit
def _lse_step(m, total, x):
    """One online log-sum-exp step over the columns of x ([BM, BN], -inf where excluded)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, total


@triton.jit
def _lse_merge(m, total, m_s, total_s):
    m_new = tl.maximum(m, m_s)
    return m_new, total * tl.exp(m - m_new) + total_s * tl.exp(m_s - m_new)


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _pick(best, arg, key, start, base):
    """Running argmax over column tiles; the first index wins ties, as torch.argmax."""
    tile_best = tl.max(key, 1)
    tile_arg = tl.argmax(key, 1) + start - base
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, tile_arg, arg)


@triton.jit
def _gumbel(seed, rows, lcols, B):
    u = tl.rand(seed, rows[:, None] * B + lcols[None, :])
    return -tl.log(-tl.log(tl.maximum(u, 1e-20)))


@triton.jit
def _split_range(N, BLOCK_N: tl.constexpr):
    """Columns [start, stop) of this program's split (axis 1 of the grid), in whole tiles."""
    tiles = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
    start = tl.program_id(1) * tiles * BLOCK_N
    return start, tl.minimum(start + tiles * BLOCK_N, N)


@triton.jit
def _load_extra(extra_ptr, rows, B):
    """The rows' extra positive columns of both directions (int32; -1 for none and outside the batch)."""
    rmask = rows < B
    e0 = tl.load(extra_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    return e0, tl.load(extra_ptr + B + rows, mask=rmask, other=-1).to(tl.int32)


@triton.jit
def _shared_positives(gid_all_ptr, cid_all_ptr, gid, cid, cols, valid, cmask):
    """Positives both directions share on a tile: the group or the caption of row and column match."""
    gid_all = tl.load(gid_all_ptr + cols, mask=cmask, other=0)
    cid_all = tl.load(cid_all_ptr + cols, mask=cmask, other=0)
    return ((gid[:, None] == gid_all[None, :]) | (cid[:, None] == cid_all[None, :])) & valid


@triton.jit
def _positives(gid_all_ptr, cid_all_ptr, gid, cid, e0, e1, cols, valid, cmask):
    """Positive masks of the two directions on a tile: the shared ones and each direction's extra column."""
    shared = _shared_positives(gid_all_ptr, cid_all_ptr, gid, cid, cols, valid, cmask)
    pos0 = shared | ((cols[None, :] == e0[:, None]) & valid)
    return pos0, shared | ((cols[None, :] == e1[:, None]) & valid)


@triton.jit(do_not_specialize=["seed0", "seed1"])
def _itc_fwd_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, temp_ptr, part_ptr, arg_ptr,
    B, N, D, offset, beta, seed0, seed1, B_KEY, N_KEY,
    HAS_BETA: tl.constexpr, NEG_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # q: [2, B, D] = (image_feat, text_feat); k: [2, N, D] = (text_all, image_all); direction 0 is i2t.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    q0 = _whole(q_ptr, 0, rows, B, D, BLOCK_D, BLOCK_K)
    q1 = _whole(q_ptr, 1, rows, B, D, BLOCK_D, BLOCK_K)
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    cid = tl.load(cid_ptr + rows, mask=rmask, other=0)
    e0, e1 = _load_extra(extra_ptr, rows, B)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)

    big = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    zero = tl.zeros([BLOCK_M], tl.float32)
    m0, l0, m1, l1 = big, zero, big, zero  # all columns
    a0, a1 = zero, zero  # consistency cross terms, relative to (m0 for values, m1 for weights) and vice versa
    nm0, ns0, nm1, ns1 = big, zero, big, zero  # negatives, (1 + beta) s
    bm0, bs0, bm1, bs1 = big, zero, big, zero  # negatives, beta s
    best0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best1 = best0
    arg0 = tl.full([BLOCK_M], -1, tl.int32)
    arg1 = arg0

    col_start, col_stop = _split_range(N, BLOCK_N)
    for start in range(col_start, col_stop, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < col_stop
        s0 = (
            _sim(
                q_ptr,
                k_ptr,
                0,
                rows,
                cols,
                B,
                N,
                D,
                q0,
                BLOCK_K == BLOCK_D,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                BLOCK_K,
                PRECISION,
            )
            * inv_t
        )
        s1 = (
            _sim(
                q_ptr,
                k_ptr,
                1,
                rows,
                cols,
                B,
                N,
                D,
                q1,
                BLOCK_K == BLOCK_D,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                BLOCK_K,
                PRECISION,
            )
            * inv_t
        )
        valid = rmask[:, None] & cmask[None, :]
        pos0, pos1 = _positives(gid_all_ptr, cid_all_ptr, gid, cid, e0, e1, cols, valid, cmask)
        neg0 = valid & ~pos0
        neg1 = valid & ~pos1

        # all columns + consistency cross terms
        x0 = tl.where(valid, s0, float("-inf"))
        x1 = tl.where(valid, s1, float("-inf"))
        m0_new = tl.maximum(m0, tl.max(x0, 1))
        m1_new = tl.maximum(m1, tl.max(x1, 1))
        r0 = tl.exp(m0 - m0_new)
        r1 = tl.exp(m1 - m1_new)
        p0 = tl.exp(x0 - m0_new[:, None])
        p1 = tl.exp(x1 - m1_new[:, None])
        # a0 = sum_j e^{s1 - m1} (s0 - m0): E_{p_t2i}[s_i2t] = a0 / l1 + m0 (and symmetric for a1)
        a0 = r1 * (a0 - (m0_new - m0) * l1) + tl.sum(p1 * tl.where(valid, s0 - m0_new[:, None], 0.0), 1)
        a1 = r0 * (a1 - (m1_new - m1) * l0) + tl.sum(p0 * tl.where(valid, s1 - m1_new[:, None], 0.0), 1)
        l0 = l0 * r0 + tl.sum(p0, 1)
        l1 = l1 * r1 + tl.sum(p1, 1)
        m0, m1 = m0_new, m1_new

        # negatives: log sum e^{(1 + beta) s} and log sum e^{beta s}
        if HAS_BETA:
            nm0, ns0 = _lse_step(nm0, ns0, tl.where(neg0, (1.0 + beta) * s0, float("-inf")))
            nm1, ns1 = _lse_step(nm1, ns1, tl.where(neg1, (1.0 + beta) * s1, float("-inf")))
            bm0, bs0 = _lse_step(bm0, bs0, tl.where(neg0, beta * s0, float("-inf")))
            bm1, bs1 = _lse_step(bm1, bs1, tl.where(neg1, beta * s1, float("-inf")))
        else:
            nm0, ns0 = _lse_step(nm0, ns0, tl.where(neg0, s0, float("-inf")))
            nm1, ns1 = _lse_step(nm1, ns1, tl.where(neg1, s1, float("-inf")))

        # ITM negatives among the local columns [offset, offset + B)
        if NEG_MODE != 0:
            if (start < offset + B) & (start + BLOCK_N > offset):
                local = ((cols >= offset) & (cols < offset + B))[None, :]
                key0 = s0
                key1 = s1
                if NEG_MODE == 2:
                    key0 += _gumbel(seed0, rows, cols - offset, B)
                    key1 += _gumbel(seed1, rows, cols - offset, B)
                best0, arg0 = _pick(best0, arg0, tl.where(neg0 & local, key0, float("-inf")), start, offset)
                best1, arg1 = _pick(best1, arg1, tl.where(neg1 & local, key1, float("-inf")), start, offset)

    base = part_ptr + tl.program_id(1) * (_PART_FIELDS * 2 * B) + rows
    _store_pair(base, _P_M, B, m0, m1, rmask)
    _store_pair(base, _P_L, B, l0, l1, rmask)
    _store_pair(base, _P_A, B, a0, a1, rmask)
    _store_pair(base, _P_NM, B, nm0, nm1, rmask)
    _store_pair(base, _P_NS, B, ns0, ns1, rmask)
    _store_pair(base, _P_BM, B, bm0, bm1, rmask)
    _store_pair(base, _P_BS, B, bs0, bs1, rmask)
    _store_pair(base, _P_BEST, B, best0, best1, rmask)
    _store_pair(arg_ptr + tl.program_id(1) * 2 * B + rows, 0, B, arg0, arg1, rmask)


@triton.jit
def _store_pair(ptr, field, B, v0, v1, mask):
    """Stores the two directions' values of one field of a [fields, 2, B] layout (ptr already offset by rows)."""
    tl.store(ptr + (2 * field) * B, v0, mask=mask)
    tl.store(ptr + (2 * field + 1) * B, v1, mask=mask)


@triton.jit
def _load_pair(ptr, field, B, mask):
    v0 = tl.load(ptr + (2 * field) * B, mask=mask, other=0.0)
    return v0, tl.load(ptr + (2 * field + 1) * B, mask=mask, other=0.0)


@triton.jit
def _row_dot(q_ptr, part, rows, B, D, key_row, key_mask, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             CHUNK: tl.constexpr):  # fmt: skip
    """Per-row dot products sum_k q[part, rows, k] * key_row[:, k] in fp32 (key_row: one pointer per row to a
    D-vector; rows where key_mask is false get 0), over chunks of CHUNK features."""
    acc = tl.zeros([BLOCK_M], tl.float32)
    for kk in range(0, D, CHUNK):  # a bound known only at run time: the loop is not unrolled, its loads not hoisted
        dims = kk + tl.arange(0, CHUNK)
        q = _tile(q_ptr, part, rows, B, D, dims).to(tl.float32)
        k = tl.load(key_row[:, None] + dims[None, :], mask=key_mask[:, None] & (dims < D)[None, :], other=0.0)
        acc += tl.sum(q * k.to(tl.float32), 1)
    return acc


@triton.jit
def _new_extra(gid_all_ptr, cid_all_ptr, e, gid, cid):
    """Rows whose extra positive (column e, -1 for none) is not already a group / caption positive of the row,
    and e clamped to a column."""
    has = e >= 0
    ec = tl.where(has, e, 0)
    same_group = gid == tl.load(gid_all_ptr + ec, mask=has, other=0)
    return has & ~(same_group | (cid == tl.load(cid_all_ptr + ec, mask=has, other=0))), ec


@triton.jit
def _extra_term(q_ptr, k_ptr, part, rows, new, ec, nt, B, N, D, inv_t, log_alpha, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    """Where `new`: the positive terms (log-ratio, and 1 - e^{s + log alpha - D} for G) of the row's extra positive
    of one direction, and its similarity s; 0 elsewhere. s is a per-row dot product with the named key row, so the
    positive tile loop need not visit the tiles that hold only extra positives."""
    loss = tl.zeros([BLOCK_M], tl.float32)
    g = loss
    s = loss
    if tl.max(new.to(tl.int32)) > 0:
        s = _row_dot(q_ptr, part, rows, B, D, k_ptr + (part * N + ec) * D, new, BLOCK_M, BLOCK_D, 32) * inv_t
        d = _logaddexp(s + log_alpha, nt)
        loss = tl.where(new, s - d, 0.0)
        g = tl.where(new, 1.0 - tl.exp(s + log_alpha - d), 0.0)
        s = tl.where(new, s, 0.0)
    return loss, g, s


@triton.jit
def _count_shared(gid_all_ptr, cid_all_ptr, gid, cid, rmask, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row: the number of group / caption positives among the N columns."""
    count = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        pos = _shared_positives(gid_all_ptr, cid_all_ptr, gid, cid, cols, rmask[:, None] & cmask[None, :], cmask)
        count += tl.sum(pos.to(tl.float32), 1)
    return count


@triton.jit
def _itc_merge_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, ksum_ptr, temp_ptr, part_ptr, arg_ptr,
    stats_ptr, npos_ptr, neg_ptr,
    B, N, D, SPLITS, log_alpha, B_KEY, N_KEY,
    HAS_BETA: tl.constexpr, NEG_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    big = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    zero = tl.zeros([BLOCK_M], tl.float32)
    m0, l0, m1, l1, a0, a1 = big, zero, big, zero, zero, zero
    nm0, ns0, nm1, ns1, bm0, bs0, bm1, bs1 = big, zero, big, zero, big, zero, big, zero
    best0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best1 = best0
    arg0 = tl.full([BLOCK_M], -1, tl.int32)
    arg1 = arg0
    for split in range(0, SPLITS):  # in column order: on ties the earlier split keeps its negative
        base = part_ptr + split * (_PART_FIELDS * 2 * B) + rows
        m0_s, m1_s = _load_pair(base, _P_M, B, rmask)
        l0_s, l1_s = _load_pair(base, _P_L, B, rmask)
        a0_s, a1_s = _load_pair(base, _P_A, B, rmask)
        m0_new = tl.maximum(m0, m0_s)
        m1_new = tl.maximum(m1, m1_s)
        r0, r0_s = tl.exp(m0 - m0_new), tl.exp(m0_s - m0_new)
        r1, r1_s = tl.exp(m1 - m1_new), tl.exp(m1_s - m1_new)
        # re-reference the cross terms to the merged maxima (see the forward kernel's update of a0, a1)
        a0 = r1 * (a0 + (m0 - m0_new) * l1) + r1_s * (a0_s + (m0_s - m0_new) * l1_s)
        a1 = r0 * (a1 + (m1 - m1_new) * l0) + r0_s * (a1_s + (m1_s - m1_new) * l0_s)
        l0 = r0 * l0 + r0_s * l0_s
        l1 = r1 * l1 + r1_s * l1_s
        m0, m1 = m0_new, m1_new
        nm0_s, nm1_s = _load_pair(base, _P_NM, B, rmask)
        ns0_s, ns1_s = _load_pair(base, _P_NS, B, rmask)
        nm0, ns0 = _lse_merge(nm0, ns0, nm0_s, ns0_s)
        nm1, ns1 = _lse_merge(nm1, ns1, nm1_s, ns1_s)
        if HAS_BETA:
            bm0_s, bm1_s = _load_pair(base, _P_BM, B, rmask)
            bs0_s, bs1_s = _load_pair(base, _P_BS, B, rmask)
            bm0, bs0 = _lse_merge(bm0, bs0, bm0_s, bs0_s)
            bm1, bs1 = _lse_merge(bm1, bs1, bm1_s, bs1_s)
        if NEG_MODE != 0:
            best0_s, best1_s = _load_pair(base, _P_BEST, B, rmask)
            arg0_s, arg1_s = _load_pair(arg_ptr + split * 2 * B + rows, 0, B, rmask)
            arg0 = tl.where(best0_s > best0, arg0_s, arg0)
            arg1 = tl.where(best1_s > best1, arg1_s, arg1)
            best0 = tl.maximum(best0, best0_s)
            best1 = tl.maximum(best1, best1_s)

    # what needs all columns, stored now so that it is not held across the positive loop below: the log-sum-exp,
    # the consistency terms, the uniform-target terms lse_i - (1/N) sum_j s_ij, with the sum q_i . (sum_j k_j) /
    # temp (ksum: [2, D] fp32), and the ITM negatives
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    out = stats_ptr + rows
    lse0 = m0 + tl.log(l0)
    lse1 = m1 + tl.log(l1)
    _store_pair(out, _LSE, B, lse0, lse1, rmask)
    # c_i2t[i] = lse_i2t[i] - E_{p_t2i}[s_i2t] = log l0 - a0 / l1
    _store_pair(out, _CONS, B, tl.log(l0) - a0 / l1, tl.log(l1) - a1 / l0, rmask)
    at_sum = tl.zeros([BLOCK_M], tl.int32)
    mean0 = _row_dot(q_ptr, 0, rows, B, D, ksum_ptr + at_sum, rmask, BLOCK_M, BLOCK_D, 32) * (inv_t / N)
    mean1 = _row_dot(q_ptr, 1, rows, B, D, ksum_ptr + D + at_sum, rmask, BLOCK_M, BLOCK_D, 32) * (inv_t / N)
    _store_pair(out, _UNI, B, lse0 - mean0, lse1 - mean1, rmask)
    if NEG_MODE != 0:
        tl.store(neg_ptr + rows, tl.where(best0 > float("-inf"), arg0, -1).to(tl.int64), mask=rmask)
        tl.store(neg_ptr + B + rows, tl.where(best1 > float("-inf"), arg1, -1).to(tl.int64), mask=rmask)

    # |P^d_i| = the shared (group / caption) positives + 1 where the extra positive of direction d is a new one.
    # The forward kernel does not count them (its registers are spent): the ids are compared again here, before
    # the positive terms when HAS_BETA (log n_neg is part of NT), else along with them.
    neg1_0 = nm0 + tl.log(ns0)
    neg1_1 = nm1 + tl.log(ns1)
    _store_pair(out, _LSE1, B, neg1_0, neg1_1, rmask)
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    cid = tl.load(cid_ptr + rows, mask=rmask, other=0)
    n_shared = zero
    if HAS_BETA:
        n_shared = _count_shared(gid_all_ptr, cid_all_ptr, gid, cid, rmask, N, BLOCK_M, BLOCK_N)
        e0, e1 = _load_extra(extra_ptr, rows, B)
        new0, _ = _new_extra(gid_all_ptr, cid_all_ptr, e0, gid, cid)
        new1, _ = _new_extra(gid_all_ptr, cid_all_ptr, e1, gid, cid)
        n_neg0 = N - n_shared - new0.to(tl.float32)  # every column is a positive or a negative of direction d
        n_neg1 = N - n_shared - new1.to(tl.float32)
        neg2_0 = bm0 + tl.log(bs0)
        neg2_1 = bm1 + tl.log(bs1)
        _store_pair(out, _LSE2, B, neg2_0, neg2_1, rmask)
        nt0 = tl.where(n_neg0 > 0, tl.log(n_neg0) + neg1_0 - neg2_0, float("-inf"))
        nt1 = tl.where(n_neg1 > 0, tl.log(n_neg1) + neg1_1 - neg2_1, float("-inf"))
    else:
        nt0 = neg1_0  # -inf when a row has no negative (ns = 0)
        nt1 = neg1_1
    _store_pair(out, _NT, B, nt0, nt1, rmask)

    # positive terms, now that NT is known. The group / caption positives, shared by both directions, over the
    # column tiles; tiles without one skip the dot products (the query rows are streamed there, not held, since
    # they are needed on about one tile per row block). Each row's extra positives, one per direction and
    # anywhere among the N columns, by per-row dot products instead.
    loss0, loss1, g0, g1 = zero, zero, zero, zero
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        pos = _shared_positives(gid_all_ptr, cid_all_ptr, gid, cid, cols, rmask[:, None] & cmask[None, :], cmask)
        if not HAS_BETA:
            n_shared += tl.sum(pos.to(tl.float32), 1)
        if tl.max(pos.to(tl.int32)) > 0:
            s0 = _sim(q_ptr, k_ptr, 0, rows, cols, B, N, D, 0.0, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
            s1 = _sim(q_ptr, k_ptr, 1, rows, cols, B, N, D, 0.0, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
            s0 *= inv_t
            s1 *= inv_t
            d0 = _logaddexp(s0 + log_alpha, nt0[:, None])
            d1 = _logaddexp(s1 + log_alpha, nt1[:, None])
            loss0 += tl.sum(tl.where(pos, s0 - d0, 0.0), 1)
            loss1 += tl.sum(tl.where(pos, s1 - d1, 0.0), 1)
            g0 += tl.sum(tl.where(pos, 1.0 - tl.exp(s0 + log_alpha - d0), 0.0), 1)
            g1 += tl.sum(tl.where(pos, 1.0 - tl.exp(s1 + log_alpha - d1), 0.0), 1)
    e0, e1 = _load_extra(extra_ptr, rows, B)
    new0, ec0 = _new_extra(gid_all_ptr, cid_all_ptr, e0, gid, cid)
    new1, ec1 = _new_extra(gid_all_ptr, cid_all_ptr, e1, gid, cid)
    x_loss0, x_g0, s_x0 = _extra_term(q_ptr, k_ptr, 0, rows, new0, ec0, nt0, B, N, D, inv_t, log_alpha, BLOCK_M,
                                      BLOCK_D)  # fmt: skip
    x_loss1, x_g1, s_x1 = _extra_term(q_ptr, k_ptr, 1, rows, new1, ec1, nt1, B, N, D, inv_t, log_alpha, BLOCK_M,
                                      BLOCK_D)  # fmt: skip
    n_pos0 = n_shared + new0.to(tl.float32)
    n_pos1 = n_shared + new1.to(tl.float32)
    inv_p0 = 1.0 / tl.maximum(n_pos0, 1.0)
    inv_p1 = 1.0 / tl.maximum(n_pos1, 1.0)
    if not HAS_BETA:  # log n_neg, for completeness: the backward reads it only with HAS_BETA
        _store_pair(out, _LSE2, B, tl.log(N - n_pos0), tl.log(N - n_pos1), rmask)
    _store_pair(out, _LOSS, B, -(loss0 + x_loss0) * inv_p0, -(loss1 + x_loss1) * inv_p1, rmask)
    _store_pair(out, _GNEG, B, (g0 + x_g0) * inv_p0, (g1 + x_g1) * inv_p1, rmask)
    _store_pair(out, _SX, B, s_x0, s_x1, rmask)
    _store_pair(npos_ptr + rows, 0, B, n_pos0, n_pos1, rmask)


@triton.jit
def _neg_weight(s, lse1, lse2, beta, HAS_BETA: tl.constexpr):
    """d l_i / d s_ij of a negative, per unit of G_i: (1 + beta) e^{(1+beta) s - LSE1} - beta e^{beta s - LSE2}."""
    if HAS_BETA:
        w = (1.0 + beta) * tl.exp((1.0 + beta) * s - lse1) - beta * tl.exp(beta * s - lse2)
    else:
        w = tl.exp(s - lse1)
    return w


@triton.jit
def _pos_grad(s, nt, inv_p, log_alpha):
    """d l_i / d s_ip of a positive: -(1/|P_i|) (1 - e^{s + log alpha - D}), D = logaddexp(s + log alpha, NT)."""
    return -inv_p * (1.0 - tl.exp(s + log_alpha - _logaddexp(s + log_alpha, nt)))


@triton.jit
def _row_stats(sd, d, rmask, npos_ptr, rows, B, HAS_BETA: tl.constexpr):
    """LSE1, LSE2, G, NT and 1/|P| of direction d for the rows (sd: the stats pointer offset by rows)."""
    lse1 = tl.load(sd + (2 * _LSE1 + d) * B, mask=rmask, other=0.0)
    lse2 = lse1
    if HAS_BETA:
        lse2 = tl.load(sd + (2 * _LSE2 + d) * B, mask=rmask, other=0.0)
    g_neg = tl.load(sd + (2 * _GNEG + d) * B, mask=rmask, other=0.0)
    nt = tl.load(sd + (2 * _NT + d) * B, mask=rmask, other=0.0)
    inv_p = 1.0 / tl.maximum(tl.load(npos_ptr + d * B + rows, mask=rmask, other=1.0), 1.0)
    return lse1, lse2, g_neg, nt, inv_p


@triton.jit
def _contrastive_grad(sd, d, s, pos, valid, rmask, npos_ptr, rows, B, log_alpha, beta, HAS_BETA: tl.constexpr):
    """dS of the contrastive term of direction d on one tile: the negatives' formula on the valid columns, the
    positives' where pos (computed only on tiles holding one)."""
    lse1, lse2, g_neg, nt, inv_p = _row_stats(sd, d, rmask, npos_ptr, rows, B, HAS_BETA)
    ds = tl.where(valid, g_neg[:, None] * _neg_weight(s, lse1[:, None], lse2[:, None], beta, HAS_BETA), 0.0)
    if tl.max(pos.to(tl.int32)) > 0:  # log-add-exp only on tiles holding a positive
        ds = tl.where(pos, _pos_grad(s, nt[:, None], inv_p[:, None], log_alpha), ds)
    return ds


@triton.jit
def _tile_grads(
    gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, stats_ptr, npos_ptr, coef_ptr, rows, cols, s0, s1, B, N,
    log_alpha, beta, HAS_BETA: tl.constexpr, HAS_CONS: tl.constexpr, HAS_UNI: tl.constexpr, EXTRAS: tl.constexpr,
):  # fmt: skip
    """dS of both directions on one [rows] x [cols] tile, each normalised by its direction's coefficient scale.
    EXTRAS: the extra positive columns count as positives; otherwise they get the negatives' formula here, and the
    caller adds the difference (_extra_grad), which keeps them out of the tile's registers."""
    rmask = rows < B
    cmask = cols < N
    valid = rmask[:, None] & cmask[None, :]
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    cid = tl.load(cid_ptr + rows, mask=rmask, other=0)
    if EXTRAS:
        e0, e1 = _load_extra(extra_ptr, rows, B)
        pos0, pos1 = _positives(gid_all_ptr, cid_all_ptr, gid, cid, e0, e1, cols, valid, cmask)
    else:
        pos0 = _shared_positives(gid_all_ptr, cid_all_ptr, gid, cid, cols, valid, cmask)
        pos1 = pos0
    sd = stats_ptr + rows
    ds0 = _contrastive_grad(sd, 0, s0, pos0, valid, rmask, npos_ptr, rows, B, log_alpha, beta, HAS_BETA)
    ds1 = _contrastive_grad(sd, 1, s1, pos1, valid, rmask, npos_ptr, rows, B, log_alpha, beta, HAS_BETA)
    ds0 *= tl.load(coef_ptr)  # coef [2 directions, (contrastive, consistency, uniform, scale)]
    ds1 *= tl.load(coef_ptr + 4)
    if HAS_CONS or HAS_UNI:  # both use the softmax over all columns, p_d
        lse0, lse1 = _load_pair(sd, _LSE, B, rmask)
        p0 = tl.exp(s0 - lse0[:, None])
        p1 = tl.exp(s1 - lse1[:, None])
        if HAS_CONS:  # the consistency gradient of direction d is p_d - p_o: one difference serves both
            p_diff = tl.where(valid, p0 - p1, 0.0)
            ds0 += tl.load(coef_ptr + 1) * p_diff
            ds1 -= tl.load(coef_ptr + 5) * p_diff
        if HAS_UNI:  # the uniform-target gradient of direction d: p_d - 1/N
            ds0 += tl.where(valid, tl.load(coef_ptr + 2) * (p0 - 1.0 / N), 0.0)
            ds1 += tl.where(valid, tl.load(coef_ptr + 6) * (p1 - 1.0 / N), 0.0)
    return ds0, ds1


@triton.jit
def _extra_grad(acc, t, k_ptr, stats_ptr, npos_ptr, coef_ptr, d, rows, new, ec, dims, B, N, D, log_alpha, beta,
                HAS_BETA: tl.constexpr):  # fmt: skip
    """Adds to the dQ accumulator `acc` and to t (sum_j dS_ij s_ij) of direction d what the extra positive column
    ec of each row where `new` (a positive the tile loop treated as a negative) is owed: the positive's dS minus
    the negative's, times that key row; s at the column comes from the merge kernel (_SX)."""
    if tl.max(new.to(tl.int32)) > 0:
        rmask = rows < B
        sd = stats_ptr + rows
        lse1, lse2, g_neg, nt, inv_p = _row_stats(sd, d, rmask, npos_ptr, rows, B, HAS_BETA)
        s = tl.load(sd + (2 * _SX + d) * B, mask=rmask, other=0.0)
        diff = _pos_grad(s, nt, inv_p, log_alpha) - g_neg * _neg_weight(s, lse1, lse2, beta, HAS_BETA)
        corr = tl.where(new, diff * tl.load(coef_ptr + 4 * d), 0.0)
        kmask = new[:, None] & (dims < D)[None, :]
        k = tl.load(k_ptr + (d * N + ec)[:, None] * D + dims[None, :], mask=kmask, other=0.0)
        acc += corr[:, None] * k.to(tl.float32)
        t += corr * s
    return acc, t


@triton.jit
def _itc_dq_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, temp_ptr, stats_ptr, npos_ptr, coef_ptr,
    dq_ptr, dtemp_ptr, B, N, D, log_alpha, beta, B_KEY, N_KEY,
    HAS_BETA: tl.constexpr, HAS_CONS: tl.constexpr, HAS_UNI: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks, column splits, chunks of BLOCK_DO of D); dq: [splits, 2, B, D], dtemp: [splits, B].
    # Both directions' accumulators stay in registers, so the query tiles are streamed (not held) for S.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dims = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    t0 = tl.zeros([BLOCK_M], tl.float32)  # sum_j dS_ij s_ij, for d loss / d temp
    t1 = tl.zeros([BLOCK_M], tl.float32)
    col_start, col_stop = _split_range(N, BLOCK_N)
    for start in range(col_start, col_stop, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s0 = _sim(q_ptr, k_ptr, 0, rows, cols, B, N, D, 0.0, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
        s1 = _sim(q_ptr, k_ptr, 1, rows, cols, B, N, D, 0.0, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
        s0 *= inv_t
        s1 *= inv_t
        ds0, ds1 = _tile_grads(
            gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, stats_ptr, npos_ptr, coef_ptr, rows, cols, s0, s1,
            B, N, log_alpha, beta, HAS_BETA, HAS_CONS, HAS_UNI, False,
        )  # fmt: skip
        t0 += tl.sum(ds0 * s0, 1)
        t1 += tl.sum(ds1 * s1, 1)
        k0 = _tile(k_ptr, 0, cols, N, D, dims)
        k1 = _tile(k_ptr, 1, cols, N, D, dims)
        acc0 = tl.dot(ds0.to(k0.dtype), k0, acc0, input_precision=PRECISION)
        acc1 = tl.dot(ds1.to(k1.dtype), k1, acc1, input_precision=PRECISION)
    # the extra positive columns in this split's range, which the tile loop treated as negatives
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    cid = tl.load(cid_ptr + rows, mask=rmask, other=0)
    e0, e1 = _load_extra(extra_ptr, rows, B)
    new0, ec0 = _new_extra(gid_all_ptr, cid_all_ptr, e0, gid, cid)
    new1, ec1 = _new_extra(gid_all_ptr, cid_all_ptr, e1, gid, cid)
    new0 &= (ec0 >= col_start) & (ec0 < col_stop)
    new1 &= (ec1 >= col_start) & (ec1 < col_stop)
    acc0, t0 = _extra_grad(acc0, t0, k_ptr, stats_ptr, npos_ptr, coef_ptr, 0, rows, new0, ec0, dims, B, N, D,
                           log_alpha, beta, HAS_BETA)  # fmt: skip
    acc1, t1 = _extra_grad(acc1, t1, k_ptr, stats_ptr, npos_ptr, coef_ptr, 1, rows, new1, ec1, dims, B, N, D,
                           log_alpha, beta, HAS_BETA)  # fmt: skip
    scale0 = tl.load(coef_ptr + 3) * inv_t
    scale1 = tl.load(coef_ptr + 7) * inv_t
    out = dq_ptr + tl.program_id(1) * 2 * B * D + rows[:, None] * D + dims[None, :]
    qmask = rmask[:, None] & (dims < D)[None, :]
    tl.store(out, acc0 * scale0, mask=qmask)
    tl.store(out + B * D, acc1 * scale1, mask=qmask)
    # d loss / d temp = -(1 / temp) sum_ij dS_ij s_ij; written once, by the programs of the first chunk of D
    first = rmask & (tl.program_id(2) == 0)
    tl.store(dtemp_ptr + tl.program_id(1) * B + rows, -(t0 * scale0 + t1 * scale1), mask=first)


@triton.jit
def _itc_dk_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, temp_ptr, stats_ptr, npos_ptr, coef_ptr,
    dk_ptr, B, N, D, log_alpha, beta, B_KEY, N_KEY,
    HAS_BETA: tl.constexpr, HAS_CONS: tl.constexpr, HAS_UNI: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):  # fmt: skip
    # grid: (column blocks, 1, chunks of BLOCK_DO of D); dk: [2, N, D] = (d text_all, d image_all)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    acc0 = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start in range(0, B, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        s0 = _sim(q_ptr, k_ptr, 0, rows, cols, B, N, D, 0.0, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
        s1 = _sim(q_ptr, k_ptr, 1, rows, cols, B, N, D, 0.0, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
        s0 *= inv_t
        s1 *= inv_t
        ds0, ds1 = _tile_grads(
            gid_ptr, gid_all_ptr, cid_ptr, cid_all_ptr, extra_ptr, stats_ptr, npos_ptr, coef_ptr, rows, cols, s0, s1,
            B, N, log_alpha, beta, HAS_BETA, HAS_CONS, HAS_UNI, True,
        )  # fmt: skip
        q0 = _tile(q_ptr, 0, rows, B, D, dims)
        q1 = _tile(q_ptr, 1, rows, B, D, dims)
        acc0 = tl.dot(tl.trans(ds0.to(q0.dtype)), q0, acc0, input_precision=PRECISION)
        acc1 = tl.dot(tl.trans(ds1.to(q1.dtype)), q1, acc1, input_precision=PRECISION)
    kmask = (cols < N)[:, None] & (dims < D)[None, :]
    out = dk_ptr + cols[:, None] * D + dims[None, :]
    tl.store(out, acc0 * (tl.load(coef_ptr + 3) * inv_t), mask=kmask)
    tl.store(out + N * D, acc1 * (tl.load(coef_ptr + 7) * inv_t), mask=kmask)


_FWD_KEY = ["B_KEY", "N_KEY", "D", "HAS_BETA", "NEG_MODE"]
_BWD_KEY = ["B_KEY", "N_KEY", "D", "HAS_BETA", "HAS_CONS", "HAS_UNI"]
_itc_fwd = _autotuned("fwd", _itc_fwd_kernel, _FWD_KEY)
_itc_merge = _autotuned("merge", _itc_merge_kernel, _FWD_KEY)
_itc_dq = _autotuned("dq", _itc_dq_kernel, _BWD_KEY)
_itc_dk = _autotuned("dk", _itc_dk_kernel, _BWD_KEY)


def _bucket(size: int) -> int:
    """Autotuning key of a size: the next power of two, so a short last batch reuses its configuration."""
    return triton.next_power_of_2(size)


def _block_params(dtype: torch.dtype, dim: int, streamed: bool = False) -> dict:
    """BLOCK_D (D padded) and BLOCK_K, the chunk of D per similarity dot: all of D when a row fits
    _WHOLE_ROW_BYTES in the forward kernel (the query tile is then held), _CHUNK_BYTES per row otherwise and
    always when `streamed`: in the merge kernel (which visits few tiles, and whose registers go to the per-row
    statistics) and in the backward (whose registers go to the dQ / dK accumulators)."""
    elt = torch.finfo(dtype).bits // 8
    block_d = max(16, triton.next_power_of_2(dim))
    chunk = min(block_d, max(16, _CHUNK_BYTES // elt))
    block_k = block_d if block_d * elt <= _WHOLE_ROW_BYTES and not streamed else chunk
    return {"BLOCK_D": block_d, "BLOCK_K": block_k, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


@functools.cache
def _target_programs(device_index: int) -> int:
    """Programs that keep the device busy: two per SM (a small number under the interpreter, to exercise splits)."""
    if _INTERPRET:
        return 6
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(b: int, n: int, device: torch.device) -> int:
    """Column splits of the forward and dQ launches: enough programs for the device, >= _MIN_SPLIT_COLUMNS columns
    each; computed from the bucketed sizes, so a short last batch keeps the same summation order."""
    row_blocks = triton.cdiv(_bucket(b), 16 if _INTERPRET else 64)
    wanted = triton.cdiv(_target_programs(device.index or 0), row_blocks)
    return max(1, min(wanted, _bucket(n) // _MIN_SPLIT_COLUMNS))


class FusedITC(torch.autograd.Function):
    """Outputs (l_i2t, l_t2i, c_i2t, c_t2i, u_i2t, u_t2i, negatives [2, B]); gradients for the features and
    temperature."""

    @staticmethod
    def forward(ctx, image_feat, text_feat, image_all, text_all, temp, gid, gid_all, cid, cid_all, extra, offset,
                hn_beta, hn_alpha, neg_mode, stop_grad_keys, seeds):  # fmt: skip
        b, dim = image_feat.shape
        n = text_all.shape[0]
        q = torch.stack([image_feat, text_feat]).contiguous()
        k = torch.stack([text_all, image_all]).contiguous()
        ksum = k.sum(1, dtype=torch.float32)  # [2, D]: sum_j s_ij = q_i . ksum / temp (uniform-target terms)
        temp32 = temp.detach().reshape(1).float()
        splits = _num_splits(b, n, q.device)
        f32 = dict(device=q.device, dtype=torch.float32)
        part = torch.empty(splits, _N_PART, 2, b, **f32)
        args = torch.empty(splits, 2, b, device=q.device, dtype=torch.int32)
        stats = torch.empty(_N_STATS, 2, b, **f32)
        n_pos = torch.empty(2, b, **f32)
        negs = torch.full((2, b), -1, device=q.device, dtype=torch.long)
        common = dict(HAS_BETA=hn_beta != 0.0, NEG_MODE=neg_mode)
        keys = (_bucket(b), _bucket(n))
        ids = (gid, gid_all, cid, cid_all, extra)
        log_alpha = math.log(hn_alpha) if hn_alpha > 0 else float("-inf")
        _itc_fwd[lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), splits)](
            q, k, *ids, temp32, part, args, b, n, dim, offset, float(hn_beta), *seeds, *keys, **common,
            **_block_params(q.dtype, dim),
        )  # fmt: skip
        _itc_merge[lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)](
            q, k, *ids, ksum, temp32, part, args, stats, n_pos, negs, b, n, dim, splits, log_alpha, *keys,
            **common, **_block_params(q.dtype, dim, streamed=True),
        )  # fmt: skip
        ctx.save_for_backward(q, k, *ids, temp32, stats, n_pos)
        ctx.consts = (b, n, dim, splits, float(hn_beta), log_alpha, stop_grad_keys)
        ctx.temp_meta = (temp.shape, temp.dtype)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(negs)
        loss, cons, uni = stats[_LOSS.value], stats[_CONS.value], stats[_UNI.value]
        return loss[0].mean(), loss[1].mean(), cons[0].mean(), cons[1].mean(), uni[0].mean(), uni[1].mean(), negs

    @staticmethod
    def backward(ctx, g_l0, g_l1, g_c0, g_c1, g_u0, g_u1, _g_negs):
        q, k, *ids, temp32, stats, n_pos = ctx.saved_tensors
        b, n, dim, splits, beta, log_alpha, stop_grad_keys = ctx.consts
        has_cons = g_c0 is not None or g_c1 is not None
        has_uni = g_u0 is not None or g_u1 is not None
        zero = q.new_zeros((), dtype=torch.float32)
        grads = [zero if g is None else g.float() for g in (g_l0, g_c0, g_u0, g_l1, g_c1, g_u1)]
        coef = torch.stack(grads).reshape(2, 3) / b  # [direction, (contrastive, consistency, uniform)]
        # dS is formed in the feature dtype before the dQ / dK dot products: normalise it to O(1) values
        # and apply the scale after the accumulation (fp16 would underflow on (p_ij - q_ij) / B).
        scale = coef.abs().sum(1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        coef = torch.cat([coef / scale, scale], 1).contiguous()  # [2, 4]
        blocks = _block_params(q.dtype, dim, streamed=True)
        chunks = lambda meta: triton.cdiv(blocks["BLOCK_D"], meta["BLOCK_DO"])  # noqa: E731
        flags = dict(HAS_BETA=beta != 0.0, HAS_CONS=has_cons, HAS_UNI=has_uni, **blocks)
        keys = (_bucket(b), _bucket(n))

        dq = torch.empty(splits, 2, b, dim, device=q.device, dtype=torch.float32)
        dtemp = torch.empty(splits, b, device=q.device, dtype=torch.float32)
        _itc_dq[lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), splits, chunks(meta))](
            q, k, *ids, temp32, stats, n_pos, coef, dq, dtemp, b, n, dim, log_alpha, beta, *keys, **flags
        )  # fmt: skip
        dq = dq[0] if splits == 1 else dq.sum(0)
        d_image_all = d_text_all = None
        if not stop_grad_keys and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            dk = torch.empty(2, n, dim, device=q.device, dtype=torch.float32)
            _itc_dk[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1, chunks(meta))](
                q, k, *ids, temp32, stats, n_pos, coef, dk, b, n, dim, log_alpha, beta, *keys, **flags
            )  # fmt: skip
            d_text_all, d_image_all = dk[0].to(k.dtype), dk[1].to(k.dtype)
        temp_shape, temp_dtype = ctx.temp_meta
        d_temp = dtemp.sum().reshape(temp_shape).to(temp_dtype)
        return (dq[0].to(q.dtype), dq[1].to(q.dtype), d_image_all, d_text_all, d_temp) + (None,) * 11


def _dense_ids(local: torch.Tensor, gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids as int32 dense ranks (equal ids, equal ranks), so the kernels compare 32-bit values: a sort of the
    B + N ids, with no host synchronisation. int32 ids pass through."""
    if local.dtype == gathered.dtype == torch.int32:
        return local, gathered
    ids = torch.cat([local.reshape(-1), gathered.reshape(-1)]).long()
    ordered, order = torch.sort(ids)
    first = torch.ones_like(ordered, dtype=torch.int32)
    first[1:] = (ordered[1:] != ordered[:-1]).to(torch.int32)
    ranks = torch.empty_like(first)
    ranks[order] = torch.cumsum(first, 0, dtype=torch.int32)
    return ranks[: local.numel()], ranks[local.numel() :]


def itc_terms(inputs: ITCInputs) -> ITCTerms:
    x = inputs
    dtype = x.image_feat.dtype if x.image_feat.dtype in (torch.float16, torch.bfloat16) else torch.float32
    feats = [t.to(dtype) for t in (x.image_feat, x.text_feat, x.image_all, x.text_all)]
    neg_mode = _NEG_MODES[x.negatives]
    seeds = (0, 0)
    if neg_mode == 2:
        # Philox seeds for the Gumbel noise, one per direction, from the generator (default: torch's CPU
        # generator, seeded by torch.manual_seed): a CPU draw needs no device synchronisation, a CUDA
        # generator's draw does (.tolist()).
        device = x.generator.device if x.generator is not None else "cpu"
        seeds = tuple(torch.randint(0, 2**31 - 1, (2,), generator=x.generator, device=device).tolist())
    groups = _dense_ids(x.group_ids, x.group_ids_all)
    same = x.caption_ids is x.group_ids and x.caption_ids_all is x.group_ids_all  # no caption relation given
    captions = groups if same else _dense_ids(x.caption_ids, x.caption_ids_all)
    ids = (*groups, *captions, x.extra_positives)
    l_i2t, l_t2i, c_i2t, c_t2i, u_i2t, u_t2i, negs = FusedITC.apply(
        *feats, x.temp, *(t.contiguous() for t in ids), x.offset, x.hn_beta, x.hn_alpha, neg_mode,
        x.stop_grad_keys, seeds,
    )  # fmt: skip
    return ITCTerms(l_i2t, l_t2i, c_i2t, c_t2i, negs[0], negs[1], uniform_i2t=u_i2t, uniform_t2i=u_t2i)


def sm90_cases() -> list[dict]:
    """Compile cases for scripts/check_kernels_sm90.py: each kernel at the dtypes and feature widths a model
    produces, with the configs the autotuner keeps for them (at bf16, D = 256: each flag off and every flag on;
    the heaviest, every flag on, elsewhere)."""
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
    widths = [(torch.bfloat16, 256), (torch.bfloat16, 64), (torch.bfloat16, 1024), (torch.float16, 256),
              (torch.float32, 128), (torch.float32, 256), (torch.float32, 1024)]  # fmt: skip
    cases = []
    for dtype, dim in widths:
        elt = torch.finfo(dtype).bits // 8
        full = dtype == torch.bfloat16 and dim == 256
        feats = {
            "q_ptr": ptr[dtype],
            "k_ptr": ptr[dtype],
            "gid_ptr": "*i32",  # dense int32 ranks of the ids (_dense_ids)
            "gid_all_ptr": "*i32",
            "cid_ptr": "*i32",
            "cid_all_ptr": "*i32",
            "extra_ptr": "*i64",
            "temp_ptr": "*fp32",
        }
        sizes = {"B": "i32", "N": "i32", "D": "i32"}
        keys = {"B_KEY": "i32", "N_KEY": "i32"}
        fwd_out = {"part_ptr": "*fp32", "arg_ptr": "*i32"}
        bwd = {"stats_ptr": "*fp32", "npos_ptr": "*fp32", "coef_ptr": "*fp32"}
        # flag values (HAS_BETA, then the kernel's own flags): the heaviest, and at bf16 D = 256 each flag off
        fwd_flags = [{"HAS_BETA": True, "NEG_MODE": 2}]
        bwd_flags = [{"HAS_BETA": True, "HAS_CONS": True, "HAS_UNI": True}]
        if full:
            fwd_flags += [{"HAS_BETA": False, "NEG_MODE": 1}, {"HAS_BETA": False, "NEG_MODE": 0}]
            bwd_flags += [{"HAS_BETA": False, "HAS_CONS": True, "HAS_UNI": False},
                          {"HAS_BETA": False, "HAS_CONS": False, "HAS_UNI": True},
                          {"HAS_BETA": False, "HAS_CONS": False, "HAS_UNI": False}]  # fmt: skip
        launches = [
            ("itc_fwd", _itc_fwd, "fwd", {**feats, **fwd_out, **sizes, "offset": "i32", "beta": "fp32",
                                          "seed0": "i32", "seed1": "i32", **keys}, fwd_flags),
            ("itc_merge", _itc_merge, "merge", {**feats, "ksum_ptr": "*fp32", **fwd_out, "stats_ptr": "*fp32",
                                              "npos_ptr": "*fp32", "neg_ptr": "*i64", **sizes, "SPLITS": "i32",
                                              "log_alpha": "fp32", **keys}, fwd_flags),
            ("itc_dq", _itc_dq, "dq", {**feats, **bwd, "dq_ptr": "*fp32", "dtemp_ptr": "*fp32", **sizes,
                                       "log_alpha": "fp32", "beta": "fp32", **keys}, bwd_flags),
            ("itc_dk", _itc_dk, "dk", {**feats, **bwd, "dk_ptr": "*fp32", **sizes, "log_alpha": "fp32",
                                       "beta": "fp32", **keys}, bwd_flags),
        ]  # fmt: skip
        for name, kernel, kind, signature, variants in launches:
            blocks = _block_params(dtype, dim, streamed=kind != "fwd")
            for flags in variants:
                cases.append({
                    "name": f"{name} {str(dtype)[6:]} D={dim} " + " ".join(f"{k}={v}" for k, v in flags.items()),
                    "kernel": kernel,
                    "signature": signature,
                    "constexprs": {**flags, **blocks},
                    "configs": _fitting(kind, elt, blocks["BLOCK_D"], blocks["BLOCK_K"]),
                    "divisible_by_16": ["D"],  # as a launch specialises D = 64 ... 1024
                })  # fmt: skip
    return cases
