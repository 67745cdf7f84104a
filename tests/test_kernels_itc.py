"""Fused ITC kernel (Triton, run by the CPU interpreter) against the PyTorch reference, forward and backward.

Tolerances: fp32 features: losses within 1e-5 relative (+1e-6 absolute), gradients within 1e-4 of the largest
reference gradient entry. fp16 features: the similarity dots are exact products with fp32 accumulation in both,
so losses keep 1e-4; dS is rounded to fp16 before the dQ / dK products, so gradients get 2e-3.
The interpreter computes bf16 tl.dot wrongly, so bf16 is not tested here.
"""

import importlib
import math

import gritvlp.kernels as kernels
import pytest
import torch
import torch.nn.functional as F

itc = importlib.import_module("gritvlp.kernels.itc")
FUSED, REFERENCE = "triton", "reference"

# the interpreter evaluates masked-out lanes too (log(0), exp overflow) before tl.where discards them
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TERMS = ("loss_i2t", "loss_t2i", "consistency_i2t", "consistency_t2i")


def ita(terms, consistency_weight=0.2):
    """GRIT-VLP's ITA, as the objective composes it from the kernel's terms."""
    contrastive = (terms.loss_i2t + terms.loss_t2i) / 2
    return contrastive + consistency_weight * (terms.consistency_i2t + terms.consistency_t2i) / 2


def itc_terms(backend, *args, **kwargs):
    return kernels.itc_terms(*args, backend=backend, **kwargs)
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-4, 2e-3)}  # (loss rtol, gradient tol)


