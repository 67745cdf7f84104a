"""Fused image-text contrastive loss: ITC (both directions), GRIT consistency, DiHT HN-NCE and ITM negatives.

Same contract as ``reference.itc_loss`` (see the docstring of kernels/reference.py). Nothing of size B x N is
ever stored: the similarity tiles are recomputed on the fly from the features.

Launches (all tiled over [BLOCK_M local rows] x [BLOCK_N gathered columns], fp32 accumulators):
  1. ``_itc_stats_kernel``: one pass over N per row block. Online log-sum-exp of S_i2t and S_t2i over all
     columns, over the negatives ((1 + beta) s and beta s for HN-NCE), the consistency cross term
     sum_j p_t2i[i, j] * s_i2t[i, j] (and symmetric) accumulated online against the other direction's running
     maximum, and the ITM negative of each row (argmax of s, or of s + Gumbel noise drawn in-kernel by Philox
     from a seed drawn on the host from the generator) among the local, non-positive columns.
  2. ``_itc_pos_kernel``: per-row positive terms log(e^s_ip / (alpha e^s_ip + e^NT_i)); it needs NT_i from
     pass 1. Column tiles without a positive skip the dot products, so with in-batch positives this pass costs
     the group-id comparisons plus about one tile of matmul per row block.
  3. ``_itc_dq_kernel`` (backward): recomputes the tiles of one direction per program (axis 1 of the grid)
     and accumulates dQ = dS @ K; also the per-row share of d loss / d temp.
  4. ``_itc_dk_kernel`` (backward, only without stop_grad_keys): dK = dS^T @ Q, one column block per program.

Gradient of the loss w.r.t. one similarity s_ij of direction d (o = the other direction), per local row i:
  positives     -(1/|P_i|) (1 - e^{s_ij + log alpha - D_ij}),  D_ij = logaddexp(s_ij + log alpha, NT_i)
  negatives     G_i ((1 + beta) e^{(1+beta) s_ij - LSE1_i} - beta e^{beta s_ij - LSE2_i}),
                G_i = (1/|P_i|) sum_p (1 - e^{s_ip + log alpha - D_ip})
  consistency   p_d[i, j] - p_o[i, j]   (the target distribution is under stop-gradient)
each scaled by the upstream gradient / B.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import ITCOutput, check_itc_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NEG_MODES = {"none": 0, "hardest": 1, "sample": 2}
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: keeps (m_new - m_old) * 0 == 0
# rows of the per-row statistics [_N_STATS, 2 directions, B]: log-sum-exp over all columns, over the negatives
# of (1 + beta) s and of beta s, the negative term NT, the consistency and contrastive losses, and G (see above)
_N_STATS = 7
_LSE, _LSE1, _LSE2, _NT, _CONS, _LOSS, _GNEG = (tl.constexpr(i) for i in range(_N_STATS))


def _configs(shapes):
    if _INTERPRET:  # the interpreter runs on CPU: small tiles, so that tests cross tile edges
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for D <= 256: candidates that compile without (or with few) register
# spills on sm_90; the autotuner picks among them per (B, N, D)
_FWD_CONFIGS = _configs([(64, 64, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3)])
_BWD_CONFIGS = _configs([(64, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 32, 8, 2)])


@triton.jit
def _tile(ptr, part, idx, n, D, dims):
    """Rows idx of part `part` of a stacked [2, n, D] tensor, as a [len(idx), BLOCK_D] tile, zero outside."""
    mask = (idx < n)[:, None] & (dims < D)[None, :]
    return tl.load(ptr + (part * n + idx[:, None]) * D + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _lse_step(m, total, x):
    """One online log-sum-exp step over the columns of x ([BM, BN], -inf where excluded)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, total


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


