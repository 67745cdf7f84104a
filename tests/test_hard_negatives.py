"""Hard-negative benchmark: the perturbations of demo captions, and the accuracies against models whose scores are known."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gritvlp.albef import write_export_folder
from gritvlp.config import load_config
from gritvlp.data.demo import COLOURS, SHAPES, SIZES, caption_holds, ensure_demo_shards, join_clauses, parse_caption
from gritvlp.data.text import load_tokenizer
from gritvlp.eval.features import tokenize
from gritvlp.eval.hard_negatives import (
    KINDS,
    HardNegativeItem,
    demo_scenes,
    evaluate_hard_negatives,
    hard_negative_set,
    perturb,
)
from gritvlp.eval.loading import load_model
from gritvlp.model.gritvlp import GritVLP

_spec = importlib.util.spec_from_file_location("eval_hard_negatives", Path(__file__).parents[1] / "scripts" / "eval_hard_negatives.py")  # fmt: skip
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

WORDS_OF_KIND = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "size": set(SIZES),
    "relation": {"left", "right", "above", "below"},
}


def obj(size, colour, shape, row, col):
    return {"size": size, "colour": colour, "shape": shape, "row": row, "col": col}


RED_LEFT_OF_BLUE = [obj("small", "red", "circle", 0, 0), obj("large", "blue", "square", 0, 2)]
CAPTION = "a small red circle left of a large blue square"


@pytest.fixture(scope="module")
def demo_test_split(tmp_path_factory):
    _, test = ensure_demo_shards(str(tmp_path_factory.mktemp("demo") / "data"), 8, 60, image_size=32, progress=False)
    return test


# ---------------------------------------------------------------- perturbations


def test_captions_parse_into_clauses_and_back():
    caption = (
        "a large green triangle above a small yellow star and a small white diamond right of a large green triangle"
    )
    clauses = parse_caption(caption)
    assert clauses == [
        ("a large green triangle", "above", "a small yellow star"),
        ("a small white diamond", "right of", "a large green triangle"),
    ]
    assert join_clauses(clauses) == caption
    assert parse_caption("a small red circle") == [("a small red circle", None, None)]
    for bad in ("a small red circle near a large blue square", "a tiny red circle", "a small pink circle"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_each_kind_changes_the_first_word_it_can_in_a_fixed_order():
    assert perturb(CAPTION, RED_LEFT_OF_BLUE, "colour") == "a small green circle left of a large blue square"
    assert perturb(CAPTION, RED_LEFT_OF_BLUE, "shape") == "a small red square left of a large blue square"
    assert perturb(CAPTION, RED_LEFT_OF_BLUE, "size") == "a large red circle left of a large blue square"
    assert perturb(CAPTION, RED_LEFT_OF_BLUE, "relation") == "a small red circle right of a large blue square"
    above = [obj("small", "red", "circle", 0, 1), obj("large", "blue", "square", 2, 1)]
    assert perturb("a small red circle above a large blue square", above, "relation").split()[4] == "below"
    assert perturb("a large white star", [obj("large", "white", "star", 1, 1)], "colour") == "a large red star"
    assert perturb("a large white star", [obj("large", "white", "star", 1, 1)], "relation") is None


def test_a_change_that_is_still_true_of_the_scene_is_passed_over():
    # a small green circle also stands left of the square: "green" would describe this very scene
    scene = [*RED_LEFT_OF_BLUE, obj("small", "green", "circle", 0, 1)]
    assert perturb(CAPTION, scene, "colour") == "a small blue circle left of a large blue square"
    # a large red circle too: the subject's size change is true, so the object's size changes
    scene = [*RED_LEFT_OF_BLUE, obj("large", "red", "circle", 0, 1)]
    assert perturb(CAPTION, scene, "size") == "a small red circle left of a small blue square"


def test_every_perturbation_of_the_demo_test_split_changes_one_word_of_its_kind_and_is_false(demo_test_split):
    found = dict.fromkeys(KINDS, 0)
    for scene in demo_scenes(demo_test_split):
        clauses = parse_caption(scene["caption"])
        assert caption_holds(scene["objects"], clauses)
        for kind in KINDS:
            negative = perturb(scene["caption"], scene["objects"], kind)
            if negative is None:
                assert kind == "relation" and all(rel is None for _, rel, _ in clauses)
                continue
            found[kind] += 1
            before, after = scene["caption"].split(), negative.split()
            changed = [(a, b) for a, b in zip(before, after) if a != b]
            assert len(before) == len(after) and len(changed) == 1, (scene["caption"], negative)
            assert set(changed[0]) <= WORDS_OF_KIND[kind]
            if kind == "relation":
                assert changed[0] in {("left", "right"), ("right", "left"), ("above", "below"), ("below", "above")}
            assert not caption_holds(scene["objects"], parse_caption(negative))
            assert perturb(scene["caption"], scene["objects"], kind) == negative  # deterministic
    assert all(n > 0 for n in found.values())


# ---------------------------------------------------------------- accuracies


class WordCountingModel(nn.Module):
    """Scores a caption by how often it holds `word`: ITC similarity and ITM match probability both grow with it."""

    def __init__(self, tokenizer, word: str):
        super().__init__()
        self.word_id = tokenizer.convert_tokens_to_ids(word)
        self.scale = nn.Parameter(torch.ones(()))

    def encode_image(self, images):
        b = images.shape[0]
        return images.new_zeros(b, 2, 4), F.normalize(images.new_tensor([1.0, 0.0]).expand(b, 2), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        count = (input_ids == self.word_id).sum(1).float()
        hidden = count[:, None, None].expand(-1, input_ids.shape[1], 4)
        return hidden, F.normalize(torch.stack([count, torch.ones_like(count)], dim=1), dim=-1)

    def itm_logits(self, image_tokens, text_hidden, attention_mask):
        return torch.stack([torch.zeros_like(text_hidden[:, 0, 0]), self.scale * text_hidden[:, 0, 0]], dim=1)


def item(caption: str, objects: list[dict]) -> HardNegativeItem:
    negatives = {kind: perturb(caption, objects, kind) for kind in KINDS}
    return HardNegativeItem(torch.zeros(3, 8, 8), caption, {k: v for k, v in negatives.items() if v})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_a_model_preferring_red_wins_every_colour_change_away_from_red_and_ties_the_rest(tokenizer):
    items = [
        item(CAPTION, RED_LEFT_OF_BLUE),
        item("a large red star", [obj("large", "red", "star", 1, 1)]),
        item(
            "a small red diamond below a small red square",
            [obj("small", "red", "diamond", 2, 0), obj("small", "red", "square", 1, 0)],
        ),  # fmt: skip
    ]
    result = evaluate_hard_negatives(WordCountingModel(tokenizer, "red"), items, "cpu", tokenizer, batch_size=2)
    for method in ("itm", "itc"):
        assert result[method] == pytest.approx(
            {"colour": 100.0, "shape": 0.0, "size": 0.0, "relation": 0.0, "all": 300 / 11}
        )
    assert result["count"] == {"colour": 3, "shape": 3, "size": 3, "relation": 2, "all": 11}
    assert result["num_images"] == 3


def test_a_change_towards_the_preferred_word_is_lost(tokenizer):
    items = [item(CAPTION, RED_LEFT_OF_BLUE), item("a large white star", [obj("large", "white", "star", 1, 1)])]
    assert items[1].negatives["colour"] == "a large red star"
    result = evaluate_hard_negatives(WordCountingModel(tokenizer, "red"), items, "cpu", tokenizer)
    assert result["itm"]["colour"] == result["itc"]["colour"] == 50.0
    assert result["count"]["colour"] == 2 and result["count"]["relation"] == 1


def test_demo_shards_give_the_accuracy_the_captions_predict(demo_test_split, tokenizer):
    items = hard_negative_set(demo_test_split, image_size=32)
    model = WordCountingModel(tokenizer, "blue")
    result = evaluate_hard_negatives(model, items, "cpu", tokenizer, batch_size=7)
    for kind in KINDS:
        wins = [it.caption.split().count("blue") > it.negatives[kind].split().count("blue") for it in items if kind in it.negatives]  # fmt: skip
        expected = 100.0 * sum(wins) / len(wins)
        assert result["itm"][kind] == pytest.approx(expected) and result["itc"][kind] == pytest.approx(expected)
        assert result["count"][kind] == len(wins)
    image_ids = {scene["image_id"] for scene in demo_scenes(demo_test_split)}
    assert result["num_images"] == len(items) == len(image_ids)  # one item per image, not per caption
    assert 0 < result["itm"]["colour"] < 100


# ---------------------------------------------------------------- a real model through the CLI


def test_cli_scores_match_the_model_pair_by_pair(tmp_path):
    _, small_split = ensure_demo_shards(str(tmp_path / "demo"), 4, 16, image_size=32, progress=False)
    torch.manual_seed(0)
    config = load_config("demo").model
    config.image_size = 32
    export = write_export_folder(GritVLP(config), tmp_path / "export")
    out = tmp_path / "result.json"
    result = cli.main(["--model", str(export), "--shards", small_split, "--batch-size", "16", "--out", str(out)])
    assert json.loads(out.read_text()) == result

    model, tokenizer = load_model(export), load_tokenizer(None)
    items = hard_negative_set(small_split, image_size=32)
    wins = {"itm": {k: [] for k in KINDS}, "itc": {k: [] for k in KINDS}}
    with torch.no_grad():
        for it in items:
            kinds = list(it.negatives)
            ids, mask = tokenize(tokenizer, [it.caption, *it.negatives.values()], 30)
            tokens, image_feat = model.encode_image(it.image[None])
            hidden, text_feat = model.encode_text(ids, mask)
            itc = (text_feat @ image_feat[0]).tolist()
            itm = model.itm_logits(tokens.expand(len(ids), -1, -1), hidden, mask).softmax(-1)[:, 1].tolist()
            for k, kind in enumerate(kinds, start=1):
                wins["itc"][kind].append(itc[0] > itc[k])
                wins["itm"][kind].append(itm[0] > itm[k])
    for method in ("itm", "itc"):
        for kind in KINDS:
            assert result[method][kind] == pytest.approx(100.0 * sum(wins[method][kind]) / len(wins[method][kind]))
