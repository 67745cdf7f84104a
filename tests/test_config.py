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
