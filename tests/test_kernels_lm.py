"""Fused masked-LM loss (Triton cross-entropy run by the CPU interpreter) against the PyTorch reference.

Tolerances: fp32: loss within 1e-5 relative, gradients within 1e-5 of the largest reference gradient entry.
fp16: the fused path adds the bias in fp32 to the rounded GEMM output (F.linear rounds once, after it) and keeps
d logits in fp16 (unscaled softmax - target) before its GEMMs while the reference rounds the scaled fp32
gradient: loss 1e-4, gradients 2e-3; bf16 (under autocast, 8x coarser): loss 2e-3, gradients 2e-2.
Vocabularies that are not multiples of 64 (37, 41, 53, 133) leave pad columns in the [C, V_pad] logits buffer;
133 = 128 + 5 also splits each GEMM into a 64-aligned part and the rest.
"""

import importlib
import weakref

import gritvlp.kernels as kernels
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

lm = importlib.import_module("gritvlp.kernels.lm_loss")


def fused_lm_loss(*args, **kwargs):
    return kernels.lm_loss(*args, backend="triton", **kwargs)


def reference_lm_loss(*args, **kwargs):
    return kernels.lm_loss(*args, backend="reference", **kwargs)


TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (2e-3, 2e-2)}  # (loss, grads)


def make_case(shape=(3, 7), hidden=5, vocab=37, dtype=torch.float32, bias=True, frac=0.5, seed=0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) >= frac] = ignore
    return h, w, b, labels


def run(fn, case, grad_scale=1.7, **kwargs):
    h, w, b, labels = (x.clone().requires_grad_() if x is not None and x.is_floating_point() else x for x in case)
    loss = fn(h, w, b, labels, **kwargs)
    (loss * grad_scale).backward()
    grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    return loss, grads


def assert_close_grads(ref, fused, tol):
    for g_ref, g in zip(ref, fused):
        assert g is not None and g.shape == g_ref.shape and g.dtype == g_ref.dtype
        err = (g.float() - g_ref.float()).abs().max().item()
        assert err <= tol * max(g_ref.float().abs().max().item(), 1e-6), err


def force_chunk_rows(monkeypatch, rows):
    """Chunks of `rows` rows (production chunks are whole 128-row tiles, larger than these cases)."""
    monkeypatch.setattr(lm, "_chunk_rows", lambda n, vocab_pad, itemsize: min(n, rows))


def spy_buffers(monkeypatch):
    """The logits buffers the fused loss allocates, in order, filled with NaN: the pad must never be read."""
    made, make = [], lm._logits_buffer

    def logits_buffer(*args):
        made.append(make(*args).fill_(float("nan")))
        return made[-1]

    monkeypatch.setattr(lm, "_logits_buffer", logits_buffer)
    return made


