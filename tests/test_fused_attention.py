"""Every attention of the model (the ViT's blocks, the text layers, the fusion layers' self- and cross-attention)
runs a fused scaled-dot-product kernel, in forward and backward: an unfused path would materialise the [B, heads,
L, S] scores and run a softmax over them (aten._softmax / _safe_softmax), which is what is counted here.

On CPU, SDPA with dropout takes the math path (scores + softmax), so the CPU test runs without dropout (eval
mode); on CUDA the flash and memory-efficient kernels take dropout, so the CUDA test trains with it."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.model.text import BertSelfAttention

SOFTMAX = ("aten._softmax", "aten._safe_softmax")


class OpCensus(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def count(self, predicate) -> int:
        return sum(n for name, n in self.ops.items() if predicate(name))


def attention_calls(model: GritVLP) -> int:
    """Attention modules one image + text + fusion pass runs: the ViT blocks' and every BERT attention."""
    vit = sum(1 for m in model.vision.modules() if hasattr(m, "fused_attn"))
    return vit + sum(1 for m in model.text.modules() if isinstance(m, BertSelfAttention))


def run_model(model: GritVLP, device: str, dtype: torch.dtype) -> OpCensus:
    size, vocab = model.config.image_size, model.text.config.vocab_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, size, size, generator=g).to(device, dtype)
    ids = torch.randint(5, vocab, (3, 9), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding: the text attentions take a key mask
    with OpCensus() as census:
        image_embeds, _ = model.encode_image(images)
        text, _ = model.encode_text(ids, mask)
        fused = model.fuse(text, mask, image_embeds)
        fused.float().square().mean().backward()
    return census


def test_every_attention_is_a_fused_kernel_on_cpu():
    model = GritVLP(load_config("demo").model).eval()
    assert all(m.fused_attn for m in model.vision.modules() if hasattr(m, "fused_attn"))
    census = run_model(model, "cpu", torch.float32)
    calls = attention_calls(model)
    assert calls == 3 + 2 + 2 * 2  # ViT depth 3; 2 text layers; 2 fusion layers with self- and cross-attention
    assert census.count(lambda op: op == "_scaled_dot_product_flash_attention_for_cpu") == calls
    assert census.count(lambda op: op == "_scaled_dot_product_flash_attention_for_cpu_backward") == calls
    assert census.count(lambda op: op.startswith(SOFTMAX)) == 0


def test_an_unfused_vit_is_reported(monkeypatch, caplog):
    """timm's attention falls back to explicit scores when told so (TIMM_FUSED_ATTN=0): the encoder says so."""
    import timm.layers.config as timm_config

    monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 0)
    with caplog.at_level("WARNING", logger="gritvlp.model"):
        GritVLP(load_config("demo").model)
    assert "fused attention is off" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_attention_is_a_fused_kernel_on_cuda_in_training():
    """bf16 parameters (DeepSpeed's bf16 engine), dropout on: flash (no mask) or memory-efficient (key mask)."""
    model = GritVLP(load_config("demo").model).cuda().bfloat16().train()
    census = run_model(model, "cuda", torch.bfloat16)
    fused = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")  # fmt: skip
    forward = census.count(lambda op: op in fused)
    assert forward == attention_calls(model), census.ops
    assert census.count(lambda op: op.startswith(SOFTMAX)) == 0
