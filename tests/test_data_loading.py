"""The embedded synthetic dataset, samplers and loaders."""
import json
import os

import numpy as np
import pytest
from torch.utils.data import DistributedSampler, Subset

from autofpn.config import load_config
from autofpn.data import (GroupedBatchSampler, InferenceSampler, SHAPE_CLASSES, build_dataset,
                          build_loader, ensure_synthetic)
from autofpn.data.synthetic import MAX_SIZE_FRACTION


@pytest.fixture(scope="module")
def synth_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "shapes"
    return load_config(None, [f"data.synthetic.root={root}", "data.synthetic.num_train=24",
                              "data.synthetic.num_val=6", "data.synthetic.image_size=128",
                              "data.num_workers=0", "data.images_per_batch=2"])


def test_synthetic_is_deterministic_and_cached(tmp_path):
    params = {"root": str(tmp_path / "a"), "num_train": 5, "num_val": 2, "image_size": 96,
              "seed": 3}
    paths_a = ensure_synthetic(params)
    paths_b = ensure_synthetic(dict(params, root=str(tmp_path / "b")))
    for key in ("train_ann", "val_ann"):
        assert json.load(open(paths_a[key])) == json.load(open(paths_b[key]))
    for name in ("train/000001.jpg", "val/000002.jpg"):
        with open(os.path.join(paths_a["root"], name), "rb") as fa, \
                open(os.path.join(paths_b["root"], name), "rb") as fb:
            assert fa.read() == fb.read()
    # same parameters: nothing rewritten
    stamp = os.path.getmtime(paths_a["train_ann"])
    ensure_synthetic(params)
    assert os.path.getmtime(paths_a["train_ann"]) == stamp
    # different parameters: regenerated, manifest updated
    ensure_synthetic(dict(params, num_train=3, seed=4))
    data = json.load(open(paths_a["train_ann"]))
    assert len(data["images"]) == 3
    assert json.load(open(paths_a["manifest"]))["seed"] == 4
    assert not any(p.name.startswith("a.tmp") for p in tmp_path.iterdir())


def test_synthetic_content(synth_cfg):
    ds = build_dataset(synth_cfg, "train")
    assert ds.class_names == ["__background__"] + list(SHAPE_CLASSES) and len(SHAPE_CLASSES) >= 10
    raw = json.load(open(os.path.join(synth_cfg["data"]["synthetic"]["root"],
                                      "annotations", "train.json")))
    boxes = np.array([a["bbox"] for a in raw["annotations"]])
    sides = np.maximum(boxes[:, 2], boxes[:, 3])
    assert len(raw["annotations"]) >= 3 * 24  # several objects per image
    assert sides.min() < 16 and sides.max() > 0.35 * 128  # small and large objects
    assert sides.max() <= MAX_SIZE_FRACTION * 128 * 1.25 + 2  # rotated shapes stay bounded
    assert len({a["category_id"] for a in raw["annotations"]}) == 10
    shapes = {(i["height"], i["width"]) for i in raw["images"]}
    assert len(shapes) >= 2  # square, landscape, portrait images
    image, target = ds[0]
    h, w = image.shape[1:]
    assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()


def _epoch(loader, epoch, start=0):
    loader.batch_sampler.set_epoch(epoch)
    loader.batch_sampler.set_start_iter(start)
    return [[(t["image_id"], t["boxes"].sum().item()) for t in targets]
            for _, targets in loader]


def test_train_loader_deterministic_resumable_grouped(synth_cfg):
    ds = build_dataset(synth_cfg, "train")
    loader = build_loader(synth_cfg, ds, train=True, seed=5)
    assert len(loader) == 12
    epoch0 = _epoch(loader, 0)
    assert len(epoch0) == 12 and sorted(i for b in epoch0 for i, _ in b) == sorted(ds.image_ids)
    assert _epoch(build_loader(synth_cfg, ds, train=True, seed=5), 0) == epoch0
    assert _epoch(loader, 1) != epoch0  # new order / flips next epoch
    assert _epoch(loader, 0, start=7) == epoch0[7:]  # resume mid-epoch
    assert len(_epoch(loader, 0)) == 12  # the skip was one-shot
    # the same with two worker processes (flips drawn from (seed, epoch, index))
    workers_cfg = dict(synth_cfg, data=dict(synth_cfg["data"], num_workers=2))
    assert _epoch(build_loader(workers_cfg, ds, train=True, seed=5), 0) == epoch0
    # aspect-ratio grouping: every full batch but the leftovers holds one orientation
    ratios = dict(zip(ds.image_ids, ds.aspect_ratios()))
    mixed = [b for b in epoch0 if len({ratios[i] >= 1 for i, _ in b}) > 1]
    assert len(mixed) <= 1


def test_flip_probability_and_boxes(synth_cfg):
    ds = build_dataset(synth_cfg, "train")
    flipped = 0
    for i in range(len(ds)):
        plain = ds.records[i]["boxes"][~ds.records[i]["iscrowd"]]
        _, target = ds[(i, 1000 + i)]
        boxes = target["boxes"].numpy()
        if not np.allclose(boxes, plain):
            flipped += 1
            w = ds.records[i]["width"]
            np.testing.assert_allclose(boxes[:, [2, 0]], w - plain[:, [0, 2]])
    assert 4 <= flipped <= 20  # about half of 24


def test_distributed_shards_cover_the_data(synth_cfg):
    ds = build_dataset(synth_cfg, "train")
    seen = []
    for rank in range(2):
        loader = build_loader(synth_cfg, ds, train=True, seed=1, distributed=True, rank=rank,
                              world_size=2)
        loader.batch_sampler.set_epoch(0)
        assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
        seen.append([i for batch in loader.batch_sampler for i, _ in batch])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 12
    val = build_dataset(synth_cfg, "val")
    shards = [list(InferenceSampler(len(val), r, 4)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(len(val)))


def test_subset_loader_and_eval_loader(synth_cfg):
    ds = build_dataset(synth_cfg, "train")
    half = Subset(ds, list(range(0, len(ds), 2)))
    loader = build_loader(synth_cfg, half, train=True, seed=0)
    loader.batch_sampler.set_epoch(0)
    ids = sorted(t["image_id"] for _, targets in loader for t in targets)
    assert ids == sorted(ds.image_ids[0::2])
    val = build_dataset(synth_cfg, "val")
    images, targets = next(iter(build_loader(synth_cfg, val, train=False)))
    assert isinstance(images, list) and images[0].shape[0] == 3
    assert targets[0]["image_id"] == val.image_ids[0]


def test_grouped_batch_sampler_counts():
    sampler = list(range(11))
    groups = [0, 1] * 6
    batches = list(GroupedBatchSampler(sampler, groups, 3))
    assert len(batches) == len(GroupedBatchSampler(sampler, groups, 3)) == 4
    assert sorted(i for b in batches for i, _ in b) == sampler
    assert all(len({groups[i] for i, _ in b}) == 1 for b in batches[:3])
    with pytest.raises(ValueError):
        GroupedBatchSampler(sampler, groups, 0)


def test_parallel_generation_is_identical(tmp_path):
    from autofpn.data.synthetic import generate_split
    single = generate_split(str(tmp_path / "one"), "val", 32, 48, seed=7, processes=1)
    parallel = generate_split(str(tmp_path / "two"), "val", 32, 48, seed=7, processes=2)
    assert single == parallel
    for i in (1, 17, 32):
        name = f"val/{i:06d}.jpg"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
