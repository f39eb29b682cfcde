"""Every loss against values computed by hand (plain Python math, not torch)."""

from __future__ import annotations

import math

import pytest
import torch

from mmkd.losses import (
    ATLoss,
    DKDLoss,
    FeatureLoss,
    FitNetsLoss,
    KDLoss,
    RKDLoss,
    attention_transfer_loss,
    dkd_loss,
    feature_loss,
    kd_loss,
    normalize_target,
    rkd_angle_loss,
    rkd_distance_loss,
)


def softmax(values: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


STUDENT = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
TEACHER = [[2.0, 0.5, -0.5], [0.0, 3.0, 1.0]]
LABELS = [0, 1]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_matches_hand_computed(temperature: float) -> None:
    expected = sum(kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(STUDENT, TEACHER)) / 2
    expected *= temperature**2
    got = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    reverse = sum(kl(softmax(s, temperature), softmax(t, temperature)) for s, t in zip(STUDENT, TEACHER)) / 2
    assert kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature, reverse=True).item() == pytest.approx(
        reverse * temperature**2, rel=1e-5
    )
    assert KDLoss(temperature, loss_weight=0.5)(torch.tensor(STUDENT), torch.tensor(TEACHER)).item() == pytest.approx(
        0.5 * expected, rel=1e-5
    )


def test_kd_two_class_closed_form() -> None:
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln 3/2 + 1/4 ln 1/2
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), temperature=1.0)
    assert got.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_kd_is_zero_for_equal_logits_and_gradient_only_to_student() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(STUDENT, requires_grad=True)
    loss = kd_loss(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    kd_loss(student, torch.tensor(TEACHER)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_hand_computed(temperature: float) -> None:
    alpha, beta = 1.0, 8.0
    expected = 0.0
    for s, t, y in zip(STUDENT, TEACHER, LABELS):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [k for k in range(3) if k != y]
        nckd = kl(softmax([t[k] for k in others], temperature), softmax([s[k] for k in others], temperature))
        expected += (alpha * tckd + beta * nckd) * temperature**2
    expected /= 2
    got = dkd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), alpha, beta, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    module = DKDLoss(alpha, beta, temperature, loss_weight=2.0)
    assert module(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)).item() == pytest.approx(2 * expected, rel=1e-4)


def test_dkd_finite_for_saturated_student() -> None:
    student = torch.tensor([[200.0, -200.0, -200.0]])
    assert torch.isfinite(dkd_loss(student, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0])))


def test_feature_losses_hand_computed() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    diffs = [1.0, 0.0, 2.0, -2.0]
    assert feature_loss(pred, target, "mse").item() == pytest.approx(sum(d * d for d in diffs) / 4)
    beta = 1.5
    smooth = [0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta for d in diffs]
    assert feature_loss(pred, target, "smooth_l1", beta=beta).item() == pytest.approx(sum(smooth) / 4)
    cos = [2.0 * 2 / (math.sqrt(5) * 2), (3 - 1) / (math.sqrt(10) * math.sqrt(2))]
    assert feature_loss(pred, target, "cosine").item() == pytest.approx(sum(1 - c for c in cos) / 2, rel=1e-6)
    assert FeatureLoss("mse", loss_weight=3.0)(pred, target).item() == pytest.approx(3 * 9 / 4)
    assert FitNetsLoss(loss_weight=100.0)(pred, target).item() == pytest.approx(100 * 9 / 4)


def test_normalized_target_is_parameter_free_layernorm() -> None:
    target = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, var = 3.0, (4 + 1 + 0 + 9) / 4
    expected = [(v - mean) / math.sqrt(var + 1e-6) for v in [1.0, 2.0, 3.0, 6.0]]
    assert normalize_target(target)[0].tolist() == pytest.approx(expected, rel=1e-6)
    # dense maps are normalised over channels at each position
    dense = torch.randn(2, 5, 3, 3)
    normed = normalize_target(dense)
    assert torch.allclose(normed.mean(1), torch.zeros(2, 3, 3), atol=1e-5)
    pred = torch.zeros(1, 4)
    assert feature_loss(pred, target, "mse", normalize=True).item() == pytest.approx(
        sum(e * e for e in expected) / 4, rel=1e-5
    )


def test_feature_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[2, 3\].*\[2, 4\]"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_attention_transfer_hand_computed() -> None:
    # student map 1x2x1x2 -> attention mean_c f^2 = [(1+9)/2, (4+0)/2] = [5, 2], normalised
    student = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 1.0]]]])  # 1 channel: [1, 1] -> normalised [1/sqrt2, 1/sqrt2]
    a_s = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    a_t = [1 / math.sqrt(2)] * 2
    expected = sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / 2
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert ATLoss(loss_weight=1000.0)(student, teacher).item() == pytest.approx(1000 * expected, rel=1e-6)


def test_attention_transfer_pools_larger_map() -> None:
    student = torch.rand(2, 4, 8, 8)
    teacher = torch.rand(2, 16, 4, 4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(student, (4, 4))
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(attention_transfer_loss(pooled, teacher).item())


def test_rkd_hand_computed() -> None:
    student = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    teacher = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]

    def normalized_distances(points):
        d = [[math.dist(p, q) for q in points] for p in points]
        mean = sum(d[i][j] for i in range(3) for j in range(3) if i != j) / 6
        return [[x / mean for x in row] for row in d]

    def smooth_l1(a, b):
        diffs = [x - y for x, y in zip(a, b)]
        return sum(0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs) / len(diffs)

    ds, dt = normalized_distances(student), normalized_distances(teacher)
    expected_distance = smooth_l1(sum(ds, []), sum(dt, []))
    got = rkd_distance_loss(torch.tensor(student), torch.tensor(teacher)).item()
    assert got == pytest.approx(expected_distance, rel=1e-5)

    def angles(points):
        out = []
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    # official layout: e[j] - e[i] with e = embeddings.unsqueeze(0) - embeddings.unsqueeze(1)
                    u = [a - b for a, b in zip(points[j], points[i])]
                    v = [a - b for a, b in zip(points[k], points[i])]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv))
        return out

    expected_angle = smooth_l1(angles(student), angles(teacher))
    assert rkd_angle_loss(torch.tensor(student), torch.tensor(teacher)).item() == pytest.approx(expected_angle, rel=1e-5, abs=1e-7)
    module = RKDLoss(distance_weight=25.0, angle_weight=50.0)
    assert module(torch.tensor(student), torch.tensor(teacher)).item() == pytest.approx(
        25 * expected_distance + 50 * expected_angle, rel=1e-5
    )
