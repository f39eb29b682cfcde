"""D-FINE losses (mmkd.losses.detection) against values computed by hand (plain Python math where it matters)."""

from __future__ import annotations

import math

import pytest
import torch

from mmkd.losses.detection import (
    DFINECriterion,
    HungarianMatcher,
    bbox2distance,
    box_cxcywh_to_xyxy,
    box_iou_and_giou,
    box_losses,
    box_xyxy_to_cxcywh,
    concat_targets,
    ddf_loss,
    distance2bbox,
    fgl_loss,
    flatten_match,
    integral,
    inverse_sigmoid,
    sqrt_count_mix,
    translate_gt,
    union_matching,
    varifocal_loss,
    weighting_function,
)

REG_MAX, REG_SCALE, UP = 32, 4.0, 0.5


def closed_form_w(n: int, reg_max: int = REG_MAX, up: float = UP, reg_scale: float = REG_SCALE) -> float:
    """W(n) in units of the box size (§A2.2), a = up, c = 1 / reg_scale."""
    a, c, big_n = up, 1 / reg_scale, reg_max
    if n == 0:
        return -2 * a
    if n == big_n:
        return 2 * a
    if n < big_n / 2:
        return c - c * (a / c + 1) ** ((big_n - 2 * n) / (big_n - 2))
    return -c + c * (a / c + 1) ** ((2 * n - big_n) / (big_n - 2))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_sum = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_sum for v in values]


