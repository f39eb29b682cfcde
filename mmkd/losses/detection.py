"""D-FINE detection losses: FDR (W(n), the integral, FGL) and GO-LSD (union matching, DDF).

Reimplemented (not copied) from the team's notes on the official code, Peterande/D-FINE at 4a1f73a:
``src/zoo/dfine/dfine_criterion.py``, ``dfine_utils.py`` and ``matcher.py``. The section marks (§A2.2, §A3.3, ...)
are those of the notes (``reference/dfine_mst.md``, kept beside the repository), which cite the lines of
those files. One function per formula of §A3: :func:`varifocal_loss` (§A3.3), :func:`box_losses` (§A3.4),
:func:`fgl_loss` (§A3.5), :func:`ddf_loss` (§A3.6), :func:`union_matching` (§A3.7), and the
:class:`HungarianMatcher` (§A3.2). :class:`DFINECriterion` puts them together as the table of §A3.7.

Conventions (shared with the data and the detector):

- Boxes are normalised to [0, 1]; predictions and targets are ``cxcywh`` unless a name says ``xyxy``.
- Classes are contiguous 0-based indices with no background class (sigmoid / focal style).
- A target is ``{"labels": LongTensor [n], "boxes": FloatTensor [n, 4] cxcywh, ...}``; ``n`` may be 0.
- Matching indices are, per image, a pair ``(query_idx, gt_idx)`` of LongTensors (on CPU). The losses take them as
  they are or already flattened over the batch (:func:`flatten_match`), which the criterion does once per matching.
- Edge distributions ``pred_corners`` are ``[..., 4 * (reg_max + 1)]`` logits, edges in order left, top, right,
  bottom. Distances ``W_code``, the integral and the FGL targets are in "reg_scale units" (as the official code):
  a distance ``d`` moves an edge by ``d * w / reg_scale``.

Losses are computed in fp32 (inputs are cast), as the official criterion runs with autocast disabled.

Deviations from the official code (values are otherwise the same):

- IoU/GIoU clamp the union and enclosing areas at 1e-9 instead of asserting on degenerate boxes;
- union matching breaks count ties towards the lowest GT index and returns queries sorted (the official order
  is by count, with implementation-defined ties);
- DDF leaves out ``batch_scale = 8 / B`` (it cancels in the mixing, see :func:`sqrt_count_mix`);
- ``union_matching=False`` (an ablation the official code has no switch for) normalises the localisation
  losses by the number of GT boxes.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert

Target = dict[str, torch.Tensor]
Indices = list[tuple[torch.Tensor, torch.Tensor]]

# ----------------------------------------------------------------------------------------------------------------
# Box utilities
# ----------------------------------------------------------------------------------------------------------------


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x1, y1, x2, y2), torchvision's ``box_convert`` (as the data module)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def box_iou_and_giou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU of ``xyxy`` boxes, element-wise with broadcasting over the leading dims.

    Aligned pairs: ``box_iou_and_giou(a [K, 4], b [K, 4]) -> [K]``; the pairwise matrix:
    ``box_iou_and_giou(a[:, None], b[None]) -> [N, M]``. Unlike the official ``generalized_box_iou`` there is no
    assert on degenerate boxes; the union and enclosing areas are clamped at ``eps`` so they give no NaN.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter_wh = torch.minimum(boxes1[..., 2:], boxes2[..., 2:]) - torch.maximum(boxes1[..., :2], boxes2[..., :2])
    inter = inter_wh.clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    iou = inter / union.clamp(min=eps)
    hull_wh = torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])
    hull = hull_wh.clamp(min=0).prod(-1)
    return iou, iou - (hull - union) / hull.clamp(min=eps)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with x clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ----------------------------------------------------------------------------------------------------------------
# FDR: W(n), the integral, box decoding and the FGL targets (§A2.2, §A2.3, §A3.5)
# ----------------------------------------------------------------------------------------------------------------


def weighting_function(
    reg_max: int = 32, up: float | torch.Tensor = 0.5, reg_scale: float | torch.Tensor = 4.0
) -> torch.Tensor:
    """The ``reg_max + 1`` bin values ``W_code(n)`` of FDR, in reg_scale units (§A2.2), float32 on CPU,
    computed as the official training path does (D-FINE ``src/zoo/dfine/dfine_utils.py``,
    ``weighting_function`` with ``deploy=False``, lines 41-45): float32 tensor arithmetic on the
    frozen ``up`` and ``reg_scale`` parameters. (Its ``deploy=True`` branch computes in Python
    floats and rounds once; that differs by up to 9.5e-7 at reg_scale 4 and 1.9e-6 at 8, in reg_scale
    units.)

    ``W_code = [-2 up rs] + [1 - s^i for i = N/2-1 .. 1] + [0] + [s^i - 1 for i = 1 .. N/2-1] + [2 up rs]`` with
    ``N = reg_max``, ``rs = reg_scale`` and ``s = (up rs + 1)^(2 / (N - 2))``. In units of the box width/height,
    ``W(n) = W_code(n) / rs`` has the closed form (``a = up``, ``c = 1 / rs``)::

        W(0) = -2a
        W(n) =  c - c (a/c + 1)^((N - 2n) / (N - 2))    for 1 <= n < N/2
        W(n) = -c + c (a/c + 1)^((2n - N) / (N - 2))    for N/2 <= n <= N - 1
        W(N) =  2a

    It is antisymmetric (so a uniform distribution integrates to 0), finest near 0, and ``W(1) = -a``,
    ``W(N-1) = a``. ``up`` and ``reg_scale`` may be (frozen) parameters; only their absolute values are used.
    """
    up = torch.tensor([abs(float(up))], dtype=torch.float32)
    reg_scale = torch.tensor([abs(float(reg_scale))], dtype=torch.float32)
    upper1, upper2 = up * reg_scale, up * reg_scale * 2
    step = (upper1 + 1) ** (2 / (reg_max - 2))
    left = [1 - step**i for i in range(reg_max // 2 - 1, 0, -1)]
    right = [step**i - 1 for i in range(1, reg_max // 2)]
    return torch.cat([-upper2, *left, torch.zeros(1), *right, upper2])


def integral(corner_logits: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """Expected edge distances: ``softmax`` over the bins of each edge, weighted sum with ``project`` (§A2.3).

    ``corner_logits [..., 4 * (reg_max + 1)]``, ``project = weighting_function(...)`` ``[reg_max + 1]``;
    returns ``[..., 4]`` in reg_scale units (left, top, right, bottom).
    """
    num_bins = project.numel()
    probs = F.softmax(corner_logits.reshape(*corner_logits.shape[:-1], 4, num_bins), dim=-1)
    return probs @ project.to(probs)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, reg_scale: float | torch.Tensor) -> torch.Tensor:
    """Decode edge distances relative to reference boxes (§A2.3).

    ``points [..., 4]`` cxcywh, ``distance [..., 4]`` (left, top, right, bottom) in reg_scale units. Each edge sits
    at ``(0.5 rs + d) * size / rs`` from the centre, so ``d = 0`` keeps the reference edge and ``d = W_code(n)``
    moves it outward by ``W(n) * size``. Returns cxcywh.
    """
    rs = abs(float(reg_scale))
    cx, cy, w, h = points.unbind(-1)
    x1 = cx - (0.5 * rs + distance[..., 0]) * (w / rs)
    y1 = cy - (0.5 * rs + distance[..., 1]) * (h / rs)
    x2 = cx + (0.5 * rs + distance[..., 2]) * (w / rs)
    y2 = cy + (0.5 * rs + distance[..., 3]) * (h / rs)
    return box_xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], dim=-1))


@torch.no_grad()
def translate_gt(
    phi: torch.Tensor, reg_max: int, reg_scale: float | torch.Tensor, up: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-bin interpolation of target distances ``phi`` (reg_scale units) in the non-uniform W space (§A3.5).

    Returns ``(left_bin, weight_right, weight_left)``, each shaped like ``phi``:

    - inside ``[W(0), W(N))``: ``left_bin = #{n: W(n) <= phi} - 1`` (as a float) and
      ``weight_right = |phi - W(left)| / (|phi - W(left)| + |W(left + 1) - phi|)``, ``weight_left = 1 - weight_right``;
    - ``phi < W(0)``: ``left_bin = 0``, ``weight_left = 1`` (all mass on bin 0);
    - ``phi >= W(N)``: ``left_bin = N - 0.1``, ``weight_right = 1`` (all mass on bin N; ``long()`` of the index
      gives the left bin N - 1).
    """
    values = weighting_function(reg_max, up, reg_scale).to(phi)
    left = (values <= phi.unsqueeze(-1)).sum(-1) - 1
    below, above = left < 0, left >= reg_max
    inside = ~below & ~above
    left_clamped = left.clamp(0, reg_max - 1)
    dist_left = (phi - values[left_clamped]).abs()
    dist_right = (values[left_clamped + 1] - phi).abs()
    interpolated = dist_left / (dist_left + dist_right)
    weight_right = torch.where(inside, interpolated, above.to(phi.dtype))
    weight_left = torch.where(inside, 1 - interpolated, below.to(phi.dtype))
    left_bin = torch.where(above, torch.full_like(phi, reg_max - 0.1), left_clamped.to(phi.dtype))
    return left_bin, weight_right, weight_left


