"""FLM: which stream states each reconstruction query sees, the span-length distribution, causal streams, the losses
against an explicit computation, training on a demo batch, config, export and the sync-free hot path."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gritvlp.config import ConfigError, load_config
from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import eval_transform
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.flm import (
    extra_span_lengths,
    flm_states,
    prepare_flm,
    reconstructor_visibility,
    span_bounds,
    stream_masks,
)
from gritvlp.objectives.pretraining import PretrainingObjective


def flm_objective(*overrides, train=False):
    cfg = load_config("demo", ["objectives.text_objective=flm", *overrides])
    torch.manual_seed(0)
    objective = PretrainingObjective(GritVLP(cfg.model), cfg.objectives)
    return objective.train(train)


def visible_sets(visible: torch.Tensor, length: int) -> list[tuple[list[int], list[int]]]:
    """Per query: (forward positions, backward positions) it may attend to."""
    return [(row[:length].nonzero().flatten().tolist(), row[length:].nonzero().flatten().tolist()) for row in visible]


def one_caption(length: int, padding: int):
    ids = torch.tensor([[101, *range(2000, 2000 + length - 2), 102] + [0] * padding])
    return ids, (ids != 0).long()


# -- which states each query sees -----------------------------------------------------------------------------------
def test_rate_zero_hides_only_the_target():
    """[CLS] a b c [SEP] + 2 padding: query t sees forward states < t and backward states > t; padding never."""
    ids, mask = one_caption(5, 2)
    inputs = prepare_flm(ids, mask, corruption_rate=0.0, generator=torch.Generator().manual_seed(0))
    assert inputs["flm_span_start"].tolist() == [[1, 1, 2, 3, 4, 1, 1]]
    assert inputs["flm_span_end"].tolist() == [[6, 1, 2, 3, 4, 6, 6]]
    visible = reconstructor_visibility(inputs["flm_span_start"], inputs["flm_span_end"], mask)[0]
    assert visible_sets(visible, 7) == [
        ([0], []),  # [CLS]: no target; it sees the forward [CLS] state only
        ([0], [2, 3, 4]),
        ([0, 1], [3, 4]),
        ([0, 1, 2], [4]),
        ([0, 1, 2, 3], []),  # [SEP]
        ([0], []),  # padding
        ([0], []),
    ]
    assert inputs["flm_positions"].tolist() == [1, 2, 3, 4] and inputs["flm_targets"].tolist() == [
        2000,
        2001,
        2002,
        102,
    ]
    assert inputs["flm_next_positions"].tolist() == [0, 1, 2, 3]
    assert inputs["flm_prev_positions"].tolist() == [2, 3, 4] and inputs["flm_prev_targets"].tolist() == [
        2000,
        2001,
        2002,
    ]


def test_positive_rate_hides_a_centred_clipped_span():
    """8 tokens, targets 1..7. Extra lengths m (even: no coin) give spans [t - m/2, t + m/2], clipped to [1, 7]."""
    extra = torch.tensor([[0, 4, 0, 0, 2, 0, 0, 2]])
    start, end = span_bounds(extra, torch.tensor([8]))
    assert start.tolist() == [[1, 1, 2, 3, 3, 5, 6, 6]]
    assert end.tolist() == [[7, 3, 2, 3, 5, 5, 6, 7]]
    visible = visible_sets(reconstructor_visibility(start, end, torch.ones(1, 8, dtype=torch.long))[0], 8)
    assert visible[1] == ([0], [4, 5, 6, 7])  # m = 4 at the left edge: [-1, 3] clipped to [1, 3]
    assert visible[2] == ([0, 1], [3, 4, 5, 6, 7])  # m = 0: the target alone
    assert visible[4] == ([0, 1, 2], [6, 7])  # m = 2: [3, 5]
    assert visible[7] == ([0, 1, 2, 3, 4, 5], [])  # m = 2 at the right edge: [6, 8] clipped to [6, 7]


def test_odd_spans_lean_either_way():
    g = torch.Generator().manual_seed(0)
    start, end = span_bounds(torch.full((400, 9), 1), torch.full((400,), 9), g)
    spans = set(zip(start[:, 4].tolist(), end[:, 4].tolist()))
    assert spans == {(3, 4), (4, 5)}
    assert 120 < (start[:, 4] == 3).sum() < 280


def test_drawn_spans_hold_their_target_and_stay_inside_the_caption():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2000, 3000, (64, 16), generator=g)
    lengths = torch.randint(3, 17, (64,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    inputs = prepare_flm(ids * mask, mask, corruption_rate=0.4, generator=g)
    start, end = inputs["flm_span_start"], inputs["flm_span_end"]
    t = torch.arange(16).expand(64, 16)
    target = (t >= 1) & (t < lengths[:, None])
    assert ((start <= t) & (t <= end) & (start >= 1) & (end <= lengths[:, None] - 1))[target].all()
    assert (end - start)[target].float().mean() > 1  # spans longer than the target alone at r = 0.4
    visible = reconstructor_visibility(start, end, mask)
    assert (
        not (visible[:, :, :16] & ~mask.bool()[:, None]).any()
        and not (visible[:, :, 16:] & ~mask.bool()[:, None]).any()
    )
    assert visible.any(dim=2).all()  # no query row is empty


def test_span_lengths_follow_the_binomial():
    """T = 20, r = 0.3: m ~ Binomial(19, p), p = (20 * 0.3 - 1) / 19."""
    draws = extra_span_lengths(torch.tensor([[20]]), 0.3, (500, 200), torch.Generator().manual_seed(0)).flatten()
    n, p = 19, 5 / 19
    assert draws.double().mean().item() == pytest.approx(n * p, abs=4 * math.sqrt(n * p * (1 - p) / draws.numel()))
    assert draws.double().var().item() == pytest.approx(n * p * (1 - p), rel=0.03)
    observed = torch.bincount(draws, minlength=n + 1).double()
    expected = torch.tensor([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]) * draws.numel()
    keep = expected >= 5
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.72 * math.sqrt(2 / (9 * dof))) ** 3  # chi-square at 1e-4 (Wilson-Hilferty)
    assert statistic < critical, (statistic, critical)
    assert observed[~keep].sum() < 20  # the far tail stays where the Binomial puts (almost) nothing


def test_no_extra_span_when_the_rate_is_below_one_token():
    draws = extra_span_lengths(torch.tensor([[10], [1]]), 0.09, (2, 1000), torch.Generator().manual_seed(0))
    assert draws.sum() == 0  # T r < 1: p = 0; and a single target never spans more than itself


# -- the streams ----------------------------------------------------------------------------------------------------
def test_unidirectional_streams_are_causal():
    model = flm_objective().model
    ids, mask = one_caption(8, 2)
    changed = ids.clone()
    changed[0, 4] = 2500
    image = model.encode_image(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[0]
    masks = stream_masks(1, 10, ids.device)
    with torch.no_grad():
        before, after = (
            model.layer_states(torch.cat([x, x]), torch.cat([mask, mask]), torch.cat([image, image]), masks)
            for x in (ids, changed)
        )
    for layer_before, layer_after in zip(before, after):
        torch.testing.assert_close(layer_after[0, :4], layer_before[0, :4], rtol=0, atol=0)  # forward: <= i
        torch.testing.assert_close(layer_after[1, 5:8], layer_before[1, 5:8], rtol=0, atol=0)  # backward: >= i
        assert (layer_after[0, 4:8] - layer_before[0, 4:8]).abs().amax(-1).min() > 1e-4
        assert (layer_after[1, :5] - layer_before[1, :5]).abs().amax(-1).min() > 1e-4
    with torch.no_grad():  # the public encoder call takes the same mask
        causal = model.encode_text(ids, mask, attn_mask=masks[0])[0]
        causal_changed = model.encode_text(changed, mask, attn_mask=masks[0])[0]
        full, full_changed = model.encode_text(ids, mask)[0], model.encode_text(changed, mask)[0]
    torch.testing.assert_close(causal_changed[0, :4], causal[0, :4], rtol=0, atol=0)
    assert (full_changed[0, :4] - full[0, :4]).abs().max() > 1e-4


def test_a_query_never_sees_its_span():
    """Changing any token inside query t's span leaves its reconstruction as it was; changing one outside does not."""
    objective = flm_objective()
    model = objective.model
    ids, mask = one_caption(9, 1)
    extra = torch.tensor([[0, 0, 0, 0, 2, 0, 0, 0, 0, 0]])
    start, end = span_bounds(extra, mask.sum(1))  # query 4: span [3, 5]
    image = model.encode_image(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[0]

    def query_state(tokens):
        batch = {"input_ids": tokens, "attention_mask": mask, "flm_span_start": start, "flm_span_end": end}
        with torch.no_grad():
            return flm_states(model, batch, image)[0][0, 4]

    reference = query_state(ids)
    for position in (3, 4, 5):
        changed = ids.clone()
        changed[0, position] = 2900
        torch.testing.assert_close(query_state(changed), reference, rtol=0, atol=0)
    for position in (2, 6):
        changed = ids.clone()
        changed[0, position] = 2900
        assert (query_state(changed) - reference).abs().max() > 1e-4


# -- the losses -----------------------------------------------------------------------------------------------------
def demo_batch(tmp_path, size=16):
    train, _ = ensure_demo_shards(str(tmp_path / "demo"), size, 4, progress=False)
    dataset = ShardDataset(train, eval_transform(64), max_words=30)
    return Collator(load_tokenizer(None), 25)([dataset[i] for i in range(size)])


def test_losses_match_an_explicit_computation(tmp_path):
    objective = flm_objective("objectives.flm_corruption_rate=0.3")
    model = objective.model
    batch = objective.prepare_batch(demo_batch(tmp_path, 6), torch.Generator().manual_seed(0))
    out = objective(batch)
    ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        queries, forward, backward = flm_states(model, batch, model.encode_image(batch["image"])[0])

        def cross_entropy(rows, targets):  # full vocabulary logits, no fused kernel
            head = model.mlm_head
            logits = F.linear(head(torch.stack(rows)), head.decoder_weight, head.bias)
            return F.cross_entropy(logits, torch.stack(targets)).item()

        every = [(b, t) for b, n in enumerate(lengths) for t in range(1, n)]
        reconstruction = cross_entropy([queries[b, t] for b, t in every], [ids[b, t] for b, t in every])
        following = cross_entropy([forward[b, t - 1] for b, t in every], [ids[b, t] for b, t in every])
        before = [(b, t) for b, t in every if t + 1 < lengths[b]]
        preceding = cross_entropy([backward[b, t + 1] for b, t in before], [ids[b, t] for b, t in before])
    assert out["flm_reconstruction"].item() == pytest.approx(reconstruction, rel=1e-5)
    assert out["flm_next"].item() == pytest.approx(following, rel=1e-5)
    assert out["flm_previous"].item() == pytest.approx(preceding, rel=1e-5)
    assert out["flm"].item() == pytest.approx((reconstruction + following + preceding) / 3, rel=1e-5)
    assert "mlm" not in out and out["loss"].requires_grad


def test_flm_trains_on_a_demo_batch(tmp_path):
    objective = flm_objective("objectives.flm_corruption_rate=0.2", train=True)
    batch = objective.prepare_batch(demo_batch(tmp_path, 8), torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=5e-4)
    history = []
    for _ in range(5):
        out = objective(batch)
        assert torch.isfinite(out["loss"])
        history.append({k: out[k].item() for k in ("flm", "flm_reconstruction", "flm_next", "flm_previous")})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert objective.model.reconstructor.layer[0].crossattention.self.query.weight.grad.abs().sum() > 0
    for key in history[0]:
        assert history[-1][key] < history[0][key] - 0.05, (key, history)


# -- configuration and export ---------------------------------------------------------------------------------------
def test_the_reconstructor_exists_only_with_flm():
    assert load_config("demo").model.reconstructor_layers == 0
    assert GritVLP(load_config("demo").model).reconstructor is None
    assert load_config("demo", ["objectives.text_objective=flm"]).model.reconstructor_layers == 1
    with pytest.raises(ConfigError, match="'model.reconstructor_layers' must be 0"):
        load_config("demo", ["model.reconstructor_layers=2"])
    with pytest.raises(ConfigError, match="'model.reconstructor_layers' must be >= 1"):
        load_config("demo", ["objectives.text_objective=flm", "model.reconstructor_layers=0"])
    with pytest.raises(ConfigError, match="'objectives.text_objective' must be one of mlm, flm"):
        load_config("demo", ["objectives.text_objective=clm"])
    with pytest.raises(ConfigError, match="'objectives.flm_corruption_rate' must lie in"):
        load_config("demo", ["objectives.text_objective=flm", "objectives.flm_corruption_rate=1.0"])
    with pytest.raises(ValueError, match="1 to 4 layers"):
        GritVLP(load_config("demo", ["objectives.text_objective=flm", "model.reconstructor_layers=5"]).model)


def test_reconstructor_layers_read_the_top_encoder_layers():
    model = GritVLP(load_config("demo", ["objectives.text_objective=flm", "model.reconstructor_layers=3"]).model)
    assert list(model.reconstructor.encoder_layers(4)) == [1, 2, 3]


def test_flm_preset():
    """FLM's recipe where the trainer can express it (the YAML documents the rest)."""
    cfg = load_config("flm")
    assert cfg.objectives.text_objective == "flm" and cfg.objectives.itm_weight == 0 and cfg.objectives.itc_weight > 0
    assert cfg.model.reconstructor_layers == cfg.model.text_config.get("num_hidden_layers", 12)
    assert cfg.objectives.flm_corruption_rate == 0 and cfg.data.max_tokens == 50
    assert cfg.train.lr_multipliers == {"heads": 5.0, "fusion": 5.0, "reconstructor": 5.0}
    assert (cfg.train.lr, cfg.train.lr_schedule, cfg.train.min_lr_ratio) == (8e-5, "linear", 0.0)
    ds = json.loads((Path(__file__).parents[1] / "ds_configs" / "flm_zero2_b128.json").read_text())
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert "gradient_clipping" not in ds


def test_flm_outside_its_preset_builds_a_one_layer_reconstructor():
    """A documented deviation from FLM's 12 layers (gritvlp.config.FLM_DEFAULT_RECONSTRUCTOR_LAYERS)."""
    assert load_config("demo", ["objectives.text_objective=flm"]).model.reconstructor_layers == 1


def test_the_reconstructor_is_exported_and_loaded(tmp_path):
    model = flm_objective("model.reconstructor_layers=2").model
    state = model.state_dict()
    assert "reconstructor.layer.1.crossattention.self.query.weight" in state
    assert not any(".attention." in key for key in state if key.startswith("reconstructor."))  # no self-attention
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(__import__("json").dumps(model.config_dict()))
    loaded = GritVLP.from_pretrained(folder)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_flm_micro_step_makes_no_host_sync(monkeypatch):
    from test_sync_free import ObjectiveAsEngine, recording_host_syncs, training_batch

    from gritvlp.sampling.bank import FeatureBank
    from gritvlp.train.step import NonFiniteGuard, bank_features, forward_backward

    monkeypatch.setenv("GRITVLP_KERNELS", "reference")
    objective = flm_objective("objectives.flm_corruption_rate=0.2", train=True)
    batch = training_batch(objective)
    assert "flm_span_start" in batch and "mlm_positions" not in batch
    guard, bank = NonFiniteGuard(torch.device("cpu")), FeatureBank(64)
    with recording_host_syncs() as syncs:
        out, finite = forward_backward(ObjectiveAsEngine(objective), batch, True, guard)
        bank.add(*bank_features(out, finite), batch["index"])
    assert not syncs, "\n".join(syncs)
    assert torch.isfinite(out["loss"]) and objective.model.reconstructor.layer[0].output.dense.weight.grad is not None


def test_mlm_objective_is_unchanged_by_the_flm_keys():
    cfg = load_config("demo")
    objective = PretrainingObjective(GritVLP(cfg.model), dataclasses.replace(cfg.objectives, flm_corruption_rate=0.5))
    ids, mask = one_caption(6, 0)
    batch = objective.prepare_batch({"input_ids": ids, "attention_mask": mask}, torch.Generator().manual_seed(0))
    assert "mlm_positions" in batch and not any(key.startswith("flm_") for key in batch)
