"""Bring your own teacher (and student): timm, open_clip and any nn.Module from local weight files
in every common layout, errors that name the fix, drop-head loading, and class maps between
label spaces that differ."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmkd.cli import lightning_cli
from mmkd.core import LOGITS, ClassMap, ClassMapError, Teacher, build_class_map, load_state_dict_file, sha256_file
from mmkd.core.checkpoint import _prefix_hint, classifier_keys
from mmkd.distillers import DKD, KD, FitNets
from mmkd.heads import ShapeMismatchError
from mmkd.losses import dkd_loss
from mmkd.models import create_clip, timm_model, torchvision_model

REPO = Path(__file__).resolve().parents[1]
WIDTH = {"channels": [8, 16, 32, 64], "stem_width": 8}  # a narrow ResNet-10-T: fast on 3x32x32


def small(num_classes: int = 10, **kwargs) -> nn.Module:
    return timm_model("resnet10t", num_classes=num_classes, in_chans=3, model_args=WIDTH, **kwargs)


def trained_a_little(model: nn.Module) -> nn.Module:
    """One SGD step, so weights and BatchNorm statistics differ from a fresh model's."""
    model.train()
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model


def assert_same_weights(model: nn.Module, reference: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
    state = model.state_dict()
    assert set(state) == set(reference) | set(skip)
    for key, value in reference.items():
        if key not in skip:
            assert torch.equal(state[key], value), key


class RandomImages(L.LightningDataModule):
    """Tiny in-memory image batches (``image``, ``label``, ``index``) for Trainer runs."""

    def __init__(self, num_classes: int = 10, size: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(_Samples(self.images, self.labels), batch_size=self.batch_size)

    train_dataloader = val_dataloader = _loader


class _Samples(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index], "index": index}


def trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


# -- timm models from every file layout ---------------------------------------------------------
def _save(kind: str, path: Path, state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind in ("pth", "bin"):
        torch.save(state, path)
    elif kind == "ddp_safetensors":  # every key under DDP's module.
        save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "timm_train":  # what timm's train.py writes (CheckpointSaver._save): EMA next to the trained weights
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
        torch.save({
            "epoch": 7, "arch": "resnet10t", "version": 2, "optimizer": optimizer.state_dict(),
            "args": argparse.Namespace(model="resnet10t", lr=0.1, model_ema=True, aa=None),
            "state_dict": {f"module.{k}": v for k, v in other.items()},
            "state_dict_ema": {f"module.{k}": v for k, v in state.items()},
            "metric": 71.3,
        }, path)  # fmt: skip
    elif kind == "timm_train_no_ema":
        torch.save({"epoch": 7, "args": argparse.Namespace(model="resnet10t"), "state_dict": state}, path)
    elif kind == "model_entry":  # MAE / DeiT release layout
        torch.save({"model": state, "epoch": 99}, path)


SUFFIX = {"safetensors": ".safetensors", "pth": ".pth", "bin": ".bin", "ddp_safetensors": ".safetensors",
          "timm_train": ".pth.tar", "timm_train_no_ema": ".pth.tar", "model_entry": ".pth"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(SUFFIX))
def test_timm_teacher_loads_every_file_layout(kind: str, tmp_path: Path) -> None:
    source, other = trained_a_little(small(20)).state_dict(), small(20).state_dict()
    path = tmp_path / f"weights{SUFFIX[kind]}"
    _save(kind, path, source, other)
    teacher = Teacher(small(20), checkpoint=str(path))  # timm EMA weights first, as timm's load_checkpoint
    assert_same_weights(teacher.model, source)
    assert teacher.reference()["checkpoint_sha256"] == sha256_file(path)
    assert_same_weights(small(20, checkpoint=str(path)), source)  # the same through the model builder


def test_timm_checkpoint_without_ema_and_ema_off(tmp_path: Path) -> None:
    ema, trained = trained_a_little(small()).state_dict(), small().state_dict()
    path = tmp_path / "model_best.pth.tar"
    _save("timm_train", path, ema, trained)
    assert_same_weights(small(checkpoint=str(path), checkpoint_ema=False), trained)
    assert set(load_state_dict_file(path, use_ema=False)) == set(trained)  # module. stripped


def test_lightning_checkpoint_of_a_distiller_loads_its_student(tmp_path: Path) -> None:
    distiller = KD(small(), Teacher(small()), input_size=[3, 32, 32], loss_impl="eager")
    run = trainer(max_steps=2, limit_val_batches=0)
    run.fit(distiller, datamodule=RandomImages())
    run.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(k.startswith("model.") for k in checkpoint["state_dict"]) and "mmkd" in checkpoint
    student = {k: v for k, v in distiller.student.state_dict().items()}
    assert_same_weights(small(checkpoint=str(tmp_path / "last.ckpt")), student)  # model. is the student
    assert_same_weights(Teacher(small(), checkpoint=str(tmp_path / "last.ckpt")).model, student)


# -- errors that name the fix -------------------------------------------------------------------
def test_prefix_of_a_larger_model_is_named_and_checkpoint_prefix_loads_it(tmp_path: Path) -> None:
    source = trained_a_little(small()).state_dict()
    path = tmp_path / "backbone.pth"
    torch.save({f"backbone.{k}": v for k, v in source.items()}, path)
    with pytest.raises(RuntimeError, match=r"do not fit ResNet: missing keys: .*unexpected keys: backbone\..*"
                       r"The file's keys are the model's with the prefix 'backbone.' in front: load them with checkpoint_prefix: 'backbone.'"):  # fmt: skip
        Teacher(small(), checkpoint=str(path))
    assert_same_weights(Teacher(small(), checkpoint=str(path), checkpoint_prefix="backbone.").model, source)

    whole = tmp_path / "whole.pth"  # a model with more in it: the student is a part
    torch.save({**{f"student.{k}": v for k, v in source.items()}, "teacher.fc.weight": torch.zeros(3, 3)}, whole)
    with pytest.raises(RuntimeError, match=r"The model's weights are the file's keys under the prefix 'student.' \(92 of its 93 keys\): "
                       r"load them with checkpoint_prefix: 'student.'"):  # fmt: skip
        small(checkpoint=str(whole))
    assert_same_weights(small(checkpoint=str(whole), checkpoint_prefix="student."), source)


def test_plain_file_with_model_prefix_and_a_file_without_a_prefix_the_model_has(tmp_path: Path) -> None:
    source = small().state_dict()
    path = tmp_path / "module_state.pt"  # a LightningModule's state_dict() saved as a plain file
    torch.save({f"model.{k}": v for k, v in source.items()}, path)
    with pytest.raises(RuntimeError, match="with the prefix 'model.' in front: load them with checkpoint_prefix: 'model.'"):
        small(checkpoint=str(path))

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = small()

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(bare))
    with pytest.raises(RuntimeError, match="do not fit Wrapped: .*The file's keys are the model's without the prefix 'backbone.': "
                       "the file holds the weights of the model's 'backbone' part alone"):  # fmt: skip
        Teacher(Wrapped(), checkpoint=str(bare))


def test_prefix_hint_cases() -> None:
    own = {"conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    assert "prefix 'module.' in front" in _prefix_hint(own, {f"module.{k}" for k in own})
    partial = {f"net.{k}" for k in own - {"fc.weight", "fc.bias"}} | {"net.head.weight"}
    hint = _prefix_hint(own, partial)
    assert "With the prefix 'net.' stripped, 3 of the model's 5 keys are in the file (without it: 0)" in hint
    assert "checkpoint_prefix: 'net.'" in hint
    assert _prefix_hint(own, {"conv.weight", "bn.weight", "x.y"}) == ""  # as they are, the keys match best
    assert _prefix_hint(own, {"a.b", "c.d"}) == ""  # nothing in common: no prefix to suggest


def test_ddp_module_prefix_is_stripped_automatically(tmp_path: Path) -> None:
    source = trained_a_little(small()).state_dict()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.items()}, path)
    assert_same_weights(Teacher(small(), checkpoint=str(path)).model, source)
    compiled = tmp_path / "compiled.pt"  # torch.compile's wrapper inside DDP's
    torch.save({f"module._orig_mod.{k}": v for k, v in source.items()}, compiled)
    assert_same_weights(small(checkpoint=str(compiled)), source)