@torch.no_grad()
def bbox2distance(
    points: torch.Tensor,
    gt_xyxy: torch.Tensor,
    reg_max: int,
    reg_scale: float | torch.Tensor,
    up: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FGL targets of ``gt_xyxy [..., 4]`` relative to the reference boxes ``points [..., 4]`` cxcywh (§A3.5).

    The distances ``phi_left = (cx - x1) / (w / rs) - 0.5 rs`` (likewise top, right, bottom; ``1e-16`` guards the
    divisions) are the inverse of :func:`distance2bbox`; :func:`translate_gt` turns them into
    ``(target_bins, weight_right, weight_left)``, each ``[..., 4]``; ``target_bins`` (the left bin, a float, see
    :func:`translate_gt`) is clamped to ``[0, N - 0.1]``. No gradient.
    """
    rs = abs(float(reg_scale))
    cx, cy, w, h = points.float().unbind(-1)
    x1, y1, x2, y2 = gt_xyxy.float().unbind(-1)
    unit_w, unit_h = w / rs + 1e-16, h / rs + 1e-16
    phi = torch.stack([(cx - x1) / unit_w, (cy - y1) / unit_h, (x2 - cx) / unit_w, (y2 - cy) / unit_h], -1) - 0.5 * rs
    target_bins, weight_right, weight_left = translate_gt(phi, reg_max, reg_scale, up)
    return target_bins.clamp(0, reg_max - 0.1), weight_right, weight_left


# ----------------------------------------------------------------------------------------------------------------
# Matching (§A3.2, §A3.7)
# ----------------------------------------------------------------------------------------------------------------


def _empty_match() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


class HungarianMatcher(nn.Module):
    """One-to-one matching of queries to ground truths, per image (§A3.2).

    ``C = cost_bbox * L1(cxcywh) + cost_class * focal_cost + cost_giou * (-GIoU)`` with the focal class cost
    ``alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1 - p + 1e-8))`` at each GT's class, ``p`` the
    sigmoid probability. ``nan_to_num(C, nan=1.0)``, then ``scipy.optimize.linear_sum_assignment`` on CPU per image.
    As in the official code, one cost matrix is built for the whole batch (all queries against all targets) and
    moved to the CPU once, then split by image: a loop of small per-image matrices costs a device sync each.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target: Target) -> torch.Tensor:
        """``[Q, n]`` cost of ``Q`` predictions (``logits [Q, C]``, ``boxes [Q, 4]`` cxcywh) against ``n`` targets."""
        prob = logits.float().sigmoid()[:, target["labels"]]
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        gt_boxes = target["boxes"].float()
        cost_bbox = torch.cdist(boxes.float(), gt_boxes, p=1)
        _, giou = box_iou_and_giou(box_cxcywh_to_xyxy(boxes.float())[:, None], box_cxcywh_to_xyxy(gt_boxes)[None])
        return self.cost_bbox * cost_bbox + self.cost_class * (pos - neg) - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[Target]) -> Indices:
        """``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` -> per image ``(query_idx, gt_idx)`` (CPU LongTensors,
        sorted by query); an image without GT gives two empty tensors."""
        sizes = [len(target["labels"]) for target in targets]
        if sum(sizes) == 0:
            return [_empty_match() for _ in targets]
        every_target = {key: torch.cat([target[key] for target in targets]) for key in ("labels", "boxes")}
        batch, queries = pred_logits.shape[:2]
        cost = self.cost_matrix(pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1), every_target)
        cost = torch.nan_to_num(cost.view(batch, queries, -1).cpu(), nan=1.0)
        indices = []
        for image, image_cost in enumerate(cost.split(sizes, dim=-1)):
            if sizes[image] == 0:
                indices.append(_empty_match())
                continue
            query_idx, gt_idx = linear_sum_assignment(image_cost[image].numpy())
            indices.append((torch.as_tensor(query_idx, dtype=torch.long), torch.as_tensor(gt_idx, dtype=torch.long)))
        return indices


