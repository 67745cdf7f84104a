"""Zero-shot classification: prompt files, class embeddings, metrics with ties, the three image sources, 2 ranks = 1."""

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from gritvlp.albef import write_export_folder
from gritvlp.config import load_config
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.eval import classification_data as cdata
from gritvlp.eval import zeroshot
from gritvlp.eval.loading import load_model, load_model_tokenizer
from gritvlp.model.gritvlp import GritVLP

_spec = importlib.util.spec_from_file_location("eval_zeroshot", Path(__file__).parents[1] / "scripts" / "eval_zeroshot.py")  # fmt: skip
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


# ---------------------------------------------------------------- prompts and metrics


def test_prompt_files_in_clip_benchmark_layout(tmp_path):
    names = tmp_path / "en_classnames.json"
    names.write_text(json.dumps({"cifar10": ["airplane", "cat"], "mnist": ["0", "1"]}))
    assert zeroshot.load_prompt_file(names, "mnist") == ["0", "1"]
    with pytest.raises(ValueError, match="holds 2 datasets"):
        zeroshot.load_prompt_file(names)
    with pytest.raises(KeyError, match="no dataset 'svhn'"):
        zeroshot.load_prompt_file(names, "svhn")
    plain = tmp_path / "templates.json"
    plain.write_text(json.dumps(["a photo of a {c}.", "a {c}"]))
    assert zeroshot.load_prompt_file(plain) == ["a photo of a {c}.", "a {c}"]
    assert zeroshot.prompts_of("cat", ["a photo of a {c}.", "a {c}"]) == ["a photo of a cat.", "a cat"]
    assert zeroshot.prompts_of("cat", {"cat": ["a small cat"], "dog": ["a dog"]}) == ["a small cat"]
    with pytest.raises(KeyError, match="'cow'"):
        zeroshot.prompts_of("cow", {"cat": ["a small cat"]})


def test_ranks_count_ties_as_wrong_and_metrics_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.1], [0.2, 0.3, 0.1], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 2])
    ranks = zeroshot.true_class_ranks(logits, labels)
    assert ranks.tolist() == [0, 1, 2, 2]  # the 0.5 / 0.5 tie and the constant row count against the true class
    counts = zeroshot.class_counts(ranks, labels, 3)
    assert counts.tolist() == [[1, 1, 1], [1, 0, 1], [2, 0, 2]]  # images, top-1, top-5 per class
    out = zeroshot.metrics_from_counts(counts)
    assert out["top1"] == 25.0 and out["top5"] == 100.0 and out["num_images"] == 4
    assert out["mean_per_class_recall"] == pytest.approx(100.0 / 3)  # (1 + 0 + 0) / 3 classes


class WordModel(torch.nn.Module):
    """Text features from the words of a prompt (one direction per word), image features from the class index
    stored in the image's first pixel: a model that knows the classes exactly."""

    def __init__(self, vocab: list[str]):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))  # model_dtype() reads a parameter
        self.config = type("Config", (), {"embed_dim": len(vocab)})()

    def encode_text(self, input_ids, attention_mask):
        feats = torch.stack([self._bag(self._texts.pop(0)) for _ in range(len(input_ids))])
        return torch.zeros(len(input_ids), 1, 1), feats

    def _bag(self, text):
        return torch.stack([torch.tensor(float(w in text.split())) for w in self.vocab])

    def encode_image(self, images):
        feats = F.one_hot(images[:, 0, 0, 0].long(), len(self.vocab)).float()
        return torch.zeros(len(images), 1, 1), feats


