"""A compact DETR in D-FINE's layout, with D-FINE's Fine-grained Distribution Refinement (FDR).

:class:`DFineDetector` = timm backbone -> :class:`HybridEncoder` (a light AIFI + FPN/PAN) ->
:class:`DFineDecoder` (RT-DETR query selection, decoder layers with D-FINE's :class:`Gate`, and
either :class:`FDRHead` or RT-DETR's direct box regression). It is small enough to train on
128x128 images in minutes; the semantics follow the official ``src/zoo/dfine/dfine_decoder.py`` (``TransformerDecoder``, ``Integral``, ``LQE``, ``Gate``) and ``dfine_utils.py``.

Boxes are normalised to [0, 1] and in ``cxcywh``. Classes are 0-based, with no background class
(sigmoid / focal-style logits).

Deviations from D-FINE (the official ``DFINETransformer``/``HybridEncoder``):

- Cross-attention is plain ``nn.MultiheadAttention`` from the queries to the whole flattened
  memory, not multi-scale deformable attention. The memory gets a level embedding (added to its
  content) and its keys a 2-D sine position embedding of the normalised cell centres; the
  queries get ``query_pos_head(reference box)`` as in D-FINE. The moving (detached) reference box
  therefore only steers attention through ``query_pos``.
- The encoder is one AIFI layer plus one 3x3 conv block per FPN/PAN step (no GELAN/CSP blocks,
  no SCDown); the AIFI position embedding uses normalised cell centres.
- Contrastive denoising (CDN, from RT-DETR; the official ``denoising.py``) is reimplemented in
  :func:`contrastive_denoising_queries` with the official defaults (100 denoising queries at most,
  label noise 0.5, box noise 1.0) and on by default; ``num_denoising=0`` turns it off.
- In eval mode every decoder layer still runs (D-FINE stops at ``eval_idx``, by default the last
  layer, so the outputs are the same) and, as in D-FINE, only the last layer's ``pred_logits`` and
  ``pred_boxes`` are returned.
- ``teacher_corners``/``teacher_logits`` in the aux outputs are detached (the official model
  passes them as they are and the DDF loss detaches them).
"""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mmkd.core.checkpoint import load_state, load_state_dict_file
from mmkd.losses.detection import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, distance2bbox, integral, inverse_sigmoid, weighting_function


def prior_bias(prob: float = 0.01) -> float:
    """Class-logit bias that makes every sigmoid start at ``prob``: ``-log((1 - p) / p)``."""
    return -math.log((1 - prob) / prob)


def sine_position_embedding(height: int, width: int, dim: int, temperature: float = 10000.0,
                            device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """2-D sine/cosine embedding ``[height * width, dim]`` of a grid, row-major (as ``x.flatten(2)``).

    Coordinates are normalised cell centres times 2π, so every pyramid level shares one frame.
    Layout: ``[sin(x·f), cos(x·f), sin(y·f), cos(y·f)]`` with ``dim / 4`` frequencies each.
    """
    if dim % 4:
        raise ValueError(f"the position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    freq = temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ax, ay = grid_x.reshape(-1, 1) / freq, grid_y.reshape(-1, 1) / freq
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], -1).to(dtype or torch.float32)


class MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last). Xavier-uniform weights, zero
    biases; ``zero_last`` zeroes the last layer's weight too (D-FINE's regression heads)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, zero_last: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        if zero_last:
            nn.init.zeros_(self.layers[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Gate(nn.Module):
    """D-FINE's target gating layer: ``norm(g1·x1 + g2·x2)`` with ``[g1; g2] = σ(W[x1; x2] + b)``,
    in place of the residual add after cross-attention. W = 0 and b = 0, so both gates start at 0.5."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def gates(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], -1))).chunk(2, -1)
        return g1, g2

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        g1, g2 = self.gates(x1, x2)
        return self.norm(g1 * x1 + g2 * x2)


class LQE(nn.Module):
    """Location-quality estimator: per edge the top-``k`` bin probabilities and their mean
    (4·(k+1) features) -> MLP -> one value added to every class logit. Last layer zero-initialised."""

    def __init__(self, reg_max: int, k: int = 4, hidden_dim: int = 64) -> None:
        super().__init__()
        self.reg_max, self.k = reg_max, k
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, 2, zero_last=True)

    def forward(self, logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        probs = corners.reshape(*corners.shape[:-1], 4, self.reg_max + 1).softmax(-1)
        top = probs.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).flatten(-2)
        return logits + self.reg_conf(stat)


class FDRHead(nn.Module):
    """Fine-grained Distribution Refinement, for any iterative DETR decoder (the official
    ``TransformerDecoder.forward``, ``dfine_decoder.py``).

    Per decoder layer ``i`` it predicts 4 edge distributions over ``reg_max + 1`` bins (edges
    left, top, right, bottom) as *residual* logits,
    ``corners_i = bbox_heads[i](h_i + stopgrad(h_{i-1})) + corners_{i-1}`` (``corners_{i-1}`` not
    detached; ``h_0`` alone at layer 0), decodes them around the host's **fixed** reference box
    (its detached layer-0 box, the same for every layer) with W(n), and adds the LQE quality term
    to the layer's class logits. Every ``bbox_heads`` MLP has a zero last layer, so the initial
    distributions are uniform and, W being antisymmetric, every box starts equal to the reference.

    ``up`` and ``reg_scale`` are frozen ``nn.Parameter`` s (kept in state dicts, as in D-FINE).

    Args:
        hidden_dim: decoder width.
        num_layers: decoder layers (one bbox head and one LQE each).
        reg_max: N; there are N + 1 bins.
        reg_scale: c = 1 / reg_scale sets the curvature of W(n).
        up: a, the upper bound of W(n) (the ends are ±2a box lengths).
        lqe_k: top-k probabilities per edge fed to the LQE.
        lqe_hidden: width of the LQE MLP.
    """

    def __init__(self, hidden_dim: int, num_layers: int, reg_max: int = 32, reg_scale: float = 4.0,
                 up: float = 0.5, lqe_k: int = 4, lqe_hidden: int = 64) -> None:
        super().__init__()
        if reg_max < 4 or reg_max % 2:
            raise ValueError(f"reg_max must be even and >= 4, got {reg_max}")
        self.reg_max = reg_max
        self.up = nn.Parameter(torch.tensor([float(up)]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        # Both are frozen: W(n) and the scale as a float are computed once, not read back from the
        # device in every layer of every forward.
        self._reg_scale_value = float(reg_scale)
        self.register_buffer("project_table", weighting_function(reg_max, up, reg_scale), persistent=False)
        self.bbox_heads = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, zero_last=True) for _ in range(num_layers)
        )
        self.lqe = nn.ModuleList(LQE(reg_max, lqe_k, lqe_hidden) for _ in range(num_layers))

    def project(self) -> torch.Tensor:
        """W(n), ``[reg_max + 1]``, in reg_scale units."""
        return self.project_table

    def decode(self, corners: torch.Tensor, ref_points: torch.Tensor) -> torch.Tensor:
        """Boxes (cxcywh) from edge logits ``[..., 4 * (reg_max + 1)]`` around ``ref_points`` (cxcywh)."""
        return distance2bbox(ref_points, integral(corners, self.project_table), self._reg_scale_value)

    def forward(self, layer: int, hidden: torch.Tensor, prev_hidden: torch.Tensor | None,
                prev_corners: torch.Tensor | None, ref_points: torch.Tensor,
                logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer: ``(corners [B, Q, 4(N+1)], boxes [B, Q, 4] cxcywh, logits + LQE)``.

        ``prev_hidden``/``prev_corners`` are the previous layer's decoder output and corner
        logits (``None`` at layer 0); ``prev_hidden`` is detached here, ``prev_corners`` is not.
        ``ref_points`` is the fixed, detached reference box of every layer.
        """
        head_input = hidden if prev_hidden is None else hidden + prev_hidden.detach()
        corners = self.bbox_heads[layer](head_input)
        if prev_corners is not None:
            corners = corners + prev_corners
        return corners, self.decode(corners, ref_points), self.lqe[layer](logits, corners)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + SiLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_ch), nn.SiLU()
        )


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (AIFI); the position embedding goes into queries and keys."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class HybridEncoder(nn.Module):
    """Light version of D-FINE's encoder: 1x1 conv + BN input projections to ``hidden_dim``, one
    AIFI layer on the coarsest level, then top-down (FPN) and bottom-up (PAN) fusion with a 3x3
    conv block per step. Returns one ``[B, hidden_dim, H_l, W_l]`` map per input level, fine to coarse.
    """

    def __init__(self, in_channels: list[int], hidden_dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        levels = len(in_channels)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)) for c in in_channels
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
        self.aifi = EncoderLayer(hidden_dim, num_heads, ffn_dim)
        self.lateral = nn.ModuleList(ConvNormAct(hidden_dim, hidden_dim, 1) for _ in range(levels - 1))
        self.fpn = nn.ModuleList(ConvNormAct(2 * hidden_dim, hidden_dim, 3) for _ in range(levels - 1))
        self.downsample = nn.ModuleList(ConvNormAct(hidden_dim, hidden_dim, 3, 2) for _ in range(levels - 1))
        self.pan = nn.ModuleList(ConvNormAct(2 * hidden_dim, hidden_dim, 3) for _ in range(levels - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [proj(f) for proj, f in zip(self.input_proj, feats)]
        b, c, h, w = x[-1].shape
        pos = sine_position_embedding(h, w, c, device=x[-1].device, dtype=x[-1].dtype)
        x[-1] = self.aifi(x[-1].flatten(2).transpose(1, 2), pos).transpose(1, 2).reshape(b, c, h, w)
        # top-down: coarse -> fine; inner[0] is always the finest fused map so far
        inner = [x[-1]]
        for step, low in enumerate(reversed(x[:-1])):
            high = self.lateral[step](inner[0])
            inner[0] = high
            up = F.interpolate(high, size=low.shape[-2:], mode="nearest")
            inner.insert(0, self.fpn[step](torch.cat([up, low], 1)))
        # bottom-up: fine -> coarse
        outs = [inner[0]]
        for step, high in enumerate(inner[1:]):
            down = self.downsample[step](outs[-1])
            outs.append(self.pan[step](torch.cat([down, high], 1)))
        return outs


def contrastive_denoising_queries(
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Noised copies of the ground truth as extra decoder queries (RT-DETR's CDN, as D-FINE's
    ``src/zoo/dfine/denoising.py`` builds them).

    With ``M`` the most GT boxes of an image in the batch there are ``G = max(1, num_denoising // M)``
    groups of ``2M`` queries: ``M`` positives, then ``M`` negatives, each a copy of the image's GT
    (padded to ``M`` with the padding class ``num_classes`` and zero boxes). A label is replaced by
    a uniformly drawn class with probability ``label_noise_ratio / 2``. Every edge of a box (xyxy)
    moves by ``±u * box_noise_scale * (w or h) / 2`` with ``u ~ U[0, 1)`` for positives and
    ``U[1, 2)`` for negatives, then the box is clipped to the image. The query content is
    ``class_embed(label)``, its reference box the noised box (inverse sigmoid).

    Returns ``(content [B, 2GM, D], boxes_unact [B, 2GM, 4], attn_mask [T, T], meta)``, ``T = 2GM +
    num_queries``, the mask True where attention is blocked: the matching queries see no
    denoising query, and a group sees no other group. ``meta``: ``dn_positive_idx`` (per image,
    the positive queries of every group in order, the match of GT ``j`` of group ``g`` being
    ``2Mg + j``), ``dn_num_group`` (G) and ``dn_num_split`` ([2GM, num_queries]). A batch without
    any GT gets no denoising queries (``G = 0``).
    """
    device = class_embed.weight.device
    counts = [len(target["labels"]) for target in targets]
    most = max(counts, default=0)
    if most == 0:
        empty = torch.zeros(len(targets), 0, class_embed.embedding_dim, device=device)
        meta = {"dn_positive_idx": [torch.zeros(0, dtype=torch.long, device=device) for _ in targets],
                "dn_num_group": 0, "dn_num_split": [0, num_queries]}  # fmt: skip
        return empty, empty.new_zeros(len(targets), 0, 4), torch.zeros(num_queries, num_queries, dtype=torch.bool, device=device), meta
    groups = max(1, num_denoising // most)
    batch = len(targets)
    labels = torch.full((batch, most), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, most, 4, device=device)
    for i, target in enumerate(targets):
        labels[i, : counts[i]] = target["labels"].to(device)
        boxes[i, : counts[i]] = target["boxes"].to(device, torch.float32)
    real = torch.arange(most, device=device)[None] < torch.tensor(counts, device=device)[:, None]  # [B, M]
    # [B, G * 2M]: per group M positives then M negatives
    labels, boxes, real = labels.repeat(1, 2 * groups), boxes.repeat(1, 2 * groups, 1), real.repeat(1, 2 * groups)
    negative = (torch.arange(2 * groups * most, device=device) // most % 2 == 1)[None, :, None].expand(batch, -1, 1)

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & real
        labels = torch.where(flip, torch.randint(0, num_classes, labels.shape, device=device), labels)
    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half_size = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint(0, 2, boxes.shape, device=device) * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, device=device) + negative.float()
        corners = (corners + sign * magnitude * half_size).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(corners).abs()  # an edge pushed past its opposite one: the width's sign dropped
    boxes_unact = inverse_sigmoid(boxes)

    total = 2 * groups * most
    group = torch.arange(total, device=device) // (2 * most)
    attn_mask = torch.zeros(total + num_queries, total + num_queries, dtype=torch.bool, device=device)
    attn_mask[:total, :total] = group[:, None] != group[None, :]
    attn_mask[total:, :total] = True
    positive_idx = [
        (torch.arange(groups, device=device)[:, None] * 2 * most + torch.arange(n, device=device)[None]).reshape(-1)
        for n in counts
    ]  # fmt: skip
    meta = {"dn_positive_idx": positive_idx, "dn_num_group": groups, "dn_num_split": [total, num_queries]}
    return class_embed(labels), boxes_unact, attn_mask, meta


class DecoderLayer(nn.Module):
    """Self-attention over the queries (post-norm residual), cross-attention to the flattened
    memory combined by :class:`Gate` instead of a residual add, then a ReLU FFN (post-norm).
    ``query_pos`` goes into the self-attention queries/keys and the cross-attention queries."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.gate = Gate(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, target: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                memory_key: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = target + query_pos
        target = self.norm1(target + self.self_attn(q, q, target, attn_mask=attn_mask, need_weights=False)[0])
        attended = self.cross_attn(target + query_pos, memory_key, memory, need_weights=False)[0]
        target = self.gate(target, attended)
        return self.norm2(target + self.linear2(F.relu(self.linear1(target))))


class DFineDecoder(nn.Module):
    """RT-DETR/D-FINE query selection plus the decoder layers and heads; see :class:`DFineDetector`."""

    def __init__(self, num_classes: int, num_levels: int, hidden_dim: int, num_queries: int, num_layers: int,
                 num_heads: int, ffn_dim: int, reg_max: int, reg_scale: float, box_head: str,
                 num_denoising: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0) -> None:
        super().__init__()
        if box_head not in ("fdr", "direct"):
            raise ValueError(f"box_head must be 'fdr' or 'direct', got {box_head!r}")
        self.num_classes, self.num_queries, self.box_head = num_classes, num_queries, box_head
        self.num_denoising, self.label_noise_ratio, self.box_noise_scale = num_denoising, label_noise_ratio, box_noise_scale
        if num_denoising > 0:  # the last row, the padding class, stays zero (the official init)
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        nn.init.normal_(self.level_embed, std=0.02)
        # query selection
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        nn.init.zeros_(self.enc_output[0].bias)
        self.enc_score_head = self._score_head(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, zero_last=True)
        # decoder
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.score_heads = nn.ModuleList(self._score_head(hidden_dim, num_classes) for _ in range(num_layers))
        if box_head == "fdr":
            self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, zero_last=True)
            self.fdr = FDRHead(hidden_dim, num_layers, reg_max, reg_scale)
        else:
            self.bbox_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3, zero_last=True) for _ in range(num_layers))

    @staticmethod
    def _score_head(hidden_dim: int, num_classes: int) -> nn.Linear:
        head = nn.Linear(hidden_dim, num_classes)
        nn.init.xavier_uniform_(head.weight)
        nn.init.constant_(head.bias, prior_bias(0.01))
        return head

    @staticmethod
    def anchors(shapes: list[tuple[int, int]], device: torch.device, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """Per memory position: ``(anchors [L, 4] in inverse-sigmoid cxcywh, valid [L, 1])``.

        Grid-cell centres with w = h = 0.05·2^level. Anchors with any coordinate outside
        (eps, 1 - eps) are invalid: their value is +inf (as in RT-DETR/D-FINE).
        """
        boxes = []
        for level, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
            sizes = torch.full_like(centres, 0.05 * 2.0**level)
            boxes.append(torch.cat([centres, sizes], -1))
        anchors = torch.cat(boxes)
        valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
        anchors = inverse_sigmoid(anchors)  # exact for the valid ones, the others become inf below
        return torch.where(valid, anchors, torch.inf), valid

    def forward(self, feats: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        shapes = [(f.shape[-2], f.shape[-1]) for f in feats]
        memory = torch.cat([f.flatten(2).transpose(1, 2) + self.level_embed[i] for i, f in enumerate(feats)], 1)
        memory_pos = torch.cat(
            [sine_position_embedding(h, w, memory.shape[-1], device=memory.device, dtype=memory.dtype) for h, w in shapes]
        )
        batch, length, dim = memory.shape
        if self.num_queries > length:
            raise ValueError(f"num_queries={self.num_queries} exceeds the {length} memory positions; use larger images or fewer queries")

        # query selection: top-Q positions by their best class score
        anchors, valid = self.anchors(shapes, memory.device)
        selection = self.enc_output(valid.to(memory.dtype) * memory)
        enc_logits = self.enc_score_head(selection)
        index = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # [B, Q]
        top_features = selection.gather(1, index[..., None].expand(-1, -1, dim))
        top_logits = enc_logits.gather(1, index[..., None].expand(-1, -1, enc_logits.shape[-1]))
        top_boxes_unact = self.enc_bbox_head(top_features) + anchors[index]
        enc_outputs = [{"pred_logits": top_logits, "pred_boxes": top_boxes_unact.sigmoid()}]

        target, boxes_unact, attn_mask, dn_meta = top_features.detach(), top_boxes_unact.detach(), None, None
        if self.training and self.num_denoising > 0:
            if targets is None:
                raise ValueError("the detector trains with contrastive denoising queries built from the ground truth: call it as "
                                 "model(images, targets), or set num_denoising: 0")  # fmt: skip
            dn_content, dn_boxes_unact, attn_mask, dn_meta = contrastive_denoising_queries(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed, self.num_denoising,
                self.label_noise_ratio, self.box_noise_scale,
            )  # fmt: skip
            target = torch.cat([dn_content.to(target.dtype), target], 1)
            boxes_unact = torch.cat([dn_boxes_unact.to(boxes_unact.dtype), boxes_unact], 1)
        ref_detach = boxes_unact.sigmoid()
        memory_key = memory + memory_pos
        fdr = self.box_head == "fdr"
        logits_all, boxes_all, corners_all = [], [], []
        pre_outputs = ref_initial = prev_hidden = prev_corners = None
        for i, layer in enumerate(self.layers):
            query_pos = self.query_pos_head(ref_detach).clamp(-10, 10)
            target = layer(target, query_pos, memory, memory_key, attn_mask)
            logits = self.score_heads[i](target)
            if fdr:
                if i == 0:
                    pre_boxes = torch.sigmoid(self.pre_bbox_head(target) + inverse_sigmoid(ref_detach))
                    pre_outputs = {"pred_logits": logits, "pred_boxes": pre_boxes}
                    ref_initial = pre_boxes.detach()
                corners, boxes, logits = self.fdr(i, target, prev_hidden, prev_corners, ref_initial, logits)
                prev_hidden, prev_corners = target, corners
                corners_all.append(corners)
            else:
                boxes = torch.sigmoid(self.bbox_heads[i](target) + inverse_sigmoid(ref_detach))
                corners_all.append(None)
            ref_detach = boxes.detach()
            logits_all.append(logits)
            boxes_all.append(boxes)

        if not self.training:  # as the official decoder: the training outputs only while training
            return {"pred_logits": logits_all[-1], "pred_boxes": boxes_all[-1]}
        # the denoising queries come first: the matching queries' outputs are what follows them
        dn_count = dn_meta["dn_num_split"][0] if dn_meta is not None else 0

        def matching(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[:, dn_count:] if t is not None and dn_count else t

        def denoising(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[:, :dn_count] if t is not None else None

        layers = self._layer_outputs([matching(t) for t in logits_all], [matching(t) for t in boxes_all],
                                     [matching(t) for t in corners_all], matching(ref_initial), fdr)  # fmt: skip
        outputs = {key: layers[-1][key] for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points")}
        outputs |= {"aux_outputs": layers[:-1], "enc_outputs": enc_outputs,
                    "pre_outputs": {k: matching(v) for k, v in pre_outputs.items()} if pre_outputs is not None else None}  # fmt: skip
        if dn_meta is not None:  # as the official model: every denoising layer, the last included, with the last as its teacher
            outputs["dn_outputs"] = self._layer_outputs([denoising(t) for t in logits_all], [denoising(t) for t in boxes_all],
                                                        [denoising(t) for t in corners_all], denoising(ref_initial), fdr)  # fmt: skip
            outputs["dn_pre_outputs"] = {k: denoising(v) for k, v in pre_outputs.items()} if pre_outputs is not None else None
            outputs["dn_meta"] = dn_meta
        return outputs

    @staticmethod
    def _layer_outputs(logits_all: list, boxes_all: list, corners_all: list, ref: torch.Tensor | None, fdr: bool) -> list[dict]:
        teacher_corners = corners_all[-1].detach() if fdr else None
        teacher_logits = logits_all[-1].detach() if fdr else None
        return [
            {"pred_logits": logits, "pred_boxes": boxes, "pred_corners": corners, "ref_points": ref,
             "teacher_corners": teacher_corners, "teacher_logits": teacher_logits}
            for logits, boxes, corners in zip(logits_all, boxes_all, corners_all)
        ]  # fmt: skip


def feature_extractor_keys(state: dict[str, torch.Tensor], own: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A timm classifier's state dict under the names of its ``features_only`` wrapper.

    timm's ``FeatureListNet`` flattens sequential containers, so the classifier's ``stages.2.*``
    (HGNetv2, ConvNeXt, ...) is the wrapper's ``stages_2.*``; names that are the same in both
    (ResNet's ``layer3.*``) are kept. Keys of neither are left as they are (the caller filters)."""
    renamed = dict(state)
    for key in own:
        if key in state:
            continue
        head, _, rest = key.partition(".")
        name, _, number = head.rpartition("_")
        original = f"{name}.{number}.{rest}" if name and number.isdigit() else None
        if original in state:
            renamed[key] = state[original]
    return renamed


class DFineDetector(nn.Module):
    """A compact D-FINE: timm backbone, light hybrid encoder, DETR decoder with FDR.

    ``forward(images [B, 3, H, W])`` returns in training mode (boxes normalised cxcywh), and in
    eval mode only ``pred_logits`` and ``pred_boxes``, as the official decoder (and the ONNX graph):

    - ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]``: the last decoder layer.
    - ``pred_corners [B, Q, 4*(reg_max+1)]``: its edge-distribution logits (left, top, right, bottom).
    - ``ref_points [B, Q, 4]``: the fixed, detached layer-0 box that every layer refines.
    - ``aux_outputs``: one dict per layer 0..L-2 with the four keys above plus ``teacher_corners``
      and ``teacher_logits`` (the last layer's, detached; for GO-LSD).
    - ``pre_outputs``: ``{"pred_logits", "pred_boxes"}`` of the layer-0 traditional box head.
    - ``enc_outputs``: ``[{"pred_logits", "pred_boxes"}]``, the top-Q encoder proposals (same Q order).
    - with contrastive denoising (``num_denoising > 0``, training only; ``forward(images, targets)``):
      ``dn_outputs`` (one dict per layer 0..L-1 for the denoising queries, the keys of
      ``aux_outputs``, the last layer's as teacher), ``dn_pre_outputs`` and ``dn_meta`` (see
      :func:`contrastive_denoising_queries`). The matching queries above never attend to them.

    With ``box_head="direct"`` (the baseline without FDR) every layer regresses its box
    RT-DETR-style, ``sigmoid(bbox_heads[i](h_i) + inverse_sigmoid(previous box, detached))``;
    ``pred_corners``, ``ref_points``, ``teacher_*`` and ``pre_outputs`` are ``None``.

    The decoder follows D-FINE's ``TransformerDecoder``: the top-Q proposals (detached) give the initial references
    and content queries; ``query_pos = query_pos_head(ref).clamp(-10, 10)``; the next layer's
    reference is the current box, detached. The deviations from D-FINE (no deformable attention,
    a lighter encoder) are listed in this module's docstring.

    Args:
        num_classes: object classes (no background class).
        backbone: any timm model name with ``features_only`` support; its last ``num_levels``
            feature levels are used (``resnet18``: ``layer2..layer4``, strides 8/16/32). Module
            paths stay timm's (``backbone.layer3``).
        backbone_checkpoint: local weights for the backbone (a timm classifier's state dict or an
            mmkd checkpoint); keys the feature extractor lacks (the classifier) are ignored, every
            backbone key must be present.
        pretrained: timm's pretrained weights (needs the hub or timm's cache).
        num_levels: feature levels (2 or 3).
        hidden_dim: encoder/decoder width.
        num_queries: Q; at most the number of memory positions.
        num_decoder_layers: L.
        num_heads: attention heads (encoder and decoder).
        ffn_dim: feed-forward width (encoder and decoder).
        reg_max: N (N + 1 bins per edge).
        reg_scale: D-FINE's reg_scale (c = 1/reg_scale); frozen.
        box_head: ``"fdr"`` or ``"direct"``.
        num_denoising: contrastive denoising's budget: ``num_denoising // (most GT boxes of an
            image)`` groups, each of positive and negative copies of the GT (official 100; 0: off).
        label_noise_ratio: twice the probability that a denoising query's label is redrawn (0.5).
        box_noise_scale: box noise, in half box sizes (1.0).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        backbone_checkpoint: str | None = None,
        pretrained: bool = False,
        num_levels: int = 3,
        hidden_dim: int = 128,
        num_queries: int = 100,
        num_decoder_layers: int = 3,
        num_heads: int = 4,
        ffn_dim: int = 512,
        reg_max: int = 32,
        reg_scale: float = 4.0,
        box_head: str = "fdr",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if num_levels not in (2, 3):
            raise ValueError(f"num_levels must be 2 or 3, got {num_levels}")
        self.num_classes, self.num_queries, self.box_head, self.reg_max = num_classes, num_queries, box_head, reg_max
        self._reg_scale = float(reg_scale)
        self.backbone = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, out_indices=tuple(range(-num_levels, 0))
        )
        # jsonargparse turns `--...backbone_checkpoint=null` into "None" inside a nested class_path
        if backbone_checkpoint and backbone_checkpoint not in ("None", "null"):
            own = self.backbone.state_dict()
            state = feature_extractor_keys(load_state_dict_file(backbone_checkpoint), own)
            load_state(self.backbone, {k: v for k, v in state.items() if k in own}, str(backbone_checkpoint))
        self.encoder = HybridEncoder(self.backbone.feature_info.channels(), hidden_dim, num_heads, ffn_dim)
        self.decoder = DFineDecoder(num_classes, num_levels, hidden_dim, num_queries, num_decoder_layers,
                                    num_heads, ffn_dim, reg_max, reg_scale, box_head,
                                    num_denoising, label_noise_ratio, box_noise_scale)  # fmt: skip

    @property
    def reg_scale(self) -> nn.Parameter | float:
        """The frozen ``reg_scale`` parameter of the FDR head (the configured float for "direct")."""
        return self.decoder.fdr.reg_scale if self.box_head == "fdr" else self._reg_scale

    @property
    def up(self) -> nn.Parameter | float:
        """The frozen ``up`` parameter of the FDR head (0.5 for "direct")."""
        return self.decoder.fdr.up if self.box_head == "fdr" else 0.5

    @property
    def num_denoising(self) -> int:
        return self.decoder.num_denoising

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        return self.decoder(self.encoder(self.backbone(images)), targets)
