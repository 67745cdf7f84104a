import functools
import http.server
import os
import pickle
import re
import threading

import pytest
import torch

from gritvlp.data.demo import make_demo_shards
from gritvlp.data.remote import ShardReader, _coalesce
from gritvlp.data.shards import ShardDataset, expand_shards
from gritvlp.data.transforms import eval_transform, train_transform

pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, honouring single `Range: bytes=a-b` requests (206 Partial Content)."""

    ranges: list[tuple[str, int, int]] = []

    def do_GET(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None:
            return super().do_GET()
        path = self.translate_path(self.path)
        with open(path, "rb") as f:
            data = f.read()
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        body = data[start : end + 1]
        self.ranges.append((os.path.basename(path), start, len(body)))
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo shards, locally and over HTTP from a server on a free loopback port."""
    root = tmp_path_factory.mktemp("served")
    train, _ = make_demo_shards(str(root), num_train=24, num_test=4, image_size=32, samples_per_shard=8, progress=False)
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    local = expand_shards(train)
    yield local, [f"{base}/{os.path.basename(p)}" for p in local]
    server.shutdown()
    server.server_close()


def test_http_shards_read_the_same_samples_as_local_ones(served, tmp_path):
    local_shards, urls = served
    local = ShardDataset(local_shards, train_transform(32), seed=1, index_dir=str(tmp_path / "local"))
    remote = ShardDataset(urls, train_transform(32), seed=1, index_dir=str(tmp_path / "remote"))
    assert expand_shards("::".join(urls)) == sorted(urls) == remote.shards
    assert len(remote) == len(local) == 24 and torch.equal(remote.group_ids, local.group_ids)
    RangeHandler.ranges.clear()
    for i in range(len(local)):
        a, b = local[i], remote[i]
        assert a["caption"] == b["caption"] and a["group_id"] == b["group_id"]
        assert torch.equal(a["image"], b["image"])
    # one ranged request per sample: image and caption are close in the tar, so they come in one range
    assert len(RangeHandler.ranges) == len(local)
    assert all(size < 64 * 1024 for _, _, size in RangeHandler.ranges)
    assert list(remote.keys) == list(local.keys)


def test_http_dataset_survives_pickling_for_workers(served, tmp_path):
    _, urls = served
    ds = ShardDataset(urls, eval_transform(32), index_dir=str(tmp_path / "remote"))
    first = ds[3]["image"]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3]["image"], first)


def test_reader_reads_exact_ranges(served):
    local_shards, urls = served
    with open(local_shards[0], "rb") as f:
        data = f.read()
    ranges = [(0, 512), (1536, 100), (len(data) - 10, 10), (200_000_000, 5)]
    for reader in (ShardReader(local_shards), ShardReader(urls)):
        assert reader.read_ranges(0, ranges) == [data[0:512], data[1536:1636], data[-10:], b""]


def test_coalesce_groups_close_ranges():
    assert _coalesce([(5000, 10), (0, 100), (10**7, 4)]) == [[1, 0], [2]]
