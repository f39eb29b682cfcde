"""DHO: the CLIP zero-shot teacher, the semi-supervised split, the dual-head loss and mix, and
the shipped recipe (CLIP teacher, then DHO) on real Fashion-MNIST."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmkd.cli import lightning_cli
from mmkd.core import Classifier, Teacher
from mmkd.data import FashionMNISTDataModule, SemiSupervisedDataModule, balanced_labeled_split
from mmkd.distillers import DHO, DualHeadStudent, dual_head_clip_student
from mmkd.distillers.dho import mix_log_probs, search_mix
from mmkd.models import ImageAdapter, ZeroShotClassifier, create_clip, timm_model, zero_shot_weights

from conftest import CONFIGS, SHORT  # noqa: E402

CLIP = "mmkd-clip-tiny"
NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@pytest.fixture
def clip_file(tmp_path: Path) -> Path:
    """Randomly initialised CLIP weights saved in open_clip's layout."""
    torch.manual_seed(0)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in create_clip(CLIP).state_dict().items()}, str(path))
    return path


def student(num_classes: int = 10, **kwargs) -> DualHeadStudent:
    backbone = timm_model("resnet10t", num_classes=0, in_chans=1, model_args={"channels": [4, 8, 16, 32], "stem_width": 4})
    return DualHeadStudent(backbone, num_classes, **kwargs)


