"""BERT text encoder and fusion encoder (ALBEF layout), configured by transformers' BertConfig.

Layers [0, num_text_layers) encode text alone; the remaining layers add cross-attention to the image
tokens. The modules are plain PyTorch with SDPA attention, and their parameter names match
transformers' BertModel / BertForMaskedLM, so any local BERT folder loads into them. (Calling
transformers' own BertLayer directly ties us to internals that change across releases.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig


def build_bert_config(text_config: dict | str) -> BertConfig:
    """BertConfig from keyword overrides (defaults = bert-base-uncased) or from a local folder."""
    if isinstance(text_config, str):
        path = Path(text_config)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no BERT config.json in {path}")
        return BertConfig.from_pretrained(str(path), local_files_only=True)
    return BertConfig(**text_config)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens exceeds max_position_embeddings")
        positions = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, x, context, mask):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(config, kv_width)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x, context, mask):
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, cross_width: int | None = None):
        super().__init__()
        self.attention = BertAttention(config, config.hidden_size)
        self.crossattention = BertAttention(config, cross_width) if cross_width else None
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, x, mask, image=None, image_mask=None):
        x = self.attention(x, x, mask)
        if self.crossattention is not None:
            x = self.crossattention(x, image, image_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, num_text_layers: int, image_width: int):
        super().__init__()
        if not 0 < num_text_layers < config.num_hidden_layers:
            raise ValueError(
                f"num_text_layers must be in [1, {config.num_hidden_layers - 1}] so that text and fusion "
                f"layers both exist, got {num_text_layers}"
            )
        self.num_text_layers = num_text_layers
        self.layer = nn.ModuleList(
            BertLayer(config, cross_width=image_width if i >= num_text_layers else None)
            for i in range(config.num_hidden_layers)
        )
        self.grad_checkpointing = False

    def _states(self, layers, x, mask, image=None, image_mask=None) -> list[torch.Tensor]:
        """The output of each of `layers`, run in order."""
        states = []
        for layer in layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mask, image, image_mask, use_reentrant=False)
            else:
                x = layer(x, mask, image, image_mask)
            states.append(x)
        return states

    def text(self, x, mask):
        return self._states(self.layer[: self.num_text_layers], x, mask)[-1]

    def fusion(self, x, mask, image, image_mask=None):
        return self._states(self.layer[self.num_text_layers :], x, mask, image, image_mask)[-1]

    def all_states(self, x, mask, image, image_mask=None) -> list[torch.Tensor]:
        """The output of every layer: the text layers', then the fusion layers' (attending to `image`)."""
        text = self._states(self.layer[: self.num_text_layers], x, mask)
        return text + self._states(self.layer[self.num_text_layers :], text[-1], mask, image, image_mask)


class BertTextFusion(nn.Module):
    """Embeddings + text layers + fusion layers; names match transformers' BertModel."""

    def __init__(self, config: BertConfig, num_text_layers: int, image_width: int):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, num_text_layers, image_width)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        init_bert_weights(module, self.config.initializer_range)

    def encode_text(self, input_ids, attention_mask, attn_mask=None):
        return self.encoder.text(self.embeddings(input_ids), self_attention_mask(attention_mask, attn_mask))

    def fuse(self, text_hidden, attention_mask, image_embeds, attn_mask=None):
        return self.encoder.fusion(text_hidden, self_attention_mask(attention_mask, attn_mask), image_embeds)

    def all_states(self, input_ids, attention_mask, image_embeds, attn_mask=None) -> list[torch.Tensor]:
        """[B, L, H] states of every text layer, then of every fusion layer."""
        mask = self_attention_mask(attention_mask, attn_mask)
        return self.encoder.all_states(self.embeddings(input_ids), mask, image_embeds)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 -> boolean [B, 1, 1, L] for SDPA (True = may attend)."""
    return attention_mask.bool()[:, None, None, :]


def self_attention_mask(attention_mask: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The SDPA mask of self-attention: the key-padding mask, restricted by `attn_mask` when one is given
    (boolean [L, L] or [B, L, L], query x key, True = may attend, e.g. a causal mask).

    Under `attn_mask` every token may also attend to itself: a padding query of a right-to-left stream would
    otherwise see no key at all, and its NaN state would reach every row through the next layer's values."""
    mask = key_padding_mask(attention_mask)
    if attn_mask is None:
        return mask
    length = attention_mask.shape[1]
    itself = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    return (mask & attn_mask.reshape(-1, 1, length, length)) | itself


class MLMHead(nn.Module):
    """BERT's MLM head: the transform (dense, GELU, LayerNorm) applied to the rows to predict, and the decoder bias;
    the decoder weight is the word embeddings' (tied, not registered twice). The vocabulary projection and the
    cross-entropy are the objective's (gritvlp.objectives.mlm), through the fused masked-LM loss."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.act = nn.GELU()
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: tied, not registered twice

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.word_embeddings[0].weight

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, H] hidden states of the rows to predict -> [n, H] inputs of the vocabulary projection."""
        return self.transform(rows)