CASES = {
    # id: (make_case kwargs, lm_loss kwargs); chunk_rows forces several chunks (d W then sums in fp32)
    "odd-fp32": ({}, {}),
    "label-smoothing": ({"vocab": 41}, {"label_smoothing": 0.1}),
    "every-row-labelled-no-bias": ({"bias": False, "frac": 1.0, "shape": (2, 5, 3)}, {}),
    "chunked-fp32": ({"frac": 0.8}, {"chunk_rows": 4}),
    "fp16-smoothing": ({"dtype": torch.float16, "vocab": 53}, {"label_smoothing": 0.2}),
    "fp16-chunked": ({"dtype": torch.float16, "frac": 0.9, "shape": (4, 6)}, {"chunk_rows": 5}),
    "ignore-index-0": ({"ignore": 0}, {"ignore_index": 0}),
    # ignore_index=None: rows already compacted, every one labelled
    "compacted": ({"frac": 1.0, "shape": (11,)}, {"ignore_index": None}),
    "compacted-chunked-smoothing": (
        {"frac": 1.0, "shape": (13,)},
        {"ignore_index": None, "chunk_rows": 4, "label_smoothing": 0.1},
    ),
    "split-vocab-chunked-smoothing": ({"vocab": 133, "frac": 0.8}, {"chunk_rows": 5, "label_smoothing": 0.1}),
    "aligned-vocab-fp16": ({"vocab": 128, "dtype": torch.float16}, {}),
    "compacted-split-vocab-fp16-chunked": (
        {"frac": 1.0, "shape": (9,), "dtype": torch.float16, "vocab": 133},
        {"ignore_index": None, "chunk_rows": 4},
    ),
    "compacted-fp16-chunked-no-bias": (
        {"frac": 1.0, "shape": (2, 7), "dtype": torch.float16, "vocab": 53, "bias": False},
        {"ignore_index": None, "chunk_rows": 3},
    ),
}


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_reference(case_id, monkeypatch):
    case_kwargs, kwargs = CASES[case_id]
    case = make_case(**case_kwargs)
    kwargs = dict(kwargs)
    if "chunk_rows" in kwargs:
        force_chunk_rows(monkeypatch, kwargs.pop("chunk_rows"))
    ref_loss, ref_grads = run(reference_lm_loss, case, **kwargs)
    loss, grads = run(fused_lm_loss, case, **kwargs)
    loss_rtol, grad_tol = TOL[case[0].dtype]
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=1e-6)
    assert_close_grads(ref_grads, grads, grad_tol)


@pytest.mark.parametrize("vocab", [37, 133])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_one_padded_buffer_reused_across_chunks(vocab, smoothing, monkeypatch):
    """Chunks of 4 of 10 rows share one [4, V_pad] buffer whose pad columns hold NaN: never read."""
    case = make_case(shape=(10,), vocab=vocab, frac=1.0, seed=5)
    force_chunk_rows(monkeypatch, 4)
    buffers = spy_buffers(monkeypatch)
    loss, grads = run(fused_lm_loss, case, ignore_index=None, label_smoothing=smoothing)
    ref_loss, ref_grads = run(reference_lm_loss, case, ignore_index=None, label_smoothing=smoothing)
    assert len(buffers) == 1 and buffers[0].shape == (4, lm._pad_vocab(vocab))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, 1e-5)


def test_vocab_parts():
    """64-aligned columns first (cuBLAS's Hopper kernels), then the rest; pad to the next multiple of 64."""
    assert lm._vocab_parts(30522) == [slice(0, 30464), slice(30464, 30522)] and lm._pad_vocab(30522) == 30528
    assert lm._vocab_parts(128) == [slice(0, 128)] and lm._pad_vocab(128) == 128
    assert lm._vocab_parts(37) == [slice(0, 37)] and lm._pad_vocab(37) == 64


@pytest.mark.parametrize("vocab", [53, 128, 133])
def test_logits_written_into_the_padded_buffer(vocab):
    """The GEMMs write the [:, :V] view in place (out= a strided view: no copy) and leave the pad alone."""
    h, w, _, _ = make_case(shape=(6,), vocab=vocab)
    buf = lm._logits_buffer(6, vocab, h).fill_(float("nan"))
    view = buf[:, :vocab]
    ptr = view.data_ptr()
    lm._project_into(view, h, w, lm._vocab_parts(vocab))
    assert buf.shape == (6, lm._pad_vocab(vocab)) and view.data_ptr() == ptr
    torch.testing.assert_close(buf[:, :vocab], h @ w.t(), rtol=1e-6, atol=1e-6)
    assert buf[:, vocab:].isnan().all()