def union_matching(indices_list: list[Indices]) -> Indices:
    """GO-LSD union set (§A3.7): per image, every query matched by any output, to the GT it was matched to most often.

    ``indices_list`` holds the matchings of all outputs (final, aux, pre, encoder), each a list over images of
    ``(query_idx, gt_idx)``. All pairs are pooled and counted; each query keeps its most frequent GT, so one GT may
    get several queries (one-to-many localisation). Ties go to the lowest GT index (deterministic); the official
    code breaks them with a non-stable ``argsort``, so its tie order is implementation-defined. Queries come out
    sorted.
    """
    union = []
    for per_output in zip(*indices_list):
        counts = Counter(
            (query, gt) for query_idx, gt_idx in per_output for query, gt in zip(query_idx.tolist(), gt_idx.tolist())
        )
        best: dict[int, tuple[int, int]] = {}  # query -> (count, gt)
        for (query, gt), count in sorted(counts.items()):
            if query not in best or count > best[query][0]:
                best[query] = (count, gt)
        queries = sorted(best)
        union.append(
            (torch.tensor(queries, dtype=torch.long), torch.tensor([best[q][1] for q in queries], dtype=torch.long))
        )
    return union


class BatchTargets(NamedTuple):
    """The targets of a batch concatenated over images: ``labels [N]``, ``boxes [N, 4]`` (cxcywh, fp32) on the device,
    and ``offsets [B]`` (CPU), the position of each image's first target."""

    labels: torch.Tensor
    boxes: torch.Tensor
    offsets: torch.Tensor


def concat_targets(targets: list[Target], device: torch.device) -> BatchTargets:
    """:class:`BatchTargets` of one target dict per image."""
    sizes = torch.tensor([len(target["labels"]) for target in targets], dtype=torch.long)
    labels = torch.cat([target["labels"] for target in targets]).to(device)
    boxes = torch.cat([target["boxes"] for target in targets]).to(device, torch.float32)
    return BatchTargets(labels, boxes, sizes.cumsum(0) - sizes)


