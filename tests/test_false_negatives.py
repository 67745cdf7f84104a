"""False negatives in GRIT's batches: identical-caption positives, the logged shares, MAFA's connection mining and
smoothed ITC, each against an independent computation on the tiny model."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_model import B, fixed_batch

from gritvlp.config import ConfigError, load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.false_negatives import duplicate_pairs, false_negative_stats
from gritvlp.objectives.mining import ConnectionMiner, load_filter_model, top2_negatives
from gritvlp.objectives.mlm import IGNORE_INDEX, mask_tokens
from gritvlp.objectives.pretraining import PretrainingObjective

CAPTIONS = torch.tensor([7, 3, 7, 4, 5, 3])  # samples 0 and 2, and 1 and 5, share a caption
GROUPS = torch.arange(B)


def batch_with_captions():
    return {**fixed_batch(), "caption_id": CAPTIONS.clone(), "group_id": GROUPS.clone()}


def tiny_objective(miner=None, **overrides):
    cfg = load_config("demo")
    grit = {"itm_negatives": "hardest", "text_start_step": 0, "text_ramp_steps": 0}
    objectives = dataclasses.replace(cfg.objectives, **{**grit, **overrides})
    torch.manual_seed(0)
    return PretrainingObjective(GritVLP(cfg.model), objectives, miner=miner).eval()


def features(objective, batch):
    with torch.no_grad():
        image_embeds, img = objective.model.encode_image(batch["image"])
        text_hidden, txt = objective.model.encode_text(batch["input_ids"], batch["attention_mask"])
    return image_embeds, text_hidden, img, txt, objective.model.temperature().detach()


def contrastive(s: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Each positive against the row's negatives only (InfoNCE with one positive), averaged; loops over rows."""
    rows = []
    for i in range(s.shape[0]):
        neg = s[i][~positives[i]]
        rows.append(sum(-(s[i, p] - torch.logsumexp(torch.cat([s[i, p : p + 1], neg]), 0)) for p in
                        positives[i].nonzero().flatten()) / positives[i].sum())  # fmt: skip
    return torch.stack(rows).mean()


def test_duplicate_pairs_and_shares():
    dup = duplicate_pairs(torch.tensor([0, 0, 1, 2]), torch.tensor([5, 6, 7, 7]))
    expected = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(dup, expected)
    # images' texts: 1 (a duplicate), 3, -1 (none), 2 (a duplicate); texts' images: 2, 2, 3 (dup), 0
    stats = false_negative_stats(dup, torch.tensor([1, 3, -1, 2]), torch.tensor([2, 2, 3, 0]))
    assert stats["false_negative_share"].item() == pytest.approx(4 / 12)
    assert stats["itm_false_negative_share"].item() == pytest.approx(3 / 7)
    converted = torch.tensor([[True, False, False, False], [False, False, True, False]])
    stats = false_negative_stats(dup, torch.tensor([1, 3, -1, 2]), torch.tensor([2, 2, 3, 0]), converted)
    assert stats["itm_false_negative_share"].item() == pytest.approx(1 / 5)  # converted pairs are no negatives


