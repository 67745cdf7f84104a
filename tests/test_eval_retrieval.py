"""Retrieval evaluation: recall metrics, chunked ITC top-k, ITM re-ranking, 2 ranks = 1 rank, shards end to end."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

from gritvlp.albef import write_export_folder
from gritvlp.config import load_config
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import eval_transform
from gritvlp.eval import data as eval_data
from gritvlp.eval.features import EncodedSet, encode_set, tokenize
from gritvlp.eval.loading import load_model, load_model_tokenizer
from gritvlp.eval.metrics import retrieval_metrics
from gritvlp.eval.retrieval import evaluate_retrieval, score_matrices, topk_similarity
from gritvlp.model.gritvlp import GritVLP

_spec = importlib.util.spec_from_file_location("eval_retrieval", Path(__file__).parents[1] / "scripts" / "eval_retrieval.py")  # fmt: skip
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)


# ---------------------------------------------------------------- metrics


def test_metrics_of_a_hand_computed_case_with_ties_and_several_captions_per_image():
    txt2img = torch.tensor([0, 0, 1, 2, 2, 2])
    score_i2t = torch.tensor(
        [
            [0.2, 0.9, 0.9, 0.1, 0.0, 0.3],  # best caption c1 ties with wrong c2: rank 1
            [0.5, 0.1, 0.7, 0.3, 0.6, 0.2],  # c2 first: rank 0
            [0.8, 0.9, 0.2, 0.3, 0.1, 0.3],  # own captions tie at 0.3 (no penalty), c0 and c1 above: rank 2
        ]
    )
    score_t2i = torch.tensor(
        [
            [0.5, 0.5, 0.1],  # tie with a wrong image: rank 1
            [0.9, 0.2, 0.3],  # rank 0
            [0.1, 0.8, 0.2],  # rank 0
            [0.4, 0.3, 0.2],  # rank 2
            [-100.0, -100.0, -100.0],  # outside every top k: rank 2
            [0.0, 0.1, 0.7],  # rank 0
        ]
    )
    result = retrieval_metrics(score_i2t, score_t2i, txt2img)
    expected = {
        "txt_r1": 100 / 3, "txt_r5": 100.0, "txt_r10": 100.0, "txt_r_mean": (100 / 3 + 200) / 3,
        "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 250 / 3,
    }  # fmt: skip
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def scores_placing_positives_at(ranks: list[int], num_candidates: int) -> torch.Tensor:
    """Row q: candidate q (the correct one) at 0-based position ranks[q], the others in index order around it."""
    rows = []
    for q, rank in enumerate(ranks):
        order = [c for c in range(num_candidates) if c != q]
        order.insert(rank, q)
        row = torch.empty(num_candidates)
        row[order] = -torch.arange(num_candidates, dtype=torch.float32)
        rows.append(row)
    return torch.stack(rows)


def test_recall_thresholds_count_ranks_below_k():
    ranks = [0, 0, 1, 4, 4, 5, 9, 9, 10, 11, 3, 2]  # R@1 2/12, R@5 7/12, R@10 10/12
    scores = scores_placing_positives_at(ranks, 12)
    result = retrieval_metrics(scores, scores, torch.arange(12))
    for prefix in ("txt", "img"):
        assert result[f"{prefix}_r1"] == pytest.approx(100 * 2 / 12)
        assert result[f"{prefix}_r5"] == pytest.approx(100 * 7 / 12)
        assert result[f"{prefix}_r10"] == pytest.approx(100 * 10 / 12)


# ---------------------------------------------------------------- ITC top-k and ITM re-ranking


def test_chunked_top_k_equals_the_full_similarity_matrix():
    g = torch.Generator().manual_seed(0)
    queries, candidates = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g)
    values, indices = topk_similarity(queries, candidates, k=7, chunk_size=5)
    full = (queries @ candidates.T).topk(7, dim=1)
    torch.testing.assert_close(values, full.values)
    assert torch.equal(indices, full.indices)


class TableITM(nn.Module):
    """ITM logits from a table [image, caption]; image i's tokens and caption c's states carry i and c."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def itm_logits(self, image_tokens, text_hidden, attention_mask):
        match = self.table[image_tokens[:, 0, 0].long(), text_hidden[:, 0, 0].long()]
        return torch.stack([torch.zeros_like(match), match], dim=1)


