"""Unit tests of the detector's parts, with hand-computed expectations."""
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from autofpn.config import load_config
from autofpn.models.backbone import Backbone, BackboneWeightsError
from autofpn.models.detector import build_detector, parameter_breakdown
from autofpn.models.rpn import AnchorGenerator
from autofpn.models.transform import ImageTransform
from autofpn.ops.boxes import BoxCoder
from autofpn.ops.matcher import BalancedPositiveNegativeSampler, Matcher
from autofpn.ops.roi_align import MultiLevelRoIAlign

SHARED = Path(__file__).resolve().parents[2] / "shared"
MOBILENET_FILE = SHARED / "weights" / "mobilenet_v2-b0353104.pth"


def tiny_cfg(*extra):
    return load_config(None, [
        "model.num_classes=4", "model.backbone.name=resnet18", "model.backbone.weights=none",
        "model.neck.channels=32", "model.head.mlp_dim=64", "model.transform.min_size=[96]",
        "model.transform.test_min_size=96", "model.transform.max_size=160",
        "model.rpn.batch_size_per_image=64", "model.roi.batch_size_per_image=32",
        "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=100", *extra])


# ---- anchors -------------------------------------------------------------------------------

def test_cell_anchors_hand_computed():
    gen = AnchorGenerator([32], [0.5, 1.0, 2.0])
    # ratio 0.5: w = 32*sqrt(2) = 45.25, h = 32/sqrt(2) = 22.63 -> half sizes 22.6, 11.3 -> rounded
    expected = torch.tensor([[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]])
    assert torch.equal(gen.cell_anchors(32), expected)


def test_grid_anchors_order_and_stride():
    gen = AnchorGenerator([32, 64], [0.5, 1.0, 2.0])
    level0, level1 = gen((16, 24), [(2, 3), (1, 2)], torch.float32, torch.device("cpu"))
    assert level0.shape == (2 * 3 * 3, 4) and level1.shape == (1 * 2 * 3, 4)
    # stride = 16 // 2 = 8 vertically, 24 // 3 = 8 horizontally; index = (y * W + x) * A + a
    assert torch.equal(level0[(1 * 3 + 2) * 3 + 1], torch.tensor([16.0 - 16, 8.0 - 16, 16.0 + 16, 8.0 + 16]))
    assert torch.equal(level1[1 * 3 + 1], torch.tensor([12.0 - 32, -32.0, 12.0 + 32, 32.0]))


# ---- box coding ------------------------------------------------------------------------------

def test_box_coder_hand_values_and_round_trip():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 5.0, 25.0, 15.0]])
    # centres (5,5) -> (15,10), sizes (10,10) -> (20,10)
    expected = torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]])
    torch.testing.assert_close(coder.encode(gt, ref), expected)
    torch.testing.assert_close(coder.decode(expected, ref)[:, 0], gt)

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    ref = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    xy = torch.rand(50, 2, generator=g) * 100
    gt = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.decode(coder.encode(gt, ref), ref)[:, 0], gt, atol=1e-4, rtol=1e-5)


def test_box_coder_clamps_growth():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert out[0, 0, 2] - out[0, 0, 0] == pytest.approx(1000.0, rel=1e-4)


# ---- matcher and sampler -----------------------------------------------------------------------

def test_matcher_thresholds():
    iou = torch.tensor([[0.9, 0.4, 0.2, 0.25], [0.1, 0.6, 0.25, 0.2]])
    matches = Matcher(0.7, 0.3)(iou)
    assert matches.tolist() == [0, Matcher.BETWEEN_THRESHOLDS, Matcher.BELOW_LOW_THRESHOLD,
                                Matcher.BELOW_LOW_THRESHOLD]


def test_matcher_low_quality_matches_include_ties():
    iou = torch.tensor([[0.9, 0.0, 0.0, 0.0], [0.0, 0.1, 0.2, 0.2]])
    # gt 1 never reaches 0.7; its best predictions (2 and 3, tied at 0.2) are matched to it
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, -1, 1, 1]
    assert Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou).tolist() == [0, -1, -1, -1]
    # a prediction between thresholds that is some gt's best becomes a match
    iou = torch.tensor([[0.5, 0.5, 0.1]])
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 0, -1]


