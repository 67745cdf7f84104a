"""data.image_decode=device: the host draws (gritvlp.data.encoded_images) and the device decode and augmentation
(gritvlp.data.device_images, device_augment) against the CPU path (gritvlp.data.transforms)."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from gritvlp.config import ConfigError, load_config
from gritvlp.data import device_images
from gritvlp.data import transforms as tr
from gritvlp.data.collate import Collator
from gritvlp.data.device_augment import augment_batch
from gritvlp.data.device_images import decode_batch
from gritvlp.data.encoded_images import EncodedBatch, HostDrawTransform, jpeg_frame
from gritvlp.data.shards import ShardDataset
from gritvlp.train.data import epoch_loader, tokenizer_and_special_tokens, training_dataset
from gritvlp.train.step import to_device

SIZE = 48
MEAN, STD = torch.tensor(tr.CLIP_MEAN).view(3, 1, 1), torch.tensor(tr.CLIP_STD).view(3, 1, 1)


def _photo(width: int, height: int, seed: int, mode="RGB", fmt="JPEG", **save) -> bytes:
    """Smooth colour fields with some texture (JPEG-friendly, like photographs), saved at quality 95."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(small.resize((width, height), Image.BICUBIC), np.float32)
    pixels = (smooth + rng.normal(0, 6, smooth.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}), **save)
    return buf.getvalue()


IMAGES = {
    "rgb_320x240": _photo(320, 240, 0),
    "rgb_odd_97x61": _photo(97, 61, 1),
    "grey_75x51": _photo(75, 51, 2, mode="L"),
    "progressive_130x90": _photo(130, 90, 3, progressive=True),
    "png_64x48": _photo(64, 48, 4, fmt="PNG"),  # decoded on the host
    "cmyk_60x40": _photo(60, 40, 5, mode="CMYK"),  # decoded on the host
}
HOST_DECODED = {"png_64x48", "cmyk_60x40"}


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _levels(normalised: torch.Tensor) -> torch.Tensor:
    return (normalised * STD + MEAN) * 255


@pytest.fixture
def full_decode(monkeypatch):
    """The CPU path without its DCT-reduced decode, which the device path does not do."""
    monkeypatch.setattr(tr, "jpeg_reduction", lambda region, out_size: 1)


