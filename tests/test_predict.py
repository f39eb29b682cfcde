"""`mmkd predict`: one row per file (path, top-k classes by name with probabilities) to CSV or
JSONL, from a zoo student, a config + checkpoint, or an ONNX file, on real Fashion-MNIST images
written as PNG and JPEG files at test time (tools/image_files.py). Every top-1 is checked against
the model's own argmax, computed here on tensors decoded independently of mmkd's loader."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd import zoo
from mmkd.cli import lightning_cli, main
from mmkd.data.images import FASHION_MNIST_CLASSES
from mmkd.export import export_onnx, student_from_checkpoint
from mmkd.models import timm_model

from conftest import CONFIGS, REPO, one_error

sys.path.insert(0, str(REPO / "tools"))
import image_files  # noqa: E402

ZOO = "fmnist-resnet10t-kd"
MEAN, STD = 0.286, 0.353  # the zoo entry's published normalisation
VIEW = {"size": 28, "mean": MEAN, "std": STD, "crop_pct": 1.0, "channels": 1}
FAST = ["--num-workers", "0"]
STUDENT = {"name": "resnet10t", "num_classes": 10, "in_chans": 1, "model_args": {"channels": [4, 8, 16, 32], "stem_width": 4}}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    """20 PNGs in class folders (predict/<class>/predict_000000i.png) and 4 loose JPEGs, from
    Fashion-MNIST training images 100..123."""
    out = tmp_path_factory.mktemp("images")
    images, labels = image_files.fashion_mnist(data_root / "fashion-mnist", 24, offset=100)
    folder = image_files.write_split(out, "folder", "predict", images[:20], labels[:20], fmt="png")
    loose = out / "loose"
    loose.mkdir()
    for i in range(20, 24):
        (loose / f"shot_{i}.jpg").write_bytes(image_files.encode(images[i], None, "jpg"))
    return {"folder": folder, "jpegs": sorted(loose.glob("*.jpg")), "images": images, "out": out}


def pixels(path: str) -> torch.Tensor:
    """A file's 28x28 grey pixels normalised as the zoo entry says, decoded with PIL directly."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return (torch.from_numpy(grey)[None] - MEAN) / STD


def own_probs(model: torch.nn.Module, paths: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.stack([pixels(p) for p in paths])).float().softmax(-1)


def read_rows(path: Path) -> list[dict]:
    """Rows as {"path", "classes", "probs"}, from CSV or JSONL."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            k = (len(header) - 1) // 2
            assert header == ["path"] + [c for j in range(1, k + 1) for c in (f"class_{j}", f"prob_{j}")]
            return [{"path": r[0], "classes": r[1::2], "probs": [float(p) for p in r[2::2]]} for r in reader]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{"path": r["path"], "classes": [t["class"] for t in r["topk"]], "probs": [t["prob"] for t in r["topk"]],
             "indices": [t["index"] for t in r["topk"]]} for r in rows]  # fmt: skip


def check_rows(rows: list[dict], paths: list[str], probs: torch.Tensor, k: int, names=FASHION_MNIST_CLASSES, atol: float = 2e-5) -> None:
    """One row per file in order, k classes, sorted probabilities summing to at most 1, and the
    model's own top-k (classes and probabilities) on the same pixels."""
    assert [row["path"] for row in rows] == paths
    values, classes = probs.topk(k, dim=-1)
    for row, value, top in zip(rows, values, classes):
        assert len(row["classes"]) == k and all(0.0 <= p <= 1.0 for p in row["probs"])
        assert row["probs"] == sorted(row["probs"], reverse=True) and sum(row["probs"]) <= 1.0 + 1e-5
        assert row["classes"][0] == names[int(top[0])]  # top-1: the model's argmax
        torch.testing.assert_close(torch.tensor(row["probs"]), value, atol=atol, rtol=1e-4)
        if k == 1 or (value[:-1] - value[1:]).min() > 1e-4:  # the order is only defined where there is no near-tie
            assert row["classes"] == [names[int(c)] for c in top]


