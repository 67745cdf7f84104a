"""Few-shot probes: shot draws, projected gradient descent's constraint, the zero-shot prior, logistic regression,
and the probing script end to end on demo shards."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gritvlp.albef import write_export_folder
from gritvlp.config import load_config
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.eval import probing
from gritvlp.model.gritvlp import GritVLP

_spec = importlib.util.spec_from_file_location("probe_fewshot", Path(__file__).parents[1] / "scripts" / "probe_fewshot.py")  # fmt: skip
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def clusters(num_classes=4, per_class=30, dim=8, noise=0.3, seed=0):
    """Normalised features around one random direction per class."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=-1)
    return feats, labels, centres


def test_shot_draws_are_k_per_class_disjoint_and_seeded():
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    train, val = probing.few_shot_split(labels, 2, seed=0)
    assert sorted(labels[train].tolist()) == [0, 0, 1, 1, 2, 2] and sorted(labels[val].tolist()) == [0, 0, 1, 1, 2, 2]
    assert not set(train.tolist()) & set(val.tolist())
    again, _ = probing.few_shot_split(labels, 2, seed=0)
    assert torch.equal(train, again)
    assert any(not torch.equal(train, probing.few_shot_split(labels, 2, seed=s)[0]) for s in range(1, 5))
    with pytest.raises(ValueError, match="class 0 has 5 samples, fewer than 2 x 3"):
        probing.few_shot_split(labels, 3, seed=0)


def test_radius_zero_is_the_zero_shot_head_and_the_ball_holds():
    feats, labels, centres = clusters()
    weight0 = 10 * centres.roll(1, dims=0)  # a wrong zero-shot head: every class named after its neighbour
    zero = probing.projected_gradient_descent(feats, labels, weight0, radius=0.0)
    assert torch.equal(zero.weight, weight0) and zero.bias.abs().max() == 0
    for radius in (0.5, 3.0):
        probe = probing.projected_gradient_descent(feats, labels, weight0, radius=radius, steps=200)
        assert float((probe.weight - weight0).norm()) <= radius * (1 + 1e-5)
    free = probing.projected_gradient_descent(feats, labels, weight0, radius=1e6, steps=500)
    assert free.accuracy(feats, labels) > 85 > 40 > zero.accuracy(feats, labels)


def test_validation_keeps_a_right_zero_shot_head_and_corrects_a_wrong_one():
    feats, labels, centres = clusters(per_class=40)
    train_idx, val_idx = probing.few_shot_split(labels, 4, seed=0)
    test = torch.ones(len(labels), dtype=torch.bool)
    test[train_idx], test[val_idx] = False, False
    fit = (feats[train_idx], labels[train_idx], feats[val_idx], labels[val_idx])
    right = probing.zero_shot_init_probe(*fit, centres, logit_scale=10.0, steps=100)
    assert right.chosen == 0.0  # validation cannot beat the zero-shot head: the tie goes to the prior
    wrong = probing.zero_shot_init_probe(*fit, centres.roll(1, dims=0), logit_scale=10.0, steps=300)
    zero_shot = probing.LinearClassifier(10.0 * centres.roll(1, dims=0), torch.zeros(4), 0.0)
    assert wrong.chosen > 0
    assert wrong.accuracy(feats[test], labels[test]) > zero_shot.accuracy(feats[test], labels[test]) + 50


def test_logistic_regression_learns_clusters_and_maps_binary_and_absent_classes():
    feats, labels, _ = clusters(num_classes=3, noise=0.2)
    train_idx, val_idx = probing.few_shot_split(labels, 5, seed=1)
    probe = probing.logistic_regression_probe(feats[train_idx], labels[train_idx], feats[val_idx], labels[val_idx], 3)
    assert probe.accuracy(feats, labels) > 90 and probe.chosen in probing.LOGREG_COSTS
    binary = labels < 2  # only classes 0 and 1 among 3: scikit-learn fits one row, class 2 must never win
    x, y = feats[binary], labels[binary]
    train_idx, val_idx = probing.few_shot_split(y, 5, seed=0)
    probe = probing.logistic_regression_probe(x[train_idx], y[train_idx], x[val_idx], y[val_idx], 3)
    assert probe.accuracy(x, y) > 90 and (probe.logits(feats).argmax(1) != 2).all()


def test_script_on_demo_shards_writes_json_and_plot(tmp_path):
    demo = tmp_path / "demo"
    ensure_demo_shards(str(demo), 256, 96, image_size=64, progress=False)
    torch.manual_seed(0)
    export = write_export_folder(GritVLP(load_config("demo").model), tmp_path / "export")
    out, png = tmp_path / "probe.json", tmp_path / "probe.png"
    result = cli.main(["--model", str(export), "--demo-shards", str(demo), "--shots", "1", "2", "--seeds", "2",
                       "--steps", "20", "--out", str(out), "--plot", str(png)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and png.stat().st_size > 0
    assert set(result["tasks"]) == {"shape", "colour", "size"}
    colour = result["tasks"]["colour"]
    assert colour["num_classes"] == 7 and 0 <= colour["zero_shot"] <= 100
    for k in ("1", "2"):
        assert len(colour["shots"][k]["diht"]) == 2 and len(colour["shots"][k]["logreg"]) == 2
        assert all(r in probing.RADII for r in colour["shots"][k]["diht_radius"])
