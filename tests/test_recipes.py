"""The full-size recipes (configs/imagenet, configs/dho/imagenet_*, configs/g2sd/imagenet_*,
configs/dfine/coco2017.yaml), each run for two steps on CPU by `mmkd fit` in a subprocess, as shipped but for
the overrides a CPU smoke run needs (the ``SMOKE`` and ``CPU`` lists and, per test, the data path,
batch sizes and worker counts; for DHO also the class names: see ``DHO_CLASSES``).

Their data is a stand-in tree of the same layout, written here from real Fashion-MNIST images
(an ImageNet ImageFolder of 3 WordNet-id classes as 64x64 JPEGs, read at the recipes' 224 px; a
COCO 2017 folder of composed scenes as JPEGs, read at 640 px), and their weight files are
randomly initialised networks saved where the configs expect them (``weights/...``, relative to
the run's folder), in the form the real files have (a torchvision state dict, MAE's ``{"model":
...}`` checkpoints in MAE's key layout, open_clip state dicts, a timm classifier). The networks
are the recipes' own, at full size: a path, key or shape mistake in a recipe fails here, not on a
GPU. Nothing here says how accurate a recipe is: none has been trained.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torchvision
import yaml

from conftest import CONFIGS, REPO

sys.path.insert(0, str(REPO / "tools"))
import compose_detection  # noqa: E402
import image_files  # noqa: E402

SMALL_LOADERS = ("--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=1")  # for a CPU smoke run

RECIPES = {
    "imagenet/kd_resnet34_resnet18.yaml": "torchdistill",
    "dho/imagenet_1pct.yaml": "81.6",
    "dho/imagenet_10pct.yaml": "82.8",
    "g2sd/imagenet_generic.yaml": "0.02",
    "g2sd/imagenet_specific.yaml": "98.7 %",
    "dfine/coco2017.yaml": "42.8 AP",
}
# What a CPU smoke run changes, for every recipe: two steps, one validation batch, one process.
SMOKE = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
         "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
WNIDS = image_files.IMAGENET_WNIDS[:3]
# DHO's text towers encode 7 prompts per class: ImageNet's 1000 classes through ViT-H's text tower
# are hours on 2 CPU cores, so the DHO runs take the stand-in's 3 classes (tench, goldfish, great
# white shark: ImageNet's first three, the recipes' own names for labels 0..2).
DHO_CLASSES = json.dumps(["tench", "goldfish", "great white shark"])
# COCO's 80 category ids (1..90 with gaps), as instances_*2017.json lists them
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


MMKD = str(Path(sys.executable).parent / "mmkd")


def fit(config: str, *overrides: str, facts: tuple[str, ...] = ()) -> dict[str, Any]:
    """``mmkd fit -c configs/<config>`` in a subprocess, as a user runs it (so each run's GBs of
    networks go with its process), with a probe callback that reports the step count, the logged
    metrics and the ``facts`` (attribute paths of the trainer, see tests/recipe_probe.py)."""
    probe = {"class_path": "recipe_probe.RecipeProbe", "init_args": {"out": "probe.json", "facts": list(facts)}}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [MMKD, "fit", "-c", str(CONFIGS / config), *SMOKE, *CPU, *overrides, f"--trainer.callbacks+={json.dumps(probe)}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(Path("probe.json").read_text())
    assert all(math.isfinite(v) for v in report["metrics"].values()), report["metrics"]
    return report


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[Path]:
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def link_weights(folder: Path) -> None:
    """The weight files where the configs look for them: ``weights/`` of the working directory."""
    Path("weights").symlink_to(folder, target_is_directory=True)


def checkpoint(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- data: stand-in trees of the recipes' layouts, from real images ----------------------------------
@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """ImageNet's ImageFolder layout: train/ and val/ with 3 WordNet-id class folders of 4 and 2
    JPEGs (64x64, read at 224 px by the recipes)."""
    out = tmp_path_factory.mktemp("imagenet") / "imagenet"
    return image_files.write_imagenet_standin(out, data_root / "fashion-mnist", classes=3, per_class=(4, 2, 0), size=(64, 64))


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """COCO 2017's layout (annotations/instances_{train,val}2017.json, train2017/ and val2017/ of
    JPEGs with 12-digit names) holding composed scenes of real Fashion-MNIST objects, with COCO's
    80 category ids (the 10 garments on the first ten, the other 70 without objects)."""
    out = compose_detection.compose(tmp_path_factory.mktemp("coco") / "coco", data_root / "fashion-mnist",
                                    {"train": 4, "val": 2, "test": 0}, layout="coco2017")  # fmt: skip
    for split in ("train2017", "val2017"):
        path = out / "annotations" / f"instances_{split}.json"
        instances = json.loads(path.read_text())
        names = [category["name"] for category in instances["categories"]]
        instances["categories"] = [{"id": i, "name": names[k] if k < len(names) else f"unused-{i}", "supercategory": "none"}
                                   for k, i in enumerate(COCO_CATEGORY_IDS)]  # fmt: skip
        path.write_text(json.dumps(instances))
    return out


# -- weights: random networks saved as the real files are -------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


def mae_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmkd MaskedAutoencoder state dict in the official MAE layout (``blocks.*``,
    ``decoder_embed.*``, ``mask_token``, ...), as mae_pretrain_vit_base_full.pth holds it."""
    renames = {"decoder.embed.": "decoder_embed.", "decoder.mask_token": "mask_token", "decoder.pos_embed": "decoder_pos_embed",
               "decoder.blocks.": "decoder_blocks.", "decoder.norm.": "decoder_norm.", "decoder.pred.": "decoder_pred."}  # fmt: skip
    out = {}
    for key, value in state.items():
        new = next((new + key[len(old) :] for old, new in renames.items() if key.startswith(old)), None)
        out[new or key.removeprefix("encoder.")] = value
    assert not any(k.startswith(("encoder.", "decoder.")) for k in out)
    return out


