"""The compact D-FINE detector (mmkd.models.detr): output format, FDR semantics (§A2.1 of the
reference notes), initialisation, gradient paths and the parameter count."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from mmkd.losses.detection import inverse_sigmoid
from mmkd.models.detr import LQE, DFineDetector, Gate

# the structure without contrastive denoising; the denoising queries are tested in test_fidelity_repairs.py (item 10)
SMALL = dict(backbone="resnet10t", hidden_dim=32, num_queries=20, num_decoder_layers=3, num_heads=2, ffn_dim=64, num_denoising=0)
LAYERS = SMALL["num_decoder_layers"]


def small(box_head: str = "fdr", **kwargs) -> DFineDetector:
    torch.manual_seed(0)
    return DFineDetector(num_classes=3, box_head=box_head, **{**SMALL, **kwargs})


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def capture(model: DFineDetector) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Forward hooks: each decoder layer's output h_i, and each FDR bbox head's (input, output)."""
    hidden, heads = [], []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda m, args, out: hidden.append(out))
    if model.box_head == "fdr":
        for head in model.decoder.fdr.bbox_heads:
            head.register_forward_hook(lambda m, args, out: heads.append((args[0], out)))
    return hidden, heads


def w_closed_form(n: int, reg_max: int = 32, a: float = 0.5, c: float = 0.25) -> float:
    """W(n) in box lengths (§A2.2), in plain Python."""
    if n == 0 or n == reg_max:
        return 2 * a * (1 if n else -1)
    if n < reg_max // 2:
        return c - c * (a / c + 1) ** ((reg_max - 2 * n) / (reg_max - 2))
    return -c + c * (a / c + 1) ** ((2 * n - reg_max) / (reg_max - 2))


# -- the detector's small modules, by hand ------------------------------------------------------
def test_lqe_by_hand():
    lqe = LQE(reg_max=4, k=2, hidden_dim=8)
    edge = [0.0, math.log(2), math.log(3), 0.0, math.log(4)]  # probabilities (1, 2, 3, 1, 4)/11
    corners = torch.tensor(edge * 4)[None]
    logits = torch.tensor([[0.5, -1.0]])
    assert torch.equal(lqe(logits, corners), logits)  # zero-initialised last layer
    with torch.no_grad():  # make the MLP output the sum of its 12 (positive) inputs
        lqe.reg_conf.layers[0].weight.zero_()
        lqe.reg_conf.layers[0].weight[0] = 1.0
        lqe.reg_conf.layers[1].weight.zero_()
        lqe.reg_conf.layers[1].weight[0, 0] = 1.0
    per_edge = 4 / 11 + 3 / 11 + 3.5 / 11  # top-2 probabilities and their mean
    assert lqe(logits, corners)[0].tolist() == pytest.approx([0.5 + 4 * per_edge, -1.0 + 4 * per_edge], abs=1e-6)


def test_gate_starts_at_half():
    gate = Gate(8)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    g1, g2 = gate.gates(x1, x2)
    assert torch.equal(g1, torch.full_like(g1, 0.5)) and torch.equal(g2, torch.full_like(g2, 0.5))
    assert torch.allclose(gate(x1, x2), torch.nn.functional.layer_norm(0.5 * x1 + 0.5 * x2, (8,)), atol=1e-6)


# -- the detector ------------------------------------------------------------------------------
@pytest.mark.parametrize("box_head", ["fdr", "direct"])
@pytest.mark.parametrize("train", [True, False])
def test_output_keys_and_shapes(box_head: str, train: bool):
    model = small(box_head).train(train)
    out = model(images())
    b, q, c, bins = 2, 20, 3, 4 * 33
    assert out["pred_logits"].shape == (b, q, c) and out["pred_boxes"].shape == (b, q, 4)
    if not train:  # the official decoder's eval outputs: the last layer's, nothing for the losses
        assert set(out) == {"pred_logits", "pred_boxes"}
        return
    assert set(out) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "aux_outputs", "pre_outputs", "enc_outputs"}
    assert len(out["aux_outputs"]) == LAYERS - 1
    aux_keys = {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "teacher_corners", "teacher_logits"}
    assert all(set(aux) == aux_keys for aux in out["aux_outputs"])
    assert len(out["enc_outputs"]) == 1
    assert out["enc_outputs"][0]["pred_logits"].shape == (b, q, c) and out["enc_outputs"][0]["pred_boxes"].shape == (b, q, 4)
    if box_head == "fdr":
        assert out["pred_corners"].shape == (b, q, bins) and out["ref_points"].shape == (b, q, 4)
        assert not out["ref_points"].requires_grad
        assert out["pre_outputs"]["pred_logits"].shape == (b, q, c) and out["pre_outputs"]["pred_boxes"].shape == (b, q, 4)
        for aux in out["aux_outputs"]:
            assert aux["pred_corners"].shape == (b, q, bins)
            assert aux["ref_points"] is out["ref_points"]  # one fixed reference for every layer
            assert torch.equal(aux["teacher_corners"], out["pred_corners"]) and not aux["teacher_corners"].requires_grad
            assert torch.equal(aux["teacher_logits"], out["pred_logits"]) and not aux["teacher_logits"].requires_grad
    else:
        assert out["pred_corners"] is None and out["ref_points"] is None and out["pre_outputs"] is None
        assert all(aux[k] is None for aux in out["aux_outputs"] for k in ("pred_corners", "ref_points", "teacher_corners", "teacher_logits"))
    assert "backbone.layer3" in dict(model.named_modules())  # timm's module paths