@triton.jit(do_not_specialize=["seed0", "seed1"])
def _itc_stats_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, temp_ptr, stats_ptr, npos_ptr, neg_ptr,
    B, N, D, offset, beta, seed0, seed1,
    HAS_BETA: tl.constexpr, NEG_MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # q: [2, B, D] = (image_feat, text_feat); k: [2, N, D] = (text_all, image_all); direction 0 is i2t.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dims = tl.arange(0, BLOCK_D)
    q0 = _tile(q_ptr, 0, rows, B, D, dims)
    q1 = _tile(q_ptr, 1, rows, B, D, dims)
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)

    big = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    zero = tl.zeros([BLOCK_M], tl.float32)
    m0, l0, m1, l1 = big, zero, big, zero  # all columns
    a0, a1 = zero, zero  # consistency cross terms, relative to (m0 for values, m1 for weights) and vice versa
    nm0, ns0, nm1, ns1 = big, zero, big, zero  # negatives, (1 + beta) s
    bm0, bs0, bm1, bs1 = big, zero, big, zero  # negatives, beta s
    n_pos, n_neg = zero, zero
    best0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best1 = best0
    arg0 = tl.full([BLOCK_M], -1, tl.int32)
    arg1 = arg0

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        s0 = tl.dot(q0, tl.trans(_tile(k_ptr, 0, cols, N, D, dims)), input_precision=PRECISION) * inv_t
        s1 = tl.dot(q1, tl.trans(_tile(k_ptr, 1, cols, N, D, dims)), input_precision=PRECISION) * inv_t
        gid_all = tl.load(gid_all_ptr + cols, mask=cmask, other=0)
        valid = rmask[:, None] & cmask[None, :]
        pos = (gid[:, None] == gid_all[None, :]) & valid
        neg = valid & ~pos
        n_pos += tl.sum(pos.to(tl.float32), 1)
        n_neg += tl.sum(neg.to(tl.float32), 1)

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
            nm0, ns0 = _lse_step(nm0, ns0, tl.where(neg, (1.0 + beta) * s0, float("-inf")))
            nm1, ns1 = _lse_step(nm1, ns1, tl.where(neg, (1.0 + beta) * s1, float("-inf")))
            bm0, bs0 = _lse_step(bm0, bs0, tl.where(neg, beta * s0, float("-inf")))
            bm1, bs1 = _lse_step(bm1, bs1, tl.where(neg, beta * s1, float("-inf")))
        else:
            nm0, ns0 = _lse_step(nm0, ns0, tl.where(neg, s0, float("-inf")))
            nm1, ns1 = _lse_step(nm1, ns1, tl.where(neg, s1, float("-inf")))

        # ITM negatives among the local columns [offset, offset + B)
        if NEG_MODE != 0:
            if (start < offset + B) & (start + BLOCK_N > offset):
                cand = neg & ((cols >= offset) & (cols < offset + B))[None, :]
                key0 = s0
                key1 = s1
                if NEG_MODE == 2:
                    key0 += _gumbel(seed0, rows, cols - offset, B)
                    key1 += _gumbel(seed1, rows, cols - offset, B)
                best0, arg0 = _pick(best0, arg0, tl.where(cand, key0, float("-inf")), start, offset)
                best1, arg1 = _pick(best1, arg1, tl.where(cand, key1, float("-inf")), start, offset)

    lse0 = m0 + tl.log(l0)
    lse1 = m1 + tl.log(l1)
    neg1_0 = nm0 + tl.log(ns0)
    neg1_1 = nm1 + tl.log(ns1)
    if HAS_BETA:
        neg2_0 = bm0 + tl.log(bs0)
        neg2_1 = bm1 + tl.log(bs1)
        nt0 = tl.log(n_neg) + neg1_0 - neg2_0
        nt1 = tl.log(n_neg) + neg1_1 - neg2_1
    else:
        neg2_0 = tl.log(n_neg)
        neg2_1 = neg2_0
        nt0 = neg1_0
        nt1 = neg1_1
    nt0 = tl.where(n_neg > 0, nt0, float("-inf"))
    nt1 = tl.where(n_neg > 0, nt1, float("-inf"))
    # c_i2t[i] = lse_i2t[i] - E_{p_t2i}[s_i2t] = log l0 - a0 / l1
    cons0 = tl.log(l0) - a0 / l1
    cons1 = tl.log(l1) - a1 / l0

    two_b = 2 * B
    tl.store(stats_ptr + _LSE * two_b + rows, lse0, mask=rmask)
    tl.store(stats_ptr + _LSE * two_b + B + rows, lse1, mask=rmask)
    tl.store(stats_ptr + _LSE1 * two_b + rows, neg1_0, mask=rmask)
    tl.store(stats_ptr + _LSE1 * two_b + B + rows, neg1_1, mask=rmask)
    tl.store(stats_ptr + _LSE2 * two_b + rows, neg2_0, mask=rmask)
    tl.store(stats_ptr + _LSE2 * two_b + B + rows, neg2_1, mask=rmask)
    tl.store(stats_ptr + _NT * two_b + rows, nt0, mask=rmask)
    tl.store(stats_ptr + _NT * two_b + B + rows, nt1, mask=rmask)
    tl.store(stats_ptr + _CONS * two_b + rows, cons0, mask=rmask)
    tl.store(stats_ptr + _CONS * two_b + B + rows, cons1, mask=rmask)
    tl.store(npos_ptr + rows, n_pos, mask=rmask)
    if NEG_MODE != 0:
        tl.store(neg_ptr + rows, tl.where(best0 > float("-inf"), arg0, -1).to(tl.int64), mask=rmask)
        tl.store(neg_ptr + B + rows, tl.where(best1 > float("-inf"), arg1, -1).to(tl.int64), mask=rmask)


