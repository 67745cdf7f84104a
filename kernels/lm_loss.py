"""Fused masked-LM loss: vocabulary projection + cross-entropy over the labelled rows, without [rows, V] logits.

Same contract as ``reference.lm_loss``. The labelled rows are compacted first (one host synchronisation, for
their count), then processed in chunks of C rows:
  1. logits = rows @ W.T + b for the chunk only ([C, V], in the input dtype, so rounded exactly like the
     reference's F.linear),
  2. ``_ce_chunk_kernel``: one program per row, an online log-sum-exp over V in blocks, then the loss
     (label smoothing as F.cross_entropy) and, in the same launch, d loss / d logits written in place,
  3. d hidden = dlogits @ W, d W += dlogits.T @ rows, d b += sum(dlogits).

Design choice: the gradients are computed in the forward pass and stored (as Liger's fused linear
cross-entropy does), not recomputed chunk-wise in backward. The chunked logits must exist for the loss anyway;
reusing them for the gradient costs three GEMMs per chunk (forward, d hidden, d W) instead of four with a
recompute, and the stored state is only the gradients themselves (d hidden [tokens, H] in the input dtype,
d W [V, H] in fp32 when several chunks accumulate into it). The GEMMs run in cuBLAS at full tensor-core
throughput; Triton only does the memory-bound softmax part. Peak extra memory is one [C, V] chunk plus the
gradients; C is chosen so a chunk holds about ``_CHUNK_BYTES``. The stored gradients are unscaled
(softmax - target) and multiplied by d loss / n in backward, which keeps fp16 chunks from underflowing.
When autograd is off (evaluation) only the loss is computed. The stored gradients are scaled in place, so a
second backward through the same loss (retain_graph) raises.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import check_lm_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CHUNK_BYTES = 32 * 2**20  # size of one [C, V] logits chunk
_MAX_BLOCK_V = 16 if _INTERPRET else 8192  # small blocks under the CPU interpreter, so that tests cross them
_NUM_WARPS = 8


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, stride, labels_ptr, loss_ptr, V, smoothing,
    HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    m = float("-inf")
    total = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(cols < V, z, 0.0), 0)
    lse = m + tl.log(total)
    z_label = tl.load(ptr + label).to(tl.float32)
    # F.cross_entropy with smoothing e: (1 - e) (lse - z_y) + e (lse - mean_j z_j)
    if HAS_SMOOTHING:
        loss = lse - (1.0 - smoothing) * z_label - smoothing * z_sum / V
    else:
        loss = lse - z_label
    tl.store(loss_ptr + row, loss)
    if COMPUTE_GRAD:
        # d loss / d z_j = softmax_j - (1 - e) [j == y] - e / V  (unscaled by 1 / n), in place
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0 - smoothing, 0.0)
            if HAS_SMOOTHING:
                grad -= smoothing / V
            tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for half-precision a, b, without a [V, H] temporary where cuBLAS allows it."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.add_(torch.mm(a, b))


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, compute_grad):
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        idx = torch.nonzero(flat_labels != ignore_index).squeeze(1)
        n, vocab = idx.numel(), weight.shape[0]
        ctx.meta = (n, hidden.shape, hidden.dtype, weight.dtype, bias is not None)
        ctx.used = False
        if n == 0:
            ctx.zero_like = [(hidden.shape, hidden.dtype), (weight.shape, weight.dtype)]
            ctx.zero_like.append((bias.shape, bias.dtype) if bias is not None else ((0,), weight.dtype))
            return torch.zeros((), device=hidden.device, dtype=torch.float32)
        targets = flat_labels.index_select(0, idx)
        if bool(((targets < 0) | (targets >= vocab)).any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
        chunk = max(1, _CHUNK_BYTES // (vocab * flat.element_size()))
        needs_h, needs_w, needs_b = (compute_grad and ctx.needs_input_grad[i] for i in range(3))
        needs_b = needs_b and bias is not None
        grad_hidden = torch.zeros_like(flat) if needs_h else None
        grad_weight = None
        if needs_w and n > chunk:  # several chunks accumulate: keep the sum in fp32
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        grad_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if needs_b else None
        loss_rows = torch.empty(n, device=hidden.device, dtype=torch.float32)
        block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
        for start in range(0, n, chunk):
            rows_idx = idx[start : start + chunk]
            rows = flat.index_select(0, rows_idx)
            logits = F.linear(rows, weight, bias).contiguous()
            _ce_chunk_kernel[(rows.shape[0],)](
                logits, logits.stride(0), targets[start : start + chunk], loss_rows[start:], vocab,
                float(label_smoothing), HAS_SMOOTHING=label_smoothing > 0, COMPUTE_GRAD=compute_grad,
                BLOCK_V=block_v, num_warps=_NUM_WARPS,
            )  # fmt: skip
            if needs_h:
                grad_hidden.index_copy_(0, rows_idx, logits @ weight)
            if needs_w:
                if grad_weight is None:  # a single chunk: one GEMM in the weight dtype, as eager
                    grad_weight = logits.t() @ rows
                else:
                    _addmm_fp32(grad_weight, logits.t(), rows)
            if needs_b:
                grad_bias += logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss_rows.sum() / n

    @staticmethod
    def backward(ctx, grad_out):
        n, shape, h_dtype, w_dtype, has_bias = ctx.meta
        if n == 0:  # no labelled row: zero gradients, so every rank runs the same backward
            zeros = [torch.zeros(s, device=grad_out.device, dtype=d) for s, d in ctx.zero_like]
            return *zeros, None, None, None, None
        if ctx.used:
            raise RuntimeError("the fused LM loss stores its gradients once: backward through it only once")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_out.float() / n
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale).reshape(shape)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(w_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(scale).to(w_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight.T + bias) against labels, mean over labelled rows (fused, chunked)."""
    check_lm_inputs(hidden, labels, label_smoothing)
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, label_smoothing, compute_grad)