def test_top_k_candidates_are_rescored_by_itm_and_the_rest_get_minus_100():
    n = 4
    ids = torch.arange(n, dtype=torch.float32)
    itc = torch.zeros(n, n)  # image i: caption i+1 most similar, then its own caption i
    itc[ids.long(), (ids.long() + 1) % n] = 0.9
    itc[ids.long(), ids.long()] = 0.8
    itm = torch.ones(n, n)  # the ITM prefers the own caption, and caption i+2 (outside the top 2) even more
    itm[ids.long(), ids.long()] = 5.0
    itm[ids.long(), (ids.long() + 2) % n] = 10.0
    encoded = EncodedSet(
        image_tokens=ids[:, None, None].expand(n, 2, 3).clone(),
        image_feat=itc,
        text_hidden=ids[:, None, None].expand(n, 5, 3).clone(),
        text_feat=torch.eye(n),
        attention_mask=torch.ones(n, 5, dtype=torch.long),
    )
    score_i2t, score_t2i = score_matrices(TableITM(itm), encoded, k_test=2, itm_batch_size=3, progress=False)
    expected_i2t = torch.full((n, n), -100.0)
    for i in range(n):
        expected_i2t[i, i], expected_i2t[i, (i + 1) % n] = 5.0, 1.0
    assert torch.equal(score_i2t, expected_i2t)
    expected_t2i = torch.full((n, n), -100.0)  # caption c: images c-1 and c in its ITC top 2
    for c in range(n):
        expected_t2i[c, c], expected_t2i[c, (c - 1) % n] = 5.0, 1.0
    assert torch.equal(score_t2i, expected_t2i)
    result = retrieval_metrics(score_i2t, score_t2i, torch.arange(n))
    assert result["txt_r1"] == 100.0 and result["img_r1"] == 100.0  # ITC alone ranks every match second


def test_itm_plus_itc_adds_the_cosine_similarity_to_the_logit():
    n = 4
    ids = torch.arange(n)
    itc = torch.zeros(n, n)  # image i: caption i+1 most similar (0.9), then its own caption (0.5)
    itc[ids, (ids + 1) % n] = 0.9
    itc[ids, ids] = 0.5
    itm = torch.ones(n, n)  # an ITM that sees no difference: the ITC order must survive
    encoded = EncodedSet(
        image_tokens=ids.float()[:, None, None].expand(n, 2, 3).clone(),
        image_feat=itc,
        text_hidden=ids.float()[:, None, None].expand(n, 5, 3).clone(),
        text_feat=torch.eye(n),
        attention_mask=torch.ones(n, 5, dtype=torch.long),
    )
    i2t, _ = score_matrices(TableITM(itm), encoded, k_test=2, progress=False, rerank_score="itm+itc")
    for i in range(n):
        assert i2t[i, i] == pytest.approx(1.5) and i2t[i, (i + 1) % n] == pytest.approx(1.9)
    plain, _ = score_matrices(TableITM(itm), encoded, k_test=2, progress=False)
    assert plain[0, 0] == plain[0, 1] == 1.0  # ALBEF's score: a tie the ITC order no longer breaks
    with pytest.raises(ValueError, match="rerank_score"):
        score_matrices(TableITM(itm), encoded, k_test=2, progress=False, rerank_score="itc")


# ---------------------------------------------------------------- real (tiny, random) model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model = GritVLP(load_config("demo").model)
    return write_export_folder(model, tmp_path_factory.mktemp("export") / "tiny")


def synthetic_set(seed: int = 0) -> eval_data.RetrievalSet:
    """7 images, 17 captions (1 to 4 per image) from a few words."""
    g = torch.Generator().manual_seed(seed)
    images = list(torch.randn(7, 3, 64, 64, generator=g))
    txt2img = torch.cat([torch.arange(7), torch.randint(0, 7, (10,), generator=g)])
    words = "a small large red blue green circle square star left right of above".split()
    captions = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g)) for _ in txt2img]
    return eval_data.RetrievalSet(images, captions, txt2img)


def scores_of(export_dir, itm_batch_size=5, k_test=4):
    """Score matrices of the synthetic set, and how many ITM batches this process ran."""
    model = load_model(export_dir)
    calls = []
    itm_logits = model.itm_logits
    model.itm_logits = lambda *args: calls.append(1) or itm_logits(*args)
    encoded = encode_set(model, synthetic_set(), load_model_tokenizer(export_dir, model), "cpu", batch_size=3, progress=False)  # fmt: skip
    with torch.no_grad():
        i2t, t2i = score_matrices(model, encoded, k_test, itm_batch_size=itm_batch_size, progress=False)
    return i2t, t2i, len(calls)