class RecordingTokenizer:
    """Hands the texts to the WordModel in order (its encode_text pops them)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, texts, **kwargs):
        self.model._texts = list(texts)
        n = len(texts)
        return {"input_ids": torch.zeros(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long)}


def word_set(labels, classnames, templates):
    images = [torch.full((3, 4, 4), float(label)) for label in labels]
    return cdata.ClassificationSet("words", cdata.TensorImages(images), labels, classnames, templates)


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompts():
    model = WordModel(["red", "blue", "a", "photo"])
    classes = zeroshot.class_embeddings(model, RecordingTokenizer(model), ["red", "blue"], ["a {c}", "a photo {c}"], "cpu")  # fmt: skip
    a_red, a_photo_red = torch.tensor([1.0, 0, 1, 0]), torch.tensor([1.0, 0, 1, 1])
    expected = F.normalize(F.normalize(a_red, dim=0) + F.normalize(a_photo_red, dim=0), dim=0)
    torch.testing.assert_close(classes[0], expected)
    assert classes[1][1] > 0 and classes[1][0] == 0


def test_a_model_that_knows_the_classes_scores_100_and_a_swapped_prompt_costs_exactly_its_class():
    vocab = ["red", "blue", "green"]
    labels = [0, 0, 1, 2, 2, 2]
    model = WordModel(vocab)
    right = zeroshot.evaluate_zeroshot(model, word_set(labels, vocab, ["{c}"]), "cpu", RecordingTokenizer(model), progress=False)  # fmt: skip
    assert right["top1"] == 100.0 and right["mean_per_class_recall"] == 100.0 and right["num_classes"] == 3
    # class 1's prompts name "green": classes 1 and 2 share one embedding, so each of their images ties (wrong)
    swapped = {"red": ["red"], "blue": ["green"], "green": ["green"]}
    out = zeroshot.evaluate_zeroshot(model, word_set(labels, vocab, swapped), "cpu", RecordingTokenizer(model), progress=False)  # fmt: skip
    assert out["top1"] == pytest.approx(100 * 2 / 6) and out["mean_per_class_recall"] == pytest.approx(100 / 3)
    assert out["top5"] == 100.0


# ---------------------------------------------------------------- image sources


def test_image_folder_classes_in_sorted_folder_order(tmp_path):
    for folder, colour in (("b_cat", "red"), ("a_dog", "blue")):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(tmp_path / folder / f"{i}.png")
    data = cdata.from_image_folder(str(tmp_path), 16, None, ["a {c}"])
    assert data.classnames == ["a dog", "b cat"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.images[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="3 class names for 2 class folders"):
        cdata.from_image_folder(str(tmp_path), 16, ["x", "y", "z"], ["a {c}"])


def _labelled_tar(path, metas):
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(metas):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(buf, "JPEG")
            members = {"jpg": buf.getvalue(), "txt": b"a caption"}
            if meta is not None:
                members["json"] = json.dumps(meta).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_labelled_shards_take_indices_or_names_and_skip_samples_without_a_label(tmp_path):
    metas = [{"label": 1}, {"label": "cat"}, {"other": 0}, None, {"label": "cow"}, {"label": 0}]
    _labelled_tar(tmp_path / "test-000000.tar", metas)
    data = cdata.from_labelled_shards(str(tmp_path / "test-000000.tar"), 16, "label", ["cat", "dog"], ["{c}"])
    assert data.labels.tolist() == [1, 0, 0]
    assert len(data.images) == 3 and data.images[2].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="no sample"):
        cdata.from_labelled_shards(str(tmp_path / "test-000000.tar"), 16, "class", ["cat"], ["{c}"])


@pytest.fixture(scope="module")
def demo_test(tmp_path_factory):
    return ensure_demo_shards(str(tmp_path_factory.mktemp("demo") / "data"), 8, 64, progress=False)[1]


def test_demo_sets_label_single_object_images_from_their_scene(demo_test):
    from gritvlp.eval.hard_negatives import demo_scenes

    singles = {}
    for scene in demo_scenes(demo_test):
        if len(scene["objects"]) == 1:
            singles.setdefault(scene["image_id"], scene["objects"][0])
    shape, colour, size = cdata.demo_attribute_sets(demo_test, 32)
    assert len(shape.labels) == len(singles) > 5
    assert [shape.classnames[i] for i in shape.labels] == [o["shape"] for o in singles.values()]
    assert [colour.classnames[i] for i in colour.labels] == [o["colour"] for o in singles.values()]
    assert [size.classnames[i] for i in size.labels] == [o["size"] for o in singles.values()]
    assert len(shape.templates) == 2 * 7 and "a small red {c}" in shape.templates
    assert len(size.templates) == 7 * 5 and "a {c} white star" in size.templates


# ---------------------------------------------------------------- a real model, one rank and two


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    return write_export_folder(GritVLP(load_config("demo").model), tmp_path_factory.mktemp("export") / "tiny")


def _result(export_dir, demo_test):
    model = load_model(export_dir)
    tokenizer = load_model_tokenizer(export_dir, model)
    return [zeroshot.evaluate_zeroshot(model, data, "cpu", tokenizer, batch_size=7, progress=False)
            for data in cdata.demo_attribute_sets(demo_test, model.config.image_size)]  # fmt: skip


def _rank_worker(rank, world_size, init_file, export_dir, demo_test, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(_result(export_dir, demo_test), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_result_of_one(export, demo_test, tmp_path):
    single = _result(export, demo_test)
    args = (2, str(tmp_path / "init"), str(export), demo_test, str(tmp_path))
    mp.start_processes(_rank_worker, args=args, nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single


def test_cli_on_an_image_folder_writes_json(export, tmp_path):
    for folder in ("circle", "square"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / folder / "0.png")
    (tmp_path / "templates.json").write_text(json.dumps({"shapes": ["a small red {c}", "a {c}"]}))
    out = tmp_path / "result.json"
    cli.main(["--model", str(export), "--image-folder", str(tmp_path / "images"),
              "--templates", str(tmp_path / "templates.json"), "--out", str(out), "--num-workers", "0"])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and result["num_classes"] == 2 and result["classnames"] == ["circle", "square"]
    assert result["top5"] == 100.0  # 2 classes: the true one is always within the top 5