def test_another_architecture_or_width_is_said(tmp_path: Path) -> None:
    wider = tmp_path / "wider.pth"
    torch.save(timm_model("resnet10t", in_chans=3, model_args={"channels": [16, 32, 64, 128], "stem_width": 8}).state_dict(), wider)
    with pytest.raises(RuntimeError, match=r"shape mismatches: .*file \[16\] vs model \[8\].* The file seems to hold another "
                       r"architecture or width than this ResNet: \d+ of the \d+ tensors that both have differ in shape.*model_args"):  # fmt: skip
        small(checkpoint=str(wider))
    other = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model("resnet18", in_chans=3).state_dict().items()}, str(other))
    with pytest.raises(RuntimeError, match="missing keys: .*unexpected keys: .*seems to hold another architecture or width"):
        Teacher(small(), checkpoint=str(other))
    grey = tmp_path / "grey.pth"
    torch.save(timm_model("resnet10t", in_chans=1, model_args=WIDTH).state_dict(), grey)
    with pytest.raises(RuntimeError, match=r"first convolution \(conv1.0\) takes 1 input channel\(s\), the model's 3: set in_chans: 1"):
        small(checkpoint=str(grey))


def test_head_only_mismatch_names_num_classes_and_drop_head(tmp_path: Path) -> None:
    path = tmp_path / "in20.safetensors"
    save_file({k: v.contiguous() for k, v in small(20).state_dict().items()}, str(path))
    with pytest.raises(RuntimeError, match=r"Only the classifier differs \(fc.weight\): the model has num_classes=10, the file's "
                       r"classifier has 20 outputs.*set the model's num_classes: 20.*checkpoint_drop_head: true"):  # fmt: skip
        Teacher(small(10), checkpoint=str(path))
    backbone_only = tmp_path / "features.pth"  # a file without classifier (timm num_classes=0)
    torch.save(small(0).state_dict(), backbone_only)
    with pytest.raises(RuntimeError, match="the file has no classifier weights; load it with checkpoint_drop_head: true"):
        small(10, checkpoint=str(backbone_only))
    assert small(10, checkpoint=str(backbone_only), checkpoint_drop_head=True).fc.out_features == 10


