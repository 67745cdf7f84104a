"""The compiled Triton kernels on a GPU, against the PyTorch reference in float64 (skipped without CUDA).

The CPU suite runs the same kernels through the interpreter, which cannot show launch failures (shared memory,
registers) nor compute bf16 dots; these run them compiled, at sizes that span several tiles and column splits.
Errors are relative norms ||x - ref|| / ||ref||: fp32 features use IEEE dots (1e-5); 16-bit features give exact
products with fp32 sums, so the losses stay near 1e-5, while dS is rounded to the feature dtype before the dQ
product (bf16: 2e-2, fp16: 5e-3).
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled Triton (run with TRITON_INTERPRET=0)",
)

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TERMS = ("loss_i2t", "loss_t2i", "consistency_i2t", "consistency_t2i")
FUSED, REFERENCE = "triton", "reference"


def itc_terms(backend):
    import gritvlp.kernels as kernels

    return lambda *args, **kwargs: kernels.itc_terms(*args, backend=backend, **kwargs)


def lm_loss(backend):
    import gritvlp.kernels as kernels

    return lambda *args, **kwargs: kernels.lm_loss(*args, backend=backend, **kwargs)


def ita(terms):
    return (terms.loss_i2t + terms.loss_t2i) / 2 + 0.2 * (terms.consistency_i2t + terms.consistency_t2i) / 2


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def itc_case(b, n, d, dtype, groups, seed):
    g = torch.Generator().manual_seed(seed)
    image_all = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text_all = F.normalize(image_all + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    offset = (n - b) // 3
    gid_all = torch.randint(0, n // 2, (n,), generator=g) if groups else torch.arange(n)
    return [x.cuda() for x in (image_all.to(dtype), text_all.to(dtype), gid_all)], offset


def run_itc(fn, feats, b, offset, temp, kwargs, upcast):
    image_all, text_all, gid_all = feats
    if upcast:
        image_all, text_all = image_all.double(), text_all.double()
    img = image_all[offset : offset + b].clone().requires_grad_()
    txt = text_all[offset : offset + b].clone().requires_grad_()
    t = torch.tensor(temp, device="cuda", dtype=torch.float64 if upcast else torch.float32, requires_grad=True)
    extra = dict(group_ids=gid_all[offset : offset + b], group_ids_all=gid_all)
    if image_all.shape[0] != b:
        extra.update(image_all=image_all, text_all=text_all, offset=offset)
    out = fn(img, txt, t, **extra, **kwargs)
    (ita(out) + 0.3 * out.loss_i2t - 0.2 * out.loss_t2i + 0.1 * out.consistency_i2t).backward()
    return out, (img.grad, txt.grad, t.grad)


@pytest.mark.parametrize(
    "b,n,d,dtype,groups,temp,kwargs",
    [
        (4096, 4096, 256, torch.bfloat16, False, 0.07, {}),
        (300, 2300, 256, torch.bfloat16, True, 0.07, {"hn_beta": 0.5, "hn_alpha": 0.6, "negatives": "sample"}),
        (200, 900, 512, torch.bfloat16, False, 0.5, {}),  # D chunked
        (257, 1001, 256, torch.float16, True, 0.001, {}),
        (150, 150, 256, torch.float32, True, 0.07, {}),
    ],
)
def test_itc_compiled_matches_float64_reference(b, n, d, dtype, groups, temp, kwargs):
    feats, offset = itc_case(b, n, d, dtype, groups, seed=b + n)
    out, grads = run_itc(itc_terms(FUSED), feats, b, offset, temp, kwargs, upcast=False)
    ref, ref_grads = run_itc(itc_terms(REFERENCE), feats, b, offset, temp, kwargs, upcast=True)
    for name in TERMS:
        assert rel(getattr(out, name), getattr(ref, name)) < 1e-5, name
    for g, g_ref, name in zip(grads, ref_grads, ("image_feat", "text_feat", "temp")):
        assert rel(g, g_ref) < GRAD_TOL[dtype], name
    img, txt, gid = (x[offset : offset + b] for x in feats)
    s = img.double() @ txt.double().T
    s[gid[:, None] == gid[None, :]] = float("-inf")
    has = out.neg_text_for_image >= 0
    assert torch.equal(has, torch.isfinite(s.max(1).values))  # -1 exactly where every local column is a positive
    chosen = s.gather(1, out.neg_text_for_image.clamp(min=0)[:, None])[:, 0]
    assert torch.isfinite(chosen[has]).all()  # never a positive
    if kwargs.get("negatives", "hardest") == "hardest":  # the best non-positive column (ties may differ)
        assert (s.max(1).values[has] - chosen[has]).max().item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_itc_compiled_with_captions_extra_positives_and_smoothing(dtype):
    """Caption positives, per-direction mined positives and the uniform-target terms of smoothed ITC."""
    b, n = 300, 1200
    feats, offset = itc_case(b, n, 256, dtype, groups=False, seed=11)
    g = torch.Generator().manual_seed(12)
    captions = torch.randint(0, n // 3, (n,), generator=g).cuda()
    extra = torch.randint(-1, n, (2, b), generator=g).cuda()
    kwargs = {"caption_ids": captions[offset : offset + b], "caption_ids_all": captions, "extra_positives": extra}

    def run(upcast):
        image_all, text_all, gid_all = feats
        if upcast:
            image_all, text_all = image_all.double(), text_all.double()
        img = image_all[offset : offset + b].clone().requires_grad_()
        txt = text_all[offset : offset + b].clone().requires_grad_()
        t = torch.tensor(0.07, device="cuda", dtype=torch.float64 if upcast else torch.float32, requires_grad=True)
        out = itc_terms(REFERENCE if upcast else FUSED)(
            img, txt, t, group_ids=gid_all[offset : offset + b], group_ids_all=gid_all, image_all=image_all,
            text_all=text_all, offset=offset, **kwargs,
        )  # fmt: skip
        (0.5 * ita(out) + 0.25 * (out.uniform_i2t + out.uniform_t2i)).backward()
        return out, (img.grad, txt.grad, t.grad)

    (out, grads), (ref, ref_grads) = run(False), run(True)
    for name in (*TERMS, "uniform_i2t", "uniform_t2i"):
        assert rel(getattr(out, name), getattr(ref, name)) < 1e-5, name
    for got, want, name in zip(grads, ref_grads, ("image_feat", "text_feat", "temp")):
        assert rel(got, want) < GRAD_TOL[dtype], name


def test_itc_compiled_is_deterministic():
    """Two identical calls give bitwise identical losses and gradients (no atomics; fixed split order)."""
    feats, offset = itc_case(1000, 3000, 256, torch.bfloat16, True, seed=5)
    first, second = (run_itc(itc_terms(FUSED), feats, 1000, offset, 0.07, {}, upcast=False) for _ in range(2))
    assert torch.equal(ita(first[0]), ita(second[0]))
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


def test_demo_training_step_through_the_fused_kernels(monkeypatch):
    """One forward + backward of the demo model on CUDA through the fused kernels matches the reference kernels
    (ITC + MLM: with random weights near-tied ITM negatives may differ between the two, so ITM is checked apart)."""
    import dataclasses

    from gritvlp.config import load_config
    from gritvlp.model.gritvlp import GritVLP
    from gritvlp.objectives.pretraining import PretrainingObjective
    from gritvlp.train.step import to_device

    cfg = load_config("demo", [])
    torch.manual_seed(0)
    objectives = dataclasses.replace(cfg.objectives, itm_weight=0.0)
    objective = PretrainingObjective(GritVLP(cfg.model), objectives).cuda().eval()  # eval: no dropout
    model = objective.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.text.config.vocab_size, (16, 12), generator=g)
    ids[:, 0], ids[:, -1] = model.special_tokens["cls"], model.special_tokens["sep"]
    host = {"image": torch.randn(16, 3, cfg.model.image_size, cfg.model.image_size, generator=g),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(16),
            "group_id": torch.arange(16)}  # fmt: skip
    batch = to_device(
        objective.prepare_batch(host, torch.Generator().manual_seed(1)), torch.device("cuda"), torch.float32
    )

    def step(backend):
        monkeypatch.setenv("GRITVLP_KERNELS", backend)
        objective.zero_grad(set_to_none=True)
        out = objective(batch)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}

    fused, fused_grads = step("auto")
    ref, ref_grads = step("reference")
    for name in ("loss", "itc", "mlm"):
        assert rel(fused[name], ref[name]) < 1e-4, name
    assert fused_grads.keys() == ref_grads.keys()
    for name, grad in fused_grads.items():
        assert torch.isfinite(grad).all() and rel(grad, ref_grads[name]) < 1e-3, name
    objective.config = dataclasses.replace(objective.config, itm_weight=1.0)
    with_itm, grads = step("auto")
    assert torch.isfinite(with_itm["itm"]) and all(torch.isfinite(g).all() for g in grads.values())


def test_itc_no_stop_grad_keys_compiled():
    b, n, d = 200, 600, 256
    g = torch.Generator().manual_seed(1)
    keys = [F.normalize(torch.randn(n, d, generator=g), dim=-1).cuda() for _ in range(2)]

    def run(fn, upcast):
        ia, ta = (k.double() if upcast else k.to(torch.bfloat16) for k in keys)
        ia, ta = ia.clone().requires_grad_(), ta.clone().requires_grad_()
        out = fn(ia[:b], ta[:b], torch.tensor(0.1, device="cuda"), image_all=ia, text_all=ta, stop_grad_keys=False)
        ita(out).backward()
        return ia.grad, ta.grad

    for g_fused, g_ref in zip(run(itc_terms(FUSED), False), run(itc_terms(REFERENCE), True)):
        assert rel(g_fused, g_ref) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_lm_loss_compiled_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 3000, 256, 30522
    h = torch.randn(rows, hidden, generator=g).cuda().to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).cuda().to(dtype)
    bias = (torch.randn(vocab, generator=g) * 0.1).cuda().to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).cuda()

    def run(fn, upcast):
        params = [x.double() if upcast else x for x in (h, w, bias)]
        params = [p.clone().requires_grad_() for p in params]
        loss = fn(*params, labels, ignore_index=None)
        loss.backward()
        return loss, [p.grad for p in params]

    loss, grads = run(lm_loss(FUSED), False)
    ref, ref_grads = run(lm_loss(REFERENCE), True)
    assert rel(loss, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    for g_fused, g_ref in zip(grads, ref_grads):
        assert rel(g_fused, g_ref) < (1e-4 if dtype == torch.float32 else 2e-2)
