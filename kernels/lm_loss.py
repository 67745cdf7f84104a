"""Fused masked-LM loss: vocabulary projection + cross-entropy over the labelled rows, without [rows, V] logits.

Same contract as ``reference.lm_loss`` (kernels/spec.py). ``ignore_index=None`` says every row is labelled (the training path
compacts them on the host): then nothing here makes the host wait for the device. With an ignore_index the
labelled rows are compacted first by one ``nonzero``, which synchronises (it must know their count). Labels are
range-checked on the device (``torch._assert_async`` in ``spec.lm_inputs``). Rows are processed in chunks of C,
all in one reused [C, V_pad] buffer (V_pad: V rounded up to a multiple of 64):
  1. logits = rows @ W.T, written by cuBLAS straight into the buffer's [:, :V] view, as two GEMMs: the 64-aligned
     columns (where cuBLAS runs its Hopper kernels) and the V % 64 others;
  2. ``_ce_chunk_kernel``: one program per row: adds the bias, an online log-sum-exp over the V_pad columns (64-
     aligned rows and masks: 16-byte loads; the pad columns count as -inf), the loss (label smoothing as
     F.cross_entropy, over the true V) and, in the same launch, d loss / d logits written in place;
  3. d hidden = dlogits @ W, d W += dlogits.T @ rows (in fp32 when several chunks add up, or in bf16 with
     weight_grad_accumulation="bf16" and bf16 weights), d b += sum(dlogits).

Design choice: the gradients are computed in the forward pass and stored (as Liger's fused linear
cross-entropy does), not recomputed chunk-wise in backward: three GEMMs per chunk instead of four, and the
stored state is only the gradients themselves. The GEMMs run in cuBLAS; Triton only does the memory-bound
softmax part. The stored gradients are unscaled (softmax - target) and multiplied by d loss / n in backward,
which keeps fp16 chunks from underflowing. When autograd is off (evaluation) only the loss is computed. The
stored gradients are scaled in place, so a second backward through the same loss (retain_graph) raises.
Under autocast the inputs are cast to the autocast dtype of hidden's device (as F.linear would cast them).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .spec import LMInputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Logits chunk budget. Peak extra memory of one forward+backward, N labelled rows, bf16, V = 30522, H = 768:
#   eager: 12 N V bytes (fp32 log-softmax output, nll grad and log-softmax grad, live together in backward):
#          2.82 GB at N = 7.7k (measured on an H100: 2820 MB);
#   fused: C V_pad 2 (this buffer) + 4 V H (fp32 d W sum, 94 MB) + 2 N H (d hidden); in backward the d W sum
#          and its bf16 cast (47 MB) coexist, so 153 MB = 5.4 % of eager at 7.7k is the floor whatever C is.
# 64 MiB: 1024-row chunks, 8 at 7.7k rows: 168 MB = 6.0 % of eager, 2.2x faster (measured); 4.1 % at the
# benchmark's 15.4k rows. 128 MiB (4 chunks) would be 0.7 ms faster at 7.7k rows but 9 % of eager.
# weight_grad_accumulation="bf16" sums d W in bf16 (47 MB, no cast in backward): 118 MB = 4.2 % of eager at 7.7k,
# for one bf16 rounding of the running sum per chunk (8 at 7.7k rows; eager rounds its single product once).
_CHUNK_BYTES = 64 * 2**20
_ROW_TILE = 128  # rows per chunk: a multiple of the GEMM tile
_VOCAB_ALIGN = 64  # buffer rows padded to 64 elements (vector loads); GEMMs split at it (Hopper cuBLAS kernels)
_MAX_BLOCK_V = 16 if _INTERPRET else 8192  # small blocks under the CPU interpreter, so that tests cross them
_NUM_WARPS = 8


@triton.jit
def _load_logits(ptr, bias_ptr, cols, V, V_pad, HAS_BIAS: tl.constexpr):
    # Loads over V_pad, a multiple of 64, so mask and row start allow 16-byte vector loads (the bias is padded to
    # V_pad too). Columns V..V_pad, never written by the GEMMs, become -inf: weight 0 in the softmax.
    z = tl.load(ptr + cols, mask=cols < V_pad, other=0.0).to(tl.float32)
    z = tl.where(cols < V, z, float("-inf"))
    if HAS_BIAS:  # in fp32 on the rounded GEMM output (F.linear rounds once after the bias: within one ulp)
        z += tl.load(bias_ptr + cols, mask=cols < V_pad, other=0.0).to(tl.float32)
    return z


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, bias_ptr, labels_ptr, loss_ptr, V, V_pad, smoothing,
    HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * V_pad  # rows of the [C, V_pad] buffer
    label = tl.load(labels_ptr + row)
    m = float("-inf")
    total = 0.0
    z_sum = 0.0
    z_label = 0.0
    for start in range(0, V_pad, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = _load_logits(ptr, bias_ptr, cols, V, V_pad, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(z, 0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        z_label += tl.sum(tl.where(cols == label, z, 0.0), 0)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(cols < V, z, 0.0), 0)
    lse = m + tl.log(total)
    # F.cross_entropy with smoothing e: (1 - e) (lse - z_y) + e (lse - mean_j z_j), the mean over the true V
    if HAS_SMOOTHING:
        loss = lse - (1.0 - smoothing) * z_label - smoothing * z_sum / V
    else:
        loss = lse - z_label
    tl.store(loss_ptr + row, loss)
    if COMPUTE_GRAD:
        # d loss / d z_j = softmax_j - (1 - e) [j == y] - e / V  (unscaled by 1 / n), in place
        for start in range(0, V_pad, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = _load_logits(ptr, bias_ptr, cols, V, V_pad, HAS_BIAS)
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0 - smoothing, 0.0)
            if HAS_SMOOTHING:
                grad -= smoothing / V
            tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V_pad)


# torch.addmm(..., out_dtype=torch.float32) (half inputs, fp32 output; CUDA kernels since torch 2.8): decided once
# from the operator's schema, never by catching errors around the real GEMM (an out-of-memory must surface).
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in a's dtype or fp32; for half a, b and an fp32 acc on CUDA one GEMM with an fp32 output,
    without a [V, H] temporary."""
    if a.dtype == acc.dtype:  # the GEMM accumulates in fp32 and rounds the sum once, into acc's dtype
        acc.addmm_(a, b)
    elif acc.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # CPU (no such kernel) or torch < 2.8: a [V, H] temporary in the input dtype
        acc.add_(torch.mm(a, b))