def test_drop_head_loads_a_pretrained_backbone_into_other_classes(tmp_path: Path) -> None:
    imagenet = trained_a_little(small(1000))  # an "ImageNet" backbone and its 1000-way classifier
    path = tmp_path / "in1k.pth"
    torch.save(imagenet.state_dict(), path)
    fresh = small(10)
    torch.manual_seed(1)
    student = small(10, checkpoint=str(path), checkpoint_drop_head=True)
    assert classifier_keys(student) == {"fc.weight", "fc.bias"}  # timm's pretrained_cfg["classifier"]
    reference = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("fc.")}
    assert_same_weights(student, reference, skip={"fc.weight", "fc.bias"})
    assert student.fc.weight.shape == (10, 64) and not torch.equal(student.fc.weight, fresh.fc.weight)
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    wider = tmp_path / "wider.pth"  # everything but the head is still loaded strictly
    torch.save(timm_model("resnet10t", num_classes=1000, in_chans=3, model_args={"channels": [16, 32, 64, 128]}).state_dict(), wider)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        small(10, checkpoint=str(wider), checkpoint_drop_head=True)

    tv = tmp_path / "tv_resnet18.pth"  # torchvision: the classifier is the last nn.Linear, fc
    torch.save({"model": torchvision_model("resnet18", num_classes=1000).state_dict()}, tv)
    tv_student = torchvision_model("resnet18", num_classes=10, checkpoint=str(tv), checkpoint_drop_head=True)
    assert tv_student.fc.out_features == 10 and classifier_keys(tv_student) == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet81'.*resnet18"):
        torchvision_model("resnet81")


# -- open_clip ----------------------------------------------------------------------------------
def test_clip_from_a_plain_state_dict_and_from_safetensors(tmp_path: Path) -> None:
    clip = create_clip("mmkd-clip-tiny")
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)  # a weight that differs from a fresh model's for sure
    state = clip.state_dict()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip.safetensors"))
    for name in ("clip.pt", "clip.safetensors"):
        assert_same_weights(create_clip("mmkd-clip-tiny", str(tmp_path / name)), state)