def kl(teacher: list[float], student: list[float], t: float) -> float:
    """T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    log_p = log_softmax([v / t for v in teacher])
    log_q = log_softmax([v / t for v in student])
    return t**2 * sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))


def target(labels: list[int], boxes: list[list[float]]) -> dict:
    return {"labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.tensor(boxes).reshape(-1, 4)}


def pairs(query: list[int], gt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(query, dtype=torch.long), torch.tensor(gt, dtype=torch.long)


# --- box utilities ---------------------------------------------------------------------------------------------


def test_box_conversions_iou_giou_and_inverse_sigmoid() -> None:
    cxcywh = torch.tensor([[0.25, 0.5, 0.3, 0.2], [0.6, 0.5, 0.2, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.1, 0.4, 0.4, 0.6], [0.5, 0.4, 0.7, 0.6]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    # disjoint: union 0.06 + 0.04, hull 0.6 x 0.2 -> GIoU = -(0.12 - 0.1) / 0.12
    iou, giou = box_iou_and_giou(xyxy[0], xyxy[1])
    assert iou.item() == pytest.approx(0.0) and giou.item() == pytest.approx(-1 / 6, rel=1e-5)
    iou, giou = box_iou_and_giou(xyxy[:, None], xyxy[None])
    assert iou.shape == (2, 2) and torch.allclose(iou.diagonal(), torch.ones(2))
    assert inverse_sigmoid(torch.tensor([0.25])).item() == pytest.approx(math.log(1 / 3), rel=1e-6)
    assert inverse_sigmoid(torch.tensor([0.0])).item() == pytest.approx(math.log(1e-5), rel=1e-6)


# --- W(n), integral, decoding ----------------------------------------------------------------------------------


def test_weighting_function_reg_scale_4() -> None:
    values = weighting_function(REG_MAX, UP, REG_SCALE)
    assert values.shape == (33,) and values.dtype == torch.float32
    in_box_units = (values / REG_SCALE).tolist()
    for n in range(33):
        assert in_box_units[n] == pytest.approx(closed_form_w(n), abs=1e-6)
    listed = [-1.0, -0.5, -0.447, -0.398, -0.352, -0.310, -0.270, -0.233, -0.199,
              -0.167, -0.138, -0.111, -0.085, -0.061, -0.039, -0.019, 0.0]  # fmt: skip
    for n, value in enumerate(listed):
        assert in_box_units[n] == pytest.approx(value, abs=6e-4)
        assert in_box_units[32 - n] == pytest.approx(-value, abs=6e-4)  # antisymmetric
    assert values[16].item() == 0.0 and values.sum().abs().item() < 1e-5


def test_weighting_function_reg_scale_8() -> None:
    in_box_units = (weighting_function(REG_MAX, UP, 8.0) / 8.0).tolist()
    for n in range(33):
        assert in_box_units[n] == pytest.approx(closed_form_w(n, reg_scale=8.0), abs=1e-6)
    assert in_box_units[17] == pytest.approx(0.0142, abs=5e-5) and in_box_units[15] == pytest.approx(-0.0142, abs=5e-5)
    assert in_box_units[:2] == pytest.approx([-1.0, -0.5]) and in_box_units[-2:] == pytest.approx([0.5, 1.0])


def test_uniform_distribution_leaves_the_box_unchanged() -> None:
    project = weighting_function(REG_MAX, UP, REG_SCALE)
    ref = torch.tensor([[0.4, 0.6, 0.3, 0.2]])
    distance = integral(torch.zeros(1, 4 * 33), project)
    assert torch.allclose(distance, torch.zeros(1, 4), atol=1e-6)
    assert torch.allclose(distance2bbox(ref, distance, REG_SCALE), ref, atol=1e-6)


def test_one_hot_at_bin_n_moves_each_edge_by_w_n_times_size() -> None:
    project = weighting_function(REG_MAX, UP, REG_SCALE)
    cx, cy, w, h = 0.4, 0.6, 0.3, 0.2
    bins = [3, 16, 25, 32]  # left, top, right, bottom
    logits = torch.zeros(1, 4, 33)
    for edge, n in enumerate(bins):
        logits[0, edge, n] = 1e4
    distance = integral(logits.reshape(1, -1), project)
    assert torch.allclose(distance[0], project[bins])
    expected_xyxy = [cx - w / 2 - closed_form_w(3) * w, cy - h / 2 - closed_form_w(16) * h,
                     cx + w / 2 + closed_form_w(25) * w, cy + h / 2 + closed_form_w(32) * h]  # fmt: skip
    decoded = box_cxcywh_to_xyxy(distance2bbox(torch.tensor([[cx, cy, w, h]]), distance, REG_SCALE))
    assert decoded[0].tolist() == pytest.approx(expected_xyxy, abs=1e-6)


# --- FGL targets ------------------------------------------------------------------------------------------------


def test_translate_gt_edge_cases() -> None:
    values = weighting_function(REG_MAX, UP, REG_SCALE)
    between = values[20] + 0.3 * (values[21] - values[20])
    phi = torch.stack([values[20], between, torch.tensor(-4.5), torch.tensor(5.0), values[32], values[0]])
    left_bin, weight_right, weight_left = translate_gt(phi, REG_MAX, REG_SCALE, UP)
    assert left_bin.tolist() == pytest.approx([20, 20, 0, 31.9, 31.9, 0])
    assert weight_right.tolist() == pytest.approx([0, 0.3, 0, 1, 1, 0], abs=1e-5)
    assert weight_left.tolist() == pytest.approx([1, 0.7, 1, 0, 0, 1], abs=1e-5)


def test_bbox2distance_by_hand() -> None:
    # reference box: centre (0.5, 0.5), w = h = 0.5, so size / reg_scale = 0.125 and phi = (edge to centre) / 0.125 - 2
    # (all exact in binary, so the left edge lands exactly on bin 16)
    ref = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    # left: on the reference edge (phi 0, bin 16); top: phi 0.5 (between bins 21 and 22);
    # right: edge left of the centre (phi -4.5 < W(0)); bottom: 0.875 below the centre (phi 5 > W(N))
    gt = torch.tensor([[0.25, 0.1875, 0.1875, 1.375]])
    target_bins, weight_right, weight_left = bbox2distance(ref, gt, REG_MAX, REG_SCALE, UP)
    w21, w22 = closed_form_w(21) * REG_SCALE, closed_form_w(22) * REG_SCALE
    top_right = (0.5 - w21) / (w22 - w21)
    assert target_bins.shape == (1, 4)
    assert target_bins[0].tolist() == pytest.approx([16, 21, 0, 31.9], abs=1e-5)
    assert weight_right[0].tolist() == pytest.approx([0, top_right, 0, 1], abs=1e-5)
    assert weight_left[0].tolist() == pytest.approx([1, 1 - top_right, 1, 0], abs=1e-5)


def test_encode_decode_round_trip() -> None:
    project = weighting_function(REG_MAX, UP, REG_SCALE)
    ref = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.3]])
    gt = torch.tensor([[0.33, 0.22, 0.81, 0.64], [0.18, 0.5, 0.37, 0.72]])  # every edge within +-1 box size
    target_bins, weight_right, weight_left = bbox2distance(ref, gt, REG_MAX, REG_SCALE, UP)
    probs = torch.zeros(2, 4, 33)
    left = target_bins.long()
    probs.scatter_(-1, left.unsqueeze(-1), weight_left.unsqueeze(-1))
    probs.scatter_add_(-1, (left + 1).unsqueeze(-1), weight_right.unsqueeze(-1))
    decoded = distance2bbox(ref, integral((probs + 1e-12).log().reshape(2, -1), project), REG_SCALE)
    assert torch.allclose(box_cxcywh_to_xyxy(decoded), gt, atol=1e-5)


# --- matching ---------------------------------------------------------------------------------------------------


def test_hungarian_matcher_2x2_beats_greedy() -> None:
    # q1 sits on GT A; q0 is nearer to A than to B, so a greedy pass would give q0 -> A, q1 -> B.
    boxes = torch.tensor([[[0.45, 0.5, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2]]])
    logits = torch.zeros(1, 2, 1)
    gts = target([0, 0], [[0.3, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2]])
    matcher = HungarianMatcher()
    # p = 0.5 everywhere: alpha (1-p)^2 (-log p) - (1-alpha) p^2 (-log(1-p)), times cost_class 2
    class_cost = 2 * (0.25 * 0.25 - 0.75 * 0.25) * math.log(2)
    expected = [[5 * 0.15 - 2 / 7, 5 * 0.25 + 2 / 9], [0.0 - 2, 5 * 0.4 + 2 / 3]]  # 5 L1 - 2 GIoU
    cost = matcher.cost_matrix(logits[0], boxes[0], gts)
    assert torch.allclose(cost, torch.tensor(expected) + class_cost, atol=1e-5)
    ((query_idx, gt_idx),) = matcher(logits, boxes, [gts])
    assert query_idx.tolist() == [0, 1] and gt_idx.tolist() == [1, 0]


def test_hungarian_matcher_image_without_gt() -> None:
    gts = [target([], []), target([1], [[0.5] * 4])]
    indices = HungarianMatcher()(torch.zeros(2, 3, 2), torch.full((2, 3, 4), 0.5), gts)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0 and indices[0][0].dtype == torch.long
    assert len(indices[1][0]) == 1 and indices[1][1].tolist() == [0]


def test_union_matching_most_frequent_gt_and_pre_enc_count() -> None:
    final = [pairs([0, 1], [0, 1]), pairs([], [])]
    aux0 = [pairs([0, 2], [1, 0]), pairs([], [])]
    pre = [pairs([0, 3], [1, 0]), pairs([], [])]
    enc = [pairs([0, 5], [1, 0]), pairs([], [])]
    (query_idx, gt_idx), empty = union_matching([final, aux0, pre, enc])
    # q0 is matched to g0 once and to g1 three times (aux, pre, enc); q3 and q5 come only from pre and enc
    assert query_idx.tolist() == [0, 1, 2, 3, 5] and gt_idx.tolist() == [1, 1, 0, 0, 0]
    assert empty[0].numel() == 0 and empty[1].numel() == 0
    # without pre and enc, q0 has one vote each: the tie goes to the lowest GT index
    (query_idx, gt_idx), _ = union_matching([final, aux0])
    assert query_idx.tolist() == [0, 1, 2] and gt_idx.tolist() == [0, 1, 0]


def test_flatten_match_indices_and_gathered_targets() -> None:
    gts = [target([2], [[0.1, 0.2, 0.3, 0.4]]), target([], []), target([0, 1], [[0.5] * 4, [0.6, 0.7, 0.2, 0.1]])]
    indices = [pairs([4], [0]), pairs([], []), pairs([1, 3], [1, 0])]
    match = flatten_match(indices, gts, torch.device("cpu"))
    assert match.batch_idx.tolist() == [0, 2, 2] and match.query_idx.tolist() == [4, 1, 3]
    assert match.labels.tolist() == [2, 1, 0]
    assert torch.equal(match.boxes, torch.stack([gts[0]["boxes"][0], gts[2]["boxes"][1], gts[2]["boxes"][0]]))
    assert flatten_match(match, gts, torch.device("cpu")) is match
    # the losses take a flattened matching (and concatenated targets) as well as per-image indices
    boxes = torch.rand(3, 5, 4) * 0.5 + 0.25
    flat_targets = concat_targets(gts, torch.device("cpu"))
    assert flat_targets.offsets.tolist() == [0, 1, 1]
    for got, expected in zip(box_losses(boxes, flat_targets, match, 3.0), box_losses(boxes, gts, indices, 3.0)):
        assert got.item() == expected.item()


# --- losses -----------------------------------------------------------------------------------------------------


def test_varifocal_loss_by_hand() -> None:
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]]])
    gts = [target([1], [[0.5, 0.5, 0.2, 0.4]])]  # IoU with q0 = 0.08 / 0.16 = 0.5
    indices = [pairs([0], [0])]

    def bce(x: float, t: float) -> float:
        return -(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))

    alpha = 0.75
    terms = [
        alpha * sigmoid(0.5) ** 2 * bce(0.5, 0.0),  # q0, c0: negative
        0.5 * bce(-1.0, 0.5),  # q0, c1: the GT class, target = weight = IoU
        alpha * sigmoid(2.0) ** 2 * bce(2.0, 0.0),
        alpha * sigmoid(0.3) ** 2 * bce(0.3, 0.0),
    ]
    # .mean(1).sum() * Q / num_boxes = sum of all terms / num_boxes
    got = varifocal_loss(logits, boxes, gts, indices, num_boxes=2.0)
    assert got.item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_box_losses_by_hand() -> None:
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.1, 0.1], [0.25, 0.5, 0.3, 0.2]]], requires_grad=True)
    gts = [target([0, 1], [[0.6, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.4]])]
    l1, giou = box_losses(boxes, gts, [pairs([2, 0], [0, 1])], num_boxes=2.0)
    # q2 vs g0: L1 0.35 + 0.1, disjoint, GIoU -1/6; q0 vs g1: L1 0.2, g1 inside q0, GIoU = IoU = 0.5
    assert l1.item() == pytest.approx((0.45 + 0.2) / 2, rel=1e-5)
    assert giou.item() == pytest.approx(((1 + 1 / 6) + (1 - 0.5)) / 2, rel=1e-5)
    (l1 + giou).backward()
    assert boxes.grad[0, 1].abs().sum() == 0 and boxes.grad[0, 2].abs().sum() > 0


def test_fgl_loss_by_hand() -> None:
    torch.manual_seed(0)
    corners = torch.randn(1, 2, 4 * 33)
    ref = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]]])
    gt_xyxy = [0.3, 0.25, 0.75, 0.7]  # relative to ref q1: phi = (0, 0.5, 0.5, 0)
    gts = [target([0], [box_xyxy_to_cxcywh(torch.tensor(gt_xyxy)).tolist()])]
    iou = (0.4 * 0.4) / (0.45 * 0.45)  # pred q1 = (0.3, 0.3, 0.7, 0.7) lies inside the GT
    w21, w22 = closed_form_w(21) * REG_SCALE, closed_form_w(22) * REG_SCALE
    right = (0.5 - w21) / (w22 - w21)
    bins_and_weights = [(16, 0.0), (21, right), (21, right), (16, 0.0)]  # (left bin, weight_right) per edge
    edge_logits = corners[0, 1].reshape(4, 33).tolist()
    expected = 0.0
    for logits, (n, weight_right) in zip(edge_logits, bins_and_weights):
        log_p = log_softmax(logits)
        expected += iou * ((1 - weight_right) * -log_p[n] + weight_right * -log_p[n + 1])
    got = fgl_loss(corners, ref, boxes, gts, [pairs([1], [0])], 1.5, REG_MAX, REG_SCALE, UP)
    assert got.item() == pytest.approx(expected / 1.5, rel=1e-4)


def test_ddf_loss_by_hand() -> None:
    torch.manual_seed(1)
    student = torch.randn(1, 3, 12, requires_grad=True)  # reg_max = 2: 3 bins per edge
    teacher = torch.randn(1, 3, 12, requires_grad=True)
    teacher_logits = torch.tensor([[[0.2, -1.0], [3.0, 0.0], [-0.5, 1.5]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4], [0.7, 0.7, 0.1, 0.1]]])
    gts = [target([0], [[0.5, 0.5, 0.2, 0.4]])]  # q1 matched, IoU 0.5
    t = 5.0
    s_rows, t_rows = student.detach().reshape(12, 3).tolist(), teacher.detach().reshape(12, 3).tolist()
    kls = [kl(tr, sr, t) for sr, tr in zip(s_rows, t_rows)]
    weights = [sigmoid(0.2)] * 4 + [0.5] * 4 + [sigmoid(1.5)] * 4
    matched = [w * k for w, k in zip(weights[4:8], kls[4:8])]
    unmatched = [w * k for w, k in zip(weights[:4] + weights[8:], kls[:4] + kls[8:])]
    mean_m, mean_u = sum(matched) / 4, sum(unmatched) / 8
    expected = (mean_m * 2 + mean_u * math.sqrt(8)) / (2 + math.sqrt(8))
    got = ddf_loss(student, teacher, teacher_logits, boxes, gts, [pairs([1], [0])], temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_ddf_zero_when_student_is_teacher_and_count_scale_invariance() -> None:
    corners = torch.randn(2, 3, 12, requires_grad=True)
    no_targets, no_pairs = [target([], [])] * 2, [pairs([], [])] * 2
    loss = ddf_loss(corners, corners, torch.randn(2, 3, 2), torch.rand(2, 3, 4), no_targets, no_pairs)
    assert loss.item() == 0.0 and loss.requires_grad
    a, b = torch.tensor(0.7), torch.tensor(0.2)
    assert sqrt_count_mix(a, b, 4, 9).item() == pytest.approx((0.7 * 2 + 0.2 * 3) / 5)
    assert sqrt_count_mix(a, b, 4 * 8 / 3, 9 * 8 / 3).item() == pytest.approx(sqrt_count_mix(a, b, 4, 9).item())
    # no GT at all: every edge is unmatched and the loss is the plain weighted mean
    student, teacher = torch.randn(1, 2, 12), torch.randn(1, 2, 12)
    no_gt = ddf_loss(student, teacher, torch.zeros(1, 2, 2), torch.rand(1, 2, 4), no_targets[:1], no_pairs[:1])
    kls = [kl(tr, sr, 5.0) for sr, tr in zip(student.reshape(8, 3).tolist(), teacher.reshape(8, 3).tolist())]
    assert no_gt.item() == pytest.approx(0.5 * sum(kls) / 8, rel=1e-5)


# --- the criterion ----------------------------------------------------------------------------------------------

NUM_CLASSES, NUM_QUERIES, NUM_LAYERS = 3, 8, 3


def make_outputs(seed: int = 0, corners: bool = True, num_layers: int = NUM_LAYERS) -> tuple[dict, list[torch.Tensor]]:
    """A random output dict in the contract's layout (B = 2), and its leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    batch, q, bins = 2, NUM_QUERIES, 4 * (REG_MAX + 1)
    project = weighting_function(REG_MAX, UP, REG_SCALE)
    centres, sizes = 0.3 + 0.4 * torch.rand(batch, q, 2, generator=g), 0.1 + 0.3 * torch.rand(batch, q, 2, generator=g)
    pre_boxes = torch.cat([centres, sizes], -1)
    pre_boxes.requires_grad_()
    ref = pre_boxes.detach()
    leaves, layers = ([pre_boxes] if corners else []), []
    for _ in range(num_layers):
        logits = torch.randn(batch, q, NUM_CLASSES, generator=g).requires_grad_()
        leaves.append(logits)
        if corners:
            layer_corners = torch.randn(batch, q, bins, generator=g).requires_grad_()
            leaves.append(layer_corners)
            boxes = distance2bbox(ref, integral(layer_corners, project), REG_SCALE)
            layers.append(
                {"pred_logits": logits, "pred_boxes": boxes, "pred_corners": layer_corners, "ref_points": ref}
            )
        else:
            boxes = torch.rand(batch, q, 4, generator=g).mul(0.4).add(0.2).requires_grad_()
            leaves.append(boxes)
            layers.append({"pred_logits": logits, "pred_boxes": boxes, "pred_corners": None, "ref_points": None})
    final = layers[-1]
    teacher_logits = final["pred_logits"] if corners else None
    aux = [dict(layer, teacher_corners=final["pred_corners"], teacher_logits=teacher_logits) for layer in layers[:-1]]
    pre_logits = torch.randn(batch, q, NUM_CLASSES, generator=g).requires_grad_()
    enc_logits = torch.randn(batch, q, NUM_CLASSES, generator=g).requires_grad_()
    enc_boxes = torch.rand(batch, q, 4, generator=g).mul(0.4).add(0.2).requires_grad_()
    leaves += ([pre_logits] if corners else []) + [enc_logits, enc_boxes]
    outputs = dict(
        final,
        aux_outputs=aux,
        pre_outputs={"pred_logits": pre_logits, "pred_boxes": pre_boxes} if corners else None,
        enc_outputs=[{"pred_logits": enc_logits, "pred_boxes": enc_boxes}],
    )
    return outputs, leaves


