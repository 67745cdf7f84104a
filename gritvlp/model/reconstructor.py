"""FLM's reconstructor: one query per text position, cross-attention + FFN layers and no self-attention, so each
query's prediction depends only on the stream states its own corruption span leaves visible.

Layer k of K reads the concatenated forward and backward states of encoder layer N - K + k (N text + fusion layers):
the reconstructor is aligned with the encoder's last K layers, its last layer with the last fusion layer (as in the
FLM reference code, whose reconstructor has one layer per encoder layer, K = N).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import BertConfig

from .text import BertAttention, BertIntermediate, BertSelfOutput, init_bert_weights


class ReconstructorLayer(nn.Module):
    """BERT's cross-attention and feed-forward blocks (names as in a BertLayer's), without its self-attention."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.crossattention = BertAttention(config, config.hidden_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(queries, context, mask)
        return self.output(self.intermediate(x), x)


class Reconstructor(nn.Module):
    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        if not 0 < num_layers <= config.num_hidden_layers:
            raise ValueError(
                f"the reconstructor needs 1 to {config.num_hidden_layers} layers (one per encoder layer at most), "
                f"got {num_layers}"
            )
        self.layer = nn.ModuleList(ReconstructorLayer(config) for _ in range(num_layers))
        self.apply(lambda module: init_bert_weights(module, config.initializer_range))

    def encoder_layers(self, num_encoder_layers: int) -> range:
        """Indices of the encoder layers the reconstructor's layers read, in order."""
        return range(num_encoder_layers - len(self.layer), num_encoder_layers)

    def forward(self, queries: torch.Tensor, contexts: list[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, H]; contexts: one [B, K, H] per layer; visible [B, Q, K] bool (True = query may attend).
        Returns the queries' final states [B, Q, H]."""
        if len(contexts) != len(self.layer):
            raise ValueError(f"{len(self.layer)} reconstructor layers need as many contexts, got {len(contexts)}")
        mask = visible[:, None]
        for layer, context in zip(self.layer, contexts):
            queries = layer(queries, context, mask)
        return queries