def build(config: str, *path: str) -> torch.nn.Module:
    """The network a recipe describes at ``path`` (keys under ``model.init_args``), built from its
    YAML with jsonargparse, as the CLI builds it (so the saved weights fit the recipe's network)."""
    from jsonargparse import ArgumentParser

    node = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]
    for key in path:
        node = node[key] if key in node else node["init_args"][key]
    parser = ArgumentParser()
    parser.add_argument("--net", type=torch.nn.Module)
    return parser.instantiate_classes(parser.parse_object({"net": node})).net


@pytest.fixture(scope="module")
def resnet34(weights: Path) -> Path:
    """torchvision's ResNet34_Weights.IMAGENET1K_V1 file in form: a plain state dict (.pth)."""
    import timm

    torch.manual_seed(0)
    path = weights / "resnet34-b627a593.pth"
    torch.save(timm.create_model("resnet34", num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mae_teachers(weights: Path) -> tuple[Path, Path]:
    """MAE's full pre-trained ViT-B (encoder + decoder, official key layout) and its fine-tuned
    ViT-B classifier, as ``{"model": state_dict}`` .pth files."""
    torch.manual_seed(0)
    full = weights / "mae_pretrain_vit_base_full.pth"
    torch.save({"model": mae_official_layout(build("g2sd/imagenet_generic.yaml", "teacher", "model").state_dict())}, full)
    finetuned = weights / "mae_finetuned_vit_base.pth"
    torch.save({"model": build("g2sd/imagenet_specific.yaml", "teacher", "model").state_dict()}, finetuned)
    return full, finetuned


@pytest.fixture(scope="module")
def hgnetv2_b0(weights: Path) -> Path:
    """An HGNetv2-B0 ImageNet classifier in timm's layout (safetensors)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = weights / "hgnetv2_b0.ssld_stage1_in22k_in1k.safetensors"
    save_file(timm.create_model("hgnetv2_b0").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def clips(weights: Path) -> tuple[Path, Path]:
    """open_clip state dicts of the DHO recipes' CLIPs, randomly initialised: DFN5B's
    ViT-H-14-378-quickgelu as the HF repo's open_clip_pytorch_model.bin (a state dict, in fp16 to halve the file) and
    OpenAI's ViT-B-16 (QuickGELU) as open_clip_model.safetensors."""
    from safetensors.torch import save_file

    from mmkd.models import create_clip

    torch.manual_seed(0)
    teacher = weights / "DFN5B-CLIP-ViT-H-14-378/open_clip_pytorch_model.bin"
    teacher.parent.mkdir()
    model = create_clip("ViT-H-14-378-quickgelu")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, teacher)
    del model
    student = weights / "vit_base_patch16_clip_224.openai/open_clip_model.safetensors"
    student.parent.mkdir()
    save_file({k: v.contiguous() for k, v in create_clip("ViT-B-16-quickgelu").state_dict().items()}, str(student))
    gc.collect()
    return teacher, student


# -- the recipes as files ---------------------------------------------------------------------------
def class_paths(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield node["class_path"]
        for value in node.values():
            yield from class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from class_paths(value)


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_each_recipe_names_existing_classes_and_states_its_reference(config: str) -> None:
    import importlib

    text = (CONFIGS / config).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert RECIPES[config] in header and "Reference" in header and "Not measured with mmkd" in header
    assert "/path/to/" in text  # the one thing a user fills in, besides the weight files
    for path in set(class_paths(yaml.safe_load(text))):
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path


def test_the_two_dho_recipes_differ_in_the_labelled_fraction_only() -> None:
    one, ten = (yaml.safe_load((CONFIGS / f"dho/imagenet_{p}.yaml").read_text()) for p in ("1pct", "10pct"))
    assert one["data"]["init_args"].pop("labeled_fraction") == 0.01 and ten["data"]["init_args"].pop("labeled_fraction") == 0.1
    for run in (one, ten):
        run["trainer"].pop("logger")
        run["trainer"].pop("callbacks")
        assert run["model"]["init_args"].pop("warmup_epochs") in (1.0, 1.1)  # 5,000 iterations either way
    assert one == ten
    names = one["model"]["init_args"]["student"]["init_args"]["class_names"]
    from open_clip import IMAGENET_CLASSNAMES

    assert names == list(IMAGENET_CLASSNAMES) and one["model"]["init_args"]["teacher"]["init_args"]["model"]["init_args"]["class_names"] == names


# -- ImageNet-1k KD, ResNet-34 -> ResNet-18 ----------------------------------------------------------
def test_imagenet_kd_resnet34_to_resnet18(imagenet: Path, resnet34: Path, tmp_path: Path) -> None:
    link_weights(resnet34.parent)
    run = fit("imagenet/kd_resnet34_resnet18.yaml", f"--data.init_args.root={imagenet}", *SMALL_LOADERS,
              facts=("lightning_module.student", "lightning_module.teacher.model", "datamodule.views", "datamodule.num_classes",
                     "lr_scheduler_configs[0].scheduler.milestones",
                     "optimizers[0].defaults"))  # fmt: skip
    metrics, facts = run["metrics"], run["facts"]
    assert run["global_step"] == 2 and {"train/loss_kd", "train/loss_ce", "val/acc", "val/teacher_acc"} <= set(metrics)
    # torchvision's ResNet-18 and ResNet-34 (their parameter counts), 1000 classes; the teacher's
    # BatchNorms are folded (each trades its weight and bias, 2 C, for a convolution bias, C)
    bn_channels = sum(m.num_features for m in torchvision.models.resnet34().modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert facts["lightning_module.student"]["parameters"] == 11_689_512
    assert facts["lightning_module.teacher.model"]["parameters"] == 21_797_672 - bn_channels
    assert facts["datamodule.num_classes"] == 3 and list(facts["datamodule.views"]) == ["image"]  # one view: the same tensor for both
    view = facts["datamodule.views"]["image"]
    assert (view["size"], view["interpolation"], view["crop_pct"], view["mean"]) == ([224, 224], "bilinear", 0.875, [0.485, 0.456, 0.406])
    assert facts["lr_scheduler_configs[0].scheduler.milestones"] == {"30": 1, "60": 1, "90": 1}
    optimizer = facts["optimizers[0].defaults"]
    assert (optimizer["lr"], optimizer["momentum"], optimizer["weight_decay"]) == (0.1, 0.9, 1e-4)
    saved = checkpoint("runs/imagenet/kd_resnet34_resnet18/last.ckpt")
    assert saved["mmkd"]["teacher"]["checkpoint"] == "weights/resnet34-b627a593.pth" and not any(k.startswith("teacher.") for k in saved["state_dict"])


# -- DHO, ImageNet 1 % and 10 % ----------------------------------------------------------------------
DHO_FACTS = (
    "lightning_module.teacher.model.visual.image_size", "lightning_module.teacher.model.visual.transformer.width",
    "len(lightning_module.teacher.model.visual.transformer.resblocks)", "lightning_module.teacher.model.visual",
    "lightning_module.student.backbone.image_size", "lightning_module.student.backbone.transformer.width",
    "lightning_module.student.ce_head.in_features", "lightning_module.student.alpha", "lightning_module.student.beta",
    "datamodule.views", "len(datamodule.parts[labeled])", "len(datamodule.parts[unlabeled])",
)


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["1pct", "10pct"])
def test_dho_imagenet(labels: str, imagenet: Path, clips: tuple[Path, Path], tmp_path: Path) -> None:
    link_weights(clips[0].parent.parent)
    run = fit(
        f"dho/imagenet_{labels}.yaml", f"--data.init_args.data.init_args.root={imagenet}",
        "--data.init_args.data.init_args.batch_size=1", "--data.init_args.labeled_batch_size=1",
        "--data.init_args.data.init_args.eval_batch_size=1", "--data.init_args.data.init_args.num_workers=1",
        "--model.init_args.teacher.init_args.bf16=false",  # CPU: fp32 (no bf16 units here)
        f"--model.init_args.student.init_args.class_names={DHO_CLASSES}",
        f"--model.init_args.teacher.init_args.model.init_args.class_names={DHO_CLASSES}", "--model.init_args.num_classes=3",
        facts=DHO_FACTS,
    )  # fmt: skip
    metrics, facts = run["metrics"], run["facts"]
    assert run["global_step"] == 2
    assert {"train/loss_ce", "train/loss_kd_labeled", "train/loss_kd_unlabeled", "val/acc", "val/acc_ce", "val/acc_kd", "val/teacher_acc"} <= set(metrics)
    # the teacher: DFN5B's ViT-H/14 at 378 px (width 1280, 32 blocks, 632 M parameters), its weights loaded strictly
    teacher = "lightning_module.teacher.model.visual"
    assert facts[f"{teacher}.image_size"] == [378, 378] and facts[f"{teacher}.transformer.width"] == 1280
    assert facts[f"len({teacher}.transformer.resblocks)"] == 32 and facts[teacher]["parameters"] > 630e6
    # the student: CLIP ViT-B/16 at 224 px, 512-d embedding under both heads
    student = "lightning_module.student"
    assert facts[f"{student}.backbone.image_size"] == [224, 224] and facts[f"{student}.backbone.transformer.width"] == 768
    assert facts[f"{student}.ce_head.in_features"] == 512 and (facts[f"{student}.alpha"], facts[f"{student}.beta"]) == (0.5, 0.5)
    views = facts["datamodule.views"]
    assert views["image"]["size"] == [224, 224] and views["teacher_image"]["size"] == [378, 378]
    assert views["image"]["mean"] == views["teacher_image"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    labelled, unlabelled = facts["len(datamodule.parts[labeled])"], facts["len(datamodule.parts[unlabeled])"]
    assert labelled == math.ceil(12 * {"1pct": 0.01, "10pct": 0.1}[labels]) and labelled + unlabelled == 12


# -- G2SD, generic then specific ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def g2sd_generic(tmp_path_factory: pytest.TempPathFactory, imagenet: Path, mae_teachers: tuple[Path, Path]) -> dict[str, Any]:
    """The generic recipe's run (its folder and probe report): the specific recipe starts from it."""
    with working_directory(tmp_path_factory.mktemp("g2sd_generic")) as folder:
        link_weights(mae_teachers[0].parent)
        run = fit("g2sd/imagenet_generic.yaml", f"--data.init_args.root={imagenet}", "--data.init_args.batch_size=2",
                  "--data.init_args.num_workers=1",
                  facts=("lightning_module.student.encoder.embed_dim", "len(lightning_module.student.encoder.blocks)",
                         "lightning_module.student.decoder_dim", "len(lightning_module.student.decoder.blocks)",
                         "lightning_module.teacher.model.encoder.embed_dim", "len(lightning_module.teacher.model.encoder.blocks)",
                         "lightning_module.teacher.model.decoder_dim", "len(lightning_module.teacher.model.decoder.blocks)",
                         "lightning_module.student.num_patches", "lightning_module.target_block",
                         "lightning_module.predictor.fc2.out_features", "accumulate_grad_batches"))  # fmt: skip
    return {**run, "folder": folder}


def test_g2sd_imagenet_generic(g2sd_generic: dict[str, Any]) -> None:
    metrics, facts = g2sd_generic["metrics"], {k.replace("lightning_module.", ""): v for k, v in g2sd_generic["facts"].items()}
    assert g2sd_generic["global_step"] == 1 and facts["accumulate_grad_batches"] == 2  # 4096 = 256 x 8 GPUs x 2
    assert {"train/loss_gd", "val/loss_gd"} <= set(metrics)
    student = [facts[k] for k in ("student.encoder.embed_dim", "len(student.encoder.blocks)", "student.decoder_dim", "len(student.decoder.blocks)")]
    teacher = [facts[k] for k in ("teacher.model.encoder.embed_dim", "len(teacher.model.encoder.blocks)", "teacher.model.decoder_dim", "len(teacher.model.decoder.blocks)")]
    assert student == [384, 12, 256, 4] and teacher == [768, 12, 512, 8]  # ViT-S + 256x4 decoder; MAE ViT-B + 512x8
    assert facts["student.num_patches"] == 196 and facts["target_block"] == 4 and facts["predictor.fc2.out_features"] == 512
    export = g2sd_generic["folder"] / "runs/g2sd/imagenet_generic/export"
    assert (export / "encoder.safetensors").is_file() and (export / "decoder.safetensors").is_file()


def test_g2sd_imagenet_specific(g2sd_generic: dict[str, Any], imagenet: Path, mae_teachers: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    link_weights(mae_teachers[1].parent)
    generic = Path("runs/g2sd/imagenet_generic")
    generic.mkdir(parents=True)
    (generic / "last.ckpt").symlink_to(g2sd_generic["folder"] / "runs/g2sd/imagenet_generic/last.ckpt")
    run = fit("g2sd/imagenet_specific.yaml", f"--data.init_args.root={imagenet}", *SMALL_LOADERS,
              facts=("lightning_module.student", "lightning_module.teacher.model", "lightning_module.teacher.model.global_pool",
                     "datamodule.augmentation", "lightning_module.layer_decay", "lightning_module.mixup.mixup_alpha",
                     "lightning_module.mixup.cutmix_alpha"))  # fmt: skip
    metrics, facts = run["metrics"], run["facts"]
    assert run["global_step"] == 2 and {"train/loss_ce", "train/loss_dist", "val/acc", "val/acc_cls", "val/acc_dist"} <= set(metrics)
    assert facts["lightning_module.student"]["class"] == "DistilledViT" and 22.0e6 < facts["lightning_module.student"]["parameters"] < 22.5e6  # ViT-S/16 + token + head
    assert 86.0e6 < facts["lightning_module.teacher.model"]["parameters"] < 87.0e6 and facts["lightning_module.teacher.model.global_pool"] == "avg"
    augment = facts["datamodule.augmentation"]
    assert (augment["auto_augment"], augment["re_prob"]) == ("rand-m9-mstd0.5-inc1", 0.25)
    assert (facts["lightning_module.layer_decay"], facts["lightning_module.mixup.mixup_alpha"], facts["lightning_module.mixup.cutmix_alpha"]) == (0.75, 0.8, 1.0)
    # the student started from the generic stage's encoder: two steps early in the warm-up (lr
    # 4e-3 x 1/10 x 2/10, layer-decayed) leave it within 1e-3 of the exported one
    exported = load_file(str(g2sd_generic["folder"] / "runs/g2sd/imagenet_generic/export/encoder.safetensors"))
    trained = checkpoint("runs/g2sd/imagenet_specific/last.ckpt")["state_dict"]
    for key in ("pos_embed", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight"):
        torch.testing.assert_close(trained[f"model.encoder.{key}"], exported[key], atol=1e-3, rtol=0)


# -- D-FINE on COCO 2017 -----------------------------------------------------------------------------
def test_dfine_coco2017(coco: Path, hgnetv2_b0: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    link_weights(hgnetv2_b0.parent)
    run = fit("dfine/coco2017.yaml", f"--data.init_args.root={coco}", *SMALL_LOADERS,
              facts=("datamodule.layout", "datamodule.num_classes", "datamodule.input_shape", "datamodule.splits[train].images",
                     "datamodule.splits[test].folder",
                     "lightning_module.model.num_queries", "len(lightning_module.model.decoder.layers)",
                     "lightning_module.model.reg_max", "lightning_module.model.reg_scale", "lightning_module.model",
                     "lightning_module.model.num_denoising"))  # fmt: skip
    metrics, facts = run["metrics"], run["facts"]
    assert run["global_step"] == 2
    assert {"train/loss_vfl", "train/loss_bbox", "train/loss_giou", "train/loss_fgl", "train/loss_ddf", "val/map", "val/map_50"} <= set(metrics)
    assert facts["datamodule.layout"] == "coco2017" and facts["datamodule.num_classes"] == 80 and facts["datamodule.input_shape"] == [3, 640, 640]
    assert facts["datamodule.splits[train].images"] is None and facts["datamodule.splits[test].folder"] == str(coco / "val2017")  # lazy; test = val2017
    assert facts["len(lightning_module.model.decoder.layers)"] == 3 and facts["lightning_module.model.num_queries"] == 300
    assert facts["lightning_module.model.reg_max"] == 32 and facts["lightning_module.model.reg_scale"] == 4.0
    assert facts["lightning_module.model.num_denoising"] == 100  # CDN as the official configs
    # the backbone holds the file's weights (timm's stages.N keys, the wrapper's stages_N): they
    # moved by at most two AdamW steps of lr 8e-4
    saved = load_file(str(hgnetv2_b0))
    trained = checkpoint("runs/dfine/coco2017/last.ckpt")["state_dict"]
    for key in ("stem.stem1.conv.weight", "stages.3.blocks.0.layers.0.conv1.conv.weight"):
        head, _, rest = key.partition(".")
        wrapper = key if head == "stem" else f"{head}_{rest}"
        torch.testing.assert_close(trained[f"model.backbone.{wrapper}"], saved[key], atol=2e-3, rtol=0)
    assert trained["model.backbone.stages_3.blocks.0.layers.0.conv1.conv.weight"].shape[0] == 128  # HGNetv2-B0's stage 4 (mid 128)
