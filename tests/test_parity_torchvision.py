"""Our Faster R-CNN equals torchvision's in eval mode when it carries torchvision's weights."""
import pytest
import torch
import torchvision

from autofpn.config import load_config
from autofpn.models.detector import build_detector, torchvision_state_dict_to_ours

NUM_CLASSES = 5


def _pair(min_size=320, max_size=512):
    torch.manual_seed(0)
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=min_size, max_size=max_size)
    theirs.eval()
    _spread_class_scores(theirs)
    # torchvision computes in NCHW, so ours does too here: torchvision against itself in
    # channels-last moves boxes by up to 0.009 px and scores by 5e-5 on these images (float32
    # rounding through ResNet-50), beyond this test's tolerances. That the two layouts compute the
    # same numbers is tests/test_memory_format.py's subject (float64).
    cfg = load_config(None, [
        "model.memory_format=contiguous",
        f"model.num_classes={NUM_CLASSES}", "model.backbone.weights=none", "model.backbone.norm=bn",
        f"model.transform.min_size=[{min_size}]", f"model.transform.test_min_size={min_size}",
        f"model.transform.max_size={max_size}"])
    ours = build_detector(cfg)
    ours.load_state_dict(torchvision_state_dict_to_ours(theirs.state_dict()), strict=True)
    ours.eval()
    return theirs, ours


def _spread_class_scores(model):
    """A randomly initialised head gives one class the top score everywhere (the RoI features
    share one dominant direction). Centre the class logits on the mean RoI feature of the test
    images, so labels and scores vary between RoIs and class-wise NMS has real work to do."""
    feats = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(_images())
        hook.remove()
        f = torch.cat(feats)
        centred = f - f.mean(0)
        predictor = model.roi_heads.box_predictor.cls_score
        predictor.weight.mul_(3.0 / (centred @ predictor.weight.t()).std())
        predictor.bias.copy_(-(f.mean(0) @ predictor.weight.t()))


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 200, generator=g)]


@pytest.fixture(scope="module")
def models():
    return _pair()


def test_proposals_equal(models):
    theirs, ours = models
    images = _images()
    with torch.no_grad():
        image_list, _ = theirs.transform(images)
        feats = theirs.backbone(image_list.tensors)
        their_props, _ = theirs.rpn(image_list, feats)
        batch, sizes, _ = ours.transform(images)
        assert torch.equal(batch, image_list.tensors)
        our_feats = ours.neck(ours.backbone(batch))
        our_props, _ = ours.rpn(tuple(batch.shape[-2:]), sizes, [our_feats[k] for k in ("p2", "p3", "p4", "p5", "p6")])
    for a, b in zip(their_props, our_props):
        assert a.shape == b.shape and a.shape[0] > 100
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0)


def test_detections_equal(models):
    theirs, ours = models
    images = _images()
    with torch.no_grad():
        expected = theirs(images)
        got = ours(images)
    for e, g in zip(expected, got):
        assert e["boxes"].shape[0] > 20 and len(e["labels"].unique()) > 1, "fixture too easy"
        assert torch.equal(e["labels"], g["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-5, rtol=0)