def _chunk_rows(n: int, vocab_pad: int, itemsize: int) -> int:
    """Rows per chunk: what _CHUNK_BYTES holds, whole _ROW_TILEs, spread evenly over the chunks n needs."""
    cap = max(_ROW_TILE, _CHUNK_BYTES // (vocab_pad * itemsize) // _ROW_TILE * _ROW_TILE)
    per_chunk = triton.cdiv(n, triton.cdiv(n, cap))
    return min(n, triton.cdiv(per_chunk, _ROW_TILE) * _ROW_TILE)


def _pad_vocab(vocab: int) -> int:
    return triton.cdiv(vocab, _VOCAB_ALIGN) * _VOCAB_ALIGN


def _vocab_parts(vocab: int) -> list[slice]:
    """The vocabulary as GEMM column ranges: whole 64-column tiles, then the V % 64 others. cuBLAS runs its Hopper
    kernels only on a 64-aligned vocabulary dimension (H100, 2048 x 768 x 30522: 0.40 ms in one GEMM, 0.15 + 0.015
    ms in two), so the few last columns get a small GEMM of their own."""
    main = vocab // _VOCAB_ALIGN * _VOCAB_ALIGN
    return [part for part in (slice(0, main), slice(main, vocab)) if part.stop > part.start]


def _logits_buffer(rows: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """[rows, V_pad], reused by every chunk: the GEMMs write [:, :V], nothing reads the pad columns."""
    return torch.empty(rows, _pad_vocab(vocab), device=like.device, dtype=like.dtype)


def _project_into(logits: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, parts: list[slice]) -> None:
    """logits[:, :V] = rows @ W.T in the buffer itself: cuBLAS takes a leading dimension (V_pad) larger than the
    column count, so nothing is copied. The kernel adds the bias: addmm into a strided view would first copy the
    broadcast bias into it (+0.13 ms per 2048-row chunk on an H100)."""
    for part in parts:
        torch.mm(rows, weight[part].t(), out=logits[:, part])


def _grad_rows_into(out: torch.Tensor, dlogits: torch.Tensor, weight: torch.Tensor, parts: list[slice]) -> None:
    torch.mm(dlogits[:, parts[0]], weight[parts[0]], out=out)
    for part in parts[1:]:
        out.addmm_(dlogits[:, part], weight[part])


def _grad_weight_buffer(weight: torch.Tensor, several: bool, accumulation: str) -> torch.Tensor:
    """d W's storage: a single chunk writes it in the weight dtype, as eager does; several chunks sum into fp32,
    or into the bf16 weight's own dtype with accumulation="bf16" (half the memory, no cast in backward)."""
    if not several:
        return torch.empty_like(weight)
    in_bf16 = accumulation == "bf16" and weight.dtype == torch.bfloat16
    return torch.zeros_like(weight, dtype=weight.dtype if in_bf16 else torch.float32)


def _grad_weight_into(grad_weight, dlogits, rows, parts: list[slice], accumulate: bool) -> None:
    for part in parts:
        if accumulate:
            _addmm_into(grad_weight[part], dlogits[:, part].t(), rows)
        else:
            torch.mm(dlogits[:, part].t(), rows, out=grad_weight[part])


def _ce_chunk(buf, bias_pad, vocab: int, targets, loss_rows, label_smoothing: float, compute_grad: bool) -> None:
    vocab_pad = buf.shape[1]
    _ce_chunk_kernel[(buf.shape[0],)](
        buf, buf if bias_pad is None else bias_pad, targets, loss_rows, vocab, vocab_pad, float(label_smoothing),
        HAS_BIAS=bias_pad is not None, HAS_SMOOTHING=label_smoothing > 0, COMPUTE_GRAD=compute_grad,
        BLOCK_V=min(triton.next_power_of_2(vocab_pad), _MAX_BLOCK_V), num_warps=_NUM_WARPS,
    )  # fmt: skip


def _labelled_rows(labels: torch.Tensor, ignore_index: int | None):
    """(targets, idx): idx the flat indices of the labelled rows, or None when every row is labelled."""
    if ignore_index is None:
        return labels, None
    idx = torch.nonzero(labels != ignore_index).squeeze(1)  # synchronises: the host must learn the count
    return labels.index_select(0, idx), idx


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, weight_grad_accumulation, compute_grad
    ):
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets, idx = _labelled_rows(labels.reshape(-1), ignore_index)
        n, vocab = targets.numel(), weight.shape[0]
        ctx.meta = (n, hidden.shape, weight.dtype)
        ctx.used = False
        if n == 0:
            ctx.zero_like = [(hidden.shape, hidden.dtype), (weight.shape, weight.dtype)]
            ctx.zero_like.append((bias.shape, bias.dtype) if bias is not None else ((0,), weight.dtype))
            return torch.zeros((), device=hidden.device, dtype=torch.float32)
        needs_h, needs_w, needs_b = (compute_grad and ctx.needs_input_grad[i] for i in range(3))
        needs_b = needs_b and bias is not None
        parts = _vocab_parts(vocab)
        chunk = _chunk_rows(n, _pad_vocab(vocab), flat.element_size())
        buf = _logits_buffer(chunk, vocab, flat)
        bias_pad = None if bias is None else F.pad(bias, (0, buf.shape[1] - vocab))
        grad_rows = flat.new_empty(n, flat.shape[1]) if needs_h else None
        several = n > chunk
        grad_weight = _grad_weight_buffer(weight, several, weight_grad_accumulation) if needs_w else None
        grad_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if needs_b else None
        loss_rows = torch.empty(n, device=hidden.device, dtype=torch.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            rows = flat[start:stop] if idx is None else flat.index_select(0, idx[start:stop])
            chunk_buf = buf[: stop - start]
            logits = chunk_buf[:, :vocab]
            _project_into(logits, rows, weight, parts)
            _ce_chunk(
                chunk_buf, bias_pad, vocab, targets[start:stop], loss_rows[start:stop], label_smoothing, compute_grad
            )
            if needs_h:
                _grad_rows_into(grad_rows[start:stop], logits, weight, parts)
            if needs_w:
                _grad_weight_into(grad_weight, logits, rows, parts, accumulate=several)
            if needs_b:
                grad_bias += logits.sum(0, dtype=torch.float32)
        grad_hidden = grad_rows
        if needs_h and idx is not None:  # back to every token, zero on the unlabelled ones
            grad_hidden = torch.zeros_like(flat).index_copy_(0, idx, grad_rows)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss_rows.sum() / n

    @staticmethod
    def backward(ctx, grad_out):
        n, shape, w_dtype = ctx.meta
        if n == 0:  # no labelled row: zero gradients, so every rank runs the same backward
            zeros = [torch.zeros(s, device=grad_out.device, dtype=d) for s, d in ctx.zero_like]
            return *zeros, None, None, None, None, None
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
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, the floating inputs in the autocast dtype of hidden's device, as F.linear would cast them.
    (torch.amp.custom_fwd fixes one device type and one cast dtype; this follows whichever autocast is on.)"""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def lm_loss(inputs: LMInputs) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight.T + bias) against labels, mean over labelled rows (fused, chunked).

    ignore_index=None: every row is labelled and nothing waits for the device (the training path); with an
    ignore_index the labelled rows are compacted first, which synchronises with the host.
    """
    hidden, weight, bias = _autocast_inputs(inputs.hidden, inputs.weight, inputs.bias)
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    compute_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    with torch.autocast(hidden.device.type, enabled=False):  # the inputs are cast already: run them as they are
        return FusedLinearCrossEntropy.apply(
            hidden, weight, bias, inputs.labels, inputs.ignore_index, inputs.label_smoothing,
            inputs.weight_grad_accumulation, compute_grad,
        )  # fmt: skip


def sm90_cases() -> list[dict]:
    """Compile cases for scripts/check_kernels_sm90.py: the cross-entropy kernel at the logits dtypes and the
    BERT vocabulary (its blocks are the same for any V >= _MAX_BLOCK_V)."""
    vocab_pad = _pad_vocab(30522)
    cases = []
    for dtype in ("bf16", "fp16", "fp32"):
        for smoothing, grad in ((False, True), (True, True), (False, False)):
            cases.append({
                "name": f"ce_chunk {dtype} V_pad={vocab_pad} smoothing={smoothing} grad={grad}",
                "kernel": _ce_chunk_kernel,
                "signature": {"logits_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "labels_ptr": "*i64",
                              "loss_ptr": "*fp32", "V": "i32", "V_pad": "i32", "smoothing": "fp32"},
                "constexprs": {"HAS_BIAS": True, "HAS_SMOOTHING": smoothing, "COMPUTE_GRAD": grad,
                               "BLOCK_V": min(triton.next_power_of_2(vocab_pad), _MAX_BLOCK_V)},
                "configs": [triton.Config({}, num_warps=_NUM_WARPS)],
                "divisible_by_16": ["V_pad"],
            })  # fmt: skip
    return cases