def test_zoo_student_on_a_folder_and_on_single_files(files: dict, capsys: pytest.CaptureFixture) -> None:
    model = zoo.load(ZOO)
    main(["predict", "--zoo", ZOO, str(files["folder"]), "--output", "preds.csv", "--topk", "3", *FAST])
    out = capsys.readouterr().out
    assert "input 1x28x28, mean (0.286,), std (0.353,)" in out and "wrote 20 predictions to preds.csv" in out
    assert "Predicting" in out  # Lightning's progress bar
    pngs = sorted(str(p) for p in files["folder"].rglob("*.png"))  # the folder's order: class folders, then names
    assert len(pngs) == 20
    check_rows(read_rows(Path("preds.csv")), pngs, own_probs(model, pngs), k=3)
    # single files given on the command line, PNG and JPEG, in the order given; JSONL by the suffix
    chosen = [str(files["jpegs"][2]), pngs[7], str(files["jpegs"][0])]
    main(["predict", "--zoo", ZOO, *chosen, "--output", "one.jsonl", *FAST])
    rows = read_rows(Path("one.jsonl"))
    check_rows(rows, chosen, own_probs(model, chosen), k=5)
    assert all(row["classes"] == [FASHION_MNIST_CLASSES[i] for i in row["indices"]] for row in rows)
    # a file list and a folder together; the default file name
    listing = files["out"] / "list.csv"
    listing.write_text("path\n" + "".join(f"{p.relative_to(files['out'])}\n" for p in files["jpegs"][:2]))
    main(["predict", "--zoo", ZOO, str(listing), str(files["jpegs"][0].parent), "--topk", "1", *FAST])
    expected = [str(p) for p in files["jpegs"][:2]] + [str(p) for p in files["jpegs"]]
    check_rows(read_rows(Path("predictions.csv")), expected, own_probs(model, expected), k=1)


def test_onnx_export_of_the_zoo_student_predicts_as_pytorch(files: dict, capsys: pytest.CaptureFixture) -> None:
    model = zoo.load(ZOO)
    export_onnx(model, torch.randn(4, 1, 28, 28), "student.onnx")
    Path("classes.txt").write_text("\n".join(FASHION_MNIST_CLASSES) + "\n")
    folder = str(files["folder"])
    # size and channels from the ONNX input shape; the normalisation given, as the zoo entry has it
    main(["predict", "--onnx", "student.onnx", "--classes", "classes.txt", "--mean", str(MEAN), "--std", str(STD), folder, "--output", "onnx.csv", *FAST])
    assert "input 1x28x28" in capsys.readouterr().out
    main(["predict", "--zoo", ZOO, folder, "--output", "torch.csv", *FAST])
    onnx_rows, torch_rows = read_rows(Path("onnx.csv")), read_rows(Path("torch.csv"))
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows] and len(onnx_rows) == 20
    assert [r["classes"][0] for r in onnx_rows] == [r["classes"][0] for r in torch_rows]
    torch.testing.assert_close(torch.tensor([r["probs"] for r in onnx_rows]), torch.tensor([r["probs"] for r in torch_rows]), atol=1e-4, rtol=1e-3)
    pngs = sorted(str(p) for p in files["folder"].rglob("*.png"))
    check_rows(onnx_rows, pngs, own_probs(model, pngs), k=5, atol=1e-4)
    # without --classes the rows name classes by index
    main(["predict", "--onnx", "student.onnx", "--mean", str(MEAN), "--std", str(STD), pngs[0], "--output", "idx.jsonl", *FAST])
    assert read_rows(Path("idx.jsonl"))[0]["classes"][0] == str(FASHION_MNIST_CLASSES.index(torch_rows[0]["classes"][0]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    """A tiny Classifier trained for 2 steps on an image folder (train/<class>/*.png), through the CLI."""
    work = tmp_path_factory.mktemp("run")
    root = image_files.write_layout(work / "tree", data_root / "fashion-mnist", "folder", [40, 0, 0], fmt="png")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 2, "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(work / "logs"), "name": "tiny"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(work / "ckpt"), "save_last": True}}],
        },
        "model": {"class_path": "mmkd.core.Classifier", "init_args": {"model": str(CONFIGS / "models/fmnist_student.yaml"), "num_classes": 10}},
        "data": {"class_path": "mmkd.data.ImageFilesDataModule",
                 "init_args": {"root": str(root), "views": {"image": VIEW}, "batch_size": 16, "num_workers": 0, "augment": False}},
    }  # fmt: skip
    path = work / "tiny.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    lightning_cli(["fit", "-c", str(path)])
    model = student_from_checkpoint(timm_model(**STUDENT), work / "ckpt/last.ckpt")
    return {"config": str(path), "ckpt": str(work / "ckpt/last.ckpt"), "model": model, "work": work, "root": root}