def test_compacted_rows_never_wait_for_the_device():
    """ignore_index=None: no nonzero, boolean indexing or scalar read-back (each makes the host wait on CUDA)."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    syncing = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "item"}
    case = make_case(frac=1.0)
    for fn in (fused_lm_loss, reference_lm_loss):
        with Ops() as ops:
            run(fn, case, ignore_index=None, label_smoothing=0.1)
        assert not ops.seen & syncing, (fn, ops.seen & syncing)
    with Ops() as ops:  # the ignore_index path compacts with nonzero: the control for the check above
        run(fused_lm_loss, make_case())
    assert "nonzero" in ops.seen


@pytest.mark.parametrize("fn", [fused_lm_loss, reference_lm_loss], ids=["fused", "reference"])
def test_label_range_checked_on_the_device(fn):
    """torch._assert_async raises synchronously on CPU (on CUDA it is a device-side assert)."""
    h, w, b, labels = make_case(frac=1.0)
    for bad_value, ignore_index in [(-100, None), (w.shape[0], None), (-1, -100), (w.shape[0], -100)]:
        bad = labels.clone()
        bad[1, 2] = bad_value
        with pytest.raises(RuntimeError, match="labels must lie in"):
            fn(h, w, b, bad, ignore_index=ignore_index)
    fn(h, w, b, labels, ignore_index=None)  # every label in range: no error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_fp32_parameters(dtype, monkeypatch):
    """Under autocast the GEMMs and the logits buffer run in the autocast dtype; the fp32 parameters get fp32
    gradients matching the reference under the same autocast."""
    case = make_case(shape=(3, 5), vocab=53, frac=0.7)
    force_chunk_rows(monkeypatch, 4)
    buffers = spy_buffers(monkeypatch)
    with torch.autocast("cpu", dtype=dtype):
        loss, grads = run(fused_lm_loss, case, label_smoothing=0.1)
        ref_loss, ref_grads = run(reference_lm_loss, case, label_smoothing=0.1)
    assert buffers[0].dtype == dtype and loss.dtype == torch.float32
    loss_rtol, grad_tol = TOL[dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=1e-6)
    assert_close_grads(ref_grads, grads, grad_tol)  # also checks the gradients are fp32, as the parameters


def test_chunks_at_training_size():
    """~7.7k labelled rows, V = 30522, bf16: a handful of whole-tile chunks, each within the byte budget."""
    vocab_pad = lm._pad_vocab(30522)
    assert vocab_pad % 64 == 0 and 30522 < vocab_pad < 30522 + 64
    rows = lm._chunk_rows(7700, vocab_pad, 2)
    assert rows % 128 == 0 and rows * vocab_pad * 2 <= lm._CHUNK_BYTES
    assert -(-7700 // rows) <= 8
    assert lm._chunk_rows(100, vocab_pad, 2) == 100  # fewer rows than a chunk: one chunk of exactly those


@pytest.mark.parametrize(
    "dtype, acc_dtype", [(torch.float32,) * 2, (torch.float16, torch.float32), (torch.bfloat16,) * 2]
)
def test_addmm_into_accumulates(dtype, acc_dtype):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 4, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)
    acc = torch.randn(6, 3, generator=g).to(acc_dtype)
    expected = acc.float() + a.float() @ b.float()
    lm._addmm_into(acc, a, b)
    assert acc.dtype == acc_dtype
    tol = 2e-2 if acc_dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(acc.float(), expected, rtol=tol, atol=tol)


class LiveStorage(TorchDispatchMode):
    """Peak bytes of tensor storage created under the mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("accumulation", ["fp32", "bf16"])
def test_bf16_weight_gradient_accumulation(accumulation, monkeypatch):
    """bf16 weights, several chunks: d W sums in fp32 (then cast) or, with "bf16", in the weight dtype itself;
    both match the reference within bf16's tolerance."""
    case = make_case(shape=(24,), hidden=8, vocab=133, dtype=torch.bfloat16, frac=1.0, seed=11)
    force_chunk_rows(monkeypatch, 5)
    made, make = [], lm._grad_weight_buffer
    monkeypatch.setattr(lm, "_grad_weight_buffer", lambda *a: made.append(make(*a)) or made[-1])
    kwargs = {"ignore_index": None, "label_smoothing": 0.1}
    loss, grads = run(fused_lm_loss, case, weight_grad_accumulation=accumulation, **kwargs)
    ref_loss, ref_grads = run(reference_lm_loss, case, **kwargs)
    assert made[0].dtype == (torch.bfloat16 if accumulation == "bf16" else torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=TOL[torch.bfloat16][0], atol=1e-6)
    assert_close_grads(ref_grads, grads, TOL[torch.bfloat16][1])


