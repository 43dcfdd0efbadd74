"""Gradients reach alpha (neck) and beta (head) through the detection loss and the cost term."""
import pytest
import torch

from autofpn.config import load_config
from autofpn.models.architecture import gumbel_straight_through
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


def test_gumbel_straight_through_samples_one_hot_from_the_softmax_with_its_gradient():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0], requires_grad=True)
    rows = logits.expand(20000, 4)
    sample = gumbel_straight_through(rows, 1.0, torch.Generator().manual_seed(0))
    values = sample.detach()
    assert ((values != 0).sum(-1) == 1).all(), "exactly one non-zero entry per row, the others exactly 0"
    torch.testing.assert_close(values.sum(-1), torch.ones(20000))
    frequencies = (sample.detach() != 0).double().mean(0)
    torch.testing.assert_close(frequencies, torch.softmax(logits.detach().double(), 0), atol=0.015, rtol=0)
    again = gumbel_straight_through(rows, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)
    assert not torch.equal(sample, gumbel_straight_through(rows, 1.0, torch.Generator().manual_seed(1)))
    # straight-through: the gradient is the soft sample's (same noise), non-zero on every logit
    (sample[:, 0] * 3.0).sum().backward()
    grad_st = logits.grad.clone()
    logits.grad = None
    u = torch.rand(rows.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    soft = torch.softmax(rows - torch.log(-torch.log(u)).float(), -1)
    (soft[:, 0] * 3.0).sum().backward()
    torch.testing.assert_close(grad_st, logits.grad)
    assert (grad_st != 0).all()


def test_sampled_detector_gives_alpha_and_beta_a_gradient_and_draws_from_the_seed():
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["search.mode=gdas"])
    model = detector.build_detector(cfg, search=True)
    model.train()
    arch = model.arch
    with pytest.raises(ValueError, match="temperature"):
        with arch.sampled(0.0, 1):
            pass
    with arch.sampled(2.0, 7):
        first = [w.detach() for w in arch.forward_weights()]
        again = [w.detach() for w in arch.forward_weights()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(((w != 0).sum(-1) == 1).all() for w in first)
    outside = arch.forward_weights()  # outside the context: the softmax, every op mixed
    assert torch.equal(outside[0], arch.neck_weights()) and (outside[0] > 0).all()

    images = [torch.rand(3, 96, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "image_id": 0}]
    with arch.sampled(2.0, 7):
        losses = model(images, targets)
    sum(losses.values()).backward()
    for name in ("alpha", "beta"):
        g = getattr(arch, name).grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"no detection-loss gradient on {name}"
    # only sampled paths ran, so the ops of the other paths got no gradient
    grads = {n: p.grad for n, p in model.neck.named_parameters()}
    assert any(g is None for g in grads.values()) and any(g is not None for g in grads.values())
