import os

# The Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """24 training samples of the demo set in 3 shards of 32 px images; returns the brace pattern."""
    from gritvlp.data.demo import make_demo_shards

    root = tmp_path_factory.mktemp("demo")
    train, _ = make_demo_shards(str(root), num_train=24, num_test=4, image_size=32, samples_per_shard=8, progress=False)
    return train