@triton.jit
def _itc_pos_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, temp_ptr, stats_ptr, npos_ptr,
    B, N, D, log_alpha,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    d = tl.program_id(1)  # direction
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dims = tl.arange(0, BLOCK_D)
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    sd = stats_ptr + d * B + rows
    two_b = 2 * B
    nt = tl.load(sd + _NT * two_b, mask=rmask, other=0.0)
    loss = tl.zeros([BLOCK_M], tl.float32)
    g_neg = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        gid_all = tl.load(gid_all_ptr + cols, mask=cmask, other=0)
        pos = (gid[:, None] == gid_all[None, :]) & cmask[None, :] & rmask[:, None]
        if tl.max(pos.to(tl.int32)) > 0:  # the dot product only where a positive lies
            q = _tile(q_ptr, d, rows, B, D, dims)
            s = tl.dot(q, tl.trans(_tile(k_ptr, d, cols, N, D, dims)), input_precision=PRECISION) * inv_t
            dpos = _logaddexp(s + log_alpha, nt[:, None])
            loss += tl.sum(tl.where(pos, s - dpos, 0.0), 1)
            g_neg += tl.sum(tl.where(pos, 1.0 - tl.exp(s + log_alpha - dpos), 0.0), 1)
    inv_p = 1.0 / tl.maximum(tl.load(npos_ptr + rows, mask=rmask, other=1.0), 1.0)
    tl.store(sd + _LOSS * two_b, -loss * inv_p, mask=rmask)
    tl.store(sd + _GNEG * two_b, g_neg * inv_p, mask=rmask)


