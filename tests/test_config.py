import pytest

from gritvlp.config import ConfigError, config_from_dict, load_config, parse_override


def test_presets_load():
    demo = load_config("demo")
    paper = load_config("vitb16_bert")
    assert demo.model.image_size == 64 and demo.objectives.mask_prob == 0.5
    assert paper.model.vision_name == "vit_base_patch16_224" and paper.model.image_size == 256
    assert paper.model.num_text_layers == 6 and paper.model.embed_dim == 256


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'objectives.mask_rate'"):
        config_from_dict({"objectives": {"mask_rate": 0.5}})
    with pytest.raises(ConfigError, match="unknown config key 'optim'"):
        config_from_dict({"optim": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="'train.epochs' must be of type int"):
        config_from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="'data.hflip' must be true or false"):
        config_from_dict({"data": {"hflip": "yes"}})
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        config_from_dict({"model": 3})


def test_int_is_accepted_for_float_and_none_for_optional():
    cfg = config_from_dict({"objectives": {"mlm_weight": 1}, "model": {"vision_weights": None}})
    assert isinstance(cfg.objectives.mlm_weight, float) and cfg.model.vision_weights is None


def test_overrides():
    assert parse_override("model.image_size=96") == {"model": {"image_size": 96}}
    cfg = load_config("demo", ["train.epochs=3", "data.crop_scale=[0.5, 1.0]", "model.vision_kwargs={depth: 1}"])
    assert cfg.train.epochs == 3 and cfg.data.crop_scale == [0.5, 1.0]
    assert cfg.model.vision_kwargs == {"depth": 1}  # replaced, not merged
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config("demo", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("train.epochs")


def test_missing_preset():
    with pytest.raises(FileNotFoundError, match="no preset named 'nope'"):
        load_config("nope")


@pytest.mark.parametrize(
    "override,key",
    [
        ("objectives.itm_negatives=bogus", "objectives.itm_negatives"),
        ("objectives.mask_prob=0", "objectives.mask_prob"),
        ("objectives.mask_prob=1.0", "objectives.mask_prob"),
        ("objectives.consistency_weight=-0.1", "objectives.consistency_weight"),
        ("model.image_size=0", "model.image_size"),
        ("model.temp_min=0.6", "model.temp_min"),
        ("model.temp_init=0.9", "model.temp_init"),
        ("model.text_weights=/no/such/bert", "model.text_weights"),
        ("model.tokenizer=/no/such/vocab", "model.tokenizer"),
        ("sampling.search_space=0", "sampling.search_space"),
        ("data.crop_scale=[0.9, 0.2]", "data.crop_scale"),
        ("data.max_tokens=2", "data.max_tokens"),
        ("data.randaug_m=30", "data.randaug_m"),
        ("train.epochs=0", "train.epochs"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("train.lr=-1", "train.lr"),
    ],
)
def test_values_are_validated_when_the_config_loads(override, key):
    """A bad value fails at load time naming its key, not at the first step with a traceback from deep inside."""
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config("demo", [override])


def test_existing_paths_pass(tmp_path):
    (tmp_path / "vit.pth").write_bytes(b"")
    cfg = load_config("demo", [f"model.vision_weights={tmp_path / 'vit.pth'}", f"model.tokenizer={tmp_path}"])
    assert cfg.model.vision_weights == str(tmp_path / "vit.pth")


def test_paper_preset_uses_the_reference_schedule():
    from gritvlp.train.engine import cosine_with_warmup

    train = load_config("vitb16_bert").train
    factor = cosine_with_warmup(100_000, train.warmup_steps, train.warmup_start_ratio, train.min_lr_ratio)
    lr = 1e-4  # ds_configs/zero2_b128.json
    assert lr * factor(0) == pytest.approx(1e-5, rel=0.01)  # warm-up starts at 1e-5 ...
    assert lr * factor(train.warmup_steps) == pytest.approx(1e-4, rel=1e-3)  # ... reaches 1e-4 ...
    assert lr * factor(100_000) == pytest.approx(1e-5)  # ... and the cosine ends at 1e-5


def test_paper_deepspeed_config_has_grit_vlps_batch():
    from pathlib import Path

    from gritvlp.train.engine import load_ds_config

    ds = load_ds_config(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_b128.json", use_cuda=True)
    assert ds["train_micro_batch_size_per_gpu"] == 128 and ds["optimizer"]["params"]["weight_decay"] == 0.02
    assert ds["bf16"]["enabled"]


def test_base_size_model_without_weights_warns_loudly():
    from gritvlp.train.trainer import random_weights_warning

    paper = load_config("vitb16_bert").model
    assert "RANDOM WEIGHTS" in random_weights_warning(paper, vision_width=768)
    assert random_weights_warning(load_config("demo").model, vision_width=96) is None