def _rank_worker(rank: int, world_size: int, init_file: str, export_dir: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(scores_of(export_dir), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_scores_of_one(export, tmp_path):
    single_i2t, single_t2i, _ = scores_of(export)
    # fork: the ranks start with this process's imports (a spawned rank spends seconds importing them again)
    args = (2, str(tmp_path / "init"), str(export), str(tmp_path))
    mp.start_processes(_rank_worker, args=args, nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i2t, t2i, _ in results:
        torch.testing.assert_close(i2t, single_i2t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t2i, single_t2i, rtol=1e-5, atol=1e-5)
    # 7 image queries split 3 + 4, 17 caption queries 8 + 9: each rank runs the larger slice's batch count
    expected_batches = math.ceil(4 * 4 / 5) + math.ceil(9 * 4 / 5)
    assert [calls for _, _, calls in results] == [expected_batches, expected_batches]
    assert (single_i2t > -100).sum(1).eq(4).all()  # k_test candidates per query were re-ranked


# ---------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def demo_test_split(tmp_path_factory):
    _, test = ensure_demo_shards(str(tmp_path_factory.mktemp("demo") / "data"), 8, 24, progress=False)
    return test


def test_shards_become_one_image_per_group_with_all_its_captions(demo_test_split):
    data = eval_data.from_shards(demo_test_split, image_size=64, progress=False)
    samples = ShardDataset(demo_test_split, eval_transform(64))
    assert data.captions == [samples[i]["caption"] for i in range(len(samples))]
    groups = [int(samples[i]["group_id"]) for i in range(len(samples))]
    first_of_group = {g: groups.index(g) for g in dict.fromkeys(groups)}
    assert data.num_images == len(first_of_group) < len(samples)  # some images have two captions
    for caption, image in enumerate(data.txt2img.tolist()):
        assert list(first_of_group)[image] == groups[caption]
    for image, sample in enumerate(first_of_group.values()):
        assert torch.equal(data.images[image], samples[sample]["image"])


def test_karpathy_annotations_merge_entries_of_one_image_and_clean_captions(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / name)
    ann = [{"image": "a.jpg", "caption": ["A dog, running!", "the dog-run"]}, {"image": "b.jpg", "caption": "Cat."}]
    ann.append({"image": "a.jpg", "caption": ["dog again"]})
    (tmp_path / "test.json").write_text(json.dumps(ann))
    data = eval_data.from_karpathy(tmp_path / "test.json", tmp_path, image_size=32)
    assert data.captions == ["a dog running", "the dog run", "cat", "dog again"]
    assert data.txt2img.tolist() == [0, 0, 1, 0]
    assert data.num_images == 2 and data.images[1].shape == (3, 32, 32)


def test_shards_end_to_end_through_the_cli_match_a_brute_force_itm(export, demo_test_split, tmp_path):
    """k_test beyond the set: every pair is re-ranked, so the scores are the ITM logits of all pairs."""
    out = tmp_path / "result.json"
    argv = ["--model", str(export), "--shards", demo_test_split, "--k-test", "1000", "--num-workers", "0"]
    result = eval_cli.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    data = eval_data.from_shards(demo_test_split, image_size=64, progress=False)
    assert (result["num_images"], result["num_captions"]) == (data.num_images, len(data.captions))

    model = load_model(export)
    tokenizer = load_model_tokenizer(export, model)
    with torch.no_grad():
        tokens, _ = model.encode_image(torch.stack([data.images[i] for i in range(data.num_images)]))
        ids, mask = tokenize(tokenizer, data.captions, 30)
        hidden, _ = model.encode_text(ids, mask)
        n_img, n_txt = data.num_images, len(data.captions)
        every_pair = model.itm_logits(
            tokens.repeat_interleave(n_txt, 0), hidden.repeat(n_img, 1, 1), mask.repeat(n_img, 1)
        )[:, 1].view(n_img, n_txt)
    score_i2t, score_t2i = score_matrices(model, encode_set(model, data, tokenizer, "cpu", progress=False), 1000, progress=False)  # fmt: skip
    torch.testing.assert_close(score_i2t, every_pair, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score_t2i, every_pair.T, rtol=1e-4, atol=1e-4)
    reranked = {k: v for k, v in result.items() if not k.startswith("itc_")}
    assert reranked == pytest.approx({**retrieval_metrics(score_i2t, score_t2i, data.txt2img), "num_images": n_img, "num_captions": n_txt, "k_test": 1000})  # fmt: skip
    assert set(result) - set(reranked) == {f"itc_{k}" for k in retrieval_metrics(score_i2t, score_t2i, data.txt2img)}


def test_evaluate_retrieval_takes_a_caption_dataset_and_restores_training_mode(export, demo_test_split):
    model = load_model(export).train()
    samples = ShardDataset(demo_test_split, eval_transform(64))
    result = evaluate_retrieval(model, samples, k_test=8, device="cpu", progress=False)
    assert model.training
    assert result["num_captions"] == len(samples) and 0 <= result["r_mean"] <= 100


def test_a_deepspeed_checkpoint_folder_loads_like_its_export(export, tmp_path):
    model = load_model(export)
    tag = tmp_path / "checkpoints" / "global_step7"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("global_step7")
    states = {
        "module": {f"model.{k}": v for k, v in model.state_dict().items()},  # the objective wraps the model
        "model_config": model.config_dict(),
        "ds_config": {"zero_optimization": {"stage": 0}},
    }
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    loaded = load_model(tag.parent)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not loaded.training
    assert load_model(export, dtype=torch.float16).temp.dtype == torch.float16


def test_tokenizer_comes_from_the_export_folder(export):
    model = load_model(export)
    assert load_model_tokenizer(export, model).vocab == load_tokenizer(None).vocab


def test_itc_metrics_rank_by_similarity_alone():
    import torch

    from gritvlp.eval.features import EncodedSet
    from gritvlp.eval.retrieval import itc_metrics

    # 3 images, 4 captions (image 1 has two); caption 3's feature points at image 2, caption 2 at image 0 (wrong)
    image_feat = torch.eye(3)
    text_feat = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1]])
    encoded = EncodedSet(None, image_feat, None, text_feat, None)
    metrics = itc_metrics(encoded, torch.tensor([0, 1, 1, 2]), chunk_size=2)
    assert metrics["itc_txt_r1"] == 100.0  # every image's best caption is one of its own
    assert metrics["itc_img_r1"] == 75.0  # caption 2 ranks image 0 first
    assert metrics["itc_img_r5"] == 100.0


