"""The trainer's data side: multi-crop augmentation, block masking and DINOv2's collation, the
seeded SSL dataset and infinite sharded sampler (the same batches with 0 and 2 workers and after a
resume), ImageFolder (labels, errors, unreadable files), the bundled digits (no network),
synthetic data, and the weighted k-NN (a hand-made case and a float64 brute-force reference).
"""

from __future__ import annotations

import functools
import math
import pickle
import random
import socket
import warnings
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_fast.train.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from dinov2_fast.train.data import (
    DigitsDataset,
    ImageFolder,
    InfiniteShardedSampler,
    SSLDataset,
    SyntheticDataset,
    UnreadableImageWarning,
    derive_seed,
    make_data_loader,
)
from dinov2_fast.train.knn import extract_features, knn_accuracy
from dinov2_fast.train.masking import (
    MaskingGenerator,
    MultiCropCollate,
    collate_data_and_cast,
    mask_upperbound,
)

GLOBAL, LOCAL, PATCH = 16, 8, 4  # small crops: a 4 x 4 patch grid per global crop


def _small_augmentation(n_local: int = 2, **kwargs) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        local_crops_number=n_local, global_crops_size=GLOBAL, local_crops_size=LOCAL, **kwargs
    )


def _noise_image(mode: str = "RGB", size=(37, 29), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _seeded(fn, seed: int = 0):
    torch.manual_seed(seed)
    return fn()


# ---------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize(
    "make",
    [
        lambda: _noise_image("RGB"),
        lambda: _noise_image("L"),
        lambda: _noise_image("RGBA"),
        lambda: _noise_image("P"),
        lambda: torch.randint(0, 256, (3, 29, 37), dtype=torch.uint8),
        lambda: torch.randint(0, 256, (1, 29, 37), dtype=torch.uint8),
        lambda: torch.randint(0, 256, (29, 37), dtype=torch.uint8),
        lambda: torch.randint(0, 256, (4, 29, 37), dtype=torch.uint8),
    ],
    ids=["rgb", "grey", "rgba", "palette", "tensor3", "tensor1", "tensor2d", "tensor4"],
)
def test_augmentation_shapes_and_dtypes(make):
    out = _small_augmentation(n_local=3)(make())
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    for crops, size in ((out["global_crops"], GLOBAL), (out["local_crops"], LOCAL)):
        for crop in crops:
            assert type(crop) is torch.Tensor  # plain tensors, not tv_tensors.Image
            assert crop.shape == (3, size, size) and crop.dtype == torch.float32
            assert torch.isfinite(crop).all()


