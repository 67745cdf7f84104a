"""gritvlp: vision-language pre-training (GRIT-VLP, FLM, DiHT) on DeepSpeed with fused Triton kernels."""

__version__ = "0.1.0"