@pytest.mark.parametrize("num_pos,num_neg,expect_pos,expect_neg", [
    (10, 100, 8, 24),  # enough of both: 25% of 32 positive
    (2, 100, 2, 30),  # few positives: negatives fill the batch
    (20, 5, 8, 5),  # few negatives: the batch stays short
])
def test_sampler_counts(num_pos, num_neg, expect_pos, expect_neg):
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(7)])
    labels = labels[torch.randperm(labels.numel())]
    pos, neg = BalancedPositiveNegativeSampler(32, 0.25)([labels])
    assert int(pos[0].sum()) == expect_pos and int(neg[0].sum()) == expect_neg
    assert bool((labels[pos[0]] == 1).all()) and bool((labels[neg[0]] == 0).all())


# ---- RoI level assignment ---------------------------------------------------------------------

def test_level_assignment_from_box_scale():
    pooler = MultiLevelRoIAlign(["p2", "p3", "p4", "p5"], {"p2": 4, "p3": 8, "p4": 16, "p5": 32})
    sides = torch.tensor([224.0, 223.0, 112.0, 111.0, 448.0, 10.0, 2000.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], 1)
    # level = floor(4 + log2(side / 224)), clamped to 2..5, as an index from p2
    assert pooler.assign_levels(boxes).tolist() == [2, 1, 1, 0, 3, 0, 3]


def test_adaptive_pooling_takes_the_max_over_levels():
    strides = {"p2": 4, "p3": 8}
    feats = {"p2": torch.rand(1, 2, 16, 16), "p3": torch.rand(1, 2, 8, 8)}
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 36.0]])]
    adaptive = MultiLevelRoIAlign(["p2", "p3"], strides, output_size=3, adaptive=True)(feats, boxes)
    per_level = [MultiLevelRoIAlign([n], strides, output_size=3)(feats, boxes) for n in ("p2", "p3")]
    assert torch.equal(adaptive, torch.maximum(*per_level))


# ---- transform ----------------------------------------------------------------------------------

def test_transform_resizes_pads_and_maps_back():
    t = ImageTransform([100], 150, 100, [0.0] * 3, [1.0] * 3, size_divisible=32).eval()
    images = [torch.rand(3, 50, 60), torch.rand(3, 40, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0]])}, {"boxes": torch.zeros(0, 4)}]
    batch, sizes, out_targets = t(images, targets)
    # first: short side 50 -> 100 (scale 2); second: long side 120 -> 150 caps it (scale 1.25)
    assert sizes == [(100, 120), (50, 150)]
    assert batch.shape == (2, 3, 128, 160)
    assert torch.equal(out_targets[0]["boxes"], torch.tensor([[20.0, 20.0, 60.0, 40.0]]))
    assert torch.equal(targets[0]["boxes"], torch.tensor([[10.0, 10.0, 30.0, 20.0]])), "inputs untouched"
    dets = t.postprocess([{"boxes": out_targets[0]["boxes"].clone()}], sizes[:1], [(50, 60)])
    torch.testing.assert_close(dets[0]["boxes"], targets[0]["boxes"])


# ---- whole detector -----------------------------------------------------------------------------

