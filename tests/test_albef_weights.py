"""Weights in and out of ALBEF's layout, against the names and shapes ALBEF's own code builds (salesforce/ALBEF
b9727e43, models/model_pretrain.py and model_retrieval.py at 256 px), listed in tests/data/albef."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gritvlp import albef
from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP

KEYS_DIR = Path(__file__).parent / "data" / "albef"
_spec = importlib.util.spec_from_file_location(
    "convert_albef", Path(__file__).parents[1] / "scripts" / "convert_albef.py"
)
convert_albef = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_albef)

# The ALBEF -> GritVLP correspondence, written out independently of gritvlp.albef.
EXPECTED_RENAMES = (
    ("visual_encoder.", "vision.vit."),
    ("text_encoder.bert.", "text."),
    ("text_encoder.cls.predictions.transform.", "mlm_head.transform."),
    ("text_encoder.cls.predictions.bias", "mlm_head.bias"),
)


def albef_keys(layout="pretrain") -> dict[str, list[int]]:
    return json.loads((KEYS_DIR / f"albef_{layout}_keys.json").read_text())


def expected_our_name(name: str) -> str | None:
    """The GritVLP tensor an online ALBEF pre-training tensor must land in (None: no counterpart)."""
    if name.endswith("position_ids"):
        return None
    for prefix, ours in EXPECTED_RENAMES:
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name if name in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "itm_head.weight", "itm_head.bias", "temp") else None  # fmt: skip


def is_momentum_or_queue(name: str) -> bool:
    return "_m." in name or name in ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def random_albef_state(keys: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random online tensors; momentum copies a constant (distinct from every online value)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1])[None]
        elif name in ("queue_ptr", "idx_queue"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        elif is_momentum_or_queue(name):
            state[name] = torch.tensor(7.0).expand(shape)  # no memory: a constant no online tensor holds
        else:
            state[name] = torch.randn(shape, generator=g)
    state["temp"] = torch.tensor(0.0625)  # ALBEF clamps its temperature into [0.001, 0.5] in place
    prefix = "text_encoder.cls.predictions."
    if prefix + "decoder.weight" in state:  # tied in ALBEF
        state[prefix + "decoder.weight"] = state["text_encoder.bert.embeddings.word_embeddings.weight"]
        state[prefix + "decoder.bias"] = state[prefix + "bias"]
    return state


@pytest.fixture(scope="module")
def model():
    """The paper-scale model (ViT-B/16 at 256 px + BERT-base, 6 + 6 layers), built once, its weights drawn
    at random (faster than the modules' own initialisation)."""
    with torch.device("meta"):
        model = GritVLP(load_config("vitb16_bert").model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=g))
        model.temp.fill_(0.125)  # within the bounds: exports write the value used, clamped
    return model


@pytest.fixture(scope="module")
def albef_state():
    return random_albef_state(albef_keys())


def test_import_puts_every_albef_tensor_where_it_belongs(model, albef_state, caplog):
    with caplog.at_level(logging.INFO, logger="gritvlp.albef"):
        ours = albef.albef_to_gritvlp(albef_state, model)
    landed = set()
    for name, value in albef_state.items():
        target = expected_our_name(name)
        if target is None:
            continue
        assert torch.equal(ours[target], value.reshape(ours[target].shape)), name
        landed.add(target)
    assert landed == set(model.state_dict())  # every model tensor got its ALBEF value
    assert ours["temp"].shape == (1,) and ours["temp"].item() == albef_state["temp"].item()
    # 419 momentum copies, 3 queue buffers and the online position_ids buffer are reported, not loaded
    assert "ignored 423 momentum/queue/buffer entries" in caplog.text


def test_import_loads_the_values_into_the_model(model, albef_state):
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    albef.load_albef_weights(model, albef_state)
    params = model.state_dict()
    assert torch.equal(params["vision.vit.blocks.11.attn.qkv.weight"], albef_state["visual_encoder.blocks.11.attn.qkv.weight"])  # fmt: skip
    key = "text.encoder.layer.9.crossattention.self.key.weight"
    assert torch.equal(params[key], albef_state["text_encoder.bert.encoder.layer.9.crossattention.self.key.weight"])
    assert torch.equal(model.mlm_head.decoder_weight, albef_state["text_encoder.cls.predictions.decoder.weight"])
    assert torch.equal(params["mlm_head.bias"], albef_state["text_encoder.cls.predictions.bias"])


def test_grit_vlp_checkpoints_without_momentum_or_queues_import(model, albef_state):
    grit_layout = {k: v for k, v in albef_state.items() if not is_momentum_or_queue(k)}
    ours = albef.albef_to_gritvlp(grit_layout, model)
    assert torch.equal(ours["itm_head.weight"], albef_state["itm_head.weight"])


def test_a_model_tensor_without_a_value_is_an_error_naming_it(model, albef_state):
    lacking = {k: v for k, v in albef_state.items() if k != "text_encoder.bert.encoder.layer.4.output.dense.bias"}
    with pytest.raises(ValueError, match=r"text\.encoder\.layer\.4\.output\.dense\.bias"):
        albef.albef_to_gritvlp(lacking, model)


def test_tensors_that_fit_nothing_or_mismatch_in_shape_are_errors(model, albef_state):
    extra = dict(albef_state)
    extra["text_encoder.bert.encoder.layer.2.crossattention.self.query.weight"] = torch.zeros(768, 768)
    with pytest.raises(ValueError, match=r"fit no model tensor: text\.encoder\.layer\.2\.crossattention"):
        albef.albef_to_gritvlp(extra, model)
    wrong = {**albef_state, "itm_head.weight": torch.zeros(3, 768)}
    with pytest.raises(ValueError, match=r"itm_head\.weight \(3, 768\)"):
        albef.albef_to_gritvlp(wrong, model)


