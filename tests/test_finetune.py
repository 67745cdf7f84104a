"""Retrieval fine-tuning: the objective's positives by image id, the export rebuilt at a new resolution, the
annotation dataset, and a short run of each recipe from an export (one process, plain python) that evaluates,
exports and resumes. The recipes' parts (queue, momentum encoder, soft targets, schedule) are tested in
test_finetune_recipes.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from gritvlp.albef import resample_pos_embed, write_export_folder
from gritvlp.config import load_config
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.transforms import train_transform
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.retrieval import RetrievalObjective, freeze_mlm_head, retrieval_objectives
from gritvlp.train.finetune import BEST_EXPORT, POS_EMBED, FinetuneConfig, load_pretrained_at_size
from gritvlp.train.finetune_data import AnnotationDataset

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the objective


class FeatureModel(nn.Module):
    """Features are the batch's own rows (image [B, D], input_ids [B, D] floats); the ITM head scores cosine."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.1))

    def temperature(self):
        return self.temp

    def encode_image(self, images):
        return images[:, None], F.normalize(images, dim=-1)

    def encode_text(self, input_ids, attention_mask):
        return input_ids[:, None], F.normalize(input_ids, dim=-1)

    def itm_logits(self, image_embeds, text_hidden, attention_mask):
        sim = (F.normalize(image_embeds[:, 0], dim=-1) * F.normalize(text_hidden[:, 0], dim=-1)).sum(-1)
        return torch.stack([-sim, sim], dim=1)