@triton.jit
def _itc_ds(
    gid_ptr, gid_all_ptr, stats_ptr, npos_ptr, coef_ptr,
    rows, cols, q, k, q_o, k_o, d, inv_t, B, N, log_alpha, beta,
    HAS_BETA: tl.constexpr, HAS_CONS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dS of direction d on one [rows] x [cols] tile (normalised by the coefficient scale), and S itself.

    q, k: the tiles of direction d; q_o, k_o: those of the other direction (read only with HAS_CONS).
    """
    rmask = rows < B
    cmask = cols < N
    valid = rmask[:, None] & cmask[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * inv_t
    gid = tl.load(gid_ptr + rows, mask=rmask, other=0)
    gid_all = tl.load(gid_all_ptr + cols, mask=cmask, other=0)
    pos = (gid[:, None] == gid_all[None, :]) & valid
    neg = valid & ~pos
    two_b = 2 * B
    sd = stats_ptr + d * B + rows
    lse1 = tl.load(sd + _LSE1 * two_b, mask=rmask, other=0.0)
    g_neg = tl.load(sd + _GNEG * two_b, mask=rmask, other=0.0)
    c_l = tl.load(coef_ptr + 3 * d)
    c_c = tl.load(coef_ptr + 3 * d + 1)
    if HAS_BETA:
        lse2 = tl.load(sd + _LSE2 * two_b, mask=rmask, other=0.0)
        w = (1.0 + beta) * tl.exp((1.0 + beta) * s - lse1[:, None]) - beta * tl.exp(beta * s - lse2[:, None])
    else:
        w = tl.exp(s - lse1[:, None])
    ds = tl.where(neg, g_neg[:, None] * w, 0.0)
    if tl.max(pos.to(tl.int32)) > 0:  # log-add-exp only on tiles holding a positive
        nt = tl.load(sd + _NT * two_b, mask=rmask, other=0.0)
        inv_p = 1.0 / tl.maximum(tl.load(npos_ptr + rows, mask=rmask, other=1.0), 1.0)
        dpos = _logaddexp(s + log_alpha, nt[:, None])
        ds = tl.where(pos, -inv_p[:, None] * (1.0 - tl.exp(s + log_alpha - dpos)), ds)
    ds = c_l * ds
    if HAS_CONS:
        # the other direction's tile, for the consistency target p_o
        s_o = tl.dot(q_o, tl.trans(k_o), input_precision=PRECISION) * inv_t
        lse = tl.load(sd + _LSE * two_b, mask=rmask, other=0.0)
        lse_o = tl.load(stats_ptr + (1 - d) * B + rows + _LSE * two_b, mask=rmask, other=0.0)
        p_diff = tl.exp(s - lse[:, None]) - tl.exp(s_o - lse_o[:, None])
        ds += c_c * tl.where(valid, p_diff, 0.0)
    return ds, s


@triton.jit
def _itc_dq_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, temp_ptr, stats_ptr, npos_ptr, coef_ptr, dq_ptr, dtemp_ptr,
    B, N, D, log_alpha, beta,
    HAS_BETA: tl.constexpr, HAS_CONS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    d = tl.program_id(1)  # 0: image queries against text keys (i2t), 1: text queries against image keys
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dims = tl.arange(0, BLOCK_D)
    q = _tile(q_ptr, d, rows, B, D, dims)
    q_o = q
    if HAS_CONS:
        q_o = _tile(q_ptr, 1 - d, rows, B, D, dims)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds_s = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(k_ptr, d, cols, N, D, dims)
        k_o = k
        if HAS_CONS:
            k_o = _tile(k_ptr, 1 - d, cols, N, D, dims)
        ds, s = _itc_ds(
            gid_ptr, gid_all_ptr, stats_ptr, npos_ptr, coef_ptr,
            rows, cols, q, k, q_o, k_o, d, inv_t, B, N, log_alpha, beta,
            HAS_BETA, HAS_CONS, PRECISION,
        )  # fmt: skip
        ds_s += tl.sum(ds * s, 1)
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=PRECISION)
    scale = tl.load(coef_ptr + 3 * d + 2)
    qmask = rmask[:, None] & (dims < D)[None, :]
    tl.store(dq_ptr + (d * B + rows[:, None]) * D + dims[None, :], acc * (scale * inv_t), mask=qmask)
    # d loss / d temp = -(1 / temp) sum_ij dS_ij s_ij
    tl.store(dtemp_ptr + d * B + rows, -ds_s * (scale * inv_t), mask=rmask)


@triton.jit
def _itc_dk_kernel(
    q_ptr, k_ptr, gid_ptr, gid_all_ptr, temp_ptr, stats_ptr, npos_ptr, coef_ptr, dk_ptr,
    B, N, D, log_alpha, beta,
    HAS_BETA: tl.constexpr, HAS_CONS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    d = tl.program_id(1)  # 0: text keys of i2t, 1: image keys of t2i
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _tile(k_ptr, d, cols, N, D, dims)
    k_o = k
    if HAS_CONS:
        k_o = _tile(k_ptr, 1 - d, cols, N, D, dims)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, B, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _tile(q_ptr, d, rows, B, D, dims)
        q_o = q
        if HAS_CONS:
            q_o = _tile(q_ptr, 1 - d, rows, B, D, dims)
        ds, s = _itc_ds(
            gid_ptr, gid_all_ptr, stats_ptr, npos_ptr, coef_ptr,
            rows, cols, q, k, q_o, k_o, d, inv_t, B, N, log_alpha, beta,
            HAS_BETA, HAS_CONS, PRECISION,
        )  # fmt: skip
        acc = tl.dot(tl.trans(ds.to(q.dtype)), q, acc, input_precision=PRECISION)
    scale = tl.load(coef_ptr + 3 * d + 2)
    kmask = (cols < N)[:, None] & (dims < D)[None, :]
    tl.store(dk_ptr + (d * N + cols[:, None]) * D + dims[None, :], acc * (scale * inv_t), mask=kmask)


_itc_stats = triton.autotune(_FWD_CONFIGS, key=["B", "N", "D", "HAS_BETA", "NEG_MODE"])(_itc_stats_kernel)
_itc_pos = triton.autotune(_FWD_CONFIGS, key=["B", "N", "D"])(_itc_pos_kernel)
_itc_dq = triton.autotune(_BWD_CONFIGS, key=["B", "N", "D", "HAS_BETA", "HAS_CONS"])(_itc_dq_kernel)
_itc_dk = triton.autotune(_BWD_CONFIGS, key=["B", "N", "D", "HAS_BETA", "HAS_CONS"])(_itc_dk_kernel)


class FusedITC(torch.autograd.Function):
    """Outputs (l_i2t, l_t2i, c_i2t, c_t2i, negatives [2, B]); gradients for the features and temperature."""

    @staticmethod
    def forward(ctx, image_feat, text_feat, image_all, text_all, temp, gid, gid_all, offset, hn_beta, hn_alpha,
                neg_mode, stop_grad_keys, seeds):  # fmt: skip
        b, dim = image_feat.shape
        n = text_all.shape[0]
        q = torch.stack([image_feat, text_feat]).contiguous()
        k = torch.stack([text_all, image_all]).contiguous()
        temp32 = temp.detach().reshape(1).float()
        stats = torch.empty(_N_STATS, 2, b, device=q.device, dtype=torch.float32)
        n_pos = torch.empty(b, device=q.device, dtype=torch.float32)
        negs = torch.full((2, b), -1, device=q.device, dtype=torch.long)
        common = dict(PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_D=_block_d(dim))
        log_alpha = math.log(hn_alpha) if hn_alpha > 0 else float("-inf")
        _itc_stats[_grid(b, "BLOCK_M")](
            q, k, gid, gid_all, temp32, stats, n_pos, negs, b, n, dim, offset, float(hn_beta), *seeds,
            HAS_BETA=hn_beta != 0.0, NEG_MODE=neg_mode, **common,
        )  # fmt: skip
        _itc_pos[_grid(b, "BLOCK_M", 2)](q, k, gid, gid_all, temp32, stats, n_pos, b, n, dim, log_alpha, **common)
        ctx.save_for_backward(q, k, gid, gid_all, temp32, stats, n_pos)
        ctx.consts = (b, n, dim, float(hn_beta), log_alpha, stop_grad_keys, common)
        ctx.temp_meta = (temp.shape, temp.dtype)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(negs)
        loss, cons = stats[_LOSS.value], stats[_CONS.value]
        return loss[0].mean(), loss[1].mean(), cons[0].mean(), cons[1].mean(), negs

    @staticmethod
    def backward(ctx, g_l0, g_l1, g_c0, g_c1, _g_negs):
        q, k, gid, gid_all, temp32, stats, n_pos = ctx.saved_tensors
        b, n, dim, beta, log_alpha, stop_grad_keys, common = ctx.consts
        has_cons = g_c0 is not None or g_c1 is not None
        zero = q.new_zeros((), dtype=torch.float32)
        grads = [zero if g is None else g.float() for g in (g_l0, g_c0, g_l1, g_c1)]
        coef = torch.stack(grads).reshape(2, 2) / b  # [direction, (contrastive, consistency)]
        # dS is formed in the feature dtype before the dQ / dK dot products: normalise it to O(1) values
        # and apply the scale after the accumulation (fp16 would underflow on (p_ij - q_ij) / B).
        scale = coef.abs().sum(1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        coef = torch.cat([coef / scale, scale], 1).contiguous()  # [2, 3]
        flags = dict(HAS_BETA=beta != 0.0, HAS_CONS=has_cons, **common)

        dq = torch.empty(2, b, dim, device=q.device, dtype=torch.float32)
        dtemp = torch.empty(2, b, device=q.device, dtype=torch.float32)
        _itc_dq[_grid(b, "BLOCK_M", 2)](
            q, k, gid, gid_all, temp32, stats, n_pos, coef, dq, dtemp, b, n, dim, log_alpha, beta, **flags
        )  # fmt: skip
        d_image_all = d_text_all = None
        if not stop_grad_keys and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            dk = torch.empty(2, n, dim, device=q.device, dtype=torch.float32)
            _itc_dk[_grid(n, "BLOCK_N", 2)](
                q, k, gid, gid_all, temp32, stats, n_pos, coef, dk, b, n, dim, log_alpha, beta, **flags
            )
            d_text_all, d_image_all = dk[0].to(k.dtype), dk[1].to(k.dtype)
        temp_shape, temp_dtype = ctx.temp_meta
        d_temp = dtemp.sum().reshape(temp_shape).to(temp_dtype)
        return (dq[0].to(q.dtype), dq[1].to(q.dtype), d_image_all, d_text_all, d_temp) + (None,) * 8


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _grid(size: int, block: str, directions: int = 1):
    """Launch grid over `size` in blocks of the autotuned `block`, times the directions handled apart."""
    return lambda meta: (triton.cdiv(size, meta[block]), directions)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    *,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
    group_ids: torch.Tensor | None = None,
    group_ids_all: torch.Tensor | None = None,
    consistency_weight: float = 0.2,
    hn_beta: float = 0.0,
    hn_alpha: float = 1.0,
    negatives: str = "hardest",
    stop_grad_keys: bool = True,
    generator: torch.Generator | None = None,
) -> ITCOutput:
    image_all, text_all, group_ids, group_ids_all = check_itc_inputs(
        image_feat, text_feat, image_all, text_all, offset, group_ids, group_ids_all, negatives
    )
    if hn_alpha < 0:
        raise ValueError(f"hn_alpha must be >= 0, got {hn_alpha}")
    if not torch.is_tensor(temp):
        temp = torch.tensor(float(temp), device=image_feat.device)
    dtype = image_feat.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    feats = [x.to(dtype) for x in (image_feat, text_feat, image_all, text_all)]
    neg_mode = _NEG_MODES[negatives]
    seeds = (0, 0)
    if neg_mode == 2:
        # Philox seeds for the Gumbel noise, one per direction, from the generator (default: torch's CPU
        # generator, seeded by torch.manual_seed): a CPU draw needs no device synchronisation, a CUDA
        # generator's draw does (.tolist()).
        device = generator.device if generator is not None else "cpu"
        seeds = tuple(torch.randint(0, 2**31 - 1, (2,), generator=generator, device=device).tolist())
    l_i2t, l_t2i, c_i2t, c_t2i, negs = FusedITC.apply(
        *feats, temp, group_ids.contiguous(), group_ids_all.contiguous(), offset, hn_beta, hn_alpha, neg_mode,
        stop_grad_keys, seeds,
    )  # fmt: skip
    loss_cons = (c_i2t + c_t2i) / 2
    loss = (l_i2t + l_t2i) / 2
    if consistency_weight != 0:
        loss = loss + consistency_weight * loss_cons
    return ITCOutput(
        loss=loss,
        loss_i2t=l_i2t,
        loss_t2i=l_t2i,
        loss_consistency=loss_cons,
        neg_text_for_image=negs[0],
        neg_image_for_text=negs[1],
    )