def test_checkpoint_of_a_config_predicts_a_folder_into_its_log_folder(trained: dict, files: dict, capsys: pytest.CaptureFixture) -> None:
    main(["predict", "-c", trained["config"], "--ckpt_path", trained["ckpt"], f"--data.init_args.predict={files['folder']}", "--topk", "2"])
    out = capsys.readouterr().out
    written = Path(out.split("wrote 20 predictions to ")[1].split()[0])
    assert written.name == "predictions.csv" and written.parent.parent == trained["work"] / "logs" / "tiny"  # runs/logs/<name>/version_N
    pngs = sorted(str(p) for p in files["folder"].rglob("*.png"))
    # the class names are the training folder's (underscores for spaces, as tools/image_files.py writes them)
    check_rows(read_rows(written), pngs, own_probs(trained["model"], pngs), k=2, names=sorted(image_files.CLASS_FOLDERS))
    assert not list(written.parent.glob(".predictions*"))  # no part or temporary file left


def test_in_memory_data_predicts_its_test_split_by_index_to_jsonl(trained: dict, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    # a config with its own PredictionWriter (jsonl, top-2); --topk on the command line overrides it
    config = json.loads(Path(trained["config"]).read_text())
    config["data"] = {"class_path": "mmkd.data.FashionMNISTDataModule", "init_args": {"root": str(data_root), "batch_size": 8}}
    config["trainer"]["callbacks"].append({"class_path": "mmkd.predict.PredictionWriter", "init_args": {"output": "mem.jsonl", "topk": 2}})
    config["trainer"]["limit_predict_batches"] = 2
    Path("mem.yaml").write_text(json.dumps(config))
    main(["predict", "-c", "mem.yaml", "--ckpt_path", trained["ckpt"], "--topk", "4"])
    assert "wrote 32 predictions to mem.jsonl" in capsys.readouterr().out
    rows = read_rows(Path("mem.jsonl"))
    from mmkd.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(root=str(data_root))  # no predict split: the test split, in order
    data.setup("test")
    images = data.splits["test"].__getitems__(list(range(32)))["image"]
    with torch.no_grad():
        probs = trained["model"].eval()(images).softmax(-1)
    check_rows(rows, [str(i) for i in range(32)], probs, k=4)


def test_mmkd_export_records_the_preprocessing_and_classes_that_predict_onnx_uses(trained: dict, files: dict, capsys: pytest.CaptureFixture) -> None:
    # A view nothing else would guess: 24 px, bicubic, crop_pct 0.875, the data's own mean and std.
    # Exported with it, `mmkd predict --onnx` on the file alone gives the checkpoint's rows.
    view = ['--data.init_args.views={image: {size: 24, interpolation: bicubic, crop_pct: 0.875, mean: 0.286, std: 0.353, channels: 1}}']
    main(["export", "-c", trained["config"], "--ckpt_path", trained["ckpt"], "--out", "tiny.onnx", *view])
    import onnx

    metadata = {entry.key: json.loads(entry.value) for entry in onnx.load("tiny.onnx").metadata_props}
    assert metadata["mmkd.preprocessing"] == {"size": [24, 24], "mean": [0.286], "std": [0.353], "interpolation": "bicubic", "crop_pct": 0.875, "channels": 1}
    assert metadata["mmkd.class_names"] == sorted(image_files.CLASS_FOLDERS)
    folder = str(files["folder"])
    main(["predict", "-c", trained["config"], "--ckpt_path", trained["ckpt"], *view, f"--data.init_args.predict={folder}", "--output", "ckpt.csv"])
    capsys.readouterr()
    main(["predict", "--onnx", "tiny.onnx", folder, "--output", "onnx.csv", *FAST])
    assert "input 1x24x24, mean (0.286,), std (0.353,), bicubic, crop_pct 0.875 (from its mmkd metadata)" in capsys.readouterr().out
    onnx_rows, ckpt_rows = read_rows(Path("onnx.csv")), read_rows(Path("ckpt.csv"))
    assert len(onnx_rows) == 20 and [(r["path"], r["classes"]) for r in onnx_rows] == [(r["path"], r["classes"]) for r in ckpt_rows]
    torch.testing.assert_close(torch.tensor([r["probs"] for r in onnx_rows]), torch.tensor([r["probs"] for r in ckpt_rows]), atol=1e-5, rtol=1e-4)
    # a flag still overrides what the file records, and the rows then differ
    main(["predict", "--onnx", "tiny.onnx", folder, "--crop-pct", "1.0", "--output", "whole.csv", *FAST])
    whole = torch.tensor([r["probs"] for r in read_rows(Path("whole.csv"))])
    assert (whole - torch.tensor([r["probs"] for r in onnx_rows])).abs().max() > 1e-3


def test_errors_end_in_one_line(files: dict, capsys: pytest.CaptureFixture) -> None:
    png = str(next(files["folder"].rglob("*.png")))
    assert "no zoo model named 'fmnist-resnet10t'" in one_error(capsys, ["predict", "--zoo", "fmnist-resnet10t", png])
    assert "missing.png does not exist" in one_error(capsys, ["predict", "--zoo", ZOO, png, "missing.png"])
    Path("empty/sub").mkdir(parents=True)
    Path("empty/notes.txt").write_text("no images here")
    assert "empty holds no image files" in one_error(capsys, ["predict", "--zoo", ZOO, "empty"])
    assert "notes.txt is not an image file" in one_error(capsys, ["predict", "--zoo", ZOO, "empty/notes.txt"])
    Path("broken.onnx").write_bytes(b"not a model" * 10)
    assert "cannot load broken.onnx as an ONNX model" in one_error(capsys, ["predict", "--onnx", "broken.onnx", png])
    assert "ONNX model nothing.onnx does not exist" in one_error(capsys, ["predict", "--onnx", "nothing.onnx", png])
    assert "is not an audio or video file" in one_error(capsys, ["predict", "--zoo", "avmnist-audiocnn-mst", png])  # an audio student: audio inputs
    assert "fmnist-det-dfine returns dict, not class scores" in one_error(capsys, ["predict", "--zoo", "fmnist-det-dfine", png])
    Path("three.txt").write_text("a\nb\nc\n")
    assert "three.txt names 3 classes; fmnist-resnet10t-kd predicts 10" in one_error(capsys, ["predict", "--zoo", ZOO, "--classes", "three.txt", png])
    assert "name it .csv or .jsonl" in one_error(capsys, ["predict", "--zoo", ZOO, png, "--output", "preds.txt"])
    assert "name it .csv or .jsonl" in one_error(capsys, ["predict", "-c", "any.yaml", "--output", "preds.txt"])
    # an image that does not decode: named, or left out with --on-bad-file skip
    bad = Path("bad")
    bad.mkdir()
    for i, path in enumerate(sorted(files["folder"].rglob("*.png"))[:3]):
        (bad / f"{i}.png").write_bytes(path.read_bytes()[: 60 if i == 1 else None])
    assert "cannot decode image bad/1.png" in one_error(capsys, ["predict", "--zoo", ZOO, "bad", *FAST])
    main(["predict", "--zoo", ZOO, "bad", "--on-bad-file", "skip", "--output", "skip.csv", *FAST])
    assert [row["path"] for row in read_rows(Path("skip.csv"))] == ["bad/0.png", "bad/2.png"]
    assert not Path("predictions.csv").exists()  # nothing written by the failed runs


@pytest.mark.slow
def test_ddp_writes_the_rows_of_one_process(trained: dict, files: dict) -> None:
    # 2 CPU processes (gloo); 21 files do not split evenly: each rank writes its part, rank 0 merges in order
    extra = Path("extra.png")
    extra.write_bytes(next(files["folder"].rglob("*.png")).read_bytes())
    listing = Path("all.csv")
    listing.write_text("path\n" + "".join(f"{p}\n" for p in [*sorted(files["folder"].rglob("*.png")), extra.resolve()]))
    mmkd = str(Path(sys.executable).parent / "mmkd")
    common = ["predict", "-c", trained["config"], "--ckpt_path", trained["ckpt"], f"--data.init_args.predict={listing.resolve()}"]
    for name, extra_args in (("ddp.csv", ["--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2"]), ("one.csv", [])):
        done = subprocess.run([mmkd, *common, *extra_args, "--output", name], capture_output=True, text=True, timeout=300, env={**os.environ})
        assert done.returncode == 0, done.stderr[-3000:]
    ddp, one = read_rows(Path("ddp.csv")), read_rows(Path("one.csv"))
    assert len(ddp) == 21 and [r["path"] for r in ddp] == [r["path"] for r in one]
    assert [r["classes"][0] for r in ddp] == [r["classes"][0] for r in one]
    torch.testing.assert_close(torch.tensor([r["probs"] for r in ddp]), torch.tensor([r["probs"] for r in one]), atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in Path(".").iterdir() if p.name.startswith(".")) == []