def test_augmentation_normalisation_and_defaults():
    image = _noise_image(size=(50, 40))
    plain = _small_augmentation(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    normed = _small_augmentation()
    a = _seeded(lambda: plain(image), 3)
    b = _seeded(lambda: normed(image), 3)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert 0.0 <= x.min() and x.max() <= 1.0  # ToDtype(scale=True): [0, 1] before Normalize
        torch.testing.assert_close(y, (x - mean) / std)
    # DINOv2's defaults: 224 / 96 px, 8 local crops; none at all is allowed
    default = MultiCropAugmentation()(image)
    assert [c.shape[-1] for c in default["global_crops"]] == [224, 224]
    assert [c.shape[-1] for c in default["local_crops"]] == [96] * 8
    assert _small_augmentation(n_local=0)(image)["local_crops"] == []


def test_augmentation_recipe():
    """DINOv2's per-view recipe: blur p = 1 / 0.1 / 0.5, solarize only on global crop 2."""
    from torchvision.transforms import v2

    aug = MultiCropAugmentation(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4))

    def flat(compose):
        out = []
        for t in compose.transforms:
            p = t.p if isinstance(t, v2.RandomApply) else 1.0
            inner = t.transforms if isinstance(t, v2.RandomApply) else [t]
            out.extend((type(i).__name__, p, i) for i in inner)
        return out

    views = {
        "g1": flat(aug.global_transform_1),
        "g2": flat(aug.global_transform_2),
        "local": flat(aug.local_transform),
    }
    for name, size, scale in (
        ("g1", 224, (0.4, 1.0)),
        ("g2", 224, (0.4, 1.0)),
        ("local", 96, (0.1, 0.4)),
    ):
        crop = next(t for n, _, t in views[name] if n == "RandomResizedCrop")
        assert crop.size == (size, size) and tuple(crop.scale) == scale
        assert crop.interpolation == v2.InterpolationMode.BICUBIC
        jitter = next((p, t) for n, p, t in views[name] if n == "ColorJitter")
        assert (
            jitter[0] == 0.8 and jitter[1].brightness == (0.6, 1.4) and jitter[1].hue == (-0.1, 0.1)
        )
        assert next(t for n, _, t in views[name] if n == "RandomGrayscale").p == 0.2
        blur = next((p, t) for n, p, t in views[name] if n == "GaussianBlur")
        assert blur[0] == {"g1": 1.0, "g2": 0.1, "local": 0.5}[name]
        assert blur[1].kernel_size == (9, 9) and blur[1].sigma == [0.1, 2.0]
        solarize = [t for n, _, t in views[name] if n == "RandomSolarize"]
        assert len(solarize) == (name == "g2")
    solarize = next(t for n, _, t in views["g2"] if n == "RandomSolarize")
    assert solarize.threshold == 128 and solarize.p == 0.2


