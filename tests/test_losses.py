"""The NoNN losses against small cases worked out by hand."""

import math

import pytest
import torch

from nonn.students.losses import (
    CrossEntropy,
    KDLoss,
    PooledActivationTransfer,
    SpatialAttentionTransfer,
    attention_map,
    make_transfer_loss,
)


def test_kd_loss_matches_hand_computation_at_t1():
    # Teacher softmax [0.75, 0.25], student uniform, label 0.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    target = torch.tensor([0])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = math.log(2.0)
    loss = KDLoss(alpha=0.9, temperature=1.0)(student, teacher, target)
    assert loss.item() == pytest.approx(0.9 * kl + 0.1 * ce, rel=1e-6)


def test_kd_loss_temperature_scaling_and_prototype_factor():
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, 0.0]])
    target = torch.tensor([0, 1])
    t = 2.0
    # Sample 1: teacher at T=2 is softmax([ln3/2, 0]); student uniform. Sample 2: identical -> 0.
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    kl1 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    kl = (kl1 + 0.0) / 2 * t * t
    ce = (math.log(2.0) + math.log(1.0 + math.e)) / 2  # label 1 of logits [1, 0]: -log(1/(1+e))
    loss = KDLoss(alpha=0.9, temperature=t)(student, teacher, target)
    assert loss.item() == pytest.approx(0.9 * kl + 0.1 * ce, rel=1e-6)
    proto = KDLoss.prototype(alpha=0.9, temperature=t)(student, teacher, target)
    assert proto.item() == pytest.approx(2 * 0.9 * kl + 0.1 * ce, rel=1e-6)


def test_kd_loss_is_zero_kl_when_student_equals_teacher_and_alpha_one():
    logits = torch.randn(5, 7)
    loss = KDLoss(alpha=1.0, temperature=4.0)(logits, logits.clone(), torch.zeros(5, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_rejects_bad_parameters():
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)


def test_cross_entropy_hand_case():
    loss = CrossEntropy()(torch.tensor([[0.0, 0.0, 0.0]]), None, torch.tensor([2]))
    assert loss.item() == pytest.approx(math.log(3.0), rel=1e-6)


def test_pooled_activation_transfer_hand_case():
    # n([3, 4]) = [0.6, 0.8], n([1, 0]) = [1, 0]: squared differences 0.16 and 0.64, mean 0.4.
    student = torch.tensor([[3.0, 4.0], [2.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [5.0, 0.0]])  # second row: identical directions -> 0
    loss = PooledActivationTransfer(beta=10.0)(student, teacher)
    assert loss.item() == pytest.approx(10.0 * (0.16 + 0.64 + 0 + 0) / 4, rel=1e-6)


def test_pooled_activation_transfer_is_scale_invariant_and_checks_shapes():
    s = torch.rand(4, 6)
    t = torch.rand(4, 6)
    loss = PooledActivationTransfer()
    assert loss(s, t).item() == pytest.approx(loss(3.0 * s, 0.5 * t).item(), rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        loss(s, t[:, :5])


def test_attention_map_and_spatial_transfer_hand_case():
    # Student: two channels [1, 0] over a 1x2 map -> mean_c(x^2) = [1, 0] -> at = [1, 0].
    s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    # Teacher group: one channel [0, 2] -> [0, 4] -> at = [0, 1].
    t = torch.tensor([[[[0.0, 2.0]]]])
    assert attention_map(s).tolist() == [[1.0, 0.0]]
    assert attention_map(t).tolist() == [[0.0, 1.0]]
    loss = SpatialAttentionTransfer(beta=3.0)
    # One student: mean([1, 1]) = 1; two students (second one matching, 0): summed.
    assert loss([s], [t]).item() == pytest.approx(3.0)
    assert loss([s, t], [t, t]).item() == pytest.approx(3.0)


def test_spatial_transfer_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="spatial size"):
        SpatialAttentionTransfer()([torch.rand(2, 3, 4, 4)], [torch.rand(2, 3, 2, 2)])
    with pytest.raises(ValueError, match="student maps"):
        SpatialAttentionTransfer()([torch.rand(2, 3, 4, 4)], [])


def test_make_transfer_loss_forms():
    assert make_transfer_loss("none") is None
    assert make_transfer_loss("pooled").beta == 1e4
    assert make_transfer_loss("spatial").beta == 1e3
    assert make_transfer_loss("spatial", beta=5.0).beta == 5.0
    with pytest.raises(ValueError, match="pooled, spatial, none"):
        make_transfer_loss("gram")


def test_losses_give_gradients():
    s = torch.rand(3, 4, requires_grad=True)
    PooledActivationTransfer()(s, torch.rand(3, 4)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
