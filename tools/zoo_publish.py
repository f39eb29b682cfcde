"""Turn a trained checkpoint into a zoo file and a manifest entry: the student's weights as
safetensors in model_zoo/files/, its architecture spec from the config (so mmkd.zoo.load rebuilds
it without the config), sha256 and size, and its test metrics re-measured here.

    python tools/zoo_publish.py --name fmnist-resnet10t-kd -c configs/kd/fmnist_kd.yaml \\
        --ckpt runs/bench_kd8/seed0/kd/last.ckpt --distiller KD --teacher "..." --data "..." \\
        --model.init_args.teacher.init_args.checkpoint=runs/bench_kd8/seed0/teacher/last.ckpt

Other arguments are config overrides (e.g. where the teacher's weights are). An entry of the same
name is replaced.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Keys whose string values point at weights files of the training machine; the zoo file holds the weights.
WEIGHT_KEYS = ("checkpoint", "encoder_checkpoint", "pretrained")


def plain(value) -> bool:
    """Whether ``value`` is plain JSON data (no classes, functions or other Python objects)."""
    if isinstance(value, dict):
        return all(plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def without_object_defaults(spec: dict) -> dict:
    """A class spec without the init arguments that are Python objects left at their defaults
    (jsonargparse fills in every default, e.g. timm's ``embed_layer=PatchEmbed``): the class
    supplies them again when the zoo builds it. An object set to anything else cannot be written
    to the manifest, and that is an error."""
    module_name, _, attribute = spec["class_path"].rpartition(".")
    defaults = {name: p.default for name, p in inspect.signature(getattr(importlib.import_module(module_name), attribute)).parameters.items()}
    init_args = {}
    for key, value in spec.get("init_args", {}).items():
        if plain(value) or (isinstance(value, dict) and "class_path" in value):
            init_args[key] = value
        elif key not in defaults or defaults[key] is not value:
            raise ValueError(f"{spec['class_path']}({key}={value!r}): a Python object, not a default; the zoo manifest holds JSON specs only")
    return {**spec, "init_args": init_args}


def portable(spec):
    """A config spec as plain JSON, without local weight paths."""
    if isinstance(spec, dict):  # jsonargparse records the files a spec was read from as __path__
        if "class_path" in spec:
            spec = without_object_defaults(spec)
        return {k: (None if k in WEIGHT_KEYS and isinstance(v, str) else portable(v)) for k, v in spec.items() if k != "__path__"}
    if isinstance(spec, (list, tuple)):
        return [portable(v) for v in spec]
    if not plain(spec):
        raise ValueError(f"{spec!r} is a Python object; the zoo manifest holds JSON specs only")
    return spec


def published_preprocessing(datamodule, input_key: str, input_shape: list[int]) -> dict:
    """What input the student expects, for the manifest and ``mmkd predict``: the data module's
    own ``preprocessing`` where it has one (audio: rate, features, standardisation, training
    noise), else an image's size, channels and normalisation."""
    if hasattr(type(datamodule), "preprocessing"):
        datamodule.setup("test")
        return datamodule.preprocessing[input_key]
    return {"kind": "image", "channels": input_shape[0], "size": input_shape[1:], "mean": getattr(datamodule, "mean", None),
            "std": getattr(datamodule, "std", None), "interpolation": "bilinear", "crop_pct": 1.0}  # fmt: skip


def main() -> None:
    from safetensors.torch import save_file

    from mmkd import zoo
    from mmkd.cli import lightning_cli
    from mmkd.core.checkpoint import sha256_file
    from mmkd.experiment import evaluate_checkpoint
    from mmkd.export import student_from_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--distiller", required=True, help="short name: KD, DHO, G2SD, ...")
    parser.add_argument("--teacher", required=True, help="what taught it, with its own measured accuracy")
    parser.add_argument("--data", required=True, help="training data and labels used")
    parser.add_argument("--summary", required=True, help="architecture in a few words")
    parser.add_argument("--licence", default="Apache-2.0")
    args, overrides = parser.parse_known_args()

    cli = lightning_cli(["-c", args.config, *overrides], run=False)
    if not isinstance(cli.model.input_key, str):
        parser.error(f"the student takes several inputs {cli.model.input_key}; the zoo holds single-input students")
    input_shape = cli.datamodule.input_shape
    if isinstance(input_shape, dict):  # several modalities: the student's
        input_shape = input_shape[cli.model.input_key]
    model_config = cli.config.as_dict()["model"]["init_args"]
    architecture = portable(model_config.get("student") or model_config["model"])
    # the data module that measured the metrics, without local paths (the zoo test rebuilds it)
    evaluation_data = portable(cli.config.as_dict()["data"])
    evaluation_data.get("init_args", {}).pop("root", None)
    student = student_from_checkpoint(cli.model.model, args.ckpt)
    state = {key: value.detach().contiguous() for key, value in student.state_dict().items()}
    rebuilt = zoo.build(architecture)
    rebuilt.load_state_dict(state)  # the spec really rebuilds this network
    # measured first: a failed measurement leaves the published file and the manifest as they were
    metrics = evaluate_checkpoint(args.config, args.ckpt, overrides)
    files = zoo.REPO_ZOO / "files"
    files.mkdir(parents=True, exist_ok=True)
    path = files / f"{args.name}.safetensors"
    staged = path.with_name(f".{path.name}.tmp")
    save_file(state, str(staged))
    command = shlex.join(["mmkd", "test", "-c", args.config, "--ckpt_path", args.ckpt, *overrides])
    entry = {
        "name": args.name, "architecture_summary": args.summary, "architecture": architecture,
        "input_shape": list(input_shape), "input_key": cli.model.input_key, "evaluation_data": evaluation_data,
        "input_normalization": {"mean": getattr(cli.datamodule, "mean", None), "std": getattr(cli.datamodule, "std", None)},
        "preprocessing": published_preprocessing(cli.datamodule, cli.model.input_key, list(input_shape)),
        "distiller": args.distiller, "config": args.config, "teacher": args.teacher, "data": args.data,
        "metrics": {key: metrics[key] for key in sorted(metrics) if key.startswith("test/")} | {"command": command},
        "params": sum(p.numel() for p in student.parameters()),
        "file": path.name, "url": None, "sha256": sha256_file(staged), "size": staged.stat().st_size, "licence": args.licence,
    }  # fmt: skip
    manifest = zoo.manifest_path()
    models = list(zoo.entries().values()) if manifest.is_file() else []  # a corrupt manifest is an error, never overwritten
    models = [m for m in models if m["name"] != args.name] + [entry]
    staged_manifest = manifest.with_name(f".{manifest.name}.tmp")
    staged_manifest.write_text(json.dumps({"models": models}, indent=2) + "\n")
    os.replace(staged, path)  # each file whole: the old one or the new one
    os.replace(staged_manifest, manifest)
    measured = ", ".join(f"{key} {value:.4f}" for key, value in entry["metrics"].items() if key != "command")
    print(f"wrote {path} ({entry['size']} bytes) and the entry {args.name} in {manifest}: {measured}")
    example = torch.zeros(1, *entry["input_shape"])
    torch.testing.assert_close(zoo.load(args.name)(example), student(example))


if __name__ == "__main__":
    main()