def make_case(b, d, n=None, dtype=torch.float32, groups=False, seed=0):
    """Normalised features; with n > b a gathered batch holding the local one at rows [offset, offset + b)."""
    g = torch.Generator().manual_seed(seed)
    n = n or b
    image_all = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    text_all = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    offset = (n - b) // 2
    group_all = torch.randint(0, max(2, n // 3), (n,), generator=g) if groups else None
    return image_all, text_all, offset, group_all


def run(backend, case, b, temp, backward="all", **kwargs):
    image_all, text_all, offset, group_all = case
    n = image_all.shape[0]
    img = image_all[offset : offset + b].clone().requires_grad_()
    txt = text_all[offset : offset + b].clone().requires_grad_()
    t = torch.tensor(temp, requires_grad=True)
    extra = {}
    keys = []
    if n != b:
        ia, ta = image_all.clone().requires_grad_(), text_all.clone().requires_grad_()
        extra.update(image_all=ia, text_all=ta, offset=offset)
        keys = [ia, ta]
    if group_all is not None:
        extra.update(group_ids=group_all[offset : offset + b].clone(), group_ids_all=group_all if n != b else None)
    out = itc_terms(backend, img, txt, t, **extra, **kwargs)
    if backward == "all":  # every output gets its own gradient: the four loss paths of the backward
        (ita(out) + 0.3 * out.loss_i2t - 0.2 * out.loss_t2i + 0.1 * out.consistency_i2t).backward()
    else:  # the contrastive terms only: the consistency outputs get no gradient
        ita(out, consistency_weight=0.0).backward()
    grads = {"image_feat": img.grad, "text_feat": txt.grad, "temp": t.grad}
    for name, x in zip(("image_all", "text_all"), keys):
        grads[name] = x.grad
    return out, grads


def assert_close_grads(ref, fused, tol):
    for name, g_ref in ref.items():
        g = fused[name]
        if g_ref is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        err = (g.float() - g_ref.float()).abs().max().item()
        scale = g_ref.float().abs().max().item()
        assert err <= tol * max(scale, 1e-6), f"{name}: max error {err:.3g} vs scale {scale:.3g}"


CASES = {
    # id: (b, d, n, dtype, groups, temp, kwargs)
    "odd-fp32": (19, 5, None, torch.float32, False, 0.07, {}),
    "b2-d3": (2, 3, None, torch.float32, False, 0.07, {}),
    "temp-0.001": (13, 6, None, torch.float32, False, 0.001, {}),
    "temp-0.5-no-stop-grad": (17, 5, None, torch.float32, False, 0.5, {"stop_grad_keys": False}),
    "gathered": (11, 7, 37, torch.float32, False, 0.07, {}),
    "gathered-groups-no-stop-grad": (9, 4, 29, torch.float32, True, 0.1, {"stop_grad_keys": False}),
    "groups-hn-nce": (18, 5, None, torch.float32, True, 0.07, {"hn_beta": 0.5, "hn_alpha": 0.6}),
    "gathered-hn-nce-no-stop-grad": (10, 5, 35, torch.float32, True, 0.2, dict(hn_beta=0.3, hn_alpha=0.4, stop_grad_keys=False)),
    "fp16-gathered-groups": (20, 8, 33, torch.float16, True, 0.05, {}),
    "fp16-no-stop-grad": (17, 6, None, torch.float16, False, 0.07, {"stop_grad_keys": False}),
    # D = 40: the similarity summed over chunks of D, dQ / dK accumulated per chunk of D (grid axis 2)
    "chunked-d-gathered-no-stop-grad": (11, 40, 60, torch.float32, True, 0.07, {"stop_grad_keys": False}),
    "chunked-d-fp16-hn-nce": (9, 40, 33, torch.float16, True, 0.05, {"hn_beta": 0.4}),
}  # fmt: skip


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_reference(case_id):
    b, d, n, dtype, groups, temp, kwargs = CASES[case_id]
    case = make_case(b, d, n, dtype, groups)
    ref_out, ref_grads = run(REFERENCE, case, b, temp, **kwargs)
    out, grads = run(FUSED, case, b, temp, **kwargs)
    loss_rtol, grad_tol = TOL[dtype]
    for name in TERMS:
        torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=loss_rtol, atol=1e-6)
        assert getattr(out, name).dim() == 0
    # hardest negatives: the argmax of the same fp32 similarities
    assert torch.equal(out.neg_text_for_image, ref_out.neg_text_for_image)
    assert torch.equal(out.neg_image_for_text, ref_out.neg_image_for_text)
    assert_close_grads(ref_grads, grads, grad_tol)


def test_cases_cross_column_splits_and_feature_chunks():
    """The cases above exercise what the GPU launches rely on: several column splits (one of them empty, so the
    merge must ignore it), and D processed in chunks in both the forward and the backward."""
    cpu = torch.device("cpu")
    tiles = -(-37 // 16)  # "gathered": N = 37 in column tiles of 16
    splits = itc._num_splits(11, 37, cpu)
    assert splits > 1 and -(-tiles // splits) * (splits - 1) >= tiles  # the last split holds no tile
    assert itc._num_splits(11, 60, cpu) > 1
    for backward in (False, True):
        blocks = itc._block_params(torch.float32, 40, backward)
        assert blocks["BLOCK_K"] < blocks["BLOCK_D"] == 64
    assert itc._block_params(torch.float32, 5)["BLOCK_K"] == 16  # held whole in the forward


def test_short_last_batch_keeps_splits():
    """Splits (and autotuning keys) come from sizes rounded up to powers of two: one sample less changes neither,
    so the summation order stays the same."""
    cpu = torch.device("cpu")
    assert itc._num_splits(127, 127, cpu) == itc._num_splits(128, 128, cpu)
    assert itc._bucket(127) == itc._bucket(128) == 128
    assert itc._bucket(129) == 256


def test_loss_only_backward_without_consistency():
    """Only the contrastive terms backpropagated: the backward skips the consistency tiles."""
    case = make_case(14, 5, 23, groups=True, seed=3)
    ref_out, ref_grads = run(REFERENCE, case, 14, 0.07, backward="loss", stop_grad_keys=False)
    out, grads = run(FUSED, case, 14, 0.07, backward="loss", stop_grad_keys=False)
    torch.testing.assert_close(ita(out, 0.0), ita(ref_out, 0.0), rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, 1e-4)


def hn_nce_by_formula(s, beta, alpha):
    """DiHT HN-NCE with diagonal positives, written from METHOD.md section 3 (float64, explicit sums)."""
    b = len(s)
    total = 0.0
    for i in range(b):
        others = [j for j in range(b) if j != i]
        norm = sum(math.exp(beta * s[i][k]) for k in others)
        weighted = sum((b - 1) * math.exp(beta * s[i][j]) / norm * math.exp(s[i][j]) for j in others)
        total += -math.log(math.exp(s[i][i]) / (alpha * math.exp(s[i][i]) + weighted))
    return total / b


@pytest.mark.parametrize("beta,alpha", [(0.0, 1.0), (0.5, 0.6), (1.5, 0.3)])
def test_hn_nce_against_formula(beta, alpha):
    b, temp = 7, 0.2
    image_all, text_all, _, _ = make_case(b, 5, seed=4)
    out = itc_terms(FUSED, image_all, text_all, torch.tensor(temp), hn_beta=beta, hn_alpha=alpha)
    s = (image_all.double() @ text_all.double().T / temp).tolist()
    s_t = (text_all.double() @ image_all.double().T / temp).tolist()
    assert out.loss_i2t.item() == pytest.approx(hn_nce_by_formula(s, beta, alpha), rel=1e-5)
    assert out.loss_t2i.item() == pytest.approx(hn_nce_by_formula(s_t, beta, alpha), rel=1e-5)


def test_gumbel_sampling_follows_softmax():
    """Chi-square test of the sampled ITM negatives against softmax(S) over the non-positive local columns.

    Every local row has the same features and the same positives, so each row of each call is an
    independent draw from one distribution: 24 rows x 20 calls = 480 draws per direction.
    """
    b, d, temp, n_cand = 24, 6, 0.5, 5
    g = torch.Generator().manual_seed(7)
    u, v = F.normalize(torch.randn(2, d, generator=g), dim=-1)
    cand_img = F.normalize(torch.randn(n_cand, d, generator=g), dim=-1)
    cand_txt = F.normalize(torch.randn(n_cand, d, generator=g), dim=-1)
    # the "gathered" batch: n_cand candidate columns, then copies of the query pair, positives of every row
    img = torch.cat([cand_img, u.expand(b - n_cand, d)])
    txt = torch.cat([cand_txt, v.expand(b - n_cand, d)])
    queries_img, queries_txt = u.expand(b, d).contiguous(), v.expand(b, d).contiguous()
    group_ids = torch.full((b,), 1000)
    group_ids_all = torch.cat([torch.arange(n_cand), torch.full((b - n_cand,), 1000)])
    expected_i2t = torch.softmax((u.double() @ cand_txt.double().T) / temp, 0)
    expected_t2i = torch.softmax((v.double() @ cand_img.double().T) / temp, 0)

    counts_i2t = torch.zeros(n_cand, dtype=torch.float64)
    counts_t2i = torch.zeros(n_cand, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    calls = 20
    for _ in range(calls):
        out = itc_terms(
            FUSED, queries_img, queries_txt, torch.tensor(temp), image_all=img, text_all=txt, offset=0,
            group_ids=group_ids, group_ids_all=group_ids_all, negatives="sample", generator=gen,
        )  # fmt: skip
        for neg, counts in ((out.neg_text_for_image, counts_i2t), (out.neg_image_for_text, counts_t2i)):
            assert int(neg.min()) >= 0 and int(neg.max()) < n_cand  # never a positive column
            counts += torch.bincount(neg, minlength=n_cand).double()
    draws = calls * b
    for counts, expected in ((counts_i2t, expected_i2t), (counts_t2i, expected_t2i)):
        assert expected.min() * draws >= 5  # chi-square validity
        chi2 = (((counts - draws * expected) ** 2) / (draws * expected)).sum().item()
        assert chi2 < 18.47, f"chi-square {chi2:.1f} >= 18.47 (4 degrees of freedom, p = 0.001)"


def test_sampling_is_seeded_and_marks_rows_without_negatives():
    image_all, text_all, _, _ = make_case(9, 4, seed=5)
    t = torch.tensor(0.1)
    a = itc_terms(FUSED, image_all, text_all, t, negatives="sample", generator=torch.Generator().manual_seed(1))
    b = itc_terms(FUSED, image_all, text_all, t, negatives="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.neg_text_for_image, b.neg_text_for_image)
    assert torch.equal(a.neg_image_for_text, b.neg_image_for_text)
    draws = []
    for _ in range(2):  # without a generator: torch's default one, seeded by torch.manual_seed
        torch.manual_seed(3)
        draws.append(itc_terms(FUSED, image_all, text_all, t, negatives="sample").neg_text_for_image)
    assert torch.equal(draws[0], draws[1])
    assert not (a.neg_text_for_image == torch.arange(9)).any()  # the diagonal is a positive
    same = torch.zeros(9, dtype=torch.long)  # one group: every column is a positive
    for mode in ("sample", "hardest", "none"):
        out = itc_terms(FUSED, image_all, text_all, t, group_ids=same, negatives=mode)
        assert (out.neg_text_for_image == -1).all() and (out.neg_image_for_text == -1).all()


def test_single_sample_raises():
    x = F.normalize(torch.randn(1, 4), dim=-1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        itc_terms(FUSED, x, x.clone(), torch.tensor(0.07))
    y = F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="negatives must be one of"):
        itc_terms(FUSED, y, y.clone(), torch.tensor(0.07), negatives="random")


def test_dispatch_by_device_environment_and_argument(monkeypatch):
    image_all, text_all, _, _ = make_case(5, 4, seed=6)
    temp = torch.tensor(0.07)
    assert kernels.backend_for(image_all) == "reference"  # CPU tensors
    monkeypatch.setenv("GRITVLP_KERNELS", "triton")
    assert kernels.backend_for(image_all) == "triton"
    assert kernels.backend_for(image_all, "reference") == "reference"  # the argument wins
    forced = kernels.itc_terms(image_all, text_all, temp)
    direct = itc.itc_terms(kernels.spec.itc_inputs(image_all, text_all, temp))
    assert torch.equal(forced.loss_i2t, direct.loss_i2t)
    monkeypatch.setenv("GRITVLP_KERNELS", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.itc_terms(image_all, text_all, temp)