# ---------------------------------------------------------------- runs that do not train ITM


class NoITM(nn.Module):
    """A model whose ITM head must not be asked."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def encode_image(self, images):
        return self.model.encode_image(images)

    def encode_text(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)

    def itm_logits(self, *args):
        raise AssertionError("k_test 0 must not re-rank")


def test_k_test_0_ranks_by_itc_alone(export, demo_test_split):
    model = load_model(export)
    data = eval_data.from_shards(demo_test_split, image_size=64, progress=False)
    reranked = evaluate_retrieval(model, data, k_test=8, device="cpu", progress=False)
    itc_only = evaluate_retrieval(NoITM(model), data, k_test=0, device="cpu", progress=False)
    itc_keys = [k for k in itc_only if k.startswith("itc_")]
    assert itc_only["k_test"] == 0 and len(itc_keys) == 9
    for key in itc_keys:
        assert itc_only[key] == itc_only[key[len("itc_") :]] == reranked[key]


def test_pretraining_evaluation_without_itm_training_ranks_by_itc(export, demo_test_split, caplog):
    from gritvlp.train.evaluation import EpochEvaluation

    model = load_model(export)
    tokenizer = load_model_tokenizer(export, model)
    results = {}
    for itm_weight in (0.0, 1.0):
        cfg = load_config("demo", [f"eval.test_shards={demo_test_split}", f"objectives.itm_weight={itm_weight}",
                                   "eval.k_test=8", "eval.zero_shot=false"])  # fmt: skip
        with caplog.at_level("INFO", logger="gritvlp.train"):
            caplog.clear()
            evaluation = EpochEvaluation(cfg, tokenizer, torch.device("cpu"))
            results[itm_weight] = [evaluation(model), evaluation(model)]
        said = [r for r in caplog.records if "ranks by ITC alone" in r.getMessage()]
        assert len(said) == (1 if itm_weight == 0 else 0)  # said once, at start-up
    first, second = results[0.0]
    for key, itc_key in (("r_mean", "itc_r_mean"), ("txt_r1", "itc_txt_r1"), ("best_r_mean", "best_itc_r_mean")):
        assert first[key] == first[itc_key]
    assert second["best_r_mean"] == max(first["r_mean"], second["r_mean"])
    assert not any(k.startswith(("hard_itm", "best_hard_itm")) for k in first) and "hard_itc_all" in first
    trained = results[1.0][0]
    assert "hard_itm_all" in trained and trained["itc_r_mean"] == first["itc_r_mean"]
