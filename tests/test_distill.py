"""Concept distillation: loss and gradient against a tiny timm teacher, precomputed targets (the teacher not run),
no teacher = no head and no call, export without the teacher, attribute concepts (loss, masking, collation, config,
export) and scripts/precompute_concepts.py (with attributes from the teacher's classes)."""

import hashlib
import json
import math
import tarfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from script_loader import load_script as load_script_named

import gritvlp.model.concepts as concepts
from gritvlp.config import ConfigError, load_config
from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.text import load_tokenizer
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.distill import attribute_loss, precomputed_targets
from gritvlp.objectives.pretraining import PretrainingObjective

NUM_CLASSES = 5
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "precompute_concepts.py"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """timm's test_vit (0.3 M parameters, 160 px) with a 5-class head, saved to a local file."""
    torch.manual_seed(7)
    model = timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("teacher") / "test_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def objective_with_teacher(teacher_file, *overrides):
    cfg = load_config("demo", ["model.teacher_name=test_vit", f"model.teacher_weights={teacher_file}", *overrides])
    torch.manual_seed(0)
    return PretrainingObjective(GritVLP(cfg.model), cfg.objectives).eval()


def text_batch(b=4):
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]] * b)
    image = torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return {"image": image, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_distillation_loss_and_gradient(teacher_file):
    objective = objective_with_teacher(
        teacher_file, "objectives.distill_temperature=2.0", "objectives.distill_weight=0.5"
    )
    model = objective.model
    assert model.config.num_concepts == NUM_CLASSES and model.concept_head.out_features == NUM_CLASSES
    batch = text_batch()
    out = objective(batch)

    reference = timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES)
    reference.load_state_dict(concepts.load_state_dict_file(teacher_file))
    with torch.no_grad():  # the teacher's input: CLIP-normalised 64 px -> its own normalisation (0.5, 0.5) at 160 px
        from gritvlp.data.transforms import CLIP_MEAN, CLIP_STD

        pixels = batch["image"] * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        x = F.interpolate((pixels - 0.5) / 0.5, size=(160, 160), mode="bilinear", antialias=True)
        teacher_probs = torch.softmax(reference.eval()(x) / 2.0, dim=1)
        student = model.concept_logits(model.encode_image(batch["image"])[0])
        expected = 4.0 * F.kl_div(torch.log_softmax(student / 2.0, 1), teacher_probs, reduction="batchmean")
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-4)
    out["loss"].backward()
    assert model.concept_head.weight.grad.abs().sum() > 0
    assert model.vision.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the student's image encoder learns
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not any(p is q for p in objective.parameters() for q in model.teacher.parameters())


def test_total_includes_the_weighted_distillation(teacher_file):
    objective = objective_with_teacher(teacher_file, "objectives.distill_weight=0.5")
    torch.manual_seed(1)  # the same MLM draw for both passes
    out = objective(text_batch())
    objective.config.distill_weight = 1.5
    torch.manual_seed(1)
    heavier = objective(text_batch())
    assert (heavier["loss"] - out["loss"]).item() == pytest.approx(out["distill"].item(), rel=1e-4)


def test_precomputed_targets_skip_the_teacher(teacher_file, monkeypatch):
    objective = objective_with_teacher(teacher_file, "objectives.distill_temperature=0.5")
    monkeypatch.setattr(objective.model.teacher, "forward", lambda images: pytest.fail("the teacher ran"))
    batch = {
        **text_batch(2),
        "concept_ids": torch.tensor([[3, 1, 0], [0, 0, 0]]),  # row 0: 0.6, 0.3, 0.1; row 1: no target
        "concept_probs": torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.0, 0.0]]),
    }
    out = objective(batch)
    model = objective.model
    with torch.no_grad():
        student = model.concept_logits(model.encode_image(batch["image"])[0])[0]
        tempered = torch.tensor([0.1, 0.3, 0.0, 0.6, 0.0]) ** 2  # p^(1/T), T = 0.5, renormalised
        target = tempered / tempered.sum()
        log_q = torch.log_softmax(student / 0.5, 0)
        expected = 0.25 * (target * (torch.log(target.clamp(min=1e-30)) - log_q)).sum()  # only row 0 counts
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_padding_entries_add_nothing_to_class_zero():
    dense, weights = precomputed_targets(torch.tensor([[0, 2, 0]]), torch.tensor([[0.5, 0.5, 0.0]]), 3, 1.0)
    assert dense.tolist() == [[0.5, 0.0, 0.5]] and weights.tolist() == [1.0]