def test_bf16_accumulation_saves_the_fp32_sum(monkeypatch):
    """Peak storage of forward + backward: the bf16 sum saves at least the 2 V H bytes an fp32 sum adds over it
    (4 V H against 2 V H in forward; in backward the fp32 sum and its bf16 cast coexist: 6 V H)."""
    hidden, vocab = 16, 256
    case = make_case(shape=(40,), hidden=hidden, vocab=vocab, dtype=torch.bfloat16, frac=1.0, seed=4)
    force_chunk_rows(monkeypatch, 8)
    peaks = {}
    for accumulation in ("fp32", "bf16"):
        h, w, b, labels = (x.clone().requires_grad_() if x.is_floating_point() else x for x in case)
        with LiveStorage() as tracker:
            fused_lm_loss(h, w, b, labels, ignore_index=None, weight_grad_accumulation=accumulation).backward()
        peaks[accumulation] = tracker.peak
    assert peaks["fp32"] - peaks["bf16"] >= 2 * vocab * hidden


def test_fp16_weights_always_sum_in_fp32(monkeypatch):
    """fp16's range: the "bf16" option leaves fp16 (and fp32) weights summing in fp32."""
    force_chunk_rows(monkeypatch, 4)
    for dtype in (torch.float16, torch.float32):
        w = torch.zeros(5, 3, dtype=dtype)
        assert lm._grad_weight_buffer(w, True, "bf16").dtype == torch.float32
        assert lm._grad_weight_buffer(w, False, "bf16").dtype == dtype  # one chunk: written once, as eager


@pytest.mark.parametrize("ignore_index", [-100, None])
def test_no_labelled_row_gives_zero_loss_and_zero_gradients(ignore_index):
    case = make_case(frac=0.0) if ignore_index is not None else make_case(shape=(0,))
    loss, grads = run(fused_lm_loss, case, ignore_index=ignore_index)
    ref_loss, ref_grads = run(reference_lm_loss, case, ignore_index=ignore_index)
    assert loss.item() == 0.0 and ref_loss.item() == 0.0
    for g, g_ref in zip(grads, ref_grads):
        assert g is not None and g.shape == g_ref.shape and not g.any()


def test_without_autograd_only_the_loss():
    h, w, b, labels = make_case(seed=2)
    with torch.no_grad():
        loss = fused_lm_loss(h, w, b, labels, label_smoothing=0.05)
    torch.testing.assert_close(loss, reference_lm_loss(h, w, b, labels, label_smoothing=0.05), rtol=1e-5, atol=1e-6)


def test_frozen_weight():
    h, w, b, labels = make_case(seed=3)
    h = h.requires_grad_()
    loss = fused_lm_loss(h, w, b, labels)
    loss.backward()
    h_ref = h.detach().clone().requires_grad_()
    reference_lm_loss(h_ref, w, b, labels).backward()
    assert_close_grads([h_ref.grad], [h.grad], 1e-5)


def test_invalid_inputs():
    h, w, b, labels = make_case()
    with pytest.raises(ValueError, match="do not match"):
        fused_lm_loss(h, w, b, labels[:, :-1])
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_lm_loss(h, w, b, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight_grad_accumulation"):
        fused_lm_loss(h, w, b, labels, weight_grad_accumulation="fp16")
    loss = fused_lm_loss(h.requires_grad_(), w, b, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_dispatch_forced_triton(monkeypatch):
    h, w, b, labels = make_case(seed=4)
    monkeypatch.setenv("GRITVLP_KERNELS", "triton")
    direct = lm.lm_loss(kernels.spec.lm_inputs(h, w, b, labels))
    assert torch.equal(kernels.lm_loss(h, w, b, labels), direct)
