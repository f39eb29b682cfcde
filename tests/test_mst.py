"""MST-Distill: MaskNets, router, load balancing, the three stages' losses, and stage hand-over
on the real AV-MNIST pairs (MNIST digits + FSDD spoken digits)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmkd.distillers.mst import MaskNet, MSTDistill, Router, decayed, load_balancing_loss, routed_kd_loss
from mmkd.losses.logit import kd_loss
from mmkd.models.av import AudioCNN, AVFusionNet, LeNet5

SHAPES = {"image": [1, 28, 28], "audio": [1, 32, 32]}


def mst(**kwargs) -> MSTDistill:
    torch.manual_seed(0)
    module = MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), stage_epochs=(1, 1, 1), hidden_dim_factor=8, input_shapes=SHAPES, **kwargs)
    module.build_masknets(module.observe_mask_shapes())
    return module


def batch(size: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(size, *SHAPES["image"], generator=generator),
        "audio": torch.randn(size, *SHAPES["audio"], generator=generator),
        "label": torch.randint(0, 10, (size,), generator=generator),
    }


@pytest.mark.parametrize(("feature_shape", "spatial"), [((5, 12), False), ((5, 8, 6, 7), True), ((5, 120, 1, 1), False)])
def test_masknet_gives_one_value_in_0_1_per_channel(feature_shape: tuple, spatial: bool) -> None:
    masknet = MaskNet(feature_shape[1], spatial=spatial, hidden_dim_factor=2, heads=3)
    mask = masknet(torch.randn(feature_shape) * 10)
    assert mask.shape == feature_shape[:2]
    assert ((mask > 0) & (mask < 1)).all()
    # H = C // (factor * heads) * heads, at least one per head
    assert masknet.hidden == max(3, feature_shape[1] // 6 * 3)


def test_masknets_are_sized_from_the_hooked_layers() -> None:
    module = mst()
    assert module.mask_shapes == {"mm0": [148], "mm1": [74], "cm0": [32, 16, 16], "cm1": [64, 8, 8]}
    assert module.masknets["cm0"].reduce[0].groups == 32  # 2-D maps go through the spatial reduction
    with pytest.raises(KeyError, match="no module at path 'fc9'.*Nearest valid paths"):
        MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), mm_mask_layers=("fc9",))
    fusion = AVFusionNet()
    fusion.spare = torch.nn.Linear(4, 4)  # a module that forward never calls
    unused = MSTDistill(LeNet5(), fusion, AudioCNN(), mm_mask_layers=("spare",), input_shapes=SHAPES)
    with pytest.raises(ValueError, match="mask layer 'spare' of the mm teacher did not run in the forward pass: choose a layer"):
        unused.observe_mask_shapes()


def test_masks_apply_only_while_active_and_accumulate_in_stage_3_as_the_official_code() -> None:
    module = mst().eval()
    inputs = batch()
    with torch.no_grad():
        plain = module.teacher_logits("mm", inputs)
        fused = torch.cat([module.mm_teacher.image.features(inputs["image"]), module.mm_teacher.audio.features(inputs["audio"])], 1)
        masked = fused * module.masknets["mm0"](fused)
        hidden = module.mm_teacher.fc1(masked)
        by_hand = {  # no activation between fc1 and fc2, as the official IntermediateFusionNet
            ("mm0",): module.mm_teacher.fc2(hidden),
            ("mm0", "mm1"): module.mm_teacher.fc2(hidden * module.masknets["mm1"](hidden)),
        }
        for names, expected in by_hand.items():
            with module.masks(names):
                torch.testing.assert_close(module.teacher_logits("mm", inputs), expected)
        torch.testing.assert_close(module.teacher_logits("mm", inputs), plain)  # masks off again
    assert module.specialised_teachers() == [("mm", ["mm0"]), ("mm", ["mm0", "mm1"]), ("cm", ["cm0"]), ("cm", ["cm0", "cm1"])]
    module.cumulative_masks = False
    assert module.specialised_teachers() == [("mm", ["mm0"]), ("mm", ["mm1"]), ("cm", ["cm0"]), ("cm", ["cm1"])]


def test_routed_kd_takes_each_samples_selected_teachers() -> None:
    torch.manual_seed(0)
    student, teachers = torch.randn(4, 10), torch.randn(3, 4, 10)
    selected = torch.tensor([[2, 0], [0, 1], [1, 1], [2, 2]])
    top1 = routed_kd_loss(student, teachers, selected[:, :1], 4.0)
    torch.testing.assert_close(top1, kd_loss(student, teachers[[2, 0, 1, 2], torch.arange(4)], 4.0))
    second = kd_loss(student, teachers[[0, 1, 1, 2], torch.arange(4)], 4.0)
    torch.testing.assert_close(routed_kd_loss(student, teachers, selected, 4.0), (top1 + second) / 2)


def test_load_balancing_is_kl_to_uniform_over_ways_as_the_official_batchmean() -> None:
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform).abs() < 1e-7
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    mean = probs.mean(0)
    expected = sum(0.25 * math.log(0.25 / m) for m in mean.tolist()) / 4
    assert load_balancing_loss(probs).item() == pytest.approx(expected, rel=1e-5)
    usage = probs.sum(0)
    assert load_balancing_loss(probs, "cv").item() == pytest.approx((usage.std() / usage.mean()).item(), rel=1e-5)


def test_router_learns_from_load_balancing_only_and_the_student_from_all_terms() -> None:
    module = mst()
    module._enter_stage(3)
    losses = module.stage3_losses(batch())
    losses["kd"].backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in module.router.parameters())
    assert module.model.fc2.weight.grad.abs().max() > 0
    losses["lb"].backward()
    assert all(p.grad.abs().max() > 0 for p in module.router.parameters())
    assert all(p.grad is None for p in module.mm_teacher.parameters())  # frozen, run without a graph


def test_co_training_sends_every_kl_gradient_to_both_sides() -> None:
    module = mst()
    module._enter_stage(1)
    losses = module.stage1_losses(batch())
    assert set(losses) == {"ce_mm", "kd_mm", "ce_cm", "kd_cm", "ce_student", "kd_student"}
    losses["kd_student"].backward()  # KL(p_mm || p_s) + KL(p_cm || p_s): nothing detached
    for net in (module.model, module.mm_teacher, module.cm_teacher):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in net.parameters())


def test_masknets_learn_to_match_the_detached_student_one_mask_at_a_time() -> None:
    module = mst()
    module._enter_stage(2)
    inputs = batch()
    losses = module.masknet_losses(inputs)
    with torch.no_grad():
        student = module.model(inputs["image"])
        with module.masks(["cm1"]):
            expected = kd_loss(module.teacher_logits("cm", inputs), student, 4.0)
    torch.testing.assert_close(losses["cm1"], expected)
    losses["mm1"].backward()
    assert all(p.grad is None for p in module.model.parameters())
    assert module.masknets["mm1"].out.weight.grad.abs().max() > 0
    assert module.masknets["mm0"].out.weight.grad is None  # mm1 was trained with its own mask only


def test_stage_3_weights_decay_after_every_epoch_as_the_official_schedule() -> None:
    # official: after epoch e, w_lb *= 0.9 if e % 10 == 0 and w_kl *= 0.5 if e % 30 == 0
    w_lb, w_kl = 1.0, 1.0
    for epoch in range(65):
        assert decayed(1.0, 0.9, 10, epoch) == pytest.approx(w_lb)
        assert decayed(1.0, 0.5, 30, epoch) == pytest.approx(w_kl)
        w_lb *= 0.9 if epoch % 10 == 0 else 1.0
        w_kl *= 0.5 if epoch % 30 == 0 else 1.0


def test_stage_boundaries_and_argument_errors() -> None:
    module = MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), stage_epochs=(2, 1, 3))
    assert [module.stage_of(e) for e in range(6)] == [1, 1, 2, 3, 3, 3]
    skipped = MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), stage_epochs=(2, 1, 3), start_stage=3, init_from="x.ckpt")
    assert [skipped.stage_of(e) for e in range(3)] == [3, 3, 3]
    with pytest.raises(ValueError, match="start_stage 2 or 3 needs init_from"):
        MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), start_stage=2)
    with pytest.raises(ValueError, match="top_k=5"):
        MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), top_k=5)
    assert isinstance(Router(10, 4)(torch.randn(3, 10)), torch.Tensor)


# -- the recipes on the real AV-MNIST pairs ----------------------------------------------------
STAGES = ["--model.init_args.stage_epochs=[1,1,1]", "--trainer.max_epochs=3"]
BASELINES = ["image_alone", "audio_alone", "fusion_teacher"]
KD_BASELINES = ["kd_image_from_fusion", "kd_image_from_audio", "kd_audio_from_fusion", "kd_audio_from_image"]
MST_RECIPES = {f"mst/{name}.yaml" for name in ["avmnist", "avmnist_audio", *BASELINES, *KD_BASELINES]}  # trained here
MST_RECIPES |= {"mst/av_pairs.yaml", "mst/ravdess.yaml"}  # on files: trained by tests/test_av_files.py


def fit(config: str, *overrides: str):
    from mmkd.cli import lightning_cli

    from conftest import CONFIGS, SHORT

    return lightning_cli(["fit", "-c", str(CONFIGS / "mst" / config), *SHORT, *overrides])


@pytest.mark.slow
def test_the_baselines_train_and_kd_reads_each_teachers_own_modalities(data_root: Path) -> None:
    for name in BASELINES:
        fit(f"{name}.yaml")
    for name in KD_BASELINES:
        cli = fit(f"{name}.yaml")
        assert cli.trainer.callback_metrics["val/teacher_acc"] >= 0  # the teacher ran on its own inputs
    fusion = torch.load("runs/mst/fusion_teacher/last.ckpt", weights_only=True)["state_dict"]
    assert {key.split(".")[1] for key in fusion} == {"image", "audio", "fc1", "fc2"}


@pytest.mark.slow
def test_three_stages_in_one_run_then_stage_3_again_from_the_stage_2_checkpoint(data_root: Path) -> None:
    cli = fit("avmnist.yaml", *STAGES)
    metrics = cli.trainer.callback_metrics
    for logged in ["train/loss_kd_student", "val/loss_masknet", "train/loss_lb", "train/w_kl", "val/acc", "val/acc_mm", "val/acc_cm"]:
        assert logged in metrics, logged
    assert metrics["train/w_kl"] == 1.0  # stage 3's first epoch: not yet decayed
    runs = Path("runs/mst/avmnist")
    stages = [torch.load(runs / f"mst_stage{n}.ckpt", weights_only=True) for n in (1, 2, 3)]
    assert [s["mmkd"]["mst_completed_stage"] for s in stages] == [1, 2, 3]
    assert [s["epoch"] for s in stages] == [0, 1, 2]
    last = torch.load(runs / "last.ckpt", weights_only=True)  # written after the selected student was put back
    assert all(torch.equal(last["state_dict"][k], v) for k, v in stages[2]["state_dict"].items() if k.startswith("model."))

    def changed(prefix: str, before: dict, after: dict) -> bool:
        return any(not torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"] if k.startswith(prefix))

    # stage 2 trains the MaskNets alone, stage 3 the student and the router alone
    assert changed("masknets.", stages[0], stages[1]) and not changed("model.", stages[0], stages[1])
    assert not changed("mm_teacher.", stages[0], stages[1]) and not changed("cm_teacher.", stages[1], stages[2])
    assert changed("model.", stages[1], stages[2]) and not changed("masknets.", stages[1], stages[2])

    # a new run of stage 3 alone, from the stage-2 checkpoint
    again = fit("avmnist.yaml", "--model.init_args.stage_epochs=[1,1,1]", "--trainer.max_epochs=1", "--model.init_args.start_stage=3",
                f"--model.init_args.init_from={runs}/mst_stage2.ckpt", "--trainer.callbacks.init_args.dirpath=again")  # fmt: skip
    assert again.model.stage_epochs == [0, 0, 1] and Path("again/mst_stage3.ckpt").is_file()
    restarted = torch.load("again/mst_stage3.ckpt", weights_only=True)
    assert not changed("masknets.", stages[1], restarted) and changed("model.", stages[1], restarted)
    with pytest.raises(ValueError, match="completed stage 1, but start_stage=3 starts from the end of stage 2"):
        fit("avmnist.yaml", "--model.init_args.start_stage=3", f"--model.init_args.init_from={runs}/mst_stage1.ckpt", "--trainer.max_epochs=null")
    Path("cut.ckpt").write_bytes(Path(f"{runs}/mst_stage2.ckpt").read_bytes()[:5000])  # a copy cut short
    with pytest.raises(RuntimeError, match="cannot read checkpoint cut.ckpt .*corrupt, truncated"):
        fit("avmnist.yaml", "--model.init_args.start_stage=3", "--model.init_args.init_from=cut.ckpt", "--trainer.max_epochs=null")


@pytest.mark.slow
def test_the_audio_student_recipe_runs_all_stages(data_root: Path) -> None:
    cli = fit("avmnist_audio.yaml", *STAGES)
    assert cli.model.mask_shapes == {"mm0": [148], "mm1": [74], "cm0": [120, 1, 1], "cm1": [84]}
    assert [cli.model.masknets[name].reduce.__class__.__name__ for name in ("cm0", "cm1")] == ["Flatten", "Flatten"]
    [result] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert {"test/acc", "test/acc_mm", "test/acc_cm"} <= set(result)
    # the student alone goes to ONNX, its input named after its modality
    import onnxruntime

    from conftest import CONFIGS
    from mmkd.cli import main

    main(["export", "-c", str(CONFIGS / "mst/avmnist_audio.yaml"), "--ckpt_path", "runs/mst/avmnist_audio/mst_stage3.ckpt", "--out", "audio.onnx"])
    assert [i.name for i in onnxruntime.InferenceSession("audio.onnx").get_inputs()] == ["audio"]


def test_stage_epochs_and_max_epochs_must_agree(data_root: Path) -> None:
    with pytest.raises(ValueError, match="trainer.max_epochs=1 but stage_epochs"):
        fit("avmnist.yaml")  # SHORT sets max_epochs=1