def test_precomputed_targets_train_without_teacher_weights(monkeypatch):
    monkeypatch.setattr(concepts, "build_teacher_model", lambda *a, **k: pytest.fail("a teacher was built"))
    cfg = load_config("demo", ["model.teacher_name=test_vit", "model.num_concepts=7"])
    objective = PretrainingObjective(GritVLP(cfg.model), cfg.objectives)
    assert objective.model.teacher is None and objective.model.concept_head.out_features == 7
    with pytest.raises(ValueError, match="needs precomputed concept targets"):
        objective(text_batch(2))
    out = objective({**text_batch(2), "concept_ids": torch.tensor([[6], [2]]), "concept_probs": torch.ones(2, 1)})
    assert torch.isfinite(out["distill"]) and out["distill"] > 0


def test_no_teacher_means_no_head_and_no_call(monkeypatch):
    monkeypatch.setattr(concepts, "build_teacher_model", lambda *a, **k: pytest.fail("a teacher was built"))
    cfg = load_config("demo")
    torch.manual_seed(0)
    model = GritVLP(cfg.model)
    assert model.concept_head is None and model.teacher is None
    assert not any(key.startswith("concept") for key in model.state_dict())
    objective = PretrainingObjective(model, cfg.objectives)
    out = objective({**text_batch(2), "concept_ids": torch.tensor([[1], [2]]), "concept_probs": torch.ones(2, 1)})
    assert "distill" not in out


def test_export_keeps_the_head_and_never_the_teacher(teacher_file, tmp_path):
    model = objective_with_teacher(teacher_file).model
    state = model.state_dict()
    assert {"concept_head.weight", "concept_head.bias"} <= set(state)
    assert not any("teacher" in key for key in state)
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config_dict()))
    loaded = GritVLP.from_pretrained(folder)  # the head is rebuilt from the recorded class count, no teacher file
    assert loaded.teacher is None
    torch.testing.assert_close(loaded.concept_head.weight, state["concept_head.weight"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "override,key",
    [
        (["model.teacher_weights=/nonexistent.pth"], "model.teacher_weights"),
        (["model.num_concepts=3"], "model.num_concepts"),
        (["model.teacher_name=test_vit"], "model.teacher_weights"),
        (
            ["model.teacher_name=test_vit", "model.num_concepts=3", "objectives.distill_weight=0"],
            "objectives.distill_weight",
        ),
        (["objectives.distill_temperature=0"], "objectives.distill_temperature"),
        (["model.num_attributes=3"], "model.num_attributes"),  # attributes are part of distillation
        (["model.teacher_name=test_vit", "model.num_concepts=3", "model.num_attributes=-1"], "model.num_attributes"),
        (
            [
                "model.teacher_name=test_vit",
                "model.num_concepts=3",
                "model.num_attributes=2",
                "objectives.distill_attribute_weight=0",
            ],
            "objectives.distill_attribute_weight",
        ),
        (["objectives.distill_attribute_weight=-1"], "objectives.distill_attribute_weight"),
    ],
)
def test_bad_distillation_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo", override)


def test_collator_passes_concepts_through():
    tokenizer = load_tokenizer(None)
    sample = {"image": torch.zeros(3, 8, 8), "caption": "a red circle", "index": 0, "group_id": 0}
    batch = Collator(tokenizer, 25)([
        {**sample, "concepts": {"ids": [4, 1], "probs": [0.7, 0.2]}},
        {**sample, "index": 1},
        {**sample, "index": 2, "concepts": {"ids": [3], "probs": [0.9]}},
    ])  # fmt: skip
    assert batch["concept_ids"].tolist() == [[4, 1], [0, 0], [3, 0]]
    torch.testing.assert_close(batch["concept_probs"], torch.tensor([[0.7, 0.2], [0.0, 0.0], [0.9, 0.0]]))
    assert "concept_ids" not in Collator(tokenizer, 25)([sample])


# -- attribute concepts -------------------------------------------------------------------------------------------
def test_attribute_loss_against_a_hand_computed_value():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, 0.5]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    both = attribute_loss(logits, targets, torch.ones(2))
    first = attribute_loss(logits, targets, torch.tensor([1.0, 0.0]))  # row 1 has no labels
    # BCE with logits: log(1 + e^x) - x y
    row0 = (math.log1p(math.exp(2.0)) - 2.0 + math.log1p(math.exp(-1.0)) + math.log(2.0)) / 3
    row1 = (math.log1p(math.exp(0.5)) * 3 - 0.5) / 3
    assert first.item() == pytest.approx(row0, rel=1e-6)
    assert both.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    first.backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0  # an unlabelled row adds nothing