def test_init_boxes_are_anchors_and_every_layer_equals_the_pre_box():
    model = small()
    out = model(images())
    enc_boxes = out["enc_outputs"][0]["pred_boxes"]
    # zero-initialised enc_bbox_head: the proposals are the anchors (w = h = 0.05·2^level)
    assert torch.equal(enc_boxes[..., 2], enc_boxes[..., 3])
    sizes = set(round(v, 4) for v in enc_boxes[..., 2].flatten().tolist())
    assert sizes <= {0.05, 0.1, 0.2}
    pre = out["pre_outputs"]["pred_boxes"]
    assert torch.allclose(pre, enc_boxes, atol=1e-5)  # zero-initialised pre head
    assert torch.equal(out["ref_points"], pre.detach())
    # uniform distributions and antisymmetric W: zero offsets, every layer's box is the pre box
    for layer_out in [*out["aux_outputs"], out]:
        assert torch.equal(layer_out["pred_corners"], torch.zeros_like(layer_out["pred_corners"]))
        assert torch.allclose(layer_out["pred_boxes"], pre, atol=1e-6)
    # the class biases start at the 0.01 prior and the LQE adds 0
    assert torch.allclose(out["pre_outputs"]["pred_logits"], out["aux_outputs"][0]["pred_logits"])
    assert model.decoder.enc_score_head.bias[0].item() == pytest.approx(-math.log(99))


def test_fdr_residual_corners_fixed_reference_and_decoding():
    model = small()
    torch.manual_seed(2)
    with torch.no_grad():  # leave the zero init so that every head does something
        for head in [*model.decoder.fdr.bbox_heads, model.decoder.pre_bbox_head]:
            head.layers[-1].weight.normal_(std=0.1)
            head.layers[-1].bias.normal_(std=0.1)
    hidden, heads = capture(model)
    out = model(images())
    corners = [aux["pred_corners"] for aux in out["aux_outputs"]] + [out["pred_corners"]]
    fdr = model.decoder.fdr
    with torch.no_grad():
        assert torch.allclose(heads[0][0], hidden[0]) and torch.allclose(corners[0], fdr.bbox_heads[0](hidden[0]))
        for i in range(1, LAYERS):
            assert torch.allclose(heads[i][0], hidden[i] + hidden[i - 1])  # h_i + stopgrad(h_{i-1})
            assert torch.allclose(corners[i] - corners[i - 1], fdr.bbox_heads[i](hidden[i] + hidden[i - 1]), atol=1e-5)
        # the fixed reference: layer-0 pre head on top of the encoder proposal
        enc_boxes = out["enc_outputs"][0]["pred_boxes"]
        ref = torch.sigmoid(model.decoder.pre_bbox_head(hidden[0]) + inverse_sigmoid(enc_boxes))
        assert torch.allclose(out["ref_points"], ref, atol=1e-6)
        # the last box by the paper's formula: left = cx - w/2 - w·Σ W(n)/rs·Pr(n), etc.
        w_n = torch.tensor([w_closed_form(n) for n in range(33)])
        offsets = (corners[-1].reshape(2, 20, 4, 33).softmax(-1) * w_n).sum(-1)
        cx, cy, w, h = ref.unbind(-1)
        left, top = cx - w / 2 - w * offsets[..., 0], cy - h / 2 - h * offsets[..., 1]
        right, bottom = cx + w / 2 + w * offsets[..., 2], cy + h / 2 + h * offsets[..., 3]
        expected = torch.stack([(left + right) / 2, (top + bottom) / 2, right - left, bottom - top], -1)
        assert torch.allclose(out["pred_boxes"], expected, atol=1e-6)
        assert not torch.allclose(out["pred_boxes"], out["aux_outputs"][0]["pred_boxes"])