# -- any nn.Module by class path, from YAML -----------------------------------------------------
def test_torchvision_teacher_and_student_from_yaml(tmp_path: Path) -> None:
    teacher_model = torchvision_model("resnet18", num_classes=20)
    torch.save({f"module.{k}": v for k, v in teacher_model.state_dict().items()}, tmp_path / "teacher.pth")
    imagenet = torchvision_model("resnet18", num_classes=1000)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(tmp_path / "in1k.safetensors"))
    (tmp_path / "map.json").write_text(json.dumps({f"class{s}": [2 * s, 2 * s + 1] for s in range(10)}))
    config = {
        "trainer": {"logger": False, "enable_checkpointing": False},
        "model": {"class_path": "mmkd.distillers.KD", "init_args": {
            "student": {"class_path": "mmkd.models.torchvision_model", "init_args": {
                "name": "resnet18", "num_classes": 10, "checkpoint": "in1k.safetensors", "checkpoint_drop_head": True}},
            "teacher": {"class_path": "mmkd.core.Teacher", "init_args": {
                "model": {"class_path": "torchvision.models.ResNet", "init_args": {
                    "block": "torchvision.models.resnet.BasicBlock", "layers": [2, 2, 2, 2], "num_classes": 20}},
                "checkpoint": "teacher.pth"}},
            "class_map": "map.json", "input_size": [3, 32, 32]}},
        "data": {"class_path": "mmkd.data.FashionMNISTDataModule"},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = lightning_cli(["-c", str(tmp_path / "config.yaml")], run=False)
    assert_same_weights(cli.model.teacher.model, teacher_model.state_dict())
    backbone = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("fc.")}
    assert_same_weights(cli.model.student, backbone, skip={"fc.weight", "fc.bias"})
    assert cli.model.class_map.groups == [[2 * s, 2 * s + 1] for s in range(10)] and cli.model.class_map.names[0] == "class0"
    # a factory function works as a class_path too (jsonargparse follows its return annotation)
    config["model"]["init_args"]["teacher"]["init_args"]["model"] = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 20}}
    (tmp_path / "function.yaml").write_text(yaml.safe_dump(config))
    cli = lightning_cli(["-c", str(tmp_path / "function.yaml")], run=False)
    assert_same_weights(cli.model.teacher.model, teacher_model.state_dict())


def test_a_factory_without_a_return_annotation_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many libraries' model factories carry no return annotation (torchdistill's ``resnet20``);
    jsonargparse refuses them as a class_path, ``mmkd.models.imported_model`` takes them."""
    (tmp_path / "their_models.py").write_text(
        "import torchvision\n\ndef narrow_resnet(num_classes=10):\n"
        "    return torchvision.models.resnet18(num_classes=num_classes)\n\n"
        "def not_a_model():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import their_models

    reference = trained_a_little(their_models.narrow_resnet(num_classes=20))
    torch.save(reference.state_dict(), tmp_path / "student.pth")
    student = {"class_path": "mmkd.models.imported_model", "init_args": {
        "builder": "their_models.narrow_resnet", "model_args": {"num_classes": 20}, "checkpoint": "student.pth"}}  # fmt: skip
    config = {
        "trainer": {"logger": False, "enable_checkpointing": False},
        "model": {"class_path": "mmkd.distillers.KD", "init_args": {"student": student, "teacher": {
            "class_path": "mmkd.core.Teacher", "init_args": {"model": {"class_path": "mmkd.models.torchvision_model",
                                                                        "init_args": {"name": "resnet18", "num_classes": 20}}}},
            "num_classes": 20}},
        "data": {"class_path": "mmkd.data.FashionMNISTDataModule"},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = lightning_cli(["-c", "config.yaml"], run=False)
    assert_same_weights(cli.model.student, reference.state_dict())
    config["model"]["init_args"]["student"] = {"class_path": "their_models.narrow_resnet", "init_args": {"num_classes": 20}}
    (tmp_path / "class_path.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):  # what imported_model is for
        lightning_cli(["-c", "class_path.yaml"], run=False)

    from mmkd.models import imported_model

    with pytest.raises(ValueError, match="'their_models' has no 'narow_resnet'; close names: \\['narrow_resnet'\\]"):
        imported_model("their_models.narow_resnet")
    with pytest.raises(ValueError, match="cannot import 'no_such_package.models'.*installed"):
        imported_model("no_such_package.models.resnet")
    with pytest.raises(ValueError, match="not an import path"):
        imported_model("resnet20")
    with pytest.raises(TypeError, match=r"their_models.not_a_model\(\*\*\{\}\) returned a int, not an nn.Module"):
        imported_model("their_models.not_a_model")


def test_readme_example_builds(tmp_path: Path) -> None:
    """The README's "Your own teacher" config, with stand-in weight files at its paths."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Your own teacher", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    config = yaml.safe_load(block)
    weights = tmp_path / "weights"
    weights.mkdir()
    teacher = trained_a_little(timm_model("resnet50", num_classes=1000, in_chans=3))
    _save("timm_train", weights / "model_best.pth.tar", teacher.state_dict(), {})  # EMA weights + args, as timm's train.py
    student_init = timm_model("resnet18", num_classes=1000, in_chans=3)
    save_file({k: v.contiguous() for k, v in student_init.state_dict().items()}, str(weights / "resnet18_in1k.safetensors"))
    config["data"] = {"class_path": "mmkd.data.FashionMNISTDataModule"}
    config["trainer"] = {"logger": False, "enable_checkpointing": False}
    (tmp_path / "byo.yaml").write_text(yaml.safe_dump(config))
    cli = lightning_cli(["-c", str(tmp_path / "byo.yaml")], run=False)
    assert_same_weights(cli.model.teacher.model, teacher.state_dict())
    assert cli.model.teacher.reference()["checkpoint_sha256"] == sha256_file(weights / "model_best.pth.tar")
    backbone = {k: v for k, v in student_init.state_dict().items() if not k.startswith("fc.")}
    assert_same_weights(cli.model.student, backbone, skip={"fc.weight", "fc.bias"})
    assert cli.model.student.fc.out_features == 10
    # the class map: Imagenette's ten ImageNet classes, checked against timm's ImageNet class names
    imagenette = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
                  "n03425413", "n03445777", "n03888257"]  # fmt: skip
    by_name = build_class_map([[wnid] for wnid in imagenette], cli.model.teacher.model)
    assert cli.model.class_map.groups == by_name.groups