def test_an_untied_decoder_is_refused(model, albef_state):
    untied = {**albef_state, "text_encoder.cls.predictions.decoder.weight": torch.zeros(30522, 768)}
    with pytest.raises(ValueError, match="decoder.weight differs"):
        albef.albef_to_gritvlp(untied, model)


def test_position_embeddings_of_another_resolution_are_resampled_as_albef_does(model, albef_state):
    at_384 = torch.randn(1, 1 + 24 * 24, 768)
    ours = albef.albef_to_gritvlp({**albef_state, "visual_encoder.pos_embed": at_384}, model)
    grid = at_384[:, 1:].reshape(1, 24, 24, 768).permute(0, 3, 1, 2)  # ALBEF's interpolate_pos_embed
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    expected = torch.cat([at_384[:, :1], grid.reshape(1, 256, 768)], dim=1)
    torch.testing.assert_close(ours["vision.vit.pos_embed"], expected, rtol=1e-5, atol=1e-5)


def test_export_matches_albef_pretraining_layout(model):
    exported = albef.gritvlp_to_albef(model)
    keys = albef_keys()
    assert set(exported) == set(keys)
    wrong = {k: (list(exported[k].shape), shape) for k, shape in keys.items() if list(exported[k].shape) != shape}
    assert not wrong
    params = model.state_dict()
    words = params["text.embeddings.word_embeddings.weight"]
    assert exported["temp"].dim() == 0 and exported["temp"].item() == params["temp"].item()
    assert torch.equal(exported["text_encoder.cls.predictions.decoder.weight"], words)
    assert torch.equal(exported["text_encoder.cls.predictions.decoder.bias"], params["mlm_head.bias"])
    assert torch.equal(exported["text_encoder.cls.predictions.bias"], params["mlm_head.bias"])
    assert torch.equal(exported["text_encoder.bert.embeddings.position_ids"], torch.arange(512)[None])
    assert exported["queue_ptr"].dtype == torch.long and exported["queue_ptr"].item() == 0
    for name in keys:
        if "_m." in name:  # momentum copies start as the online weights (ALBEF's copy_params)
            assert torch.equal(exported[name], exported[name.replace("_m.", ".", 1)]), name
    for queue in ("image_queue", "text_queue"):
        torch.testing.assert_close(exported[queue].norm(dim=0), torch.ones(65536))
    assert not torch.equal(exported["image_queue"], exported["text_queue"])


def test_export_matches_albef_retrieval_layout(model):
    exported = albef.gritvlp_to_albef(model, layout="retrieval")
    keys = albef_keys("retrieval")
    assert {k: list(v.shape) for k, v in exported.items()} == keys
    assert torch.equal(exported["idx_queue"], torch.full((1, 65536), -100))
    assert torch.equal(exported["text_encoder_m.encoder.layer.8.output.dense.weight"], model.state_dict()["text.encoder.layer.8.output.dense.weight"])  # fmt: skip


def retrieval_layout(pretrain_state: dict) -> dict:
    """ALBEF's retrieval model's names for the same tensors: BertModel without 'bert.' and without the MLM head."""
    out = {
        k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m."): v
        for k, v in pretrain_state.items()
        if ".cls." not in k
    }
    out["idx_queue"] = torch.full((1, 65536), -100)
    return out


def test_retrieval_checkpoints_import_only_when_the_mlm_head_may_stay(model, albef_state):
    retrieval = retrieval_layout(albef_state)
    assert {k: list(v.shape) for k, v in retrieval.items()} == albef_keys("retrieval")
    with pytest.raises(ValueError, match=r"mlm_head\.bias"):
        albef.albef_to_gritvlp(retrieval, model)
    ours = albef.albef_to_gritvlp(retrieval, model, allow_missing=("mlm_head.",))
    assert torch.equal(ours["text.encoder.layer.0.attention.self.query.weight"], retrieval["text_encoder.encoder.layer.0.attention.self.query.weight"])  # fmt: skip


def test_round_trips_are_exact(model, albef_state):
    params = model.state_dict()
    back = albef.albef_to_gritvlp(albef.gritvlp_to_albef(model), model)
    assert set(back) == set(params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    albef.load_albef_weights(model, albef_state)
    again = albef.gritvlp_to_albef(model)
    online = [k for k in albef_state if not is_momentum_or_queue(k)]
    assert all(torch.equal(again[k], albef_state[k]) for k in online)


def test_cli_converts_both_ways_through_files(tmp_path):
    """demo-sized model: export folder -> ALBEF .pth -> export folder gives the same (fp16) weights."""
    torch.manual_seed(1)
    tiny = GritVLP(load_config("demo").model)
    albef.write_export_folder(tiny, tmp_path / "export")
    convert_albef.main(["to-albef", str(tmp_path / "export"), str(tmp_path / "albef.pth"), "--queue-size", "128"])
    state = albef.load_albef_file(tmp_path / "albef.pth")
    assert "visual_encoder_m.pos_embed" in state and state["temp"].dim() == 0
    assert state["image_queue"].shape == (64, 128)
    convert_albef.main(["to-gritvlp", str(tmp_path / "albef.pth"), str(tmp_path / "back"), "--config", "demo"])
    back = GritVLP.from_pretrained(tmp_path / "back").state_dict()
    for name, value in tiny.state_dict().items():
        assert torch.equal(back[name], value.half().float()), name
