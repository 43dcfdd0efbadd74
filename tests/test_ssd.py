"""SSD (autofpn/models/ssd.py): parity with torchvision's ``ssd300_vgg16`` when it carries its
weights (default boxes, detections in eval mode, both losses in train mode), and unit tests of the
parts written here (default boxes and hard negative mining against hand-computed values, matching,
the loss normalisation, training steps, necks over SSD's levels, the parameter / FLOP breakdown,
config errors)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.image_list import ImageList

from autofpn.config import ConfigError, load_config
from autofpn.models.detector import build_detector, count_flops, parameter_breakdown
from autofpn.models.ssd import (SSD300_EXTRA_LAYERS, DefaultBoxGenerator, VGG16Trunk, hard_negative_mask, ssd_match,
                                torchvision_ssd_state_dict_to_ours)

NUM_CLASSES = 5  # 4 classes + background
# torchvision's ssd300_vgg16 in our config (model.neck.type none: plain SSD)
SSD300_OPTS = [
    "model.detector=ssd", f"model.num_classes={NUM_CLASSES}", "model.backbone.name=vgg16",
    "model.backbone.weights=none", "model.backbone.frozen_stages=-1", "model.neck.type=none",
    "model.memory_format=contiguous", "model.transform.min_size=[300]", "model.transform.test_min_size=300",
    "model.transform.size_divisible=1", "model.transform.image_mean=[0.48235,0.45882,0.40784]",
    f"model.transform.image_std=[{1 / 255},{1 / 255},{1 / 255}]", f"model.ssd.extra_layers={SSD300_EXTRA_LAYERS}",
    "model.ssd.scales=[0.07,0.15,0.33,0.51,0.69,0.87,1.05]", "model.ssd.aspect_ratios=[[2],[2,3],[2,3],[2,3],[2],[2]]",
    "model.ssd.steps=[8,16,32,64,100,300]"]


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 220, generator=g)]


def _targets():
    return [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 110.0], [150.0, 60.0, 300.0, 230.0], [40.0, 150.0, 90.0, 200.0]]),
             "labels": torch.tensor([1, 4, 2])},
            {"boxes": torch.tensor([[10.0, 10.0, 200.0, 280.0], [120.0, 40.0, 160.0, 90.0]]),
             "labels": torch.tensor([3, 3])}]


def _spread_outputs(model):
    """A random ssd300_vgg16 scores its best boxes at ~1.0 (fc7's class logits have std ~4.4 on
    0..255 inputs), so scores would hardly be compared: each level's class logits are rescaled to
    std 1 (softmax scores spread over 0.01..0.9) and its box deltas to std 0.3."""
    head = model.head
    inputs = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: inputs.extend(o.values()))
    with torch.no_grad():
        model(_images())
        hook.remove()
        for x, cls, box in zip(inputs, head.classification_head.module_list, head.regression_head.module_list):
            for conv, std in ((cls, 1.0), (box, 0.3)):
                conv.weight.mul_(std / F.conv2d(x, conv.weight, None, padding=1).std())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    theirs.eval()
    _spread_outputs(theirs)
    ours = build_detector(load_config(None, SSD300_OPTS))
    ours.load_state_dict(torchvision_ssd_state_dict_to_ours(theirs.state_dict()), strict=True)
    ours.eval()
    return theirs, ours


def test_default_boxes_equal_torchvision_at_300(models):
    theirs, ours = models
    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]  # conv4_3 .. conv11_2 at 300 px
    with torch.no_grad():
        feats = ours.neck(ours.backbone(torch.zeros(1, 3, 300, 300)))
    assert [tuple(feats[f"p{k}"].shape[-2:]) for k in range(3, 9)] == sizes
    mine = torch.cat(ours.default_boxes((300, 300), sizes, torch.float32, torch.device("cpu")))
    expected = theirs.anchor_generator(ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)]),
                                       [torch.zeros(1, 1, h, w) for h, w in sizes])[0]
    assert mine.shape == (8732, 4)  # the paper's SSD300 box count
    assert torch.equal(mine, expected)


def test_detections_equal(models):
    theirs, ours = models
    images = _images()
    with torch.no_grad():
        expected = theirs(images)
        got = ours(images)
    for e, g in zip(expected, got):
        assert e["boxes"].shape[0] == 200 and len(e["labels"].unique()) == NUM_CLASSES - 1, "fixture too easy"
        assert float(e["scores"].max()) < 0.99 and float(e["scores"].max() - e["scores"].min()) > 0.1, "scores not spread"
        assert torch.equal(e["labels"], g["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-5, rtol=0)


def test_losses_equal(models):
    theirs, ours = models
    theirs.train()
    ours.train()
    try:
        with torch.no_grad():
            expected = theirs(_images(), _targets())
            got = ours(_images(), _targets())
    finally:
        theirs.eval()
        ours.eval()
    assert float(expected["classification"]) > 1.0 and float(expected["bbox_regression"]) > 0.1
    torch.testing.assert_close(got["loss_cls"], expected["classification"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["loss_box"], expected["bbox_regression"], rtol=1e-5, atol=0)


def test_ssd512_default_layout():
    """The defaults are the paper's SSD512: 64, 32, 16, 8, 4, 2, 1 cells and 24564 default boxes
    (its Table 7), built on the meta device (shapes only)."""
    cfg = load_config(None, ["model.detector=ssd", "model.num_classes=21", "model.backbone.name=vgg16",
                             "model.backbone.weights=none", "model.neck.type=none", "model.transform.min_size=[512]"])
    with torch.device("meta"):
        model = build_detector(cfg)
        levels = model.neck(model.backbone(torch.empty(1, 3, 512, 512)))
    sizes = [tuple(levels[f"p{k}"].shape[-2:]) for k in range(3, 10)]
    assert sizes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert [levels[f"p{k}"].shape[1] for k in range(3, 10)] == [512, 1024, 512, 256, 256, 256, 256]
    boxes = model.default_boxes((512, 512), sizes, torch.float32, torch.device("cpu"))
    assert sum(b.shape[0] for b in boxes) == 24564
    with pytest.raises(ValueError, match=r"model.ssd.extra_layers\[4\] makes no cells of its \(1, 1\) input"):
        with torch.device("meta"):
            model.neck(model.backbone(torch.empty(1, 3, 256, 256)))  # SSD512's conv12_2 needs ~270 px
    assert not any(p.requires_grad for p in model.backbone.body[:10].parameters())  # frozen_stages 1: conv1_x, conv2_x
    assert all(p.requires_grad for p in model.backbone.body[10:].parameters())


@pytest.mark.parametrize("name, classes, conv4_3_scale, s_min", [("voc", 21, 0.07, 0.15), ("coco", 81, 0.04, 0.1)])
def test_paper_configs_build_ssd512(name, classes, conv4_3_scale, s_min):
    """configs/ssd512_{voc,coco}.yaml: the paper's SSD512 (its VOC / COCO default-box scales), a batch of
    32 at lr 1e-3, momentum 0.9, weight decay 5e-4; the search at the 512 px square."""
    from pathlib import Path
    from autofpn.search.differentiable import search_image_size, search_transform
    path = Path(__file__).resolve().parents[1] / "configs" / f"ssd512_{name}.yaml"
    cfg = load_config(str(path), ["model.backbone.weights=none"])
    s = cfg["solver"]
    assert (s["lr"], s["momentum"], s["weight_decay"], cfg["data"]["images_per_batch"]) == (0.001, 0.9, 0.0005, 32)
    assert cfg["model"]["num_classes"] == classes
    assert search_image_size({**cfg, "model": {**cfg["model"], "transform": search_transform(cfg)}}) == (512, 512)
    with torch.device("meta"):
        model = build_detector(cfg)
    assert model.default_boxes.scales[:2] == [conv4_3_scale, s_min] and model.default_boxes.scales[-2] == 0.9
    assert len(model.head.cls_logits) == 7 and model.head.cls_logits[0].out_channels == 4 * classes


# ---- units: hand-computed values --------------------------------------------------------------

def test_default_boxes_hand_computed():
    """A 64 x 64 image, two levels (2 x 2 and 1 x 1 cells), scales 0.25, 1, 4, ratio 4 (sqrt 2):
    level 1 has squares of 16 px (s_1) and 32 px (sqrt(0.25 x 1) = 0.5), a 32 x 8 box and an
    8 x 32 box per cell, centred at 16 / 48 px; level 2 a 64 px square (s_2 = 1), the extra
    square sqrt(1 x 4) = 2 clipped to 1, a 128 x 32 box clipped to 64 x 32, and its transpose."""
    generator = DefaultBoxGenerator([[4], [4]], [0.25, 1.0, 4.0], steps=None, clip=True)
    assert generator.num_anchors_per_location() == [4, 4]
    level1, level2 = generator((64, 64), [(2, 2), (1, 1)], torch.float32, torch.device("cpu"))
    first_cell = [[8, 8, 24, 24], [0, 0, 32, 32], [0, 12, 32, 20], [12, 0, 20, 32]]
    expected1 = torch.tensor([[x0 + dx, y0 + dy, x1 + dx, y1 + dy] for dy in (0, 32) for dx in (0, 32)
                              for x0, y0, x1, y1 in first_cell], dtype=torch.float32)
    assert torch.equal(level1, expected1)  # cell-major (row by row), then box
    assert torch.equal(level2, torch.tensor([[0, 0, 64, 64], [0, 0, 64, 64], [0, 16, 64, 48], [16, 0, 48, 64]],
                                            dtype=torch.float32))
    # steps: centres at (j + 0.5) x step px; a 32 (H) x 64 (W) image, one 1 x 2 level of step 32
    steps = DefaultBoxGenerator([[]], [0.5, 0.5], steps=[32], clip=False)
    boxes = steps((32, 64), [(1, 2)], torch.float32, torch.device("cpu"))[0]
    # s = 0.5: 32 px wide (of 64), 16 px high (of 32), centres (16, 16) and (48, 16)
    assert torch.equal(boxes, torch.tensor([[0, 8, 32, 24], [0, 8, 32, 24], [32, 8, 64, 24], [32, 8, 64, 24]],
                                           dtype=torch.float32))


def test_hard_negative_mining_keeps_the_highest_loss_negatives():
    """Image 1: 2 positives (boxes 0, 3) among 10 -> the 6 negatives of highest loss are kept, boxes
    1, 2 (losses 0.1, 0.2) are not; image 2: 1 positive -> 3 negatives (losses 9, 8, 7, the
    positive's own 100 not counted); image 3: no positive -> no negative. Then the loss: positives'
    plus kept negatives' cross-entropy over the batch's positive count."""
    cls_loss = torch.tensor([[5.0, 0.1, 0.2, 6.0, 0.7, 0.9, 0.8, 0.5, 0.6, 0.4],
                             [100.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 0.0, 0.5],
                             [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    foreground = torch.zeros(3, 10, dtype=torch.bool)
    foreground[0, [0, 3]] = True
    foreground[1, 0] = True
    kept = hard_negative_mask(cls_loss, foreground, 3.0)
    assert torch.where(kept[0])[0].tolist() == [4, 5, 6, 7, 8, 9]
    assert torch.where(kept[1])[0].tolist() == [2, 4, 6]
    assert not kept[2].any()
    assert not (kept & foreground).any()
    assert torch.where(hard_negative_mask(cls_loss, foreground, 1.0)[0])[0].tolist() == [5, 6]  # ratio 1: 2 of them


def test_loss_normalised_by_the_batch_positives():
    """Logits 0: every default box costs log K. Image 1 has 2 positives (one matched above 0.5,
    one a gt's best box) and keeps 6 negatives, image 2 has no box (no negatives): loss_cls =
    (2 + 6) log K / 2; the deltas equal the targets of the exact-match positive only."""
    model = build_detector(tiny_cfg())
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]] + [[50.0 + i, 50.0, 60.0 + i, 60.0]
                                                                                for i in range(8)])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([2, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    matched = model.assign_targets(anchors, targets)
    assert matched[0].tolist() == [0, 1] + [-1] * 8  # box 1 (IoU 0.25) is the second gt's best
    assert matched[1].tolist() == [-1] * 10
    logits = torch.zeros(2, 10, NUM_CLASSES)
    losses = model.losses(logits, torch.zeros(2, 10, 4), anchors, matched, targets)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(8 * math.log(NUM_CLASSES) / 2))
    # box 0 is its gt exactly (deltas 0); box 1 -> gt 2: dx = dy = 10 x (-5 / 20), dw = dh = 5 log 0.5
    d = [10 * -0.25, 10 * -0.25, 5 * math.log(0.5), 5 * math.log(0.5)]
    expected_box = sum(abs(v) - 0.5 for v in d) / 2  # smooth L1 (beta 1) of |v| > 1, over 2 positives
    torch.testing.assert_close(losses["loss_box"], torch.tensor(expected_box))
    # label 3 of box 1 is output 3 (softmax column 0 = background)
    logits[0, 1, 3] = 5.0
    assert float(model.losses(logits, torch.zeros(2, 10, 4), anchors, matched, targets)["loss_cls"]) < \
        float(losses["loss_cls"])


def test_match_gives_every_gt_its_best_box():
    iou = torch.tensor([[0.6, 0.55, 0.1, 0.0],
                        [0.2, 0.52, 0.3, 0.0]])
    # box 0: gt 0 by the threshold; box 1 (IoU 0.55 with gt 0, above it too) is gt 1's best box: gt 1
    assert ssd_match(iou, 0.5).tolist() == [0, 1, -1, -1]
    assert ssd_match(iou, 0.7).tolist() == [0, 1, -1, -1]  # below the threshold, each gt keeps its best


def test_background_label_rejected():
    model = build_detector(tiny_cfg())
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}]
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match=r"labels must be 1\.\.4"):
        model.losses(torch.zeros(1, 1, NUM_CLASSES), torch.zeros(1, 1, 4), anchors, [torch.tensor([0])], targets)


# ---- small models ------------------------------------------------------------------------------

def tiny_cfg(*extra):
    """VGG16 at 64 px: conv4_3 8 x 8, fc7 4 x 4, two extra layers 2 x 2 and 1 x 1."""
    return load_config(None, [
        "model.detector=ssd", f"model.num_classes={NUM_CLASSES}", "model.backbone.name=vgg16",
        "model.backbone.weights=none", "model.backbone.frozen_stages=-1", "model.neck.type=none",
        "model.neck.channels=16", "model.neck.levels=[3,4,5]", "model.neck.extra_pool_level=false",
        "model.transform.min_size=[64]", "model.transform.test_min_size=64", "model.transform.size_divisible=1",
        "model.ssd.extra_layers=[[32,64,3,2,1],[32,64,3,2,1]]", "model.ssd.scales=[0.1,0.25,0.45,0.7,0.95]",
        "model.ssd.aspect_ratios=[[2],[2,3],[2],[2]]", "model.ssd.steps=null", *extra])


def _tiny_batch():
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 70, 60, generator=g)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [44.0, 10.0, 78.0, 30.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 12.0, 50.0, 66.0]]), "labels": torch.tensor([4])}]
    return images, targets


def test_train_steps_lower_the_losses_and_eval_contract():
    torch.manual_seed(0)
    model = build_detector(tiny_cfg()).train()
    images, targets = _tiny_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    history = []
    for _ in range(6):
        losses = model(images, targets)
        assert set(losses) == {"loss_cls", "loss_box"}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["loss_cls"] < first["loss_cls"] and last["loss_box"] < first["loss_box"], history

    model.eval()
    with torch.no_grad():
        out = model(images)
    for det, image in zip(out, images):
        assert det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0] > 0
        assert det["boxes"].shape[0] <= 200 and det["labels"].dtype == torch.int64
        assert 1 <= int(det["labels"].min()) and int(det["labels"].max()) <= NUM_CLASSES - 1
        assert float(det["boxes"][:, 2].max()) <= image.shape[-1] and float(det["boxes"][:, 3].max()) <= image.shape[-2]


@pytest.mark.parametrize("neck", ["fpn", "panet"])
def test_a_neck_fuses_its_levels_and_passes_on_the_others(neck):
    torch.manual_seed(0)
    plain = build_detector(tiny_cfg())
    fused = build_detector(tiny_cfg(f"model.neck.type={neck}"))
    shared = {k: v for k, v in plain.state_dict().items() if k.startswith(("backbone.", "neck.extra."))}
    fused.load_state_dict(shared, strict=False)  # the same backbone and extra layers
    assert fused.neck.out_channels == {"p3": 16, "p4": 16, "p5": 16, "p6": 64}
    assert [conv.in_channels for conv in fused.head.cls_logits] == [16, 16, 16, 64]
    with torch.no_grad():
        feats = fused.backbone(torch.rand(1, 3, 64, 64))
        a, b = plain.neck(feats), fused.neck(feats)
    assert torch.equal(a["p6"], b["p6"]) and b["p3"].shape == (1, 16, 8, 8)


def test_parameter_and_flop_breakdown():
    model = build_detector(tiny_cfg())
    params = parameter_breakdown(model)
    assert set(params) == {"backbone", "neck", "head", "total"}
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["backbone"] == 14714688  # VGG16's 13 convolutions
    # neck: L2Norm (512) + fc6 + fc7 + the two extra layers
    assert params["neck"] == 512 + (512 * 9 + 1) * 1024 + (1024 + 1) * 1024 + (1024 + 1) * 32 + (32 * 9 + 1) * 64 \
        + (64 + 1) * 32 + (32 * 9 + 1) * 64
    flops = count_flops(model, 64, 64)
    assert min(flops[part] for part in ("backbone", "neck", "head")) > 0
    assert flops["total"] == flops["backbone"] + flops["neck"] + flops["head"]
    fpn = parameter_breakdown(build_detector(tiny_cfg("model.neck.type=fpn")))
    assert fpn["neck"] > params["neck"] and fpn["backbone"] == params["backbone"]


@pytest.mark.parametrize("extra, message", [
    (["model.backbone.name=resnet50"], r"model.backbone.name = 'resnet50': model.detector 'ssd' is built on vgg16; set model.backbone.name to one "
                                     r"of vgg16, vgg16_bn"),
    (["model.ssd.scales=[0.1,0.2,0.3]"], r"model.ssd.scales has 3 entries but the SSD has 4 levels"),
    (["model.ssd.aspect_ratios=[[2]]"], r"model.ssd.aspect_ratios has 1 entries"),
    (["model.ssd.steps=[8,16]"], r"model.ssd.steps has 2 entries"),
    (["model.ssd.aspect_ratios=[[2],[0.5],[2],[2]]"], r"model.ssd.aspect_ratios = "),
    (["model.neck.type=fpn", "model.neck.levels=[2,3,4]"], r"model.neck.levels = \[2, 3, 4\]: the SSD's levels are"),
    (["model.neck.type=fpn", "model.neck.extra_pool_level=true"], r"model.neck.extra_pool_level"),
    (["model.neck.type=bogus"], r"'model.neck.type' = 'bogus': expected one of none, fpn, panet, auto"),
])
def test_config_errors_are_one_line_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_detector(tiny_cfg(*extra))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("model.ssd.extra_layers=[[32,64,3,2]]", "model.ssd.extra_layers"),
    ("model.ssd.neg_to_pos_ratio=0", "model.ssd.neg_to_pos_ratio"),
    ("model.ssd.iou_thresh=1.5", "model.ssd.iou_thresh"),
    ("model.detector=yolo", "model.detector"),
])
def test_config_values_are_checked_when_loaded(override, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg16_is_refused_by_the_other_detectors(name):
    with pytest.raises(ConfigError, match=f"model.backbone.name '{name}' is SSD's backbone"):
        build_detector(load_config(None, ["model.num_classes=5", f"model.backbone.name={name}", "model.backbone.weights=none"]))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_trunk_equals_torchvisions_features(batch_norm):
    """The trunk (plain or vgg16_bn) holds torchvision's ``features`` up to relu5_3 under the same
    keys: with torchvision's weights loaded it gives conv4_3 and conv5_3 as torchvision's layers do
    (64 px: pool3's ceil mode changes nothing), and ``frozen_stages`` freezes whole stages by their
    convolutions (stem: 2, conv2_x: 2, conv3_x .. conv5_x: 3 each)."""
    torch.manual_seed(0)
    theirs = (torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16)(weights=None).features.eval()
    ours = VGG16Trunk(frozen_stages=1, batch_norm=batch_norm)
    ours.body.load_state_dict({k: v for k, v in theirs.state_dict().items() if int(k.split(".")[0]) < len(ours.body)})
    ours.eval()
    pools = [i for i, layer in enumerate(theirs) if isinstance(layer, torch.nn.MaxPool2d)]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        assert torch.equal(out["c3"], theirs[: pools[3]](x))
        assert torch.equal(out["c4"], theirs[: pools[4]](x))
    assert [sum(isinstance(m, torch.nn.Conv2d) for m in stage.modules()) for stage in ours.stages()] == [2, 2, 3, 3, 3]
    frozen = [name for name, p in ours.named_parameters() if not p.requires_grad]
    assert len(frozen) == 4 * (4 if batch_norm else 2)  # conv1_1, conv1_2, conv2_1, conv2_2 (+ their BN)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules()) == (13 if batch_norm else 0)


def test_width_mult_scales_the_trunk_and_fc_layers():
    """model.ssd.width_mult: VGG16's 13 convolutions and fc6 / fc7 at that fraction of their widths
    (the extra layers keep their configured ones); the predictors read the narrower levels."""
    model = build_detector(tiny_cfg("model.backbone.name=vgg16_bn", "model.ssd.width_mult=0.25"))
    convs = [m.out_channels for m in model.backbone.body if isinstance(m, torch.nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    extra = model.neck.extra
    assert (extra.fc6.in_channels, extra.fc6.out_channels, extra.fc7.out_channels) == (128, 256, 256)
    assert model.head.cls_logits[0].in_channels == 128 and model.head.cls_logits[1].in_channels == 256
    assert extra.out_channels["c5"] == tiny_cfg()["model"]["ssd"]["extra_layers"][0][1]
    losses = model.train()(*_tiny_batch())
    assert all(torch.isfinite(v) for v in losses.values())


def test_only_the_neck_is_searchable():
    """No RoI head: a head supernet is refused; the neck search is tests/test_ssd_search.py's."""
    with pytest.raises(ConfigError, match="search.stage: model.detector 'ssd' has no RoI head"):
        build_detector(tiny_cfg(), search="head")
    model = build_detector(tiny_cfg(), search=True)
    assert model.arch.beta is None and tuple(model.arch.alpha.shape) == model.neck.base.arch_shape