def _both_paths(drawn: list[tr.TrainDraw], datas: list[bytes], train=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path's and the device path's (on the CPU) normalised batches for the same draws."""
    train = train or tr.train_transform(SIZE)
    host = HostDrawTransform(train)
    cpu, encoded = [], []
    for data, draw in zip(datas, drawn):
        cpu.append(train.apply(_open(data), draw))
        encoded.append(host.encode(_open(data), data, draw))
    return torch.stack(cpu), decode_batch(EncodedBatch.collate(encoded, list(range(len(datas)))), "cpu")


# ---------------------------------------------------------------- the draws


def test_host_draws_are_the_cpu_paths_draws():
    train = tr.train_transform(SIZE)
    host = HostDrawTransform(train)
    for name, data in IMAGES.items():
        for seed in range(25):
            torch.manual_seed(seed)
            cpu = train.draw(_open(data))
            after_cpu = torch.rand(3)
            torch.manual_seed(seed)
            image = host(_open(data), data)
            assert image.drawn == cpu, name
            assert torch.equal(torch.rand(3), after_cpu)  # no draw more or less
            assert (image.pixels is not None) == (name in HOST_DECODED), name
            assert image.size == (_open(data).height, _open(data).width)


def test_cpu_path_equals_its_steps_run_one_after_another():
    """Drawing everything first changes nothing: the pipeline equals its steps each drawing in turn (the CPU path as
    it ran before the draws were gathered)."""
    train = tr.train_transform(SIZE)
    steps = T.Compose(train.transforms)
    for data in IMAGES.values():
        for seed in range(20):
            torch.manual_seed(seed)
            whole = train(_open(data))
            torch.manual_seed(seed)
            assert torch.equal(whole, steps(_open(data)))


def test_shard_dataset_draws_the_same_in_both_paths(demo, tmp_path):
    train = tr.train_transform(SIZE)
    cpu_set = ShardDataset(demo, train, index_dir=str(tmp_path), seed=3)
    device_set = ShardDataset(demo, HostDrawTransform(train), index_dir=str(tmp_path), seed=3)
    cpu_set.set_epoch(2), device_set.set_epoch(2)
    collator = Collator(tokenizer=lambda captions, **kw: {"input_ids": torch.zeros(len(captions), 4),
                                                          "attention_mask": torch.ones(len(captions), 4)})  # fmt: skip
    samples = [device_set[i] for i in range(8)]
    batch = collator(samples)["image"]
    assert isinstance(batch, EncodedBatch) and len(batch) == 8
    for row, sample in enumerate(samples):
        assert batch.draw(row) == sample["image"].drawn
    with torch.random.fork_rng():
        # the CPU path's output for dataset[i] is the CPU pipeline applied to the draws the host made for i
        cpu = cpu_set[5]["image"]
        data = samples[5]["image"].data.numpy().tobytes()
        assert torch.equal(cpu, train.apply(_open(data), samples[5]["image"].drawn))


def test_drawn_distributions_are_equal_and_albefs():
    """2,000 seeds: flip rate, operation frequencies, application and sign rates, crop area and aspect ratio."""
    train = tr.train_transform(SIZE)
    host = HostDrawTransform(train)
    data = IMAGES["rgb_320x240"]
    cpu, device = [], []
    for seed in range(2000):
        torch.manual_seed(seed)
        cpu.append(train.draw(_open(data)))
        torch.manual_seed(seed)
        device.append(host(_open(data), data).drawn)
    images = []
    for seed in range(50):
        torch.manual_seed(seed)
        images.append(host(_open(data), data))
    batch = EncodedBatch.collate(images, list(range(50)))  # the batch's tensors carry the draws unchanged
    assert [batch.draw(row) for row in range(50)] == device[:50]

    def stats(draws):
        augment = [d for draw in draws for d in draw.augment]
        geometric = [d for d in augment if d.applied and d.op in tr.GEOMETRIC_OPS]
        area = np.array([d.box[2] * d.box[3] / (320 * 240) for d in draws])
        ratio = np.array([d.box[3] / d.box[2] for d in draws])
        return {
            "flip": np.mean([d.flip for d in draws]),
            "ops": np.array([sum(d.op == op for d in augment) for op in tr.ALBEF_OPS]) / len(augment),
            "applied": np.mean([d.applied for d in augment]),
            "negative": np.mean([d.sign == -1 for d in geometric]),
            "area": (area.mean(), area.min(), area.max()),
            "log_ratio": (np.log(ratio).mean(), ratio.min(), ratio.max()),
        }

    ours, theirs = stats(device), stats(cpu)
    assert device == cpu
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert abs(ours["flip"] - 0.5) < 0.04 and abs(ours["applied"] - 0.5) < 0.03 and abs(ours["negative"] - 0.5) < 0.06
    assert np.abs(ours["ops"] - 0.1).max() < 0.02
    assert 0.2 - 1e-3 <= ours["area"][1] and ours["area"][2] <= 1 and 0.45 < ours["area"][0] < 0.6
    assert 3 / 4 - 0.01 <= ours["log_ratio"][1] and ours["log_ratio"][2] <= 4 / 3 + 0.01


# ---------------------------------------------------------------- the device path against the CPU path


@pytest.mark.parametrize("op", tr.ALBEF_OPS)
@pytest.mark.parametrize("size", [32, 33])
def test_batched_ops_equal_cpu_ops_on_identical_pixels(op, size):
    rng = np.random.default_rng(size)
    pixels = torch.from_numpy(rng.integers(0, 256, (4, 3, size, size), dtype=np.uint8))
    pixels[1] = pixels[1] // 4 + 90  # a narrow histogram: AutoContrast and Equalize stretch it
    pixels[2, 0] = 77  # a constant channel: AutoContrast and Equalize leave it
    augment = tr.AlbefRandomAugment(2, 7)
    geometric = op in tr.GEOMETRIC_OPS
    # two draws of the op per sample: both applied, or the second not; geometric ones in either direction
    first = [tr.AugmentDraw(op, True, -1 if geometric and row % 2 else 1) for row in range(4)]
    draws = [(first[row], tr.AugmentDraw(op, row < 2)) for row in range(4)]
    ops = torch.tensor([[tr.ALBEF_OPS.index(d.op) for d in row] for row in draws])
    applied = torch.tensor([[d.applied for d in row] for row in draws])
    signs = torch.tensor([[d.sign for d in row] for row in draws])
    out = augment_batch(pixels.clone(), ops, applied, signs, 7)
    for row in range(4):
        assert torch.equal(out[row], augment.apply(pixels[row], draws[row])), row
    if op != "Identity":
        assert not torch.equal(out, pixels)


def test_device_resize_differs_from_the_cpu_resize_by_rounding_only():
    """The CPU path resizes with torch's uint8 kernel (fixed-point weights), the device path in float32, both in two
    passes rounded in between: the same filter, a level apart on a few pixels (the fixed-point weights' error grows
    with the filter's support: rarely more)."""
    pixels = torch.from_numpy(np.asarray(_open(IMAGES["rgb_320x240"]).convert("RGB")).copy())
    box = (13, 21, 170, 211)  # top, left, height, width
    cpu = tr.resize_region(pixels, (21, 13, 21 + 211, 13 + 170), (SIZE, SIZE)).int()
    device = device_images._crop_resize(pixels.permute(2, 0, 1).contiguous(), list(box), SIZE).round().int()
    diff = (cpu - device).abs()
    assert (diff > 0).float().mean() < 0.01 and (diff > 1).float().mean() < 0.001 and diff.max() <= 4


@pytest.mark.parametrize("op", tr.ALBEF_OPS)
def test_device_path_matches_cpu_path_with_each_op(op, full_decode):
    """Real JPEGs (odd sizes, grey, progressive) and the host-decoded PNG and CMYK JPEG, each op forced on, both
    flips. The residual is the resize's rounding (previous test): a level on a few pixels, which Equalize and
    AutoContrast may map as far apart as their tables' steps; host-decoded samples share the CPU path's pixels and
    match exactly."""
    names = list(IMAGES)
    datas = [IMAGES[name] for name in names]
    geometric = op in tr.GEOMETRIC_OPS
    drawn = []
    for i, data in enumerate(datas):
        torch.manual_seed(i)
        box = tr.train_transform(SIZE).crop.draw(_open(data))
        drawn.append(tr.TrainDraw(box, i % 2 == 0, (tr.AugmentDraw(op, True, -1 if geometric and i % 3 else 1),)))
    cpu, device = _both_paths(drawn, datas)
    assert device.shape == cpu.shape == (len(datas), 3, SIZE, SIZE) and device.dtype == torch.float32
    for row, name in enumerate(names):
        diff = (_levels(device[row]) - _levels(cpu[row])).abs()
        if name in HOST_DECODED:
            assert diff.max() < 1e-3, name
        elif op in ("Equalize", "AutoContrast"):
            assert diff.mean() < 0.1 and (diff > 2.5).float().mean() < 0.01, (name, diff.mean())
        else:
            assert diff.mean() < 0.1 and diff.max() < 4.5, (name, diff.mean(), diff.max())


def test_device_path_matches_cpu_path_on_random_draws(full_decode):
    train = tr.train_transform(SIZE, randaug_n=3)
    datas = list(IMAGES.values()) * 3
    drawn = []
    for seed, data in enumerate(datas):
        torch.manual_seed(seed)
        drawn.append(train.draw(_open(data)))
    cpu, device = _both_paths(drawn, datas, train)
    diff = (_levels(device) - _levels(cpu)).abs()
    assert diff.mean() < 0.1 and (diff > 2.5).float().mean() < 0.005


# ---------------------------------------------------------------- what the device decoder rejects


def test_jpeg_kinds():
    assert jpeg_frame(IMAGES["rgb_320x240"]) == 0xC0 and jpeg_frame(IMAGES["progressive_130x90"]) == 0xC2
    assert jpeg_frame(IMAGES["png_64x48"]) is None and jpeg_frame(b"\xff\xd8\xff\xda\x00\x02") is None


def test_corrupt_jpeg_is_replaced_counted_and_logged(caplog):
    """A JPEG whose header parses but whose data is cut short: the batch keeps its size, the other samples are
    untouched, the broken one becomes grey (PIL cannot decode it either), logged and counted."""
    good = _photo(80, 60, 7)
    broken = _photo(96, 72, 8)[:900]
    host = HostDrawTransform(tr.train_transform(SIZE))
    whole = {id(good): tr.TrainDraw((0, 0, 60, 80), False, ()), id(broken): tr.TrainDraw((0, 0, 72, 96), False, ())}
    images = [host.encode(_open(data), data, whole[id(data)]) for data in (good, broken, good)]
    assert images[1].pixels is None  # its header parsed: it went to the device decoder
    before = device_images.replaced_images
    with caplog.at_level(logging.WARNING, "gritvlp.data"):
        out = decode_batch(EncodedBatch.collate(images, [10, 11, 12]), "cpu")
    assert out.shape == (3, 3, SIZE, SIZE) and device_images.replaced_images == before + 1
    assert "sample 11" in caplog.text and "grey" in caplog.text
    assert torch.allclose(_levels(out[1]), torch.full_like(out[1], 128), atol=1e-3)
    alone = decode_batch(EncodedBatch.collate(images[:1], [10]), "cpu")
    assert torch.equal(out[0], alone[0]) and torch.equal(out[2], alone[0])


def test_image_the_device_decoder_rejects_is_decoded_by_pil(monkeypatch, caplog, full_decode):
    """A JPEG the device decoder refuses but libjpeg reads (nvJPEG is the stricter) comes from PIL, same crop."""
    real = device_images.decode_jpeg
    refused = IMAGES["rgb_odd_97x61"]

    def picky(data, **kwargs):
        if isinstance(data, list) or data.numpy().tobytes() == refused:
            raise RuntimeError("refused")
        return real(data, **kwargs)

    monkeypatch.setattr(device_images, "decode_jpeg", picky)
    datas = [IMAGES["rgb_320x240"], refused]
    drawn = [tr.TrainDraw((5, 7, 50, 61), True, (tr.AugmentDraw("Rotate", True, -1),)) for _ in datas]
    with caplog.at_level(logging.WARNING, "gritvlp.data"):
        cpu, device = _both_paths(drawn, datas)
    assert "decoded by PIL" in caplog.text
    assert (_levels(device) - _levels(cpu)).abs().mean() < 0.1


def test_unparsable_header_is_a_counted_skip(tmp_path):
    import webdataset as wds

    shard = tmp_path / "bad.tar"
    with wds.TarWriter(str(shard), encoder=False, mtime=0) as sink:
        sink.write({"__key__": "0", "jpg": b"\xff\xd8 not a jpeg", "txt": b"a caption"})
        sink.write({"__key__": "1", "jpg": IMAGES["rgb_odd_97x61"], "txt": b"a caption"})
    dataset = ShardDataset(str(shard), HostDrawTransform(tr.train_transform(SIZE)), index_dir=str(tmp_path / "i"))
    assert dataset[0] is None and dataset[1] is not None


# ---------------------------------------------------------------- configuration and the trainer's data path


def test_config_key():
    assert load_config("demo").data.image_decode == "cpu"
    assert load_config("demo", ["data.image_decode=device"]).data.image_decode == "device"
    with pytest.raises(ConfigError, match="data.image_decode"):
        load_config("demo", ["data.image_decode=gpu"])


def test_trainer_data_path_gives_the_cpu_paths_batch(demo, tmp_path):
    """training_dataset -> epoch_loader -> to_device, as the trainer runs them, with image_decode cpu and device."""
    batches = {}
    for mode in ("cpu", "device"):
        workers = 1 if mode == "device" else 0  # a worker process: the encoded batch crosses to the trainer
        overrides = [f"data.train_shards={demo}", f"data.num_workers={workers}", f"data.index_dir={tmp_path}"]
        cfg = load_config("demo", [*overrides, f"data.image_decode={mode}"])
        dataset = training_dataset(cfg)
        tokenizer, _ = tokenizer_and_special_tokens(cfg)
        loader = epoch_loader(dataset, [list(range(6))], Collator(tokenizer, cfg.data.max_tokens), cfg, False)
        host = next(iter(loader))
        if mode == "cpu":  # the loader sends uint8 pixels; the step normalises them after the copy
            assert host["image"].dtype == torch.uint8
        batches[mode] = to_device(host, torch.device("cpu"), torch.float32)
    cpu, device = batches["cpu"], batches["device"]
    assert device["image"].shape == cpu["image"].shape and device["image"].dtype == cpu["image"].dtype
    assert torch.equal(device["input_ids"], cpu["input_ids"])
    # 32 px demo images: no crop is large enough for a reduced decode, so the paths differ by rounding only
    diff = (_levels(device["image"]) - _levels(cpu["image"])).abs()
    assert diff.mean() < 0.1, diff.mean()


def test_grouping_picture_decodes_encoded_samples():
    from gritvlp.train.pictures import THUMB, to_pil

    data = IMAGES["rgb_odd_97x61"]
    train = tr.train_transform(SIZE)
    torch.manual_seed(0)
    thumb = to_pil(HostDrawTransform(train)(_open(data), data))
    torch.manual_seed(0)
    cpu = np.asarray(to_pil(train(_open(data))), np.float32)
    assert thumb.size == (THUMB, THUMB) and np.abs(np.asarray(thumb, np.float32) - cpu).mean() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_path_matches_cpu_path(full_decode):
    """The batched nvJPEG decode and the augmentation on the GPU against the CPU path: nvJPEG's IDCT and chroma
    upsampling add a level or two to the resize's rounding."""
    train = tr.train_transform(SIZE, randaug_n=3)
    datas = list(IMAGES.values()) * 4
    encoded, cpu = [], []
    host = HostDrawTransform(train)
    for seed, data in enumerate(datas):
        torch.manual_seed(seed)
        encoded.append(host(_open(data), data))
        cpu.append(train.apply(_open(data), encoded[-1].drawn))
    before = device_images.replaced_images
    device = decode_batch(EncodedBatch.collate(encoded, list(range(len(datas)))).pin_memory(), "cuda")
    assert device.is_cuda and device_images.replaced_images == before
    diff = (_levels(device.cpu()) - _levels(torch.stack(cpu))).abs()
    assert diff.mean() < 1.5 and (diff > 6).float().mean() < 0.02, (diff.mean(), (diff > 6).float().mean())