@pytest.mark.parametrize("caption_positives", [True, False])
def test_identical_captions_are_itc_positives_and_never_itm_negatives(caption_positives):
    objective = tiny_objective(caption_positives=caption_positives)
    batch = batch_with_captions()
    out = objective(batch)
    _, _, img, txt, temp = features(objective, batch)
    s = img @ txt.T / temp
    same = CAPTIONS[:, None] == CAPTIONS[None, :] if caption_positives else torch.eye(B, dtype=torch.bool)
    expected = (contrastive(s, same) + contrastive(s.T, same)) / 2
    assert out["itc"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the shares are measured either way: 2 caption pairs of the 6 x 5 ordered pairs
    assert out["false_negative_share"].item() == pytest.approx(4 / 30)
    hardest_text = s.masked_fill(same, float("-inf")).argmax(1)
    hardest_image = s.T.masked_fill(same, float("-inf")).argmax(1)
    dup = duplicate_pairs(GROUPS, CAPTIONS)
    chosen = torch.cat([dup[torch.arange(B), hardest_text], dup[torch.arange(B), hardest_image]]).float().mean()
    assert out["itm_false_negative_share"].item() == pytest.approx(chosen.item())
    if caption_positives:
        assert out["itm_false_negative_share"].item() == 0.0


def test_smoothed_itc_starts_at_its_epoch_and_mixes_in_the_uniform_target():
    objective = tiny_objective(itc_smoothing=0.5, itc_smoothing_start_epoch=1, consistency_weight=0.0,
                               itm_weight=0.0, mlm_weight=0.0)  # fmt: skip
    batch = batch_with_captions()
    _, _, img, txt, temp = features(objective, batch)
    s = img @ txt.T / temp
    same = CAPTIONS[:, None] == CAPTIONS[None, :]
    plain = (contrastive(s, same) + contrastive(s.T, same)) / 2
    uniform = (-(F.log_softmax(s, 1).mean(1)).mean() - F.log_softmax(s.T, 1).mean(1).mean()) / 2
    objective.set_step(10, epoch=0)
    assert objective(batch)["loss"].item() == pytest.approx(plain.item(), rel=1e-5)
    objective.set_step(10, epoch=1)
    assert objective(batch)["loss"].item() == pytest.approx((0.5 * plain + 0.5 * uniform).item(), rel=1e-5)
    # one positive per row: exactly the cross-entropy against the target 0.5 one-hot + 0.5 uniform (MAFA's)
    objective.config.caption_positives = False
    target = 0.5 * torch.eye(B) + 0.5 / B
    mafa = (-(target * F.log_softmax(s, 1)).sum(1).mean() - (target * F.log_softmax(s.T, 1)).sum(1).mean()) / 2
    assert objective(batch)["loss"].item() == pytest.approx(mafa.item(), rel=1e-5)


def test_top2_negatives_skip_positives():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    positives = torch.eye(5, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    first, second = top2_negatives(img, txt, torch.tensor(0.1), positives, "hardest")
    s = img @ txt.T
    for d, sim in enumerate((s, s.T)):
        order = sim.masked_fill(positives, float("-inf")).argsort(1, descending=True)
        assert torch.equal(first[d], order[:, 0]) and torch.equal(second[d], order[:, 1])
    torch.manual_seed(0)
    first, second = top2_negatives(img, txt, torch.tensor(0.1), positives, "sample")
    assert not positives[torch.arange(5), first[0]].any() and not positives[torch.arange(5), second[0]].any()
    assert (first != second).all()
    everything = torch.ones(5, 5, dtype=torch.bool)
    first, second = top2_negatives(img, txt, torch.tensor(0.1), everything, "hardest")
    assert (first == -1).all() and (second == -1).all()


class ScriptedMiner(ConnectionMiner):
    """A miner whose filter answers a fixed match probability per (image row, text row) pair."""

    def __init__(self, filter_model, table: dict, default: float = 0.1):
        super().__init__(filter_model, low=0.5, high=0.8)
        self.table, self.default, self.asked = table, default, []

    def match_probability(self, images, input_ids, attention_mask, image_rows, text_rows):
        pairs = list(zip(image_rows.tolist(), text_rows.tolist()))
        self.asked.append(pairs)
        return torch.tensor([self.table.get(p, self.default) for p in pairs])


def test_connection_mining_converts_replaces_and_keeps():
    cfg = load_config("demo").model
    probe = tiny_objective(caption_positives=False)
    batch = batch_with_captions()
    image_embeds, text_hidden, img, txt, temp = features(probe, batch)
    s = img @ txt.T / temp
    eye = torch.eye(B, dtype=torch.bool)
    order_t = s.masked_fill(eye, float("-inf")).argsort(1, descending=True)  # images' texts, hardest first
    order_i = s.T.masked_fill(eye, float("-inf")).argsort(1, descending=True)  # texts' images
    table = {(0, int(order_t[0, 0])): 0.9,  # image 0's hardest text: a positive
             (1, int(order_t[1, 0])): 0.6,  # image 1's: replaced by its second-hardest
             (int(order_i[2, 0]), 2): 0.95}  # text 2's hardest image: a positive  # fmt: skip
    miner = ScriptedMiner(GritVLP(cfg), table)
    objective = tiny_objective(miner=miner, caption_positives=False)
    objective.load_state_dict(probe.state_dict())
    torch.manual_seed(5)
    out = objective(batch)
    assert out["converted_negatives"].item() == 2 and out["replaced_negatives"].item() == 1

    # ITC: the converted pairs are extra positives of their own row and direction only
    pos_i2t, pos_t2i = eye.clone(), eye.clone()
    pos_i2t[0, order_t[0, 0]] = True
    pos_t2i[2, order_i[2, 0]] = True
    expected_itc = (contrastive(s, pos_i2t) + contrastive(s.T, pos_t2i)) / 2
    assert out["itc"].item() == pytest.approx(expected_itc.item(), rel=1e-5)

    # ITM: B positives, then (text t's image, t), then (image i, its text); converted pairs labelled 1
    neg_text, neg_image = order_t[:, 0].clone(), order_i[:, 0].clone()
    neg_text[1] = order_t[1, 1]
    labels = torch.tensor([1] * B + [0] * (2 * B))
    labels[B + 2] = labels[2 * B + 0] = 1
    model = objective.model
    with torch.no_grad():
        images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        texts = torch.cat([text_hidden, text_hidden, text_hidden[neg_text]])
        masks = torch.cat([batch["attention_mask"]] * 2 + [batch["attention_mask"][neg_text]])
        itm = F.cross_entropy(model.itm_logits(images, texts, masks), labels)
    assert out["itm"].item() == pytest.approx(itm.item(), rel=1e-5)

    # MLM: the batch's pairs, then each converted pair's text (its own masking) fused with its new image
    torch.manual_seed(5)
    masked, mlm_labels = mask_tokens(batch["input_ids"], vocab_size=model.text.config.vocab_size, mask_token_id=103,
                                     pad_token_id=0, cls_token_id=101, mask_prob=0.5)  # fmt: skip
    with torch.no_grad():
        states = model.text.encode_text(masked, batch["attention_mask"])
        pairs = [(0, int(order_t[0, 0])), (int(order_i[2, 0]), 2)]
        fused = [model.text.fuse(states, batch["attention_mask"], image_embeds)]
        labels_all = [mlm_labels]
        for image_row, text_row in pairs:
            fused.append(model.text.fuse(states[text_row : text_row + 1], batch["attention_mask"][text_row : text_row + 1],
                                         image_embeds[image_row : image_row + 1]))  # fmt: skip
            labels_all.append(mlm_labels[text_row : text_row + 1])
        hidden = torch.cat(fused)
        logits = model.mlm_head.transform(hidden) @ model.text.embeddings.word_embeddings.weight.T + model.mlm_head.bias
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.cat(labels_all).reshape(-1),
                              ignore_index=IGNORE_INDEX)  # fmt: skip
    assert out["mlm"].item() == pytest.approx(mlm.item(), rel=1e-5)
    # the filter was asked about both directions' first choices only
    asked = miner.asked[0]
    assert asked[:B] == [(i, int(order_t[i, 0])) for i in range(B)]
    assert asked[B:] == [(int(order_i[t, 0]), t) for t in range(B)]


def test_filter_model_scores_pairs_with_its_itm_head_at_its_own_size(tmp_path):
    from gritvlp.albef import write_export_folder

    cfg = load_config("demo").model
    torch.manual_seed(3)
    write_export_folder(GritVLP(dataclasses.replace(cfg, image_size=32)).eval(), tmp_path)
    filter_model = load_filter_model(tmp_path, image_size=64)
    assert not any(p.requires_grad for p in filter_model.parameters()) and not filter_model.training
    miner = ConnectionMiner(filter_model)
    batch = fixed_batch()  # 64 px images: resized to the filter's 32 px
    rows = torch.tensor([0, 1, 2])
    texts = torch.tensor([3, 1, 0])
    p = miner.match_probability(batch["image"], batch["input_ids"], batch["attention_mask"], rows, texts)
    with torch.no_grad():
        images = F.interpolate(batch["image"], size=(32, 32), mode="bicubic", align_corners=False)
        tokens, _ = filter_model.encode_image(images)
        hidden, _ = filter_model.encode_text(batch["input_ids"], batch["attention_mask"])
        logits = filter_model.itm_logits(tokens[rows], hidden[texts], batch["attention_mask"][texts])
    torch.testing.assert_close(p, logits.softmax(-1)[:, 1])


def test_filter_from_an_albef_checkpoint_scores_as_the_original(tmp_path):
    from gritvlp.albef import save_albef_checkpoint

    torch.manual_seed(4)
    original = GritVLP(load_config("demo").model).eval()
    path = save_albef_checkpoint(original, tmp_path / "albef.pth", queue_size=8)
    miners = [ConnectionMiner(original), ConnectionMiner(load_filter_model(path, 64, albef_preset="demo"))]
    batch = fixed_batch()
    rows, texts = torch.tensor([0, 4, 5]), torch.tensor([2, 4, 1])
    p = [m.match_probability(batch["image"], batch["input_ids"], batch["attention_mask"], rows, texts) for m in miners]
    torch.testing.assert_close(p[0], p[1])


def test_filter_with_another_vocabulary_is_refused():
    cfg = load_config("demo").model
    other = GritVLP(dataclasses.replace(cfg, text_config={**cfg.text_config, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens"):
        tiny_objective(miner=ConnectionMiner(other))


@pytest.mark.parametrize(
    "override, key",
    [("objectives.itc_smoothing=1.0", "objectives.itc_smoothing"),
     ("objectives.mining_low=0.9", "objectives.mining_low"),
     ("objectives.mining_filter=/no/such/export", "objectives.mining_filter"),
     ("objectives.itc_smoothing_start_epoch=-1", "objectives.itc_smoothing_start_epoch")],  # fmt: skip
)
def test_bad_false_negative_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo", [override])