TARGETS = [target([0, 2], [[0.4, 0.5, 0.2, 0.3], [0.6, 0.4, 0.3, 0.2]]), target([1], [[0.5, 0.5, 0.3, 0.3]])]


def expected_keys(num_aux: int, corners: bool = True, pre: bool = True) -> set[str]:
    keys = {"loss_vfl", "loss_bbox", "loss_giou"} | ({"loss_fgl"} if corners else set())
    for i in range(num_aux):
        keys |= {f"loss_vfl_aux_{i}", f"loss_bbox_aux_{i}", f"loss_giou_aux_{i}"}
        keys |= {f"loss_fgl_aux_{i}", f"loss_ddf_aux_{i}"} if corners else set()
    keys |= {"loss_vfl_pre", "loss_bbox_pre", "loss_giou_pre"} if pre else set()
    return keys | {"loss_vfl_enc_0", "loss_bbox_enc_0", "loss_giou_enc_0"}


def check_finite_and_backward(losses: dict[str, torch.Tensor], leaves: list[torch.Tensor]) -> None:
    assert all(v.dim() == 0 and torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_criterion_union_matching_keys_values_and_backward() -> None:
    outputs, leaves = make_outputs()
    criterion = DFINECriterion(NUM_CLASSES)
    losses = criterion(outputs, TARGETS)
    assert set(losses) == expected_keys(NUM_LAYERS - 1)

    matcher = HungarianMatcher()
    named = [outputs, *outputs["aux_outputs"], outputs["pre_outputs"], *outputs["enc_outputs"]]
    own = [matcher(o["pred_logits"], o["pred_boxes"], TARGETS) for o in named]
    union = union_matching(own)
    num_union = float(sum(len(q) for q, _ in union))
    aux0, aux1, pre, enc = *outputs["aux_outputs"], outputs["pre_outputs"], outputs["enc_outputs"][0]
    # VFL: own matching, normalised by the 3 GT boxes; boxes, FGL and DDF: the union, normalised by its size
    vfl = varifocal_loss(aux1["pred_logits"], aux1["pred_boxes"], TARGETS, own[2], 3.0)
    assert losses["loss_vfl_aux_1"].item() == pytest.approx(vfl.item(), rel=1e-6)
    l1_enc, _ = box_losses(enc["pred_boxes"], TARGETS, union, num_union)
    assert losses["loss_bbox_enc_0"].item() == pytest.approx(5 * l1_enc.item(), rel=1e-6)
    _, giou_pre = box_losses(pre["pred_boxes"], TARGETS, union, num_union)
    assert losses["loss_giou_pre"].item() == pytest.approx(2 * giou_pre.item(), rel=1e-6)
    fgl = fgl_loss(aux0["pred_corners"], aux0["ref_points"], aux0["pred_boxes"], TARGETS, union, num_union)
    assert losses["loss_fgl_aux_0"].item() == pytest.approx(0.15 * fgl.item(), rel=1e-6)
    teacher_corners, teacher_logits = aux0["teacher_corners"], aux0["teacher_logits"]
    ddf = ddf_loss(aux0["pred_corners"], teacher_corners, teacher_logits, aux0["pred_boxes"], TARGETS, union)
    assert losses["loss_ddf_aux_0"].item() == pytest.approx(1.5 * ddf.item(), rel=1e-6)
    assert losses["loss_ddf_aux_0"] > 0
    check_finite_and_backward(losses, leaves)


def test_criterion_ddf_only_reaches_the_student() -> None:
    outputs, _ = make_outputs()
    losses = DFINECriterion(NUM_CLASSES)(outputs, TARGETS)
    losses["loss_ddf_aux_0"].backward()
    assert outputs["pred_corners"].grad is None and outputs["pred_logits"].grad is None
    assert outputs["aux_outputs"][0]["pred_corners"].grad.abs().sum() > 0


def test_criterion_images_without_gt() -> None:
    outputs, leaves = make_outputs(seed=1)
    losses = DFINECriterion(NUM_CLASSES)(outputs, [TARGETS[0], target([], [])])
    assert set(losses) == expected_keys(NUM_LAYERS - 1)
    check_finite_and_backward(losses, leaves)

    outputs, leaves = make_outputs(seed=2)
    losses = DFINECriterion(NUM_CLASSES)(outputs, [target([], []), target([], [])])
    assert set(losses) == expected_keys(NUM_LAYERS - 1)
    for key in ("loss_bbox", "loss_giou", "loss_fgl", "loss_bbox_enc_0"):
        assert losses[key].item() == 0.0
    assert losses["loss_vfl"] > 0 and losses["loss_ddf_aux_0"] > 0  # negatives and unmatched distillation remain
    sum(losses.values()).backward()
    assert all(leaf.grad is None or torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_criterion_without_union_matching() -> None:
    outputs, leaves = make_outputs(seed=3)
    criterion = DFINECriterion(NUM_CLASSES, weights={"bbox": 1.0}, union_matching=False)
    losses = criterion(outputs, TARGETS)
    assert set(losses) == expected_keys(NUM_LAYERS - 1)
    matcher = HungarianMatcher()
    pre, aux1 = outputs["pre_outputs"], outputs["aux_outputs"][1]
    own_pre = matcher(pre["pred_logits"], pre["pred_boxes"], TARGETS)
    own_aux1 = matcher(aux1["pred_logits"], aux1["pred_boxes"], TARGETS)
    l1_pre, _ = box_losses(pre["pred_boxes"], TARGETS, own_pre, 3.0)
    assert losses["loss_bbox_pre"].item() == pytest.approx(l1_pre.item(), rel=1e-6)  # bbox weight set to 1
    fgl = fgl_loss(aux1["pred_corners"], aux1["ref_points"], aux1["pred_boxes"], TARGETS, own_aux1, 3.0)
    assert losses["loss_fgl_aux_1"].item() == pytest.approx(0.15 * fgl.item(), rel=1e-6)
    check_finite_and_backward(losses, leaves)

    no_ddf = DFINECriterion(NUM_CLASSES, union_matching=False, use_ddf=False)(make_outputs(seed=3)[0], TARGETS)
    assert set(no_ddf) == expected_keys(NUM_LAYERS - 1) - {"loss_ddf_aux_0", "loss_ddf_aux_1"}


def test_criterion_direct_regression_baseline() -> None:
    outputs, leaves = make_outputs(seed=4, corners=False)
    losses = DFINECriterion(NUM_CLASSES)(outputs, TARGETS)
    assert set(losses) == expected_keys(NUM_LAYERS - 1, corners=False, pre=False)
    check_finite_and_backward(losses, leaves)


def test_criterion_zero_ddf_at_init_and_eval_layout() -> None:
    outputs, _ = make_outputs(seed=5)
    outputs["aux_outputs"][0]["pred_corners"] = outputs["pred_corners"]  # zero-initialised heads: equal corners
    losses = DFINECriterion(NUM_CLASSES)(outputs, TARGETS)
    assert losses["loss_ddf_aux_0"].item() == 0.0 and losses["loss_ddf_aux_1"] > 0

    outputs, _ = make_outputs(seed=6)
    outputs["aux_outputs"] = []  # eval mode may give no auxiliary layers
    assert set(DFINECriterion(NUM_CLASSES)(outputs, TARGETS)) == expected_keys(0)
    with pytest.raises(ValueError, match="classes"):
        DFINECriterion(NUM_CLASSES + 1)(outputs, TARGETS)