def test_augmentation_errors():
    aug = _small_augmentation()
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(2, 20, 20, dtype=torch.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        aug(np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropAugmentation(local_crops_number=-1)


# ---------------------------------------------------------------------------- masking


def test_masking_generator_counts_and_shape():
    grid = MaskingGenerator((14, 14), max_num_patches=0.5 * 196)
    g = torch.Generator().manual_seed(0)
    for request in (0, 1, 5, 19, 50, 98):
        counts = []
        for _ in range(40):
            mask = grid(request, g)
            assert mask.dtype == torch.bool and mask.shape == (14, 14)
            counts.append(int(mask.sum()))
        assert max(counts) <= request  # never more than asked
        if request >= grid.min_num_patches:  # below it, rectangles rarely fit (as in DINOv2)
            assert np.mean(counts) >= 0.9 * request and min(counts) >= 0.5 * request
    rect = MaskingGenerator((6, 10))
    assert rect(20, g).shape == (6, 10)
    with pytest.raises(ValueError, match="num_masking_patches"):
        rect(61, g)


def test_masking_generator_seeded():
    grid = MaskingGenerator(16, max_num_patches=128)
    a = grid(70, torch.Generator().manual_seed(5))
    b = grid(70, torch.Generator().manual_seed(5))
    c = grid(70, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the global RNGs play no part
    random.seed(1)
    torch.manual_seed(1)
    d = grid(70, torch.Generator().manual_seed(5))
    assert torch.equal(a, d)
    # the mask is blocky: far fewer boundary edges than random scattering would give
    edges = (a[1:] != a[:-1]).sum() + (a[:, 1:] != a[:, :-1]).sum()
    assert edges < 0.5 * 2 * 70


@pytest.mark.parametrize(
    ("n_crops", "n_tokens", "expected"), [(128, 196, 3771), (64, 256, 2496), (24, 256, 967)]
)
def test_upperbound_matches_dinov2(n_crops, n_tokens, expected):
    assert mask_upperbound(n_crops, n_tokens, (0.1, 0.5), 0.5) == expected


def _samples(batch: int, n_local: int = 3, side: int = GLOBAL, with_label: bool = True):
    """Crops filled with an identifying value: 100 * sample + crop (+ 50 for local crops)."""
    out = []
    for b in range(batch):
        sample = {
            "global_crops": [torch.full((3, side, side), 100.0 * b + c) for c in range(2)],
            "local_crops": [torch.full((3, 6, 6), 100.0 * b + 50 + c) for c in range(n_local)],
            "seed": 1000 + b,
        }
        if with_label:
            sample["label"] = b % 3
        out.append(sample)
    return out


def test_collate_layout_and_masks():
    batch, grid = 12, 14
    n_tokens = grid * grid
    gen = MaskingGenerator(grid, max_num_patches=0.5 * n_tokens)
    out = collate_data_and_cast(
        _samples(batch),
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        n_tokens=n_tokens,
        mask_generator=gen,
        generator=torch.Generator().manual_seed(0),
    )
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (2 * batch, 3, GLOBAL, GLOBAL) and loc.shape == (3 * batch, 3, 6, 6)
    for c in range(2):  # crop-major: all samples' crop 0, then all samples' crop 1
        for b in range(batch):
            assert g[c * batch + b, 0, 0, 0] == 100 * b + c
    for c in range(3):
        for b in range(batch):
            assert loc[c * batch + b, 0, 0, 0] == 100 * b + 50 + c
    assert torch.equal(out["labels"], torch.arange(batch) % 3)

    masks = out["collated_masks"]
    assert masks.shape == (2 * batch, n_tokens) and masks.dtype == torch.bool
    per_crop = masks.sum(1)
    n_masked = int(2 * batch * 0.5)
    assert int((per_crop > 0).sum()) == n_masked  # exactly mask_probability of the globals
    # the masked crops' counts spread over the ratio range: the i-th smallest lies in slot i
    probs = torch.linspace(0.1, 0.5, n_masked + 1)
    counts = sorted(per_crop[per_crop > 0].tolist())
    for count in counts:
        assert count <= int(n_tokens * probs[-1])
        assert count >= 0.8 * int(n_tokens * probs[0])
    assert sum(counts) >= 0.9 * sum(int(n_tokens * p) for p in (probs[:-1] + probs[1:]) / 2)
    # the masked crops are shuffled among all 2B, not simply the first n
    assert not bool((per_crop[:n_masked] > 0).all())

    indices = out["mask_indices_list"]
    assert torch.equal(indices, masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].shape == (1,) and int(out["n_masked_patches"]) == len(indices)
    assert out["upperbound"] == mask_upperbound(2 * batch, n_tokens) >= len(indices)
    weights = out["masks_weight"]
    assert weights.shape == indices.shape and weights.dtype == torch.float32
    per_image = torch.zeros(2 * batch).index_add_(0, indices // n_tokens, weights)
    torch.testing.assert_close(per_image[per_crop > 0], torch.ones(n_masked))
    torch.testing.assert_close(weights, 1.0 / per_crop[indices // n_tokens].float())


def test_collate_options():
    gen = MaskingGenerator(4)
    kwargs = dict(n_tokens=16, mask_generator=gen)
    none = collate_data_and_cast(_samples(4), mask_probability=0.0, **kwargs)
    assert not none["collated_masks"].any() and none["upperbound"] == 0
    assert none["mask_indices_list"].numel() == 0 and int(none["n_masked_patches"]) == 0
    every = collate_data_and_cast(_samples(4), mask_probability=1.0, **kwargs)
    assert (every["collated_masks"].sum(1) > 0).all()
    half = collate_data_and_cast(_samples(4, n_local=0), dtype=torch.bfloat16, **kwargs)
    assert half["collated_global_crops"].dtype == torch.bfloat16
    assert half["collated_local_crops"].shape[0] == 0
    # DINOv2's (crops, target) pairs
    pairs = [(s, s.pop("label")) for s in _samples(4)]
    assert torch.equal(collate_data_and_cast(pairs, **kwargs)["labels"], torch.tensor([0, 1, 2, 0]))
    assert "labels" not in collate_data_and_cast(_samples(4, with_label=False), **kwargs)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(_samples(2), n_tokens=15, mask_generator=gen)
    with pytest.raises(ValueError, match="mask_ratio_tuple"):
        collate_data_and_cast(_samples(2), mask_ratio_tuple=(0.6, 0.5), **kwargs)
    with pytest.raises(ValueError, match="empty"):
        collate_data_and_cast([], **kwargs)


def test_multicrop_collate_seeded_by_items():
    collate = MultiCropCollate(
        MaskingGenerator(14, max_num_patches=98), mask_ratio_tuple=(0.1, 0.5), n_tokens=196
    )
    collate = pickle.loads(pickle.dumps(collate))  # DataLoader workers get a pickled copy
    samples = _samples(8, side=4)
    a, b = collate(samples), collate(samples)
    torch.manual_seed(123)
    c = collate(samples)
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert torch.equal(a["collated_masks"], c["collated_masks"])
    for s in samples:
        s["seed"] += 1
    assert not torch.equal(a["collated_masks"], collate(samples)["collated_masks"])
    with pytest.raises(ValueError, match="seed"):
        collate([{k: v for k, v in s.items() if k != "seed"} for s in samples])
    with pytest.raises(ValueError, match="n_tokens"):
        MultiCropCollate(MaskingGenerator(14), n_tokens=256)


# ---------------------------------------------------------------------------- SSL dataset


def test_ssl_dataset_is_a_function_of_seed_epoch_index():
    base = SyntheticDataset(10, 24, num_classes=7, seed=1)
    ds = SSLDataset(base, _small_augmentation(), seed=0)
    torch.manual_seed(99)
    random.seed(99)
    expected_torch, expected_python = torch.rand(3), random.random()
    torch.manual_seed(99)
    random.seed(99)
    a = ds[(2, 5)]
    assert torch.equal(torch.rand(3), expected_torch)  # callers' RNG streams are untouched
    assert random.random() == expected_python
    b = ds[(2, 5)]
    assert set(a) == {"global_crops", "local_crops", "label", "seed", "unreadable"}
    assert a["label"] == base[5][1] and a["seed"] == ds.item_seed(2, 5) and a["unreadable"] == {}
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    other_epoch, other_seed = ds[(3, 5)], SSLDataset(base, ds.transform, seed=1)[(2, 5)]
    for other in (other_epoch, other_seed):
        assert not torch.equal(a["global_crops"][0], other["global_crops"][0])
    # the two global crops and the local crops are different views
    assert not torch.equal(a["local_crops"][0], a["local_crops"][1])
    # a plain index uses set_epoch's epoch
    ds.set_epoch(2)
    assert torch.equal(ds[5]["global_crops"][1], a["global_crops"][1])


def _loader(num_workers: int, start: int = 0):
    ds = SSLDataset(SyntheticDataset(40, 24, seed=3), _small_augmentation(), seed=7)
    side = GLOBAL // PATCH
    return make_data_loader(
        ds,
        batch_size=6,
        num_workers=num_workers,
        pin_memory=True,  # ignored without CUDA
        sampler=InfiniteShardedSampler(len(ds), seed=7, start=start),
        collate_fn=MultiCropCollate(MaskingGenerator(side, max_num_patches=8)),
    )


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_loader_same_batches_with_workers_and_after_resume():
    serial = list(islice(_loader(0), 9))  # crosses an epoch boundary (40 samples, 54 drawn)
    parallel = list(islice(_loader(2), 9))
    for a, b in zip(serial, parallel):
        _assert_same_batch(a, b)
    resumed = list(islice(_loader(0, start=6 * 7), 2))  # resume at step 7
    for a, b in zip(serial[7:], resumed):
        _assert_same_batch(a, b)
    assert not torch.equal(serial[0]["collated_masks"], serial[1]["collated_masks"])
    assert serial[0]["collated_global_crops"].shape == (12, 3, GLOBAL, GLOBAL)
    assert serial[0]["collated_local_crops"].shape == (12, 3, LOCAL, LOCAL)


def test_make_data_loader_errors():
    ds = SyntheticDataset(4, 8)
    with pytest.raises(ValueError, match="num_workers > 0"):
        make_data_loader(
            ds,
            batch_size=2,
            num_workers=0,
            pin_memory=False,
            sampler=None,
            collate_fn=None,
            prefetch_factor=2,
        )
    loader = make_data_loader(
        ds,
        batch_size=3,
        num_workers=0,
        pin_memory=False,
        sampler=None,
        collate_fn=None,
        drop_last=False,
    )
    assert [len(b[1]) for b in loader] == [3, 1]


# ---------------------------------------------------------------------------- sampler


def test_sampler_shards_are_disjoint_and_cover_each_epoch():
    length, world = 10, 3
    streams = [
        list(islice(InfiniteShardedSampler(length, seed=4, rank=r, world_size=world), 10))
        for r in range(world)
    ]  # 30 global positions: 3 epochs
    for epoch in range(3):
        shards = [[i for e, i in s if e == epoch] for s in streams]
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == list(range(length))  # covering and disjoint
    # rank r's k-th sample is global position k * world + r of the concatenated permutations
    sampler = InfiniteShardedSampler(length, seed=4, rank=1, world_size=world)
    stream = torch.cat([sampler.permutation(e) for e in range(3)]).tolist()
    assert [i for _, i in streams[1]] == stream[1::world][:10]
    assert [e for e, _ in streams[1]] == [sampler.epoch_at(k) for k in range(10)]
    # each epoch is a new permutation
    assert not torch.equal(sampler.permutation(0), sampler.permutation(1))


def test_sampler_deterministic_and_resumable():
    def take(n, length=7, **kwargs):
        return list(islice(InfiniteShardedSampler(length, **kwargs), n))

    assert take(30, seed=1) == take(30, seed=1)
    assert take(30, seed=1) != take(30, seed=2)
    for start in (0, 1, 6, 7, 13, 29):
        assert take(12, seed=1, start=start) == take(start + 12, seed=1)[start:]
        sharded = take(start + 12, seed=1, rank=2, world_size=4)
        assert take(12, seed=1, rank=2, world_size=4, start=start) == sharded[start:]
    # more ranks than samples still works, and plain indices on request
    tiny = take(6, length=2, seed=0, rank=2, world_size=3, with_epoch=False)
    assert all(isinstance(i, int) and 0 <= i < 2 for i in tiny)
    with pytest.raises(ValueError, match="rank"):
        InfiniteShardedSampler(7, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start"):
        InfiniteShardedSampler(7, seed=0, start=-1)


# ---------------------------------------------------------------------------- ImageFolder


def _write(path, mode="RGB", size=(12, 10), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    _noise_image(mode, size, seed).save(path)


def test_image_folder_labels(tmp_path):
    _write(tmp_path / "zebra" / "a.png")
    _write(tmp_path / "cat" / "nested" / "deep" / "b.PNG", mode="L")
    _write(tmp_path / "cat" / "c.jpg")
    _write(tmp_path / "loose.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    folder = ImageFolder(tmp_path)
    assert folder.classes == ["cat", "zebra"]
    labels = {p.split("/")[-1]: label for p, label in folder.samples}
    assert labels == {"b.PNG": 0, "c.jpg": 0, "a.png": 1, "loose.png": -1}
    assert folder.targets == [label for _, label in folder.samples] and len(folder) == 4
    image, label = folder[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == folder.targets[0]
    flat = tmp_path / "cat" / "nested"
    unlabelled = ImageFolder(flat / "deep", transform=lambda im: im.size)
    assert unlabelled.classes == [] and unlabelled[0] == ((12, 10), -1)
    assert ImageFolder(flat).targets == [0]  # one class: "deep"


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"\.jpeg"):
        ImageFolder(tmp_path / "empty")


def test_image_folder_reports_and_skips_unreadable_files(tmp_path):
    _write(tmp_path / "a" / "0.png", seed=0)
    (tmp_path / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    _write(tmp_path / "a" / "2.png", seed=2)
    truncated = tmp_path / "b" / "3.png"
    _write(truncated, size=(64, 64), seed=3)
    truncated.write_bytes(truncated.read_bytes()[:200])
    folder = ImageFolder(tmp_path)
    with pytest.warns(UnreadableImageWarning, match="1.jpg"):
        image, label = folder[1]
    assert np.array_equal(np.asarray(image), np.asarray(folder[2][0]))  # the next readable item
    assert label == 0 and list(folder.unreadable) == [str(tmp_path / "a" / "1.jpg")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per file
        folder[1]
    with pytest.warns(UnreadableImageWarning, match="3.png"):
        image, label = folder[3]  # wraps around to the first
    assert label == 0 and folder.unreadable_count == 2
    assert all("Error" in message for message in folder.unreadable.values())

    # SSLDataset passes the new records on with the item (and so into the batch)
    fresh = SSLDataset(ImageFolder(tmp_path), _small_augmentation(), seed=0)
    with pytest.warns(UnreadableImageWarning):
        item = fresh[(0, 1)]
    assert list(item["unreadable"]) == [str(tmp_path / "a" / "1.jpg")]
    assert fresh[(0, 1)]["unreadable"] == {}

    with pytest.warns(UnreadableImageWarning):
        verified = ImageFolder(tmp_path, verify=True)
    assert len(verified) == 2 and verified.unreadable_count == 2
    (tmp_path / "a" / "0.png").write_bytes(b"junk")
    (tmp_path / "a" / "2.png").write_bytes(b"junk")
    with pytest.warns(UnreadableImageWarning), pytest.raises(RuntimeError, match="none"):
        ImageFolder(tmp_path)[0]


# ---------------------------------------------------------------------------- digits, synthetic


def test_digits_bundled_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("DigitsDataset tried to use the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    train, test, every = (DigitsDataset(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (1438, 359, 1797)
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(train.indices + test.indices) == list(range(1797))
    assert sorted(set(train.targets)) == sorted(set(test.targets)) == list(range(10))
    assert all(30 <= n <= 40 for n in np.bincount(test.targets))  # stratified, ~20% per class
    assert DigitsDataset("test").indices == test.indices  # fixed split
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert label == train.targets[0] and 0 <= label <= 9
    pixels = np.asarray(image)
    assert pixels.max() > 200 and pixels.min() < 30 and len(np.unique(pixels)) > 20  # smooth
    big = DigitsDataset("all", image_size=64, transform=lambda im: np.asarray(im).shape)
    assert big[5] == ((64, 64, 3), every.targets[5])
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("val")


def test_synthetic_dataset():
    ds = SyntheticDataset(50, (24, 20), num_classes=5, seed=2)
    image, label = ds[7]
    assert image.shape == (3, 24, 20) and image.dtype == torch.uint8 and 0 <= label < 5
    assert torch.equal(ds[7][0], image) and not torch.equal(ds[8][0], image)
    assert not torch.equal(SyntheticDataset(50, (24, 20), seed=3)[7][0], image)
    with pytest.raises(IndexError):
        ds[50]
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)


# ---------------------------------------------------------------------------- k-NN


def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_knn_hand_made():
    # class 0 near 0 degrees, class 1 near 60 degrees; features need not be normalised
    train = _unit([0, 5, 60, 65, 70]) * torch.tensor(
        [[1.0], [2.0], [3.0], [1.0], [0.5]], dtype=torch.float64
    )
    train_labels = torch.tensor([0, 0, 1, 1, 1])
    test = _unit([2, 63, 36, 20]).float()
    # 36 deg: k=3 neighbours are 60 (cos 24 deg), 65, 5 -> majority class 1, weighted: class 1 too
    # 20 deg: neighbours 5 (cos 15), 0 (cos 20), 60 (cos 40): class 0
    test_labels = torch.tensor([0, 1, 1, 1])
    assert knn_accuracy(train.float(), train_labels, test, test_labels, k=3) == 75.0
    # the weighting: one very close class-0 neighbour outvotes two farther class-1 ones
    train2 = _unit([0, 80, 85]).float()
    labels2 = torch.tensor([0, 1, 1])
    query = _unit([10]).float()
    assert knn_accuracy(train2, labels2, query, torch.tensor([0]), k=3, temperature=0.07) == 100.0
    # at a high temperature the weights flatten and the majority wins
    assert knn_accuracy(train2, labels2, query, torch.tensor([1]), k=3, temperature=100.0) == 100.0


def _knn_reference(train, train_labels, test, test_labels, k, temperature, num_classes):
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    correct = 0
    for x, y in zip(test, test_labels.tolist()):
        sims = (train @ x).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_labels[j])] += math.exp(sims[j] / temperature)
        correct += int(max(range(num_classes), key=lambda c: (votes[c], -c)) == y)
    return 100.0 * correct / len(test)


def test_knn_matches_float64_reference():
    g = torch.Generator().manual_seed(11)
    centers = torch.randn(5, 16, generator=g)
    train_labels = torch.randint(0, 5, (257,), generator=g)
    test_labels = torch.randint(0, 5, (77,), generator=g)
    train = centers[train_labels] + 1.5 * torch.randn(257, 16, generator=g)
    test = centers[test_labels] + 1.5 * torch.randn(77, 16, generator=g)
    for k, temperature in ((1, 0.07), (10, 0.1), (37, 0.5)):
        got = knn_accuracy(
            train, train_labels, test, test_labels, k=k, temperature=temperature, chunk_size=13
        )
        want = _knn_reference(train, train_labels, test, test_labels, k, temperature, 5)
        assert got == pytest.approx(want)
        assert 20.0 < got < 100.0  # a non-trivial case
    with pytest.warns(UserWarning, match="k=300"):
        clamped = knn_accuracy(train, train_labels, test, test_labels, k=300, num_classes=6)
    assert clamped == pytest.approx(
        _knn_reference(train, train_labels, test, test_labels, 257, 0.07, 6)
    )


def test_knn_errors():
    f, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 2, 2])
    knn = functools.partial(knn_accuracy, k=3)
    with pytest.raises(ValueError, match="width"):
        knn(f, y, torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match="train_labels"):
        knn(f, y[:5], f, y)
    with pytest.raises(ValueError, match="k"):
        knn(f, y, f, y, k=0)
    with pytest.raises(ValueError, match=">= 0"):
        knn(f, y - 1, f, y)
    with pytest.raises(TypeError, match="integer"):
        knn(f, y.float(), f, y)
    with pytest.raises(ValueError, match="num_classes"):
        knn(f, y, f, y, num_classes=2)


def test_extract_features():
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.Dropout(0.5)
    )
    model.train()
    images = torch.randn(10, 3, 4, 4)
    labels = torch.arange(10) % 4
    loader = [(images[:4], labels[:4]), {"images": images[4:], "labels": labels[4:].tolist()}]
    features, got_labels = extract_features(model, loader, device="cpu")
    assert model.training  # restored
    assert features.shape == (10, 8) and features.dtype == torch.float32
    assert not features.requires_grad and torch.equal(got_labels, labels)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))
    model.eval()
    expected = torch.nn.functional.normalize(model(images), dim=1).detach()
    torch.testing.assert_close(features, expected)  # eval mode: no dropout
    low, _ = extract_features(model, loader, device="cpu", dtype=torch.bfloat16)
    torch.testing.assert_close(low, expected, atol=3e-2, rtol=0)
    with pytest.raises(ValueError, match="no"):
        extract_features(model, [], device="cpu")
