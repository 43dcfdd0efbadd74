"""Gradients reach alpha (neck) and beta (head) through the detection loss and the cost term."""
import pytest
import torch

from autofpn.config import load_config
from autofpn.search.cost import ResourceCost

detector = pytest.importorskip("autofpn.models.detector")

TINY = ["model.backbone.name=resnet18", "model.backbone.weights=none", "model.num_classes=3",
        "model.neck.channels=8", "model.head.channels=4",
        "model.transform.min_size=[96]", "model.transform.max_size=128", "model.transform.test_min_size=96",
        "model.rpn.pre_nms_top_n_train=50", "model.rpn.post_nms_top_n_train=32",
        "model.roi.batch_size_per_image=16"]


def test_gradients_reach_alpha_and_beta_through_detection_loss_and_cost():
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = detector.build_detector(cfg, search=True)
    model.train()
    arch = model.arch
    arch_ids = {id(p) for p in model.arch_parameters()}
    assert arch_ids == {id(arch.alpha), id(arch.beta)}
    assert not arch_ids & {id(p) for p in model.weight_parameters()}

    images = [torch.rand(3, 96, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "image_id": 0}]
    losses = model(images, targets)
    detection_loss = sum(losses.values())
    detection_loss.backward()
    grad_det = {name: getattr(arch, name).grad.clone() for name in ("alpha", "beta")}
    for name, g in grad_det.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"no detection-loss gradient on {name}"

    model.zero_grad()
    cost = ResourceCost(model.neck, model.roi_heads.box_head, image_size=(96, 128),
                        num_rois=cfg["model"]["roi"]["batch_size_per_image"])
    penalty = cost.expected_cost(arch.neck_weights(), arch.head_weights())
    (0.02 * penalty).backward()
    for name in ("alpha", "beta"):
        g = getattr(arch, name).grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"no cost gradient on {name}"
    # "none" is free: raising its logit lowers the cost, so the cost gradient on it is negative
    assert (arch.alpha.grad[..., 0] < 0).all() and (arch.beta.grad[..., 0] < 0).all()