# -- class maps -----------------------------------------------------------------------------------
def test_class_map_is_the_renormalised_group_mass() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 20) * 3
    groups = [[0], [3, 5], [7, 8, 9], [19], [1, 2, 4, 6]]
    mapped = ClassMap(groups)(logits)
    # from the definition: the teacher's probabilities summed over each group, renormalised
    probs = logits.softmax(-1)
    mass = torch.stack([probs[:, group].sum(-1) for group in groups], dim=-1)
    assert torch.allclose(mapped.softmax(-1), mass / mass.sum(-1, keepdim=True), atol=1e-6)
    # with a temperature, the mapped logits are softened: proportional to mass ** (1 / T)
    tempered = mass ** (1 / 4)
    assert torch.allclose((mapped / 4).softmax(-1), tempered / tempered.sum(-1, keepdim=True), atol=1e-6)
    # one teacher class per student class: its logits themselves, i.e. the teacher renormalised
    single = ClassMap([[4], [0], [13]])(logits)
    assert torch.equal(single, logits[:, [4, 0, 13]])
    assert torch.allclose(single.softmax(-1), probs[:, [4, 0, 13]] / probs[:, [4, 0, 13]].sum(-1, keepdim=True), atol=1e-6)


def test_class_map_specs_and_errors(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps([[0], [3, 5]]))
    assert build_class_map(str(tmp_path / "list.json")).groups == [[0], [3, 5]]
    (tmp_path / "names.json").write_text(json.dumps({"fish": ["tench", "goldfish"], "shark": "n01491361", "other": [999]}))
    imagenet_teacher = timm_model("resnet18", num_classes=1000, in_chans=3)
    names = build_class_map(str(tmp_path / "names.json"), imagenet_teacher)
    assert names.groups == [[0, 1], [3], [999]] and names.names == ["fish", "shark", "other"]
    assert names.ordered_as(["other", "fish", "shark"]).groups == [[999], [0, 1], [3]]  # the data's label order
    with pytest.raises(ClassMapError, match=r"not in the map \['dog'\]"):
        names.ordered_as(["fish", "shark", "dog"])
    with pytest.raises(ClassMapError, match="'crane' is ambiguous"):  # a bird and a machine in ImageNet
        build_class_map([["crane"]], imagenet_teacher)
    with pytest.raises(ClassMapError, match="no teacher class named 'tenchh'; close names: .*'tench'"):
        build_class_map([["tenchh"]], imagenet_teacher)
    with pytest.raises(ClassMapError, match="teacher's class names are unknown"):
        build_class_map([["tench"]], small(20))
    with pytest.raises(ClassMapError, match="teacher class 3 is listed twice"):
        ClassMap([[3], [1, 3]])
    with pytest.raises(ClassMapError, match=r"student classes \[1\] have no teacher class"):
        ClassMap([[3], []])
    with pytest.raises(ClassMapError, match="class_map has 2 student classes but the student's logits have 10"):
        ClassMap([[0], [1]]).check(20, 10)
    with pytest.raises(ClassMapError, match=r"names teacher classes \[25\], but the teacher's logits have 20"):
        ClassMap([[0], [25]])(torch.randn(2, 20))