# -- the teacher ------------------------------------------------------------------------------
def test_zero_shot_classifier_matches_a_hand_computation(clip_file: Path) -> None:
    teacher = ZeroShotClassifier(CLIP, NAMES[:3], pretrained=str(clip_file), templates=["a {}.", "a photo of a {}."], input_mean=0.5, input_std=0.25)
    clip, tokenizer = create_clip(CLIP, str(clip_file)).eval(), open_clip.get_tokenizer(CLIP)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        columns = []
        for name in NAMES[:3]:
            prompts = clip.encode_text(tokenizer([f"a {name}.", f"a photo of a {name}."]))
            prompts = prompts / prompts.norm(dim=-1, keepdim=True)
            mean = prompts.mean(0)
            columns.append(mean / mean.norm())
        pixels = F.interpolate((images * 0.25 + 0.5).expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic", antialias=True)
        mean, std = torch.tensor(clip.visual.preprocess_cfg["mean"]), torch.tensor(clip.visual.preprocess_cfg["std"])
        features = clip.encode_image((pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        expected = 100 * (features / features.norm(dim=-1, keepdim=True)) @ torch.stack(columns, 1)
        torch.testing.assert_close(teacher(images), expected, rtol=1e-4, atol=1e-4)
    # DFN5B's variant (no renormalisation) and the model's own logit scale
    raw = zero_shot_weights(clip, tokenizer, NAMES[:3], ["a {}.", "a photo of a {}."], renormalize=False)
    assert not torch.allclose(raw.norm(dim=0), torch.ones(3))
    learned = ZeroShotClassifier(CLIP, NAMES[:3], pretrained=str(clip_file), logit_scale=None, input_mean=0.5, input_std=0.25)
    assert learned.logit_scale == pytest.approx(float(clip.logit_scale.detach().exp()))
    assert ZeroShotClassifier(CLIP, NAMES[:3], pretrained=str(clip_file)).class_weights.shape == (128, 3)  # imagenet7 by default


def test_clip_loading_errors_are_clear(clip_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'mmkd-clip-tiyn'.*mmkd-clip-tiny"):
        create_clip("mmkd-clip-tiyn")
    with pytest.raises(ValueError, match="no pretrained tag 'opneai'"):
        create_clip("ViT-B-32", "opneai")
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        create_clip(CLIP, str(tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(clip_file.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="corrupt, truncated"):
        create_clip(CLIP, str(corrupt))
    with pytest.raises(RuntimeError, match="do not fit CLIP: missing keys"):
        other = tmp_path / "partial.safetensors"
        save_file({k: v.contiguous() for k, v in create_clip(CLIP).visual.state_dict().items()}, str(other))
        create_clip(CLIP, str(other))
    # a torch.save'd DDP state dict ("module." keys), as open_clip's own training writes
    state = {"module." + k: v for k, v in create_clip(CLIP, str(clip_file)).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ddp.pt")
    loaded = create_clip(CLIP, str(tmp_path / "ddp.pt"))
    torch.testing.assert_close(loaded.visual.proj, create_clip(CLIP, str(clip_file)).visual.proj)


def test_image_adapter_resizes_and_renormalises() -> None:
    images = torch.rand(2, 1, 28, 28)
    adapter = ImageAdapter(28, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), input_mean=0.3, input_std=0.2)
    out = adapter((images - 0.3) / 0.2)
    torch.testing.assert_close(out[:, 2], (images[:, 0] - 0.3) / 0.5)
    assert ImageAdapter(40, 0.5, 0.5, input_mean=0.0, input_std=1.0)(images).shape == (2, 3, 40, 40)
    with pytest.raises(RuntimeError, match="does not know how the input batches are normalised"):
        ImageAdapter(28, 0.5, 0.5)(images)


def test_student_heads_can_start_from_the_students_own_text_embeddings(clip_file: Path) -> None:
    model = dual_head_clip_student(CLIP, NAMES[:4], pretrained=str(clip_file), templates="simple")
    clip = create_clip(CLIP, str(clip_file)).eval()
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer(CLIP)([f"a photo of a {n}." for n in NAMES[:4]]))  # one template: its mean
    torch.testing.assert_close(model.ce_head.weight, expected)
    torch.testing.assert_close(model.kd_head.weight, expected)
    assert torch.all(model.ce_head.bias == 0) and model.forward_heads(torch.randn(2, 3, 32, 32))[0].shape == (2, 4)


# -- semi-supervised data ---------------------------------------------------------------------
def test_labeled_split_is_balanced_disjoint_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([120, 80, 100, 100, 100, 90, 110, 100, 100, 100]))
    labeled, unlabeled = balanced_labeled_split(labels, fraction=0.01, seed=13)
    counts = torch.bincount(labels[labeled], minlength=10)
    assert len(labeled) == math.ceil(len(labels) * 0.01) == 10 and torch.all(counts == 1)
    labeled, unlabeled = balanced_labeled_split(labels, fraction=0.038, seed=13)
    counts = torch.bincount(labels[labeled], minlength=10)
    assert len(labeled) == 38 and counts.max() - counts.min() == 1
    assert set(labeled.tolist()).isdisjoint(unlabeled.tolist()) and len(labeled) + len(unlabeled) == len(labels)
    assert torch.equal(balanced_labeled_split(labels, fraction=0.038, seed=13)[0], labeled)
    assert not torch.equal(balanced_labeled_split(labels, fraction=0.038, seed=14)[0], labeled)
    shots, _ = balanced_labeled_split(labels, shots_per_class=4)
    assert torch.all(torch.bincount(labels[shots]) == 4)
    with pytest.raises(ValueError, match="class 1 has 80 samples, fewer than the 81"):
        balanced_labeled_split(labels, shots_per_class=81)


def test_semi_supervised_loader_pairs_a_labeled_and_an_unlabeled_batch(data_root: Path) -> None:
    data = SemiSupervisedDataModule(FashionMNISTDataModule(root=str(data_root), batch_size=500), labeled_fraction=0.01, labeled_batch_size=64)
    data.setup("fit")
    labeled, unlabeled = data.parts["labeled"], data.parts["unlabeled"]
    assert len(labeled) == 550 and len(unlabeled) == 54450 and torch.all(torch.bincount(labeled.labels) == 55)
    assert torch.all(unlabeled.labels == -1)  # no training step can see these labels
    loader = data.train_dataloader()
    steps = math.ceil(54450 / 500)
    assert {name: len(part) for name, part in loader.iterables.items()} == {"labeled": steps, "unlabeled": steps}
    batches = list(loader)
    assert len(batches) == steps
    first, _, _ = batches[0]
    assert set(first) == {"labeled", "unlabeled"} and first["labeled"]["image"].shape == (64, 1, 28, 28)
    # the labelled part is reshuffled each time it is used up: 550 images, 64 a step
    seen = torch.cat([batch["labeled"]["index"] for batch, _, _ in batches[:9]])
    assert len(set(seen[:550].tolist())) == 550 and not torch.equal(seen[:14], seen[550:564])
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28) and data.mean == FashionMNISTDataModule.mean


# -- the loss and the mix ---------------------------------------------------------------------
def test_mix_is_a_probability_mixture_with_a_temperature_on_the_kd_head() -> None:
    ce, kd = torch.randn(5, 4), 10 * torch.randn(5, 4)
    mixed = mix_log_probs(ce, kd, 0.3, 0.5).exp()
    torch.testing.assert_close(mixed, 0.3 * ce.softmax(-1) + 0.7 * (kd / 0.5).softmax(-1))
    torch.testing.assert_close(mix_log_probs(ce, kd, 1.0, 0.5), ce.log_softmax(-1))
    torch.testing.assert_close(mix_log_probs(ce, kd, 0.0, 2.0), (kd / 2).log_softmax(-1))


def test_search_picks_the_best_mix_and_the_first_of_ties() -> None:
    labels = torch.tensor([0, 1, 1])
    ce = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # right on 0 and 2
    kd = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # right on 1 and 2
    alpha, beta, accuracy = search_mix(ce, kd, labels, alphas=[0.0, 0.5, 1.0], betas=[0.5, 1.0])
    assert (alpha, beta, accuracy) == (0.0, 0.5, pytest.approx(2 / 3))  # every alpha scores 2/3: the first wins
    kd = torch.tensor([[0.0, 0.1], [0.0, 8.0], [0.0, 0.1]])  # a soft kd head lets the ce head win sample 0
    alpha, beta, accuracy = search_mix(ce, kd, labels, alphas=[0.0, 0.5, 1.0], betas=[0.5, 1.0])
    assert (alpha, beta, accuracy) == (0.5, 0.5, 1.0)


def test_loss_is_ce_on_labels_plus_kd_on_labeled_and_unlabeled(clip_file: Path) -> None:
    torch.manual_seed(0)
    teacher = Teacher(ZeroShotClassifier(CLIP, NAMES, pretrained=str(clip_file), input_mean=0.0, input_std=1.0))
    batch = {"labeled": {"image": torch.randn(3, 1, 28, 28), "label": torch.tensor([1, 2, 3])},
             "unlabeled": {"image": torch.randn(5, 1, 28, 28), "label": torch.full((5,), -1)}}  # fmt: skip
    images = torch.cat([batch["labeled"]["image"], batch["unlabeled"]["image"]])
    teacher_logits = teacher(images)

    def kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 4 * (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()

    def losses(**kwargs) -> tuple[dict, DualHeadStudent]:
        model = DHO(student(), teacher, **kwargs)
        logged = {}
        model.total_loss = lambda terms, stage, size: logged.update(terms) or sum(terms.values())
        model.train()
        model.training_step(batch, 0)
        return logged, model.student

    logged, net = losses()  # still in train mode: BatchNorm normalises with the same batch statistics
    ce_logits, kd_logits = net.forward_heads(images)
    torch.testing.assert_close(logged["ce"], F.cross_entropy(ce_logits[:3], batch["labeled"]["label"]))
    torch.testing.assert_close(logged["kd_labeled"], kd(kd_logits[:3], teacher_logits[:3]))
    torch.testing.assert_close(logged["kd_unlabeled"], kd(kd_logits[3:], teacher_logits[3:]))

    logged, net = losses(loss_lambda=0.25)
    ce_logits, kd_logits = net.forward_heads(images)
    torch.testing.assert_close(logged["kd_unlabeled"], 0.75 * kd(kd_logits[3:], teacher_logits[3:]))
    torch.testing.assert_close(logged["ce"], 0.25 * F.cross_entropy(ce_logits[:3], batch["labeled"]["label"]))

    logged, net = losses(single_head=True)  # the KD terms on the CE head, which alone decides
    ce_logits, _ = net.forward_heads(images)
    torch.testing.assert_close(logged["kd_unlabeled"], kd(ce_logits[3:], teacher_logits[3:]))
    assert float(net.alpha) == 1.0 and not any(p.requires_grad for p in net.kd_head.parameters())

    logged, net = losses(kd_weight=0)
    assert set(logged) == {"ce"} and float(net.alpha) == 1.0


def test_dho_refuses_a_plain_student_and_a_bad_mix(clip_file: Path) -> None:
    teacher = Teacher(ZeroShotClassifier(CLIP, NAMES, pretrained=str(clip_file)))
    with pytest.raises(TypeError, match="DualHeadStudent"):
        DHO(timm_model("resnet10t"), teacher)
    with pytest.raises(ValueError, match=r"needs 0 <= alpha <= 1 and beta > 0, got alpha=1.5, beta=0.5"):
        student(alpha=1.5)  # the mix would score NaN
    with pytest.raises(ValueError, match="got alpha=0.0, beta=0.0"):
        DHO(student(), teacher, mix="search", beta_grid=[1.0, 0.0])


def test_dho_and_other_modules_refuse_the_other_kind_of_data_module(clip_file: Path, data_root: Path) -> None:
    Path("runs/dho").mkdir(parents=True)
    Path("runs/dho/clip_fmnist.safetensors").write_bytes(clip_file.read_bytes())
    cli = lightning_cli(["-c", str(CONFIGS / "dho/fmnist.yaml"), *SHORT], run=False)
    with pytest.raises(ValueError, match="DHO trains on labelled \\+ unlabelled batches, but FashionMNISTDataModule .*SemiSupervisedDataModule"):
        cli.trainer.fit(cli.model, datamodule=FashionMNISTDataModule(root=str(data_root)))
    classifier = Classifier(timm_model("resnet10t", num_classes=10, in_chans=1))
    with pytest.raises(ValueError, match="Classifier trains on labelled batches; .* are for DHO: give the data module it wraps"):
        cli.trainer.fit(classifier, datamodule=cli.datamodule)


# -- the shipped recipe -----------------------------------------------------------------------
def test_searched_mix_is_saved_and_used_by_test(clip_file: Path, data_root: Path) -> None:
    Path("runs/dho").mkdir(parents=True)
    Path("runs/dho/clip_fmnist.safetensors").write_bytes(clip_file.read_bytes())
    config = ["-c", str(CONFIGS / "dho/fmnist.yaml"), *SHORT, "--trainer.limit_train_batches=8", "--model.init_args.mix=search",
              "--model.init_args.alpha_grid=[0.0, 0.3, 1.0]", "--model.init_args.beta_grid=[1.0, 2.0]"]  # fmt: skip
    cli = lightning_cli(config, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = torch.load("runs/dho/fmnist/last.ckpt", map_location="cpu", weights_only=True)
    alpha, beta = checkpoint["mmkd"]["dho"]["alpha"], checkpoint["mmkd"]["dho"]["beta"]
    assert alpha in (0.0, 0.3, 1.0) and beta in (1.0, 2.0)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    fresh = lightning_cli(config, run=False)  # the configured 0.5, 0.5 until the checkpoint loads
    assert float(fresh.model.student.alpha) == 0.5
    [metrics] = fresh.trainer.test(fresh.model, datamodule=fresh.datamodule, ckpt_path="runs/dho/fmnist/last.ckpt", verbose=False)
    assert (float(fresh.model.student.alpha), float(fresh.model.student.beta)) == pytest.approx((alpha, beta))
    assert {"test/acc", "test/acc_ce", "test/acc_kd", "test/acc_fixed_mix"} <= set(metrics)


@pytest.mark.slow
def test_clip_recipe_learns_zero_shot_and_dho_distils_it(data_root: Path) -> None:
    clip = lightning_cli(["-c", str(CONFIGS / "dho/clip_fmnist.yaml"), *SHORT, "--trainer.limit_train_batches=50",
                          "--trainer.limit_val_batches=10", "--trainer.limit_test_batches=10"], run=False)  # fmt: skip
    clip.trainer.fit(clip.model, datamodule=clip.datamodule)
    [clip_metrics] = clip.trainer.test(clip.model, datamodule=clip.datamodule, verbose=False)
    assert clip_metrics["test/acc"] > 0.35  # zero-shot, from captions only; chance is 0.1
    teacher = ZeroShotClassifier(CLIP, NAMES, pretrained="runs/dho/clip_fmnist.safetensors")
    assert teacher.logit_scale == 100.0
    dho = lightning_cli(["-c", str(CONFIGS / "dho/fmnist.yaml"), *SHORT, "--trainer.limit_train_batches=40", "--trainer.limit_val_batches=10"], run=False)
    dho.trainer.fit(dho.model, datamodule=dho.datamodule)
    metrics = dho.trainer.callback_metrics
    assert metrics["val/teacher_acc"] > 0.35 and metrics["val/acc_kd"] > 0.3  # 40 steps of 1 % labels
