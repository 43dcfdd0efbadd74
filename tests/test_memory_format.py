"""model.memory_format: the detector computes the same numbers in NCHW and channels-last, and
"auto" really runs a searched detector's pyramid and RoI features channels-last on the CPU
(and leaves FPN in NCHW).

In float64, so that no near-tie among the random model's proposal scores can flip between the
two layouts' roundings: what is compared is the arithmetic, not a tie-break.
"""
import copy

import pytest
import torch

from autofpn.config import ConfigError, load_config
from autofpn.models.detector import build_detector
from autofpn.models.genotype import validate_genotype
from autofpn.ops.layout import memory_format_of, resolve_memory_format
from autofpn.search.random_sample import random_genotype

TINY = ["model.num_classes=4", "model.backbone.name=resnet18", "model.backbone.weights=none",
        "model.neck.channels=16", "model.head.mlp_dim=64", "model.head.channels=8",
        "model.transform.min_size=[96]", "model.transform.test_min_size=96", "model.transform.max_size=160",
        "model.rpn.batch_size_per_image=64", "model.roi.batch_size_per_image=32",
        "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=100",
        "model.roi.score_thresh=0.0"]

# the three kinds of model a run builds: the baseline, a decoded Auto-FPN, the search's supernet
KINDS = {
    "fpn": dict(opts=["model.neck.type=fpn", "model.head.type=mlp"], genotype=None, search=False),
    "decoded": dict(opts=["model.neck.type=auto", "model.head.type=auto", "model.neck.norm=bn",
                          "model.head.norm=bn"], genotype=True, search=False),
    "supernet": dict(opts=[], genotype=None, search=True),
}


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g, dtype=torch.float64),
              torch.rand(3, 112, 96, generator=g, dtype=torch.float64)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [50.0, 5.0, 90.0, 40.0]], dtype=torch.float64),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 30.0, 80.0, 100.0]], dtype=torch.float64), "labels": torch.tensor([2])}]
    return images, targets


def _pair(kind: str):
    """The same model (same weights) built with each layout, in float64."""
    spec = KINDS[kind]
    genotype = validate_genotype(random_genotype(0, 3)) if spec["genotype"] else None
    torch.manual_seed(0)
    models = {}
    for layout in ("contiguous", "channels_last"):
        cfg = load_config(None, TINY + spec["opts"] + [f"model.memory_format={layout}"])
        models[layout] = build_detector(cfg, genotype, search=spec["search"]).double()
    models["channels_last"].load_state_dict(models["contiguous"].state_dict())
    return models


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_losses_gradients_and_detections_agree_across_layouts(kind):
    models = _pair(kind)
    images, targets = _batch()
    losses, grads = {}, {}
    for layout, model in models.items():
        model.train()
        torch.manual_seed(1)  # the RPN and RoI samplers draw the same indices
        out = model(images, copy.deepcopy(targets))
        sum(out.values()).backward()
        losses[layout] = out
        grads[layout] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name in losses["contiguous"]:
        torch.testing.assert_close(losses["channels_last"][name], losses["contiguous"][name], rtol=1e-9, atol=1e-12)
    assert grads["channels_last"].keys() == grads["contiguous"].keys()
    for name, g in grads["contiguous"].items():
        torch.testing.assert_close(grads["channels_last"][name], g, rtol=1e-7, atol=1e-10, msg=name)
    if kind == "supernet":
        assert {"arch.alpha", "arch.beta"} <= grads["contiguous"].keys()

    if kind != "supernet":  # a supernet is only ever evaluated through its decoded module
        detections = {}
        for layout, model in models.items():
            with torch.no_grad():
                detections[layout] = model.eval()(images)
        for got, want in zip(detections["channels_last"], detections["contiguous"]):
            assert got["boxes"].shape[0] > 0
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind, setting, expected", [
    ("supernet", "auto", torch.channels_last), ("decoded", "auto", torch.channels_last),
    ("fpn", "auto", torch.contiguous_format), ("fpn", "channels_last", torch.channels_last),
    ("supernet", "contiguous", torch.contiguous_format)])
def test_the_pyramid_and_the_roi_features_take_the_configured_layout_on_the_cpu(kind, setting, expected):
    spec = KINDS[kind]
    genotype = validate_genotype(random_genotype(0, 3)) if spec["genotype"] else None
    cfg = load_config(None, TINY + spec["opts"] + [f"model.memory_format={setting}"])
    model = build_detector(cfg, genotype, search=spec["search"]).train()
    seen = {}
    model.neck.register_forward_hook(lambda m, args, out: seen.update(pyramid=[memory_format_of(f) for f in out.values()]))
    model.roi_heads.box_head.register_forward_pre_hook(lambda m, args: seen.update(rois=memory_format_of(args[0])))
    images, targets = _batch()
    model.float()(([im.float() for im in images]), [{**t, "boxes": t["boxes"].float()} for t in targets])
    assert seen["pyramid"] and set(seen["pyramid"]) == {expected}
    assert seen["rois"] == expected


def test_auto_is_channels_last_on_the_cpu_for_a_searched_detector_only():
    assert resolve_memory_format("auto", torch.device("cpu"), searched=True) == torch.channels_last
    assert resolve_memory_format("auto", torch.device("cpu"), searched=False) == torch.contiguous_format
    assert resolve_memory_format("auto", torch.device("cuda"), searched=True) == torch.contiguous_format
    assert resolve_memory_format("channels_last", "cuda", searched=False) == torch.channels_last
    with torch.autocast("cpu", dtype=torch.bfloat16):  # search.amp on the CPU: see the docstring
        assert resolve_memory_format("auto", torch.device("cpu"), searched=True) == torch.contiguous_format


def test_a_tensor_contiguous_in_both_layouts_counts_as_nchw():
    assert memory_format_of(torch.zeros(2, 1, 5, 5).contiguous(memory_format=torch.channels_last)) == torch.contiguous_format
    assert memory_format_of(torch.zeros(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)) == torch.channels_last
    assert memory_format_of(torch.zeros(2, 3, 5)) == torch.contiguous_format


def test_an_unknown_layout_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="model.memory_format"):
        load_config(None, TINY + ["model.memory_format=nhwc"])