GROUPS = [[2 * s, 2 * s + 1] for s in range(9)] + [[18]]  # 10 student classes from 19 of 20 teacher classes


def test_kd_with_a_class_map_trains_and_its_loss_is_kd_on_the_mapped_logits() -> None:
    torch.manual_seed(0)
    distiller = KD(small(10), Teacher(trained_a_little(small(20))), temperature=4.0, kd_weight=0.9, ce_weight=0.1,
                   class_map=GROUPS, input_size=[3, 32, 32], loss_impl="eager")  # fmt: skip
    run = trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    run.fit(distiller, datamodule=RandomImages())
    assert {"train/loss_kd", "train/loss_ce", "val/teacher_acc"} <= set(run.callback_metrics)
    assert distiller.feature_shapes["teacher"][LOGITS] == [10]

    distiller.eval()
    batch = next(iter(RandomImages()._loader()))
    losses = distiller.distillation_losses(batch)
    with torch.no_grad():
        student = distiller.student(batch["image"])
        teacher = distiller.teacher.model(batch["image"])
    mapped = torch.stack([torch.log(teacher[:, group].exp().sum(-1)) for group in GROUPS], dim=-1)  # log of summed mass
    p_teacher, log_p_student = (mapped / 4).softmax(-1), (student / 4).log_softmax(-1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean()
    assert torch.allclose(losses["kd"], 0.9 * 16 * kl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(losses["ce"], 0.1 * F.cross_entropy(student, batch["label"]), rtol=1e-5)

    dkd = DKD(distiller.student, distiller.teacher, class_map=GROUPS, input_size=[3, 32, 32])  # every logit term
    dkd.setup("fit")
    dkd.eval()
    expected = dkd_loss(student, mapped, batch["label"], 1.0, 8.0, 4.0) * dkd.term_scale("dkd")
    assert torch.allclose(dkd.distillation_losses(batch)["dkd"], expected, rtol=1e-5, atol=1e-6)

    class RawCache:  # the teacher cache stores the teacher's own 20-way logits: mapped on lookup too
        def lookup(self, indices: torch.Tensor, device: torch.device, views: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            return {LOGITS: teacher[indices]}

    distiller.train()
    distiller._cache = RawCache()
    assert torch.allclose(distiller.teacher_outputs(batch)[LOGITS], mapped, atol=1e-5)


def test_logit_loss_between_other_class_counts_points_to_class_map() -> None:
    distiller = KD(small(10), Teacher(small(20)), input_size=[3, 32, 32])
    with pytest.raises(ShapeMismatchError, match=r"the student's logits are \[10\] and the teacher's \[20\].*set the distiller's class_map"):
        distiller.setup("fit")
    with pytest.raises(ClassMapError, match="class_map has 2 student classes but the student's logits have 10"):
        KD(small(10), Teacher(small(20)), class_map=[[0], [1]], input_size=[3, 32, 32]).setup("fit")


def test_feature_terms_need_no_class_map_and_teacher_accuracy_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr("mmkd.core.distiller.rank_zero_info", said.append)
    distiller = FitNets(small(10), Teacher(small(37)), student_layer="layer2", teacher_layer="layer2", input_size=[3, 32, 32])
    run = trainer(limit_val_batches=2)
    run.validate(distiller, datamodule=RandomImages())
    run.validate(distiller, datamodule=RandomImages())
    assert "val/acc" in run.callback_metrics and "val/teacher_acc" not in run.callback_metrics
    assert said == ["val/teacher_acc skipped: the teacher's outputs [37] are not logits over the student's 10 classes "
                    "(set class_map to map a teacher of other classes)"]  # fmt: skip