def test_gradients_flow_through_residual_corners_but_not_into_references():
    model = small()
    out = model(images())
    (out["pred_corners"].sum() + out["pred_boxes"].sum()).backward()
    decoder = model.decoder
    for i in range(LAYERS):  # earlier layers' heads are reached only through the un-detached residual
        assert decoder.fdr.bbox_heads[i].layers[-1].weight.grad.abs().sum() > 0
    for head in (decoder.pre_bbox_head, decoder.enc_bbox_head):  # the reference boxes are detached
        assert all(p.grad is None for p in head.parameters())


def test_direct_head_refines_iteratively():
    model = small("direct")
    torch.manual_seed(3)
    with torch.no_grad():
        for head in model.decoder.bbox_heads:
            head.layers[-1].weight.normal_(std=0.1)
    hidden, _ = capture(model)
    out = model(images())
    boxes = [out["enc_outputs"][0]["pred_boxes"]] + [aux["pred_boxes"] for aux in out["aux_outputs"]] + [out["pred_boxes"]]
    with torch.no_grad():
        for i in range(LAYERS):
            expected = torch.sigmoid(model.decoder.bbox_heads[i](hidden[i]) + inverse_sigmoid(boxes[i]))
            assert torch.allclose(boxes[i + 1], expected, atol=1e-6)
    assert not hasattr(model.decoder, "fdr") and not hasattr(model.decoder, "pre_bbox_head")
    assert float(model.reg_scale) == 4.0 and float(model.up) == 0.5


def test_up_and_reg_scale_are_frozen_parameters_in_the_state_dict():
    model = small(reg_scale=8.0)
    state = model.state_dict()
    assert state["decoder.fdr.up"].tolist() == [0.5] and state["decoder.fdr.reg_scale"].tolist() == [8.0]
    assert model.up is model.decoder.fdr.up and not model.up.requires_grad
    assert model.reg_scale is model.decoder.fdr.reg_scale and not model.reg_scale.requires_grad
    assert model.reg_max == 32
    assert torch.allclose(model.decoder.fdr.project() / 8, torch.tensor([w_closed_form(n, c=1 / 8) for n in range(33)]), atol=1e-6)


@pytest.mark.parametrize("box_head", ["fdr", "direct"])
def test_forward_backward_reaches_every_trainable_parameter(box_head: str):
    model = small(box_head)
    out = model(images())
    parts = [out["pred_logits"], out["pred_boxes"], *(o[k] for o in out["enc_outputs"] for k in ("pred_logits", "pred_boxes"))]
    parts += [aux[k] for aux in out["aux_outputs"] for k in ("pred_logits", "pred_boxes")]
    if box_head == "fdr":
        parts += [out["pred_corners"], out["pre_outputs"]["pred_logits"], out["pre_outputs"]["pred_boxes"]]
    sum(p.sum() for p in parts).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == (["decoder.fdr.reg_scale", "decoder.fdr.up"] if box_head == "fdr" else [])


def test_backbone_checkpoint_loads_a_timm_classifier(tmp_path):
    classifier = timm.create_model("resnet10t", num_classes=7)
    torch.save(classifier.state_dict(), tmp_path / "backbone.pt")
    model = small(backbone_checkpoint=str(tmp_path / "backbone.pt"))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, classifier.layer3[0].conv1.weight)


def test_too_many_queries_is_a_clear_error():
    with pytest.raises(ValueError, match="memory positions"):
        small(num_queries=100)(images())  # 8·8 + 4·4 + 2·2 = 84 positions at 64x64


def test_parameter_count_of_the_default_config():
    model = DFineDetector(num_classes=80)
    h, bins = 128, 4 * 33
    mlp3 = lambda out: 2 * (h * h + h) + h * out + out  # noqa: E731
    fdr = 3 * mlp3(bins) + 3 * (20 * 64 + 64 + 64 + 1) + 2  # bbox heads, LQEs, up and reg_scale
    assert sum(p.numel() for p in model.decoder.fdr.parameters()) == fdr == 154_385
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_176_512  # resnet18 without fc
    assert sum(p.numel() for p in model.decoder.denoising_class_embed.parameters()) == 81 * h  # 80 classes + padding
    assert sum(p.numel() for p in model.parameters()) == 14_304_793 + 81 * h
