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

TERMS = ("loss_i2t", "loss_t2i", "consistency_i2t", "consistency_t2i", "uniform_i2t", "uniform_t2i")


def ita(terms, consistency_weight=0.2, smoothing=0.0):
    """GRIT-VLP's ITA, as the objective composes it from the kernel's terms (smoothing: the weight of the
    uniform-target terms, as in label-smoothed ITC)."""
    contrastive = (terms.loss_i2t + terms.loss_t2i) / 2
    loss = contrastive + consistency_weight * (terms.consistency_i2t + terms.consistency_t2i) / 2
    if smoothing:
        loss = (1 - smoothing) * loss + smoothing * (terms.uniform_i2t + terms.uniform_t2i) / 2
    return loss


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


def positive_kwargs(b, n, offset, captions=False, extras=False, seed=0):
    """caption_ids (a few values, so that captions match across groups) and extra_positives: per direction a
    random column, -1 for some rows, and for others the row's own column (already a positive: not counted twice)."""
    g = torch.Generator().manual_seed(1000 + seed)
    kwargs = {}
    if captions:
        caption_all = torch.randint(0, max(2, n // 2), (n,), generator=g) + 2**40  # beyond int32: ranked first
        kwargs.update(
            caption_ids=caption_all[offset : offset + b].clone(), caption_ids_all=caption_all if n != b else None
        )
    if extras:
        extra = torch.randint(0, n, (2, b), generator=g)
        extra[torch.rand(2, b, generator=g) < 0.25] = -1
        own = torch.rand(2, b, generator=g) < 0.15
        extra[own] = (offset + torch.arange(b)).expand(2, b)[own]
        kwargs["extra_positives"] = extra
    return kwargs


# backward modes: which outputs get a gradient, so which paths of the backward run
BACKWARD = {
    "all": lambda out: (
        ita(out, smoothing=0.1)
        + 0.3 * out.loss_i2t
        - 0.2 * out.loss_t2i
        + 0.1 * out.consistency_i2t
        + 0.25 * out.uniform_i2t
        - 0.15 * out.uniform_t2i
    ),
    "loss": lambda out: ita(out, consistency_weight=0.0),  # neither consistency nor uniform
    "no-uniform": lambda out: ita(out) + 0.1 * out.loss_t2i,  # contrastive and consistency
    "uniform": lambda out: ita(out, consistency_weight=0.0, smoothing=0.3) - 0.1 * out.uniform_t2i,  # no consistency
    "uniform-only": lambda out: 0.7 * out.uniform_i2t + 0.4 * out.uniform_t2i,
}


def run(backend, case, b, temp, backward="all", captions=False, extras=False, **kwargs):
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
    extra.update(positive_kwargs(b, n, offset, captions, extras))
    out = itc_terms(backend, img, txt, t, **extra, **kwargs)
    # "all": every output gets its own gradient (the six loss paths of the backward); see BACKWARD for the others
    BACKWARD[backward](out).backward()
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
    # caption ids (positives across groups) and per-direction extra positives
    "captions": (19, 5, None, torch.float32, False, 0.07, {"captions": True}),
    "extras": (21, 6, None, torch.float32, False, 0.1, {"extras": True}),
    "captions-extras-groups-hn-nce": (18, 5, None, torch.float32, True, 0.07, dict(captions=True, extras=True, hn_beta=0.5, hn_alpha=0.6)),
    "gathered-captions-extras-no-stop-grad": (11, 7, 37, torch.float32, True, 0.07, dict(captions=True, extras=True, stop_grad_keys=False)),
    "gathered-extras-hn-nce-no-stop-grad": (10, 5, 35, torch.float32, True, 0.2, dict(extras=True, hn_beta=0.3, hn_alpha=0.4, stop_grad_keys=False)),
    "fp16-gathered-captions-extras": (20, 8, 33, torch.float16, True, 0.05, dict(captions=True, extras=True)),
    "fp16-captions-extras-hn-nce-no-stop-grad": (17, 6, None, torch.float16, False, 0.07, dict(captions=True, extras=True, hn_beta=0.5, stop_grad_keys=False)),
    "chunked-d-gathered-captions-extras-hn-nce": (13, 40, 45, torch.float32, True, 0.07, dict(captions=True, extras=True, hn_beta=0.4, hn_alpha=0.7, stop_grad_keys=False)),
    "chunked-d-fp16-extras": (9, 40, 33, torch.float16, True, 0.05, dict(captions=True, extras=True)),
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
    for streamed in (False, True):  # the forward kernel; the merge and backward kernels
        blocks = itc._block_params(torch.float32, 40, streamed)
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


@pytest.mark.parametrize("backward", ["no-uniform", "uniform", "uniform-only", "loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_paths_with_captions_and_extras(backward, dtype):
    """Each combination of the outputs that get a gradient (the HAS_CONS / HAS_UNI specialisations of the
    backward; with "no-uniform" and "loss" the uniform outputs get none), gathered with an offset, HN-NCE."""
    b, n = 15, 34
    case = make_case(b, 6, n, dtype, groups=True, seed=8)
    kwargs = dict(captions=True, extras=True, hn_beta=0.3, hn_alpha=0.8, stop_grad_keys=False, backward=backward)
    ref_out, ref_grads = run(REFERENCE, case, b, 0.08, **kwargs)
    out, grads = run(FUSED, case, b, 0.08, **kwargs)
    loss_rtol, grad_tol = TOL[dtype]
    for name in TERMS:
        torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=loss_rtol, atol=1e-6)
    assert_close_grads(ref_grads, grads, grad_tol)


def explicit_positives(ids, ids_all, caption_ids, caption_ids_all, extra):
    """Per direction, row by row, the set P^d_i of kernels/spec.py (Python sets, independent of the reference)."""
    n = len(ids_all)
    sets = []
    for d in range(2):
        rows = []
        for i in range(len(ids)):
            pos = {j for j in range(n) if ids[i] == ids_all[j] or caption_ids[i] == caption_ids_all[j]}
            if extra[d][i] >= 0:
                pos.add(extra[d][i])
            rows.append(pos)
        sets.append(rows)
    return sets


def contrastive_by_formula(s, positives, beta, alpha):
    """DiHT HN-NCE with explicit positive sets, float64 sums as written in kernels/spec.py."""
    total = 0.0
    for i, pos in enumerate(positives):
        negs = [j for j in range(len(s[i])) if j not in pos]
        norm = sum(math.exp(beta * s[i][k]) for k in negs)
        weighted = sum(len(negs) * math.exp(beta * s[i][j]) / norm * math.exp(s[i][j]) for j in negs)
        total += -sum(math.log(math.exp(s[i][p]) / (alpha * math.exp(s[i][p]) + weighted)) for p in pos) / len(pos)
    return total / len(positives)


@pytest.mark.parametrize("beta,alpha", [(0.0, 1.0), (0.4, 0.7)])
def test_contrastive_with_extra_positives_against_formula(beta, alpha):
    """Reference and fused contrastive terms with captions and per-direction extra positives (gathered, offset)
    against the formula built from explicit positive sets."""
    b, n, temp = 7, 16, 0.25
    image_all, text_all, offset, group_all = make_case(b, 5, n, groups=True, seed=12)
    kwargs = positive_kwargs(b, n, offset, captions=True, extras=True, seed=12)
    kwargs["extra_positives"][0, 0] = offset + 3  # a hand-picked extra in each direction as well
    kwargs["extra_positives"][1, 1] = n - 1
    gid, cid = group_all[offset : offset + b], kwargs["caption_ids"]
    pos_i2t, pos_t2i = explicit_positives(
        gid.tolist(), group_all.tolist(), cid.tolist(), kwargs["caption_ids_all"].tolist(),
        kwargs["extra_positives"].tolist(),
    )  # fmt: skip
    assert pos_i2t != pos_t2i  # the extra positives make the two directions differ
    img, txt = image_all[offset : offset + b], text_all[offset : offset + b]
    s_i2t = (img.double() @ text_all.double().T / temp).tolist()
    s_t2i = (txt.double() @ image_all.double().T / temp).tolist()
    expected = (
        contrastive_by_formula(s_i2t, pos_i2t, beta, alpha),
        contrastive_by_formula(s_t2i, pos_t2i, beta, alpha),
    )
    for backend in (REFERENCE, FUSED):
        out = itc_terms(
            backend, img, txt, torch.tensor(temp), image_all=image_all, text_all=text_all, offset=offset,
            group_ids=gid, group_ids_all=group_all, hn_beta=beta, hn_alpha=alpha, **kwargs,
        )  # fmt: skip
        assert out.loss_i2t.item() == pytest.approx(expected[0], rel=1e-5), backend
        assert out.loss_t2i.item() == pytest.approx(expected[1], rel=1e-5), backend


def test_uniform_terms_against_dense_formula():
    """u_d = -mean_i sum_j (1/N) log_softmax(s_i)_j, over all N columns whatever the positives."""
    b, n, temp = 9, 23, 0.05
    image_all, text_all, offset, group_all = make_case(b, 6, n, groups=True, seed=13)
    img, txt = image_all[offset : offset + b], text_all[offset : offset + b]
    kwargs = dict(image_all=image_all, text_all=text_all, offset=offset, group_ids=group_all[offset : offset + b],
                  group_ids_all=group_all, **positive_kwargs(b, n, offset, captions=True, extras=True, seed=13))  # fmt: skip
    s_i2t = img.double() @ text_all.double().T / temp
    s_t2i = txt.double() @ image_all.double().T / temp
    expected = [-(F.log_softmax(s, dim=1) / n).sum(1).mean().item() for s in (s_i2t, s_t2i)]
    for backend in (REFERENCE, FUSED):
        out = itc_terms(backend, img, txt, torch.tensor(temp), **kwargs)
        assert out.uniform_i2t.item() == pytest.approx(expected[0], rel=1e-5), backend
        assert out.uniform_t2i.item() == pytest.approx(expected[1], rel=1e-5), backend


@pytest.mark.parametrize("backend", [REFERENCE, FUSED])
def test_label_smoothed_itc_is_smoothed_cross_entropy(backend):
    """With one positive per row (InfoNCE), (1 - eps) l_d + eps u_d is cross-entropy with label smoothing eps."""
    b, temp, eps = 11, 0.07, 0.1
    image_all, text_all, _, _ = make_case(b, 5, seed=14)
    out = itc_terms(backend, image_all, text_all, torch.tensor(temp))
    target = torch.arange(b)
    for loss, uniform, s in ((out.loss_i2t, out.uniform_i2t, image_all @ text_all.T / temp),
                             (out.loss_t2i, out.uniform_t2i, text_all @ image_all.T / temp)):  # fmt: skip
        expected = F.cross_entropy(s.double(), target, label_smoothing=eps)
        torch.testing.assert_close((1 - eps) * loss.double() + eps * uniform.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [REFERENCE, FUSED])
def test_caption_ids_relate_like_group_ids(backend):
    """With the default (diagonal) groups, caption ids X give the positives that group ids X give; the default
    caption ids (None) add nothing."""
    b, n = 12, 30
    image_all, text_all, offset, _ = make_case(b, 5, n, seed=15)
    ids_all = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(15))
    ids = ids_all[offset : offset + b]
    img, txt, t = image_all[offset : offset + b], text_all[offset : offset + b], torch.tensor(0.1)
    common = dict(image_all=image_all, text_all=text_all, offset=offset, hn_beta=0.2)
    by_caption = itc_terms(backend, img, txt, t, caption_ids=ids, caption_ids_all=ids_all, **common)
    by_group = itc_terms(backend, img, txt, t, group_ids=ids, group_ids_all=ids_all, **common)
    plain = itc_terms(backend, img, txt, t, **common)
    explicit_none = itc_terms(backend, img, txt, t, caption_ids=None, extra_positives=None, **common)
    for name in TERMS:
        torch.testing.assert_close(getattr(by_caption, name), getattr(by_group, name), rtol=1e-6, atol=0)
        torch.testing.assert_close(getattr(explicit_none, name), getattr(plain, name), rtol=0, atol=0)
    assert torch.equal(by_caption.neg_text_for_image, by_group.neg_text_for_image)
    assert not torch.equal(by_caption.loss_i2t, plain.loss_i2t)


@pytest.mark.parametrize("mode", ["hardest", "sample"])
@pytest.mark.parametrize("backend", [REFERENCE, FUSED])
def test_itm_negatives_avoid_each_directions_positives(backend, mode):
    """A chosen ITM negative is never in P^d_i (group, caption or that direction's extra positive), and a row
    gets -1 exactly when all its local columns are positives of that direction."""
    b, n = 16, 40
    image_all, text_all, offset, group_all = make_case(b, 5, n, groups=True, seed=16)
    kwargs = positive_kwargs(b, n, offset, captions=True, extras=True, seed=16)
    gid = group_all[offset : offset + b]
    # row 0: its local columns are all positives of i2t (the group takes some, the caption the rest but one, the
    # i2t extra positive that one), while t2i keeps exactly that one column as its only candidate
    group_all[offset : offset + b] = gid = torch.where(torch.arange(b) < b // 2, gid, 10**6 + torch.arange(b))
    gid[0] = group_all[offset] = 10**6 + 999  # row 0 alone in its group ...
    caption_all = torch.arange(n) + 2**40
    caption_all[offset : offset + b - 1] = 2**40 - 1  # ... and shares its caption with every local row but the last
    kwargs.update(caption_ids=caption_all[offset : offset + b].clone(), caption_ids_all=caption_all)
    last = offset + b - 1
    kwargs["extra_positives"][0, 0] = last
    kwargs["extra_positives"][1, 0] = -1
    pos_i2t, pos_t2i = explicit_positives(
        gid.tolist(), group_all.tolist(), kwargs["caption_ids"].tolist(), caption_all.tolist(),
        kwargs["extra_positives"].tolist(),
    )  # fmt: skip
    out = itc_terms(
        backend, image_all[offset : offset + b], text_all[offset : offset + b], torch.tensor(0.1),
        image_all=image_all, text_all=text_all, offset=offset, group_ids=gid, group_ids_all=group_all,
        negatives=mode, generator=torch.Generator().manual_seed(3), **kwargs,
    )  # fmt: skip
    assert out.neg_text_for_image[0] == -1 and out.neg_image_for_text[0] == b - 1
    for negs, positives in ((out.neg_text_for_image, pos_i2t), (out.neg_image_for_text, pos_t2i)):
        for i, j in enumerate(negs.tolist()):
            local_candidates = [c for c in range(offset, offset + b) if c not in positives[i]]
            if j == -1:
                assert not local_candidates, (i, local_candidates)
            else:
                assert offset + j in local_candidates, (i, j)
    assert (out.neg_text_for_image >= 0).sum() >= b // 2  # most rows do have a candidate


def test_dense_ids_keep_equality_in_int32():
    local = torch.tensor([5, 2**40, 5, -(2**50)])
    gathered = torch.tensor([2**40, 7, 5, -(2**50), 2**40 + 1])
    r_local, r_all = itc._dense_ids(local, gathered)
    assert r_local.dtype == r_all.dtype == torch.int32
    assert torch.equal(r_local[:, None] == r_all[None, :], local[:, None] == gathered[None, :])
    assert torch.equal(r_local[:, None] == r_local[None, :], local[:, None] == local[None, :])
    ids32 = torch.arange(4, dtype=torch.int32)
    assert itc._dense_ids(ids32, ids32)[0] is ids32  # int32 ids pass through


def hn_nce_by_formula(s, beta, alpha):
    """DiHT HN-NCE with diagonal positives, written from docs/METHOD.md section 3 (float64, explicit sums)."""
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


@pytest.mark.parametrize("backend", [REFERENCE, FUSED])
def test_bad_positive_arguments_raise(backend):
    image_all, text_all, _, _ = make_case(6, 4, 10, seed=17)
    img, txt, t = image_all[2:8], text_all[2:8], torch.tensor(0.07)
    gathered = dict(image_all=image_all, text_all=text_all, offset=2)
    for bad in (torch.full((6,), -1), torch.full((2, 5), -1), torch.full((3, 6), -1), torch.full((1, 2, 6), -1)):
        with pytest.raises(ValueError, match="extra_positives must be"):
            itc_terms(backend, img, txt, t, extra_positives=bad, **gathered)
    with pytest.raises(ValueError, match="integer column indices"):
        itc_terms(backend, img, txt, t, extra_positives=torch.zeros(2, 6), **gathered)
    for value in (10, -2):  # N = 10 columns: [-1, 10) is the range
        out_of_range = torch.full((2, 6), -1)
        out_of_range[1, 3] = value
        with pytest.raises(ValueError, match=r"must lie in \[-1, 10\)"):
            itc_terms(backend, img, txt, t, extra_positives=out_of_range, **gathered)
    with pytest.raises(ValueError, match="caption_ids_all is required"):
        itc_terms(backend, img, txt, t, caption_ids=torch.arange(6), **gathered)
    with pytest.raises(ValueError, match="caption_ids must be"):
        itc_terms(backend, img, txt, t, caption_ids=torch.arange(6), caption_ids_all=torch.arange(9), **gathered)
    edge = torch.tensor([[9, -1, 0, 2, 3, 4], [-1, -1, -1, -1, -1, 9]])  # the range's ends are accepted
    itc_terms(backend, img, txt, t, extra_positives=edge, **gathered)


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