class FlatMatch(NamedTuple):
    """A matching flattened over the batch, on the device: the ``K`` matched predictions are
    ``pred[batch_idx, query_idx]`` and their GT ``labels [K]`` and ``boxes [K, 4]`` (cxcywh, fp32)."""

    batch_idx: torch.Tensor
    query_idx: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor


def flatten_match(
    indices: Indices | FlatMatch, targets: list[Target] | BatchTargets, device: torch.device
) -> FlatMatch:
    """Per-image ``(query_idx, gt_idx)`` (CPU) -> :class:`FlatMatch`, in image order; a ``FlatMatch`` is returned as is.

    The flat indices are built on the CPU and moved to ``device`` in one copy; the GTs are gathered in one index op
    each from the concatenated targets. ``targets`` may be given already concatenated (:func:`concat_targets`).
    """
    if isinstance(indices, FlatMatch):
        return indices
    if not isinstance(targets, BatchTargets):
        targets = concat_targets(targets, device)
    sizes = torch.tensor([len(query_idx) for query_idx, _ in indices], dtype=torch.long)
    batch_idx = torch.repeat_interleave(sizes)
    query_idx = torch.cat([query_idx for query_idx, _ in indices])
    target_idx = torch.cat([gt_idx for _, gt_idx in indices]) + torch.repeat_interleave(targets.offsets, sizes)
    flat = torch.stack([batch_idx, query_idx, target_idx]).to(device, non_blocking=True)
    batch_idx, query_idx, target_idx = flat.unbind(0)
    return FlatMatch(batch_idx, query_idx, targets.labels[target_idx], targets.boxes[target_idx])


def _matched_iou(pred_boxes: torch.Tensor, match: FlatMatch) -> torch.Tensor:
    """Detached IoU ``[K]`` of each matched prediction (cxcywh) with its GT."""
    src = box_cxcywh_to_xyxy(pred_boxes[match.batch_idx, match.query_idx].detach().float())
    iou, _ = box_iou_and_giou(src, box_cxcywh_to_xyxy(match.boxes))
    return iou


# ----------------------------------------------------------------------------------------------------------------
# Losses (§A3.3-A3.6)
# ----------------------------------------------------------------------------------------------------------------


def varifocal_loss(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: list[Target] | BatchTargets,
    indices: Indices | FlatMatch,
    num_boxes: float,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Varifocal loss (§A3.3): BCE-with-logits towards an IoU-valued target, ``.mean(1).sum() * Q / num_boxes``.

    The target score is the detached IoU of each matched pair at its GT class, 0 elsewhere. The weight is
    ``alpha * sigmoid(x)^gamma`` (detached) on every non-GT entry and the target score on the GT entry.
    """
    logits = pred_logits.float()
    match = flatten_match(indices, targets, logits.device)
    where = (match.batch_idx, match.query_idx, match.labels)
    one_hot = torch.zeros_like(logits)
    one_hot[where] = 1.0
    score = torch.zeros_like(logits)
    score[where] = _matched_iou(pred_boxes, match)
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - one_hot) + score
    loss = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def box_losses(
    pred_boxes: torch.Tensor, targets: list[Target] | BatchTargets, indices: Indices | FlatMatch, num_boxes: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, 1 - GIoU)`` of the matched boxes (cxcywh), each summed and divided by ``num_boxes`` (§A3.4)."""
    match = flatten_match(indices, targets, pred_boxes.device)
    src = pred_boxes[match.batch_idx, match.query_idx].float()
    l1 = F.l1_loss(src, match.boxes, reduction="none").sum() / num_boxes
    _, giou = box_iou_and_giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(match.boxes))
    return l1, (1 - giou).sum() / num_boxes