def test_attribute_loss_without_labels_is_zero_and_in_the_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = attribute_loss(logits, torch.ones(3, 4), torch.zeros(3))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()  # every rank runs the same backward, labels or not
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def attribute_batch(b=3, num_attributes=4):
    targets = torch.zeros(b, num_attributes)
    targets[0, [1, 3]] = 1.0
    targets[1, 2] = 0.4  # a soft label
    return {"attribute_targets": targets, "attribute_mask": torch.tensor([1.0, 1.0] + [0.0] * (b - 2))}


def test_attribute_distillation_joins_the_total(teacher_file):
    objective = objective_with_teacher(teacher_file, "model.num_attributes=4", "objectives.distill_attribute_weight=.3")
    model = objective.model
    assert model.attribute_head.out_features == 4
    assert {"attribute_head.weight", "attribute_head.bias"} <= set(model.state_dict())
    batch = {**text_batch(3), **attribute_batch()}
    out = objective(batch)
    with torch.no_grad():
        expected = attribute_loss(model.attribute_logits(model.encode_image(batch["image"])[0]),
                                  batch["attribute_targets"], batch["attribute_mask"])  # fmt: skip
    assert out["distill_attributes"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["distill"].item() == pytest.approx(out["distill_objects"].item() + 0.3 * expected.item(), rel=1e-5)
    assert not out["distill_objects"].requires_grad and not out["distill_attributes"].requires_grad  # logged only
    out["loss"].backward()
    assert model.attribute_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="attribute_targets"):
        objective(text_batch(3))  # a collator built without num_attributes


def test_without_attributes_the_distillation_term_is_the_objects_alone(teacher_file):
    objective = objective_with_teacher(teacher_file)
    assert objective.model.attribute_head is None
    out = objective({**text_batch(2), **attribute_batch(2)})  # attribute targets are ignored
    assert torch.equal(out["distill"].detach(), out["distill_objects"]) and "distill_attributes" not in out