def two_captions_of_one_image() -> dict:
    """Samples 0 and 1 show one image; text 1 is by far the text most like image 0 after text 0 itself."""
    images = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    texts = torch.tensor([[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [0.2, 1.0, 0, 0], [0, 0.3, 1.0, 0]])
    return {"image": images, "input_ids": texts, "attention_mask": torch.ones(4, 1), "group_id": torch.tensor([0, 0, 1, 2])}  # fmt: skip


def multi_positive_nce(s: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Each positive against the row's negatives only, averaged over the positives, then over the rows."""
    negatives = torch.logsumexp(s.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
    per_positive = s - torch.logaddexp(s, negatives)
    return -((per_positive * positive).sum(1) / positive.sum(1)).mean()


def test_captions_of_one_image_are_itc_positives_of_each_other():
    batch = two_captions_of_one_image()
    out = RetrievalObjective(FeatureModel(), retrieval_objectives("hardest"))(batch)
    s = F.normalize(batch["image"], dim=-1) @ F.normalize(batch["input_ids"], dim=-1).T / 0.1
    same_image = batch["group_id"][:, None] == batch["group_id"][None, :]
    expected = (multi_positive_nce(s, same_image) + multi_positive_nce(s.T, same_image)) / 2
    torch.testing.assert_close(out["itc"], expected)
    diagonal_only = (multi_positive_nce(s, torch.eye(4, dtype=torch.bool)) + multi_positive_nce(s.T, torch.eye(4, dtype=torch.bool))) / 2  # fmt: skip
    assert diagonal_only - expected > 0.3  # the test tells the two apart
    torch.testing.assert_close(out["loss"], out["itc"] + out["itm"])


def test_the_hardest_itm_negative_is_never_a_caption_of_the_same_image():
    out = RetrievalObjective(FeatureModel(), retrieval_objectives("hardest"))(two_captions_of_one_image())
    assert out["neg_text_for_image"].tolist() == [2, 2, 3, 1]  # image 0 would pick text 1 were it a negative
    neg_image = out["neg_image_for_text"].tolist()
    assert neg_image[:2] == [2, 3] and neg_image[2] in (0, 1) and neg_image[3] == 2


def test_sampled_itm_negatives_avoid_the_same_image_and_vary():
    objective = RetrievalObjective(FeatureModel(), retrieval_objectives("sample"))
    chosen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = objective(two_captions_of_one_image())
        for negatives in (out["neg_text_for_image"], out["neg_image_for_text"]):
            assert not {int(negatives[0]), int(negatives[1])} & {0, 1}
            assert int(negatives[2]) != 2 and int(negatives[3]) != 3
        chosen.add(int(out["neg_text_for_image"][0]))
    assert chosen == {2, 3}


def test_a_real_model_trains_everything_but_the_mlm_head():
    torch.manual_seed(0)
    model = GritVLP(load_config("demo").model)
    freeze_mlm_head(model)
    batch = {
        "image": torch.randn(4, 3, 64, 64),
        "input_ids": torch.randint(1000, 2000, (4, 7)),
        "attention_mask": torch.ones(4, 7, dtype=torch.long),
        "group_id": torch.tensor([5, 5, 6, 7]),
    }
    out = RetrievalObjective(model)(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0 <= out["itm_acc"] <= 1
    assert all(p.grad is None and not p.requires_grad for p in model.mlm_head.parameters())
    assert model.text.embeddings.word_embeddings.weight.grad is not None  # tied to the MLM decoder, still trained
    assert model.vision.vit.pos_embed.grad is not None and model.itm_head.weight.grad is not None


# ---------------------------------------------------------------- model and data in


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    return write_export_folder(GritVLP(load_config("demo").model), tmp_path_factory.mktemp("export") / "tiny")


def test_an_export_is_rebuilt_at_the_fine_tuning_size_with_resampled_position_embeddings(export):
    exported = GritVLP.from_pretrained(export)
    model = load_pretrained_at_size(export, 80)
    assert model.config.image_size == 80 and model.vision.vit.pos_embed.shape == (1, 1 + 10 * 10, 96)
    torch.testing.assert_close(model.vision.vit.pos_embed, resample_pos_embed(exported.vision.vit.pos_embed, model.vision.vit))  # fmt: skip
    for name, tensor in exported.state_dict().items():
        if name != POS_EMBED:
            assert torch.equal(model.state_dict()[name], tensor), name
    tokens, _ = model.encode_image(torch.randn(2, 3, 80, 80))
    assert tokens.shape == (2, 101, 96)
    same = load_pretrained_at_size(export, 64)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in exported.state_dict().items())


def test_annotation_captions_of_one_image_share_a_group_and_unreadable_images_are_skipped(tmp_path):
    for name, colour in (("a.jpg", (200, 10, 10)), ("b.jpg", (10, 10, 200))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / name)
    ann = [
        {"image": "a.jpg", "caption": "A red square!", "image_id": "x1"},
        {"image": "a.jpg", "caption": ["the red-square", "red"], "image_id": "x1"},
        {"image": "b.jpg", "caption": "blue"},
        {"image": "b.jpg", "caption": "still blue"},
        {"image": "missing.jpg", "caption": "nothing"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(ann))
    data = AnnotationDataset(tmp_path / "train.json", tmp_path, train_transform(32, (0.5, 1.0), True, 2, 7), seed=3)
    assert data.captions == ["a red square", "the red square", "red", "blue", "still blue", "nothing"]
    assert data.group_ids.tolist() == [0, 0, 0, 1, 1, 2]
    sample = data[1]
    assert sample["image"].shape == (3, 32, 32) and sample["group_id"] == 0 and sample["index"] == 1
    assert torch.equal(data[1]["image"], sample["image"])  # augmentation is a function of (seed, epoch, index)
    data.set_epoch(1)
    assert not torch.equal(data[1]["image"], sample["image"])
    assert data[5] is None


def test_dataset_picks_albef_epochs_and_sources_are_checked():
    coco = FinetuneConfig("export", train_shards="t", test_shards="s")
    flickr = FinetuneConfig("export", train_shards="t", test_shards="s", dataset="flickr30k")
    assert (coco.epochs, flickr.epochs) == (5, 10)
    assert coco.k_test is None  # resolved against the test set: default_k_test
    assert (coco.image_size, coco.lr, coco.crop_scale, coco.itm_negatives) == (384, 1e-5, (0.5, 1.0), "sample")
    with pytest.raises(ValueError, match="exactly one of train"):
        FinetuneConfig("export", train_shards="t", train_ann="a.json", test_shards="s", image_root=".")
    with pytest.raises(ValueError, match="image_root"):
        FinetuneConfig("export", train_shards="t", test_ann="test.json")
    with pytest.raises(ValueError, match="train_ann needs image_root"):
        FinetuneConfig("export", train_ann="train.json", test_ann="test.json", test_image_root=".")


# ---------------------------------------------------------------- a short run of each recipe

# Per recipe: a queue smaller than the 32 samples of a run, so it wraps around; grit evaluates with the default
# k_test (capped by the 12 test images), in-batch selects its best epoch by the ITC ranking.
RECIPE_ARGS = {
    "albef": ["--recipe", "albef", "--queue-size", "12", "--k-test", "8"],
    "grit": ["--recipe", "grit", "--queue-size", "12"],
    "in-batch": ["--recipe", "in-batch", "--k-test", "8", "--select", "itc"],
}


def finetune(out: Path, export: Path, data: tuple[str, str], ds: Path, *extra: str) -> str:
    """Runs the script; returns its console output."""
    train, test = data
    cmd = [
        sys.executable, "scripts/finetune_retrieval.py", "--deepspeed_config", str(ds), "--pretrained", str(export),
        "--train-shards", train, "--test-shards", test, "--hard-negative-shards", test, "--output_dir", str(out),
        "--image-size", "80", "--no-hflip", "--randaug-n", "0", "--num-workers", "0", "--log-every", "1", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, f"fine-tuning failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, export):
    """Data and DeepSpeed config of 2 epochs of 2 steps."""
    tmp = tmp_path_factory.mktemp("finetune")
    data = ensure_demo_shards(str(tmp / "demo"), 16, 12, image_size=64, progress=False)
    config = json.loads((REPO / "ds_configs" / "finetune_zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 8
    (tmp / "ds.json").write_text(json.dumps(config))
    return tmp, data, tmp / "ds.json"


@pytest.fixture(scope="module", params=list(RECIPE_ARGS))
def run(request, small_run, export):
    """(recipe, output folder, console output) of a whole run of 2 epochs."""
    tmp, data, ds = small_run
    out = tmp / f"run_{request.param}"
    console = finetune(out, export, data, ds, "--epochs", "2", *RECIPE_ARGS[request.param])
    return request.param, out, console


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_client_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)


def test_each_step_logs_finite_losses_and_each_epoch_both_rankings(run):
    recipe, out, console = run
    rows = metrics(out)
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss/total"]) and r["loss/total"] > 0 for r in steps)
    lrs = [r["train/lr"] for r in steps]
    if recipe == "in-batch":  # cosine per optimiser step
        assert lrs[0] == pytest.approx(1e-5) and lrs[0] > lrs[1] > lrs[2] > lrs[3]
        assert "train/alpha" not in steps[0]
    else:  # cosine per epoch: 1e-6 + 9e-6 (1 + cos(pi e / 2)) / 2 in epoch e
        assert lrs == pytest.approx([1e-5, 1e-5, 5.5e-6, 5.5e-6])
        alpha = 0.4 if recipe == "albef" else 0.0  # warmed up over epoch 0: x 0/2, 1/2; then whole
        assert [r["train/alpha"] for r in steps] == pytest.approx([0.0, alpha / 2, alpha, alpha])
    evals = [r for r in rows if "eval/r_mean" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals:
        assert 0 <= row["eval/r_mean"] <= 100 and 0 <= row["eval/hard_itm_colour"] <= 100
        assert {"eval/txt_r1", "eval/img_r10", "eval/hard_itc_all", "eval/itc_r_mean", "eval/itc_img_r1"} <= set(row)
        assert row["eval/itc_mean_r1"] == pytest.approx((row["eval/itc_txt_r1"] + row["eval/itc_img_r1"]) / 2)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    k_test = "1 re-ranked by itm (coco's value, at most 12.8% of the test images)" if recipe == "grit" else "8 re-ranked by itm (--k-test)"  # fmt: skip
    selected = "eval/itc_r_mean" if recipe == "in-batch" else "eval/r_mean"
    assert f"top {k_test}; the best epoch is selected by {selected}" in console


def test_the_queue_and_momentum_encoder_are_checkpointed(run):
    recipe, out, _ = run
    state = final_client_state(out)
    if recipe == "in-batch":
        assert "queue" not in state and "momentum_encoder" not in state
        return
    queue = state["queue"]
    assert int(queue["ptr"]) == 4 * 8 % 12  # 4 steps of 8 samples, wrapped around a queue of 12
    assert queue["ids"].shape == (12,) and (queue["ids"] >= 0).all()  # every slot written over by now
    momentum = state["momentum_encoder"]
    assert momentum["encoder.text_proj.weight"].dtype == torch.float32
    assert not any(".crossattention." in k or "itm_head" in k for k in momentum)


def test_the_best_epoch_is_exported_and_loads(run, export):
    recipe, run, _ = run
    key = "eval/itc_r_mean" if recipe == "in-batch" else "eval/r_mean"
    evals = [r for r in metrics(run) if "eval/r_mean" in r]
    best = json.loads((run / "best.json").read_text())
    best_epoch = max(range(2), key=lambda e: (evals[e][key], -e)) + 1  # ties keep the earlier epoch
    assert best["selected_by"] == key
    assert best["epoch"] == best_epoch and best[key] == evals[best_epoch - 1][key]
    model = GritVLP.from_pretrained(run / BEST_EXPORT)
    start = load_pretrained_at_size(export, 80)
    assert model.config.image_size == 80 and model.vision.vit.pos_embed.shape == start.vision.vit.pos_embed.shape
    assert not torch.equal(model.text_proj.weight, start.text_proj.weight)  # it trained
    assert torch.equal(model.mlm_head.bias, start.mlm_head.bias)  # frozen: exported as it came
    assert (run / BEST_EXPORT / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_run_stopped_after_an_epoch_and_resumed_logs_what_the_whole_run_logs(small_run, export, run):
    """The queue and momentum encoder come back from the checkpoint: the resumed epoch's losses (which read the
    queue) and the final queue and momentum weights are the whole run's."""
    tmp, data, ds = small_run
    recipe, whole_run, _ = run
    args = ["--epochs", "2", *RECIPE_ARGS[recipe]]
    resumed_run = tmp / f"resumed_{recipe}"
    finetune(resumed_run, export, data, ds, *args, "--max-steps", "2")
    assert [r["step"] for r in metrics(resumed_run) if "eval/r_mean" in r] == [2]
    if recipe != "in-batch":
        with pytest.raises(AssertionError, match="resume it with that setting"):
            other = "grit" if recipe == "albef" else "albef"
            finetune(resumed_run, export, data, ds, *args, "--recipe", other, "--resume", "latest")
    finetune(resumed_run, export, data, ds, *args, "--resume", "latest")
    resumed, whole = metrics(resumed_run), metrics(whole_run)
    assert len(resumed) == len(whole)
    for row, expected in zip(resumed, whole):  # approx compares flat mappings only
        assert row == pytest.approx(expected)
    assert json.loads((resumed_run / "best.json").read_text()) == json.loads((whole_run / "best.json").read_text())
    if recipe != "in-batch":
        for part in ("queue", "momentum_encoder"):
            got, expected = final_client_state(resumed_run)[part], final_client_state(whole_run)[part]
            assert got.keys() == expected.keys()
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{part}.{key}")
