"""Fused masked-LM loss (Triton cross-entropy run by the CPU interpreter) against the PyTorch reference.

Tolerances: fp32: loss within 1e-5 relative, gradients within 1e-5 of the largest reference gradient entry.
fp16: both compute the logits with the same F.linear; the fused path keeps d logits in fp16 (unscaled
softmax - target) before its GEMMs while the reference rounds the scaled fp32 gradient, so gradients get 2e-3.
"""

import importlib

import pytest
import torch
from gritvlp.kernels import reference

lm = importlib.import_module("gritvlp.kernels.lm_loss")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3)}  # (loss rtol, gradient tol)


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


CASES = {
    # id: (make_case kwargs, lm_loss kwargs)
    "odd-fp32": ({}, {}),
    "label-smoothing": ({"vocab": 41}, {"label_smoothing": 0.1}),
    "every-row-labelled-no-bias": ({"bias": False, "frac": 1.0, "shape": (2, 5, 3)}, {}),
    "chunked-fp32": ({"frac": 0.8}, {"chunk_rows": 4}),  # chunk_rows: set through the chunk byte budget
    "fp16-smoothing": ({"dtype": torch.float16, "vocab": 53}, {"label_smoothing": 0.2}),
    "fp16-chunked": ({"dtype": torch.float16, "frac": 0.9, "shape": (4, 6)}, {"chunk_rows": 5}),
    "ignore-index-0": ({"ignore": 0}, {"ignore_index": 0}),
}


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_reference(case_id, monkeypatch):
    case_kwargs, kwargs = CASES[case_id]
    case = make_case(**case_kwargs)
    dtype = case[0].dtype
    kwargs = dict(kwargs)
    if "chunk_rows" in kwargs:  # several chunks: d W accumulates in fp32 across them
        vocab = case[1].shape[0]
        monkeypatch.setattr(lm, "_CHUNK_BYTES", kwargs.pop("chunk_rows") * vocab * case[0].element_size())
    ref_loss, ref_grads = run(reference.lm_loss, case, **kwargs)
    loss, grads = run(lm.lm_loss, case, **kwargs)
    loss_rtol, grad_tol = TOL[dtype]
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=1e-6)
    assert_close_grads(ref_grads, grads, grad_tol)


def test_no_labelled_row_gives_zero_loss_and_zero_gradients():
    case = make_case(frac=0.0)
    loss, grads = run(lm.lm_loss, case)
    ref_loss, ref_grads = run(reference.lm_loss, case)
    assert loss.item() == 0.0 and ref_loss.item() == 0.0
    for g, g_ref in zip(grads, ref_grads):
        assert g is not None and g.shape == g_ref.shape and not g.any()


def test_without_autograd_only_the_loss():
    h, w, b, labels = make_case(seed=2)
    with torch.no_grad():
        loss = lm.lm_loss(h, w, b, labels, label_smoothing=0.05)
    torch.testing.assert_close(loss, reference.lm_loss(h, w, b, labels, label_smoothing=0.05), rtol=1e-5, atol=1e-6)


def test_frozen_weight():
    h, w, b, labels = make_case(seed=3)
    h = h.requires_grad_()
    loss = lm.lm_loss(h, w, b, labels)
    loss.backward()
    h_ref = h.detach().clone().requires_grad_()
    reference.lm_loss(h_ref, w, b, labels).backward()
    assert_close_grads([h_ref.grad], [h.grad], 1e-5)


def test_invalid_inputs():
    h, w, b, labels = make_case()
    bad = labels.clone()
    bad[0, 0] = w.shape[0]
    with pytest.raises(ValueError, match="labels must lie in"):
        lm.lm_loss(h, w, b, bad)
    with pytest.raises(ValueError, match="do not match"):
        lm.lm_loss(h, w, b, labels[:, :-1])
    loss = lm.lm_loss(h.requires_grad_(), w, b, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_dispatch_forced_triton(monkeypatch):
    import gritvlp.kernels as kernels

    h, w, b, labels = make_case(seed=4)
    monkeypatch.setenv("GRITVLP_KERNELS", "triton")
    assert torch.equal(kernels.lm_loss(h, w, b, labels), lm.lm_loss(h, w, b, labels))