def test_collator_builds_attribute_targets():
    tokenizer = load_tokenizer(None)
    sample = {"image": torch.zeros(3, 8, 8), "caption": "a red circle", "index": 0, "group_id": 0}
    samples = [
        {**sample, "concepts": {"ids": [4], "probs": [0.7], "attributes": [0, 2]}},
        {**sample, "index": 1},  # no concepts at all
        {**sample, "index": 2, "concepts": {"attributes": [1, 3], "attribute_probs": [0.25, 1.0]}},  # no objects
        {**sample, "index": 3, "concepts": {"attributes": []}},  # labelled: no attribute applies
        {**sample, "index": 4, "concepts": {"ids": [1], "probs": [1.0]}},  # objects only
    ]
    batch = Collator(tokenizer, 25, num_attributes=4)(samples)
    expected = [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0.25, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    torch.testing.assert_close(batch["attribute_targets"], torch.tensor(expected))
    assert batch["attribute_mask"].tolist() == [1, 0, 1, 1, 0]
    assert batch["concept_ids"].tolist() == [[4], [0], [0], [0], [1]]  # rows without objects get no object target
    none = Collator(tokenizer, 25, num_attributes=4)([sample, {**sample, "index": 1}])
    assert none["attribute_targets"].shape == (2, 4) and none["attribute_mask"].tolist() == [0, 0]
    assert "attribute_targets" not in Collator(tokenizer, 25)(samples)  # no attribute head: not collated
    with pytest.raises(ValueError, match=r"sample 7: attribute id 4 is outside \[0, 4\)"):
        Collator(tokenizer, 25, num_attributes=4)([{**sample, "index": 7, "concepts": {"attributes": [1, 4]}}])
    with pytest.raises(ValueError, match="sample 8: 2 attributes but 1 attribute_probs"):
        Collator(tokenizer, 25, num_attributes=4)(
            [{**sample, "index": 8, "concepts": {"attributes": [1, 2], "attribute_probs": [0.5]}}]
        )


def test_export_round_trips_the_attribute_head(tmp_path):
    cfg = load_config("demo", ["model.teacher_name=test_vit", "model.num_concepts=5", "model.num_attributes=6"])
    torch.manual_seed(0)
    model = GritVLP(cfg.model)
    state = model.state_dict()
    assert state["attribute_head.weight"].shape == (6, model.vision.width)
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config_dict()))
    loaded = GritVLP.from_pretrained(folder)  # strict: every tensor, the attribute head's included
    assert loaded.config.num_attributes == 6
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    data = model.config_dict()
    del data["model"]["num_attributes"]  # a config.json written before attributes existed
    assert GritVLP.from_config_dict(data).attribute_head is None


# -- scripts/precompute_concepts.py ---------------------------------------------------------------------------------

def load_script():
    return load_script_named("precompute_concepts")


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_precompute_writes_a_labelled_copy(teacher_file, tmp_path):
    train, _ = ensure_demo_shards(str(tmp_path / "demo"), 10, 1, samples_per_shard=4, progress=False)
    inputs = sorted((tmp_path / "demo").glob("train-*.tar"))
    before = {p: digest(p) for p in inputs}
    out = tmp_path / "labelled"
    script = load_script()
    stats = script.main([train, "--teacher", "test_vit", "--weights", str(teacher_file), "--topk", "3",
                         "--out", str(out), "--batch-size", "3", "--device", "cpu"])  # fmt: skip
    assert stats == {"shards": 3, "labelled": 10, "undecodable": 0}
    assert {p: digest(p) for p in inputs} == before  # inputs untouched

    teacher = concepts.build_teacher_model("test_vit", str(teacher_file))
    transform = concepts.teacher_transform(teacher)
    for source in inputs:
        original, written = members(source), members(out / source.name)
        assert [name for name, _ in written] == [name for name, _ in original]
        for (name, data), (_, new) in zip(original, written):
            if not name.endswith(".json"):
                assert new == data
                continue
            meta, labelled = json.loads(data), json.loads(new)
            found = labelled.pop("concepts")
            assert labelled == meta and found["teacher"] == "test_vit" and len(found["ids"]) == 3
            image = Image.open(__import__("io").BytesIO(dict(original)[name[:-5] + ".jpg"])).convert("RGB")
            with torch.no_grad():
                probs = torch.softmax(teacher(transform(image)[None]), 1)[0]
            top = probs.topk(3)
            assert found["ids"] == top.indices.tolist()
            assert found["probs"] == pytest.approx(top.values.tolist(), abs=1e-5)

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert (
        script.main([train, "--teacher", "test_vit", "--weights", str(teacher_file), "--out", str(out)])["shards"] == 0
    )
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps  # a rerun skips finished shards


