"""``build_dataset(cfg, split)`` and ``build_loader(cfg, dataset, train)``."""
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from autofpn.config import ConfigError

from .base import DetectionDataset
from .bdd import BddDataset
from .coco import CocoDataset
from .samplers import (GroupedBatchSampler, InferenceSampler, aspect_ratio_group_ids,
                       distributed_rank_and_size)
from .synthetic import ensure_synthetic
from .voc import VocDataset, VocFolderDataset, voc_folder_class_names

DATASET_TYPES = ("coco", "voc", "bdd", "synthetic")

logger = logging.getLogger(__name__)


def build_dataset(cfg: Dict[str, Any], split: str) -> DetectionDataset:
    """The dataset described by ``cfg["data"][split]`` (split: "train" or "val").

    ``cfg["data"][split]`` = ``{"type": coco | voc | bdd | synthetic, "root", "ann_file",
    "splits", "annotations", "images"}``:

    - coco: ``root`` = image folder, ``ann_file`` = instances JSON (also any custom dataset
      converted to COCO JSON, see docs/DATA.md);
    - voc: ``root`` = one VOC root or a list, ``splits`` = split name(s) (``trainval``); or
      ``annotations`` = a folder of XML files and ``images`` = their image folder (no
      ImageSets): when train and val name the same annotations folder, each gets its part of
      the seeded split ``data.split`` (``val_fraction``, ``seed``), else each folder is used
      whole; without ``data.class_names`` the classes are read from all those folders' files;
    - bdd: ``root`` = image folder, ``ann_file`` = BDD labels JSON;
    - synthetic: generated from ``cfg["data"]["synthetic"]`` if needed, then read as COCO.

    ``data.categories`` (names) keeps only those classes, relabelled 1..len in that order, for
    every type. Training sets get the training filter and flips; "val" keeps every image and box.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_cfg = cfg["data"]
    spec = data_cfg[split]
    kind = spec.get("type")
    train = split == "train"
    common = {"train": train, "hflip_prob": float(data_cfg.get("hflip_prob", 0.5)),
              "keep_empty_images": bool(data_cfg.get("keep_empty_images", False)),
              "bad_images": data_cfg.get("bad_images", "stop"),
              "categories": data_cfg.get("categories")}

    def need(key: str):
        if spec.get(key) in (None, "", []):
            raise ConfigError(f"data.{split}.{key} must be set for a '{kind}' dataset")
        return spec[key]

    if kind == "synthetic":
        paths = ensure_synthetic(data_cfg["synthetic"])
        return CocoDataset(paths["root"], paths[f"{split}_ann"], **common)
    if kind == "coco":
        return CocoDataset(need("root"), need("ann_file"), **common)
    if kind == "voc" and (spec.get("annotations") or spec.get("images")):
        return _voc_folder_dataset(data_cfg, split, need("annotations"), need("images"), common)
    if kind == "voc":
        roots, splits = need("root"), need("splits")
        if _entries(splits) not in (1, _entries(roots)):
            raise ConfigError(f"data.{split}.splits: {_entries(splits)} splits for {_entries(roots)} "
                              f"data.{split}.root folders; give one split for all, or one per root")
        return VocDataset(roots, splits, class_names=data_cfg.get("class_names"),
                          use_difficult=bool(data_cfg.get("use_difficult", False)), **common)
    if kind == "bdd":
        return BddDataset(need("root"), need("ann_file"), class_names=data_cfg.get("class_names"),
                          **common)
    raise ConfigError(f"data.{split}.type must be one of {', '.join(DATASET_TYPES)}, "
                     f"got {kind!r}")


def _entries(value: Any) -> int:
    """How many entries a config value of one string or a list holds."""
    return 1 if isinstance(value, str) else len(value)


def _is_voc_folder(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("type") == "voc" and bool(spec.get("annotations"))


def _voc_folder_dataset(data_cfg: Dict[str, Any], split: str, annotations: str, images: str,
                        common: Dict[str, Any]) -> VocFolderDataset:
    """``data.<split>`` = ``{type: voc, annotations, images}``: the part of the seeded split when
    the other split names the same folder, else the whole folder. The class list (unless
    ``data.class_names``) is read from every folder-form split, so train and val agree."""
    spec = data_cfg[split]
    if spec.get("root") or spec.get("splits"):
        raise ConfigError(f"data.{split}: give either root + splits (a VOC root with ImageSets) or "
                         f"annotations + images (a folder of XML files), not both")
    other = data_cfg.get("val" if split == "train" else "train")
    folders = [annotations] + ([other["annotations"]] if _is_voc_folder(other) else [])
    same = len(folders) == 2 and os.path.realpath(folders[0]) == os.path.realpath(folders[1])
    split_cfg = data_cfg.get("split") or {}
    class_names = data_cfg.get("class_names") or voc_folder_class_names(folders)
    return VocFolderDataset(annotations, images, part=split if same else None,
                            val_fraction=float(split_cfg.get("val_fraction", 0.2)),
                            split_seed=int(split_cfg.get("seed", 0)), class_names=class_names,
                            use_difficult=bool(data_cfg.get("use_difficult", False)), **common)


def resolve_num_classes(cfg: Dict[str, Any], dataset: DetectionDataset) -> None:
    """Fill ``model.num_classes`` in from ``dataset`` (its classes + background) when the config
    leaves it null, and log it; a value that is set is checked (``check_num_classes``)."""
    if cfg["model"].get("num_classes") is None:
        cfg["model"]["num_classes"] = len(dataset.class_names)
        logger.info("model.num_classes = %d: the %d classes of %s + background", len(dataset.class_names),
                    len(dataset.class_names) - 1, dataset.name)
        return
    check_num_classes(cfg, dataset)


def check_num_classes(cfg: Dict[str, Any], dataset: DetectionDataset) -> None:
    """``model.num_classes`` must be the dataset's classes + background: one too few crashes at
    the first step, a leftover 81 from a COCO config trains silently wrong."""
    expected = cfg["model"]["num_classes"]
    if expected != len(dataset.class_names):
        names = dataset.class_names[1:]
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(f"'model.num_classes' = {expected} but {dataset.name} has {len(names)} classes ({shown}) "
                          f"+ background = {len(dataset.class_names)}: set model.num_classes={len(dataset.class_names)}")


def collate_detection(batch: List[Tuple[torch.Tensor, Dict]]) -> Tuple[List, List]:
    """[(image, target), ...] -> (images list, targets list); padding is the detector's job."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _base_dataset(dataset) -> DetectionDataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def build_loader(cfg: Dict[str, Any], dataset, train: bool, distributed: Optional[bool] = None,
                 seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> DataLoader:
    """A DataLoader yielding ``(images: List[Tensor[3, H, W]], targets: List[dict])``.

    Training (``train=True``): shuffled by a ``DistributedSampler`` (one replica when not
    distributed) seeded with ``seed``, aspect-ratio grouped (``data.aspect_ratio_grouping``),
    ``data.images_per_batch`` images per process. The batch sampler is a
    ``GroupedBatchSampler``: call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch
    (order and flips are a function of (seed, epoch) only) and, when resuming in the middle
    of an epoch, ``loader.batch_sampler.set_start_iter(n)`` to skip its first ``n`` batches.

    Inference (``train=False``): each rank takes a contiguous shard (no padding, no
    duplicates), in order, ``eval.images_per_batch`` images per batch.

    ``distributed=None`` means "when torch.distributed is initialized with world size > 1".
    ``rank`` / ``world_size`` override what torch.distributed reports (both or neither).
    ``dataset`` may be a ``Subset`` (e.g. the search's split halves).
    """
    if (rank is None) != (world_size is None):
        raise ValueError("build_loader: give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = distributed_rank_and_size()
    if distributed is None:
        distributed = world_size > 1
    if not distributed:
        rank, world_size = 0, 1
    data_cfg = cfg["data"]
    num_workers = int(data_cfg.get("num_workers", 0))
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=False)
        if isinstance(dataset, Subset):
            base = _base_dataset(dataset)
            ratios = base.aspect_ratios()
            subset_ratios = [ratios[i] for i in _subset_indices(dataset)]
        else:
            subset_ratios = dataset.aspect_ratios()
        group_ids = aspect_ratio_group_ids(subset_ratios,
                                           bool(data_cfg.get("aspect_ratio_grouping", True)))
        batch_sampler = GroupedBatchSampler(sampler, group_ids,
                                            int(data_cfg.get("images_per_batch", 2)), seed=seed)
    else:
        sampler = InferenceSampler(len(dataset), rank, world_size)
        batch_size = int(cfg.get("eval", {}).get("images_per_batch", 1))
        batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    if isinstance(dataset, Subset):
        dataset = _KeyedSubset(dataset)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=collate_detection, persistent_workers=False,
                      pin_memory=False)


def _subset_indices(subset: Subset) -> List[int]:
    """Indices of ``subset`` in its innermost dataset (Subsets may be nested)."""
    indices = list(range(len(subset)))
    while isinstance(subset, Subset):
        indices = [subset.indices[i] for i in indices]
        subset = subset.dataset
    return indices


class _KeyedSubset(torch.utils.data.Dataset):
    """A ``Subset`` that also accepts the ``(index, aug_seed)`` keys of the batch sampler."""

    def __init__(self, subset: Subset):
        self.base = _base_dataset(subset)
        self.indices = _subset_indices(subset)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.base[(self.indices[key[0]], key[1])]
        return self.base[self.indices[key]]