def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 112, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [50.0, 5.0, 90.0, 40.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


@pytest.mark.parametrize("neck", ["fpn", "panet"])
def test_train_losses_finite_with_an_empty_image(neck):
    torch.manual_seed(0)
    model = build_detector(tiny_cfg(f"model.neck.type={neck}")).train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.neck.lateral["c5"].weight.grad.abs().sum() > 0


def test_all_empty_targets_give_zero_box_losses():
    torch.manual_seed(0)
    model = build_detector(tiny_cfg()).train()
    images, targets = _batch()
    losses = model(images, [targets[1], targets[1]])
    assert losses["loss_rpn_box"].item() == 0.0 and losses["loss_box"].item() == 0.0
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_cls"].item() > 0


def test_eval_output_contract_and_breakdown():
    model = build_detector(tiny_cfg("model.roi.score_thresh=0.0")).eval()
    images, _ = _batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, image in zip(out, images):
        assert det["boxes"].shape[1] == 4 and det["labels"].dtype == torch.int64
        assert det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0] > 0
        assert float(det["boxes"][:, 2].max()) <= image.shape[-1] and float(det["boxes"][:, 3].max()) <= image.shape[-2]
    parts = parameter_breakdown(model)
    assert parts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_conv_head_builds_trains_and_counts(norm):
    """model.head.type=conv (Xconv1fc): convs x 3x3 then one fc; params by hand, the RoI features'
    gradient reaches its first convolution, and its FLOPs land in the head part."""
    from autofpn.models.detector import count_flops
    from autofpn.models.heads import ConvFCHead
    torch.manual_seed(0)
    convs, width, fc = 2, 8, 64
    model = build_detector(tiny_cfg("model.head.type=conv", f"model.head.convs={convs}",
                                    f"model.head.channels={width}", f"model.head.norm={norm}")).train()
    head = model.roi_heads.box_head
    assert isinstance(head, ConvFCHead) and head.out_channels == fc
    conv_params = (32 * width * 9 + width * width * 9) + (2 * 2 * width if norm == "bn" else 2 * width)
    assert sum(p.numel() for p in head.parameters()) == conv_params + width * 7 * 7 * fc + fc
    assert head(torch.randn(5, 32, 7, 7)).shape == (5, fc)
    images, targets = _batch()
    sum(model(images, targets).values()).backward()
    assert head[0][0].weight.grad.abs().sum() > 0
    flops = count_flops(model, 96, 96)
    mlp_flops = count_flops(build_detector(tiny_cfg()), 96, 96)
    assert flops["head"] > 0 and flops["head"] != mlp_flops["head"] and flops["neck"] == mlp_flops["neck"]


# ---- backbones -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_backbone_declared_channels_and_strides(name):
    backbone = Backbone(name, "none", frozen_stages=1)
    feats = backbone(torch.rand(1, 3, 64, 96))
    for key, feat in feats.items():
        assert feat.shape[1] == backbone.out_channels[key]
        assert (64 // feat.shape[2], 96 // feat.shape[3]) == (backbone.strides[key],) * 2
    frozen = [all(not p.requires_grad for p in stage.parameters()) for stage in backbone.stages()]
    assert frozen == [True, True, False, False, False]


def test_backbone_weights_errors_name_file_and_keys(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneWeightsError, match=str(missing)):
        Backbone("resnet18", str(missing))
    bad = tmp_path / "bad.pth"
    state = torchvision_resnet18_state()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    del state["layer4.1.bn2.bias"]
    torch.save(state, bad)
    with pytest.raises(BackboneWeightsError) as err:
        Backbone("resnet18", str(bad))
    assert str(bad) in str(err.value) and "layer4.1.bn2.bias" in str(err.value)
    assert "layer1.0.conv1.weight" in str(err.value)


def torchvision_resnet18_state():
    import torchvision
    return torchvision.models.resnet18(weights=None).state_dict()


def test_backbone_loads_a_local_file(tmp_path):
    state = torchvision_resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    backbone = Backbone("resnet18", str(path))
    assert torch.equal(backbone.body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])


@pytest.mark.skipif(not MOBILENET_FILE.exists(), reason="shared MobileNetV2 weights not present")
def test_imagenet_weights_load_from_torch_home_without_network(tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(MOBILENET_FILE, checkpoints / MOBILENET_FILE.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    backbone = Backbone("mobilenet_v2", "imagenet")
    state = torch.load(MOBILENET_FILE, map_location="cpu", weights_only=True)
    assert torch.equal(backbone.body[4].conv[0][0].weight, state["features.4.conv.0.0.weight"])


def test_imagenet_weights_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(BackboneWeightsError, match=os.path.join("hub", "checkpoints", "resnet18-")):
        Backbone("resnet18", "imagenet")