def test_a_killed_precompute_leaves_no_partial_shard(teacher_file, tmp_path, monkeypatch):
    train, _ = ensure_demo_shards(str(tmp_path / "demo"), 8, 1, samples_per_shard=8, progress=False)
    out = tmp_path / "labelled"
    script = load_script()
    calls = {"n": 0}
    original_call = script.Labeller.__call__

    def dies_on_second_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original_call(self, images)

    monkeypatch.setattr(script.Labeller, "__call__", dies_on_second_batch)
    argv = [train, "--teacher", "test_vit", "--weights", str(teacher_file), "--out", str(out), "--batch-size", "4"]
    with pytest.raises(KeyboardInterrupt):
        script.main(argv)
    assert list(out.iterdir()) == []  # neither the shard nor its temporary file
    (out / ".train-000000.tar.tmp-99999").write_bytes(b"left by a SIGKILL")
    monkeypatch.setattr(script.Labeller, "__call__", original_call)
    assert script.main(argv)["labelled"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]


def test_teacher_tags_give_the_attributes_of_probable_classes(tmp_path):
    tags = load_script().TeacherTagAttributes
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"4": [2, 0], "1": [0, 5], "0": [7], "3": []}))
    attributes = tags(mapping, NUM_CLASSES, 0.1)
    assert attributes({"ids": [4, 1, 0, 2], "probs": [0.5, 0.3, 0.05, 0.15]}) == [0, 2, 5]  # class 0: too unlikely
    assert attributes({"ids": [3, 2], "probs": [0.9, 0.1]}) == []  # 0.1 is not above the threshold
    for bad, match in [({"5": [1]}, "'5' is not a class index"), ({"x": [1]}, "'x' is not a class index"),
                       ({"2": 1}, "class 2 must map to a list"), ({"2": [-1]}, "class 2 must map")]:  # fmt: skip
        mapping.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            tags(mapping, NUM_CLASSES, 0.1)


def test_precompute_attributes_from_teacher_tags(teacher_file, tmp_path):
    train, _ = ensure_demo_shards(str(tmp_path / "demo"), 6, 1, samples_per_shard=6, progress=False)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({str(c): [c, 10 + c % 2] for c in range(NUM_CLASSES)}))
    out = tmp_path / "labelled"
    stats = load_script().main([train, "--teacher", "test_vit", "--weights", str(teacher_file), "--topk", "3",
                                "--attributes-from", "teacher-tags", "--teacher-attributes", str(mapping),
                                "--attribute-threshold", "0.15", "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert stats["labelled"] == 6 and stats["undecodable"] == 0
    written = [json.loads(data)["concepts"] for name, data in members(out / "train-000000.tar") if ".json" in name]
    assert len(written) == 6
    for found in written:
        classes = [c for c, p in zip(found["ids"], found["probs"]) if p > 0.15]
        assert found["attributes"] == sorted({a for c in classes for a in (c, 10 + c % 2)})
    assert stats["with_attributes"] == sum(1 for c in written if c["attributes"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--attributes-from", "teacher-tags", "--teacher-attributes", "m.json"], "--teacher or --object-vocab"),
        ([], "--teacher or --object-vocab is required"),
        (["--object-vocab", "o.txt", "--attributes-from", "teacher-tags", "--teacher-attributes", "m.json"],
         "teacher-tags needs --teacher"),
        (["--teacher", "test_vit"], "--teacher and --weights go together"),
        (["--attributes-from", "caption", "--attribute-vocab", "v", "--weights", "w"], "--teacher and --weights"),
        (["--attributes-from", "caption"], "--attribute-vocab goes with"),
        (["--attribute-vocab", "v.txt", "--teacher", "t", "--weights", "w"], "--attribute-vocab goes with"),
        (["--teacher", "t", "--weights", "w", "--attributes-from", "teacher-tags"], "--teacher-attributes goes with"),
        (["--attributes-from", "caption", "--attribute-vocab", "v", "--attribute-threshold", "1"], "threshold"),
    ],
)
def test_precompute_rejects_incomplete_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_script().parse_args(["shards", "--out", "o", *argv])
    assert message in capsys.readouterr().err