def fgl_target_bins(
    ref_points: torch.Tensor,
    targets: list[Target] | BatchTargets,
    indices: Indices | FlatMatch,
    reg_max: int,
    reg_scale: float | torch.Tensor,
    up: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`bbox2distance` of each matched GT relative to its query's reference box ``ref_points [B, Q, 4]``.

    Returns ``(target_bins, weight_right, weight_left)``, each ``[K, 4]``, in the order of ``indices``. Since every
    decoder layer refines the same reference box, one call serves all layers that share ``indices`` (§A3.5).
    """
    match = flatten_match(indices, targets, ref_points.device)
    ref = ref_points[match.batch_idx, match.query_idx].detach()
    return bbox2distance(ref, box_cxcywh_to_xyxy(match.boxes), reg_max, reg_scale, up)


def two_bin_cross_entropy(
    logits: torch.Tensor, target_bins: torch.Tensor, weight_right: torch.Tensor, weight_left: torch.Tensor
) -> torch.Tensor:
    """``weight_left * CE(logits, n_left) + weight_right * CE(logits, n_left + 1)`` with ``n_left = long(target_bins)``.

    ``logits [..., reg_max + 1]``; the other arguments have the leading shape ``[...]``, which the result has too.
    This is the official ``unimodal_distribution_focal_loss`` before its IoU weight and reduction.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    left = target_bins.long().unsqueeze(-1)
    ce_left = -log_probs.gather(-1, left).squeeze(-1)
    ce_right = -log_probs.gather(-1, left + 1).squeeze(-1)
    return weight_left * ce_left + weight_right * ce_right


def fgl_loss(
    pred_corners: torch.Tensor,
    ref_points: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: list[Target] | BatchTargets,
    indices: Indices | FlatMatch,
    num_boxes: float,
    reg_max: int = 32,
    reg_scale: float | torch.Tensor = 4.0,
    up: float | torch.Tensor = 0.5,
    cached_targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fine-grained localisation loss (§A3.5).

    ``sum_{matched k, edges e} IoU_k * two_bin_cross_entropy(corners_ke, targets_ke) / num_boxes``, with ``IoU_k``
    the detached IoU of this layer's box ``pred_boxes [B, Q, 4]`` with its GT, and the targets
    :func:`fgl_target_bins` of the shared reference box ``ref_points [B, Q, 4]``. ``cached_targets`` (that
    function's result for the same ``indices``) skips recomputing them, so that all layers share one set.
    """
    match = flatten_match(indices, targets, pred_corners.device)
    corners = pred_corners[match.batch_idx, match.query_idx].float().reshape(-1, 4, reg_max + 1)
    if cached_targets is None:
        cached_targets = fgl_target_bins(ref_points, targets, match, reg_max, reg_scale, up)
    ce = two_bin_cross_entropy(corners, *cached_targets)
    iou = _matched_iou(pred_boxes, match)
    return (ce * iou.unsqueeze(-1)).sum() / num_boxes


def sqrt_count_mix(
    mean_matched: torch.Tensor,
    mean_unmatched: torch.Tensor,
    count_matched: float | torch.Tensor,
    count_unmatched: float | torch.Tensor,
) -> torch.Tensor:
    """``(mean_m * sqrt(K_m) + mean_u * sqrt(K_u)) / (sqrt(K_m) + sqrt(K_u))``, the DDF group mixing (§A3.6).

    Invariant to a common factor on both counts; this is why the official ``batch_scale = 8 / B`` is left out.
    The counts may be numbers or (float) tensors.
    """
    root_m, root_u = count_matched**0.5, count_unmatched**0.5
    return (mean_matched * root_m + mean_unmatched * root_u) / (root_m + root_u)


def ddf_loss(
    pred_corners: torch.Tensor,
    teacher_corners: torch.Tensor,
    teacher_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: list[Target] | BatchTargets,
    indices: Indices | FlatMatch,
    temperature: float = 5.0,
    counts: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Decoupled distillation focal loss of GO-LSD (§A3.6), over all B x Q x 4 edge distributions.

    Per edge ``KL_ke = T^2 KL(softmax(t/T) || softmax(s/T))`` with the teacher (``teacher_corners``, the final
    layer) detached. The detached weight is this layer's IoU with the GT for the queries in ``indices`` (the union
    set), and ``max_c sigmoid(teacher_logits)`` for the others. The weighted KL is averaged within each group and
    the two means are mixed by :func:`sqrt_count_mix` with the edge counts: this layer's own, or ``counts``
    (matched, unmatched) when given (the denoising layers take those of the last auxiliary layer, as the official
    criterion keeps ``num_pos``/``num_neg`` from it). Returns ``0 * sum`` when the student is the teacher (the
    official guard for the last layer).
    """
    num_bins = pred_corners.shape[-1] // 4
    if torch.equal(pred_corners, teacher_corners):
        return pred_corners.float().sum() * 0
    student = pred_corners.float().reshape(-1, num_bins)
    teacher = teacher_corners.detach().float().reshape(-1, num_bins)
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1), reduction="none"
    ).sum(-1) * temperature**2

    match = flatten_match(indices, targets, pred_corners.device)
    weight = teacher_logits.detach().float().sigmoid().amax(-1)  # [B, Q]
    weight[match.batch_idx, match.query_idx] = _matched_iou(pred_boxes, match)
    matched = torch.zeros_like(weight, dtype=torch.bool)
    matched[match.batch_idx, match.query_idx] = True
    weighted_kl = weight.unsqueeze(-1) * kl.reshape(*weight.shape, 4)  # [B, Q, 4]
    matched = matched.unsqueeze(-1).expand_as(weighted_kl)

    # group means as masked sums over counts (0 for an empty group), so no host sync
    num_matched = matched.sum(dtype=torch.float32)
    num_unmatched = matched.numel() - num_matched
    mean_matched = weighted_kl.where(matched, 0).sum() / num_matched.clamp(min=1)
    mean_unmatched = weighted_kl.where(~matched, 0).sum() / num_unmatched.clamp(min=1)
    if counts is not None:
        num_matched, num_unmatched = counts
    return sqrt_count_mix(mean_matched, mean_unmatched, num_matched, num_unmatched)


# ----------------------------------------------------------------------------------------------------------------
# The criterion (§A3.1, §A3.7)
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_WEIGHTS = {"vfl": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}

# The detector's output dict. mmkd's layout (DFineDetector) names the encoder proposals
# ``enc_outputs``; the official DFINETransformer (``src/zoo/dfine/dfine_decoder.py``, the ``out`` dict
# of ``forward`` in training) names them ``enc_aux_outputs`` and adds ``enc_meta`` and the FDR
# constants ``up`` and ``reg_scale``. Both layouts are read; every other key is an error.
OUTPUT_KEYS = frozenset({
    "pred_logits", "pred_boxes", "pred_corners", "ref_points", "aux_outputs", "pre_outputs", "enc_outputs",
    "enc_aux_outputs", "enc_meta", "up", "reg_scale", "dn_outputs", "dn_pre_outputs", "dn_meta",
})  # fmt: skip
# keys of one layer's dict (final, aux, pre, encoder); ``up``/``reg_scale`` are what the official
# criterion writes into its aux dicts
LAYER_KEYS = frozenset({"pred_logits", "pred_boxes", "pred_corners", "ref_points", "teacher_corners", "teacher_logits", "up", "reg_scale"})


class DetectionOutputError(ValueError):
    """A detector output the criterion cannot take in full: an unknown key, an output it has no
    losses for, or constants that disagree with the criterion's. Raised instead of leaving any
    part of the output out of the losses."""


def _mean_over_ranks(count: int, device: torch.device) -> float:
    """A box count, averaged over ranks when torch.distributed is initialised, clamped at 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(count), 1.0)
    value = torch.tensor([float(count)], device=device)
    dist.all_reduce(value)
    return (value / dist.get_world_size()).clamp(min=1).item()


class DFINECriterion(nn.Module):
    """The D-FINE losses of one forward, as the table of §A3.7; returns the **weighted** losses.

    Keys (official names): ``loss_vfl``, ``loss_bbox``, ``loss_giou``, ``loss_fgl`` for the final layer, the same
    plus ``loss_ddf`` with suffix ``_aux_{i}`` for each auxiliary layer, ``loss_{vfl,bbox,giou}_pre`` for the
    layer-0 box head and ``loss_{vfl,bbox,giou}_enc_{i}`` for each encoder output; with contrastive denoising
    queries, the same five with ``_dn_{i}`` for every decoder layer (the last included) and
    ``loss_{vfl,bbox,giou}_dn_pre``. ``loss_fgl`` is present where
    ``pred_corners`` is not None, ``loss_ddf`` where ``teacher_corners`` is not None and ``use_ddf``; with
    ``pred_corners`` None everywhere (the direct-regression baseline) there are only VFL, L1 and GIoU. For one
    output layout every key is present on every call, also without any GT (zeros that keep the graph), so
    DDP ranks stay in step.

    - Every output gets its own Hungarian matching, used for its VFL, normalised by the number of GT boxes.
    - ``union_matching=True`` (GO-LSD): L1/GIoU of every output and FGL/DDF use the union of all matchings
      (:func:`union_matching`), normalised by its size; the FGL targets are computed once per forward from
      ``outputs["ref_points"]`` (the reference box all layers share). ``union_matching=False`` (the "FDR without
      GO-LSD" ablation): each output uses its own matching for everything, normalised by the number of GT, with
      FGL targets per output.
    - Box counts are averaged over ranks under torch.distributed and clamped at 1.
    - NaNs in the losses are zeroed (``nan_to_num``) as the official code does.

    - Denoising outputs (``dn_outputs``, ``dn_pre_outputs`` with ``dn_meta``, official
      ``dfine_criterion.py``, the "cdn auxiliary losses"): matched by construction (positive query
      ``2Mg + j`` of group ``g`` to GT ``j``, :func:`~mmkd.models.detr.contrastive_denoising_queries`), every
      loss on that matching normalised by ``G`` times the number of GT boxes, the FGL targets computed
      once from the denoising reference boxes, and DDF mixed with the edge counts of the last auxiliary
      layer (the official ``num_pos``/``num_neg``).

    ``outputs`` is the detector's dict (see the shared contract): ``pred_logits``, ``pred_boxes``,
    ``pred_corners``, ``ref_points``, ``aux_outputs`` (with ``teacher_corners``, ``teacher_logits``),
    ``pre_outputs`` and ``enc_outputs``; missing or None optional entries are skipped. The official model's
    layout is read too (:meth:`canonical_outputs`): encoder proposals under ``enc_aux_outputs`` with ``enc_meta``,
    and ``up``/``reg_scale``, which must equal the criterion's. Keys of neither layout, and denoising outputs
    without a complete ``dn_meta``, raise :class:`DetectionOutputError`.

    Args:
        num_classes: C of ``pred_logits``, checked on each call.
        weights: loss weights by short name; missing names take the D-FINE defaults
            ``{"vfl": 1, "bbox": 5, "giou": 2, "fgl": 0.15, "ddf": 1.5}``, applied to every output alike.
        matcher: defaults to ``HungarianMatcher()`` (costs class 2, bbox 5, giou 2; alpha 0.25, gamma 2).
        vfl_alpha, vfl_gamma: VFL focusing (0.75, 2).
        reg_max, reg_scale, up: the FDR constants of the detector (32, 4, 0.5).
        ddf_temperature: DDF temperature T (5).
        union_matching: GO-LSD union matching for the localisation losses.
        use_ddf: add the DDF loss on auxiliary layers.
    """

    def __init__(
        self,
        num_classes: int,
        weights: dict[str, float] | None = None,
        matcher: HungarianMatcher | None = None,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        reg_max: int = 32,
        reg_scale: float = 4.0,
        up: float = 0.5,
        ddf_temperature: float = 5.0,
        union_matching: bool = True,
        use_ddf: bool = True,
    ) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; expected names in {sorted(DEFAULT_WEIGHTS)}")
        self.num_classes = num_classes
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.vfl_alpha, self.vfl_gamma = vfl_alpha, vfl_gamma
        self.reg_max, self.reg_scale, self.up = reg_max, float(reg_scale), float(up)
        self.ddf_temperature = ddf_temperature
        self.union_matching, self.use_ddf = union_matching, use_ddf

    def canonical_outputs(self, outputs: dict) -> dict:
        """``outputs`` in mmkd's layout: the official ``enc_aux_outputs`` become ``enc_outputs``, ``enc_meta``,
        ``up`` and ``reg_scale`` are checked and dropped; anything the losses would not read is an error."""
        if outputs.get("dn_outputs") is not None:
            missing = sorted({"dn_positive_idx", "dn_num_group"} - set(outputs.get("dn_meta") or {}))
            if missing:
                raise DetectionOutputError(
                    f"the outputs hold contrastive-denoising layers (dn_outputs) but dn_meta lacks {missing}: the denoising "
                    "queries cannot be matched to their ground truth without them"
                )
        unknown = sorted(set(outputs) - OUTPUT_KEYS)
        if unknown:
            raise DetectionOutputError(f"unknown detector outputs {unknown}; the criterion reads {sorted(OUTPUT_KEYS)}")
        if "enc_outputs" in outputs and "enc_aux_outputs" in outputs:
            raise DetectionOutputError("the outputs hold both enc_outputs (mmkd) and enc_aux_outputs (official); give one")
        if (outputs.get("enc_meta") or {}).get("class_agnostic"):
            raise DetectionOutputError(
                "enc_meta.class_agnostic=True (the official query_select_method='agnostic') scores the encoder proposals "
                "with one class; this criterion has only the default class-aware encoder losses"
            )
        for name, value in (("up", self.up), ("reg_scale", self.reg_scale)):
            given = outputs.get(name)
            if given is not None and abs(float(given) - value) > 1e-6:
                raise DetectionOutputError(f"the outputs' {name}={float(given)} differs from the criterion's {name}={value}")
        canonical = {key: value for key, value in outputs.items() if key not in ("enc_aux_outputs", "enc_meta", "up", "reg_scale")}
        if "enc_aux_outputs" in outputs:
            canonical["enc_outputs"] = outputs["enc_aux_outputs"]
        layers = [canonical, *(canonical.get("aux_outputs") or []), *(canonical.get("enc_outputs") or []), *(canonical.get("dn_outputs") or [])]
        layers += [canonical[key] for key in ("pre_outputs", "dn_pre_outputs") if canonical.get(key) is not None]
        for layer in layers[1:]:
            unknown = sorted(set(layer) - LAYER_KEYS)
            if unknown:
                raise DetectionOutputError(f"unknown keys {unknown} in a layer's outputs; a layer has {sorted(LAYER_KEYS)}")
        return canonical

    @staticmethod
    def _named_outputs(outputs: dict) -> list[tuple[str, dict]]:
        """(key suffix, output dict) of every output that gets losses, in the official order."""
        named = [("", outputs)]
        named += [(f"_aux_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
        if outputs.get("pre_outputs") is not None:
            named.append(("_pre", outputs["pre_outputs"]))
        named += [(f"_enc_{i}", enc) for i, enc in enumerate(outputs.get("enc_outputs") or [])]
        return named

    def forward(self, outputs: dict, targets: list[Target]) -> dict[str, torch.Tensor]:
        """Weighted losses of one forward; ``outputs`` as the detector returns it, ``targets`` one dict per image."""
        outputs = self.canonical_outputs(outputs)
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {outputs['pred_logits'].shape[-1]} classes, expected {self.num_classes}")
        device = outputs["pred_logits"].device
        named = self._named_outputs(outputs)
        own = {suffix: self.matcher(out["pred_logits"], out["pred_boxes"], targets) for suffix, out in named}
        num_gt = _mean_over_ranks(sum(len(t["labels"]) for t in targets), device)
        # every matching is flattened once (one index copy to the device, one gather of the GTs)
        batch_targets = concat_targets(targets, device)
        own_flat = {suffix: flatten_match(indices, batch_targets, device) for suffix, indices in own.items()}

        # (matching, normaliser) of the localisation losses (L1, GIoU, FGL, DDF) of each output
        shared_fgl_targets = None
        if self.union_matching:
            union = union_matching(list(own.values()))
            num_union = _mean_over_ranks(sum(len(query_idx) for query_idx, _ in union), device)
            union_flat = flatten_match(union, batch_targets, device)
            localisation = {suffix: (union_flat, num_union) for suffix in own}
            if outputs.get("pred_corners") is not None:
                shared_fgl_targets = fgl_target_bins(
                    outputs["ref_points"], batch_targets, union_flat, self.reg_max, self.reg_scale, self.up
                )
        else:
            localisation = {suffix: (flat, num_gt) for suffix, flat in own_flat.items()}

        losses: dict[str, torch.Tensor] = {}
        ddf_counts = None  # edge counts (matched, unmatched) of the last auxiliary layer with DDF
        for suffix, out in named:
            loc_indices, loc_num = localisation[suffix]
            losses |= self._output_losses(suffix, out, batch_targets, own_flat[suffix], num_gt, loc_indices, loc_num,
                                          shared_fgl_targets)  # fmt: skip
            if out.get("teacher_corners") is not None:
                matched = 4.0 * loc_indices.query_idx.numel()
                ddf_counts = (matched, 4.0 * out["pred_corners"].shape[0] * out["pred_corners"].shape[1] - matched)
        if outputs.get("dn_outputs") is not None:
            losses |= self._denoising_losses(outputs, targets, batch_targets, num_gt, ddf_counts)
        return {key: torch.nan_to_num(value, nan=0.0) for key, value in losses.items()}

    def _output_losses(
        self, suffix: str, out: dict, batch_targets: BatchTargets, vfl_match: FlatMatch, vfl_num: float,
        loc_match: FlatMatch, loc_num: float, fgl_targets: tuple | None, ddf_counts: tuple[float, float] | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The weighted VFL, L1, GIoU and, where the output has them, FGL and DDF of one output."""
        w = self.weights
        losses = {"loss_vfl" + suffix: w["vfl"] * varifocal_loss(
            out["pred_logits"], out["pred_boxes"], batch_targets, vfl_match, vfl_num, self.vfl_alpha, self.vfl_gamma,
        )}  # fmt: skip
        l1, giou = box_losses(out["pred_boxes"], batch_targets, loc_match, loc_num)
        losses["loss_bbox" + suffix], losses["loss_giou" + suffix] = w["bbox"] * l1, w["giou"] * giou
        if out.get("pred_corners") is not None:
            losses["loss_fgl" + suffix] = w["fgl"] * fgl_loss(
                out["pred_corners"], out["ref_points"], out["pred_boxes"], batch_targets, loc_match,
                loc_num, self.reg_max, self.reg_scale, self.up, cached_targets=fgl_targets,
            )  # fmt: skip
        if self.use_ddf and out.get("teacher_corners") is not None:
            losses["loss_ddf" + suffix] = w["ddf"] * ddf_loss(
                out["pred_corners"], out["teacher_corners"], out["teacher_logits"], out["pred_boxes"],
                batch_targets, loc_match, self.ddf_temperature, ddf_counts,
            )  # fmt: skip
        return losses

    def _denoising_losses(
        self, outputs: dict, targets: list[Target], batch_targets: BatchTargets, num_gt: float,
        ddf_counts: tuple[float, float] | None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The losses of the contrastive-denoising layers: GT ``j`` of an image is the target of its positive
        query in every group, the official ``get_cdn_matched_indices``; normalised by groups x GT boxes."""
        meta, layers = outputs["dn_meta"], outputs["dn_outputs"]
        groups = int(meta["dn_num_group"])
        indices = []
        for image, (positive, target) in enumerate(zip(meta["dn_positive_idx"], targets)):
            gt_idx = torch.arange(len(target["labels"])).repeat(groups)
            if len(positive) != len(gt_idx):
                raise DetectionOutputError(
                    f"dn_meta gives image {image} {len(positive)} positive denoising queries, but its {len(target['labels'])} "
                    f"GT boxes in {groups} groups need {len(gt_idx)}: the denoising queries were built from other targets"
                )
            indices.append((positive.detach().cpu().long(), gt_idx))
        device = outputs["pred_logits"].device
        match = flatten_match(indices, batch_targets, device)
        num_boxes = num_gt * groups if num_gt * groups > 0 else 1.0
        fgl_targets = None
        if layers and layers[0].get("pred_corners") is not None:
            fgl_targets = fgl_target_bins(layers[0]["ref_points"], batch_targets, match, self.reg_max, self.reg_scale, self.up)
        named = [(f"_dn_{i}", layer) for i, layer in enumerate(layers)]
        if outputs.get("dn_pre_outputs") is not None:
            named.append(("_dn_pre", outputs["dn_pre_outputs"]))
        losses: dict[str, torch.Tensor] = {}
        for suffix, out in named:
            losses |= self._output_losses(suffix, out, batch_targets, match, num_boxes, match, num_boxes, fgl_targets, ddf_counts)
        return losses
