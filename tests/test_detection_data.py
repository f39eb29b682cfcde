"""The composed Fashion-MNIST detection set, the COCO data module and the mAP conversions."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert, box_iou

from mmkd.data.common import ResumableDataLoader
from mmkd.data.detection import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetection,
    CocoDetectionDataModule,
    detection_predictions,
    detection_targets,
)
from mmkd.data.images import FASHION_MNIST_CLASSES
from mmkd.data.sources import StringArena

REPO = Path(__file__).resolve().parents[1]
QUICK = {"train": 20, "val": 5, "test": 5}


def _load_tool():
    spec = importlib.util.spec_from_file_location("compose_detection", REPO / "tools/compose_detection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="session")
def fmnist(data_root: Path) -> Path:
    return data_root / "fashion-mnist"


@pytest.fixture(scope="session")
def quick_set(tmp_path_factory: pytest.TempPathFactory, fmnist: Path) -> Path:
    return tool.compose(tmp_path_factory.mktemp("det") / "quick", fmnist, QUICK, seed=0)


@pytest.fixture(scope="session")
def pools(fmnist: Path) -> dict:
    return tool.object_pools(fmnist, seed=0)


def _instances(root: Path, split: str) -> dict:
    return json.loads((root / split / "instances.json").read_text())


def _denormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


# -- the composed set -------------------------------------------------------------------------
def test_boxes_are_the_tight_boxes_of_the_pasted_pixels(quick_set: Path, pools: dict) -> None:
    for split, count in QUICK.items():
        instances = _instances(quick_set, split)
        assert [image["id"] for image in instances["images"]] == list(range(1, count + 1))
        assert [c["name"] for c in instances["categories"]] == list(FASHION_MNIST_CLASSES)
        for info in instances["images"]:
            composed = tool.compose_image(pools[split], tool.image_rng(0, split, info["id"] - 1))
            stored = np.asarray(Image.open(quick_set / split / info["file_name"]))
            assert stored.shape == (128, 128, 3) and np.array_equal(stored, composed.image)
            annotations = [a for a in instances["annotations"] if a["image_id"] == info["id"]]
            assert 1 <= len(annotations) <= 6
            assert [a["bbox"] for a in annotations] == composed.bboxes
            assert [a["category_id"] for a in annotations] == composed.category_ids
            for annotation, mask in zip(annotations, composed.masks):
                ys, xs = np.nonzero(mask)
                x, y, w, h = annotation["bbox"]
                assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert max(w, h) <= 64 and annotation["area"] == w * h and annotation["iscrowd"] == 0
                inside = np.zeros_like(mask)
                inside[y : y + h, x : x + w] = True
                assert mask[y, x : x + w].any() and mask[y + h - 1, x : x + w].any()  # every edge touches the object
                assert mask[y : y + h, x].any() and mask[y : y + h, x + w - 1].any()
                assert not (mask & ~inside).any()
            last = composed.masks[-1]  # the last pasted object is not covered: it changed its pixels
            background = tool.textured_background(tool.image_rng(0, split, info["id"] - 1), 128)
            assert np.abs(composed.image[last].astype(float) - background[last]).mean() > 10
            boxes = box_convert(torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32), "xywh", "xyxy")
            assert (box_iou(boxes, boxes).triu(1) <= 0.3).all()  # limited overlap


def test_composition_is_seeded_and_splits_share_no_object(quick_set: Path, fmnist: Path, pools: dict, tmp_path: Path) -> None:
    smaller = tool.compose(tmp_path / "small", fmnist, {"train": 3, "val": 2, "test": 0}, seed=0)
    for split, count in (("train", 3), ("val", 2)):
        for index in range(count):
            name = f"{split}/images/{index:06d}.png"
            assert (smaller / name).read_bytes() == (quick_set / name).read_bytes()
        first = [a for a in _instances(quick_set, split)["annotations"] if a["image_id"] <= count]
        assert _instances(smaller, split)["annotations"] == first
    assert _instances(smaller, "test")["images"] == []
    other = tool.compose(tmp_path / "other", fmnist, {"train": 1}, seed=1)
    assert (other / "train/images/000000.png").read_bytes() != (quick_set / "train/images/000000.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "small"]  # no temporary folder left
    with pytest.raises(FileExistsError, match="overwrite"):
        tool.compose(tmp_path / "other", fmnist, {"train": 1}, seed=1)

    sources = {split: _instances(quick_set, split)["info"]["object_source"] for split in QUICK}
    assert sources == {"train": "fashion-mnist train", "val": "fashion-mnist t10k", "test": "fashion-mnist t10k"}
    val, test = set(pools["val"].indices.tolist()), set(pools["test"].indices.tolist())
    assert not val & test and len(val | test) == 10_000 and len(pools["train"].indices) == 60_000
    used = {split: {a["source_index"] for a in _instances(quick_set, split)["annotations"]} for split in ("val", "test")}
    assert used["val"] <= val and used["test"] <= test
    # the stored label is the object's own Fashion-MNIST label
    for annotation in _instances(quick_set, "val")["annotations"]:
        position = int(np.searchsorted(pools["val"].indices, annotation["source_index"]))
        assert annotation["category_id"] == pools["val"].labels[position] + 1


# -- the data module --------------------------------------------------------------------------
def test_data_module_batches_follow_the_contract(quick_set: Path) -> None:
    dm = CocoDetectionDataModule(root=str(quick_set), batch_size=4, image_size=96, seed=1)
    assert dm.num_classes == 10 and dm.class_names == FASHION_MNIST_CLASSES and dm.input_shape == (3, 96, 96)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (5, 3, 96, 96) and batch["image"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and len(batch["targets"]) == 5
    instances = _instances(quick_set, "val")
    for target, info in zip(batch["targets"], instances["images"]):
        assert set(target) == {"labels", "boxes", "image_id", "orig_size"} and target["image_id"] == info["id"]
        assert target["orig_size"].tolist() == [128, 128] and target["labels"].dtype == torch.long
        annotations = [a for a in instances["annotations"] if a["image_id"] == info["id"]]
        assert target["labels"].tolist() == [a["category_id"] - 1 for a in annotations]
        x, y, w, h = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).unbind(1)
        expected = torch.stack([(x + w / 2) / 128, (y + h / 2) / 128, w / 128, h / 128], 1)
        torch.testing.assert_close(target["boxes"], expected)  # normalised cxcywh, whatever the resize
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    train = next(iter(loader))
    assert train["image"].shape == (4, 3, 96, 96) and len(train["targets"]) == 4
    assert sorted(train["index"].tolist()) != [0, 1, 2, 3]  # shuffled
    again = dm.splits["train"].__getitems__([(int(i), 0) for i in train["index"]])
    assert torch.equal(again["image"], train["image"])  # augmentation: a function of (seed, epoch, index)

    exact = CocoDetectionDataModule(root=str(quick_set), image_size=128, augment=False)
    exact.setup("test")
    image, _ = exact.splits["test"][2]
    stored = torch.from_numpy(np.array(Image.open(quick_set / "test/images/000002.png"))).permute(2, 0, 1).float()
    torch.testing.assert_close(_denormalise(image) * 255, stored, atol=1e-3, rtol=0)


def _write_coco(folder: Path, width: int = 20, height: int = 10, bbox: list[float] | None = None) -> Path:
    """One black image with a white rectangle at ``bbox`` [x, y, w, h], and its instances.json."""
    bbox = bbox or [2, 3, 4, 5]
    (folder / "images").mkdir(parents=True)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x, y, w, h = (int(v) for v in bbox)
    pixels[y : y + h, x : x + w] = 255
    Image.fromarray(pixels).save(folder / "images/a.png")
    instances = {
        "images": [{"id": 7, "file_name": "images/a.png", "width": width, "height": height},
                   {"id": 8, "file_name": "images/a.png", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}],
        "categories": [{"id": 9, "name": "late"}, {"id": 5, "name": "early"}],
    }  # fmt: skip
    (folder / "instances.json").write_text(json.dumps(instances))
    return folder


def test_horizontal_flip_moves_the_boxes(tmp_path: Path) -> None:
    folder = _write_coco(tmp_path / "one")
    plain = CocoDetection(folder)
    image, target = plain[0]
    assert plain.class_names == ("early", "late") and target["labels"].tolist() == [0] and target["image_id"] == 7
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.55, 0.2, 0.5]]))  # (2 + 2) / 20, (3 + 2.5) / 10
    assert plain[1][1]["boxes"].shape == (0, 4)  # an image without objects is kept
    augmented = CocoDetection(folder, image_size=40, augment=True, seed=3)
    seen = set()
    for epoch in range(16):
        image, target = augmented[(0, epoch)]
        flipped = bool(target["boxes"][0, 0] > 0.5)
        seen.add(flipped)
        expected = [0.8, 0.55, 0.2, 0.5] if flipped else [0.2, 0.55, 0.2, 0.5]  # x' = 20 - 2 - 4 = 14
        torch.testing.assert_close(target["boxes"], torch.tensor([expected]))
        assert target["orig_size"].tolist() == [10, 20] and image.shape == (3, 40, 40)
        bright = _denormalise(image).mean(0) > 0.5  # the rectangle, after resize and photometric jitter
        cols = bright.any(0).nonzero().flatten()
        assert (cols.min() >= 26) if flipped else (cols.max() < 14)  # 40 * 14 / 20 = 28, 40 * 6 / 20 = 12
    assert seen == {True, False}


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instances.json.*compose_detection.py"):
        CocoDetection(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="tools/compose_detection.py --out"):
        CocoDetectionDataModule(root=str(tmp_path / "nothing")).prepare_data()

    folder = _write_coco(tmp_path / "missing")
    (folder / "images/a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.png"):
        CocoDetection(folder)

    folder = _write_coco(tmp_path / "corrupt")
    text = (folder / "instances.json").read_text()
    (folder / "instances.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'instances.json'} is not valid JSON")):
        CocoDetection(folder)

    folder = _write_coco(tmp_path / "cut")
    png = (folder / "images/a.png").read_bytes()
    (folder / "images/a.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(OSError, match="cannot read image .*a.png .*corrupt or cut short"):
        CocoDetection(folder, preload=True)

    folder = _write_coco(tmp_path / "outside", bbox=[17, 3, 4, 5])  # 17 + 4 > 20
    with pytest.raises(ValueError, match=r"annotation 1 has bbox .* outside its image images/a.png \(20x10\)"):
        CocoDetection(folder)


# -- evaluation -------------------------------------------------------------------------------
def _coco_map(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(predictions, targets)
    return {key: float(value) for key, value in metric.compute().items() if key.startswith("map") and value.numel() == 1}


def test_coco_map_of_exact_and_shifted_boxes(quick_set: Path) -> None:
    split = CocoDetection(quick_set / "val")
    targets = detection_targets([split[i][1] for i in range(len(split))])
    exact = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    result = _coco_map(exact, targets)
    assert result["map"] == result["map_50"] == result["map_75"] == 1.0
    shifted = [{**p, "boxes": p["boxes"] + torch.tensor([4.0, 0.0, 4.0, 0.0])} for p in exact]
    assert _coco_map(shifted, targets)["map"] < 0.9

    # by hand: IoU([0, 0, 10, 10], [2, 0, 12, 10]) = 80 / 120 = 0.667, a hit at IoU 0.50..0.65: 4 of 10
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    pred = [{"boxes": torch.tensor([[2.0, 0.0, 12.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    result = _coco_map(pred, gt)
    assert result["map"] == pytest.approx(0.4) and result["map_50"] == 1.0 and result["map_75"] == 0.0
    assert result["map_small"] == pytest.approx(0.4) and result["map_medium"] == -1.0  # area 100 < 32^2


def test_detection_predictions_by_hand() -> None:
    logits = torch.tensor([[[2.0, -1.0, 0.0], [-3.0, 1.0, 3.0]]])  # 1 image, 2 queries, 3 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    sizes = torch.tensor([[100, 200]])  # h, w
    (out,) = detection_predictions(logits, boxes, sizes, top_k=3)
    torch.testing.assert_close(out["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    assert out["labels"].tolist() == [2, 0, 1]  # query 1 gives two of the three detections
    q0, q1 = [80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]
    torch.testing.assert_close(out["boxes"], torch.tensor([q1, q0, q1]))
    assert len(detection_predictions(logits, boxes, sizes, top_k=100)[0]["scores"]) == 6  # at most Q x C
    (target,) = detection_targets([{"boxes": boxes[0, :1], "labels": torch.tensor([4]), "orig_size": sizes[0]}])
    torch.testing.assert_close(target["boxes"], torch.tensor([q0]))
    assert target["labels"].tolist() == [4]


# -- on disk: the COCO 2017 layout, JPEG files, lazy decoding in workers, a compact index -----------
@pytest.fixture(scope="module")
def coco_layout(tmp_path_factory: pytest.TempPathFactory, fmnist: Path) -> Path:
    return tool.compose(tmp_path_factory.mktemp("coco") / "coco", fmnist, {"train": 6, "val": 3}, layout="coco2017")


def test_compose_writes_the_coco_2017_layout_as_jpeg(coco_layout: Path, quick_set: Path, fmnist: Path) -> None:
    assert sorted(p.name for p in coco_layout.iterdir()) == ["annotations", "train2017", "val2017"]
    assert sorted(p.name for p in (coco_layout / "annotations").iterdir()) == ["instances_train2017.json", "instances_val2017.json"]
    train = json.loads((coco_layout / "annotations/instances_train2017.json").read_text())
    assert [info["file_name"] for info in train["images"]] == [f"{i:012d}.jpg" for i in range(1, 7)]
    with Image.open(coco_layout / "train2017/000000000001.jpg") as image:
        assert image.format == "JPEG" and image.size == (128, 128)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    # the same scene as the PNG of the splits layout (same seed, split and index), up to JPEG's error
    png = np.asarray(Image.open(quick_set / "train/images/000000.png"), dtype=np.float64)
    assert np.abs(pixels - png).mean() < 6
    # and the same boxes, exactly
    assert [a["bbox"] for a in train["annotations"] if a["image_id"] == 1] == [a["bbox"] for a in _instances(quick_set, "train")["annotations"] if a["image_id"] == 1]
    with pytest.raises(ValueError, match="train and val only"):
        tool.compose(coco_layout.parent / "other", Path("unused"), {"train": 1, "test": 1}, layout="coco2017")
    # the splits layout in JPEG: the same boxes, and the data module reads it
    jpeg = tool.compose(coco_layout.parent / "jpeg_splits", fmnist, {"train": 2, "val": 1, "test": 1}, image_format="jpg")
    assert _instances(jpeg, "train")["images"][0]["file_name"] == "images/000000.jpg"
    assert _instances(jpeg, "train")["annotations"] == _instances(quick_set, "train")["annotations"][: len(_instances(jpeg, "train")["annotations"])]
    image, target = CocoDetection(jpeg / "train", image_size=64)[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == len([a for a in _instances(jpeg, "train")["annotations"] if a["image_id"] == 1])


def test_data_module_reads_the_coco_2017_layout_lazily_in_workers(coco_layout: Path) -> None:
    dm = CocoDetectionDataModule(root=str(coco_layout), batch_size=2, image_size=64, num_workers=1)
    assert dm.layout == "coco2017" and dm.num_classes == 10 and dm.class_names == FASHION_MNIST_CLASSES  # before setup too
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["val"]
    assert train.images is None and val.images is None  # nothing decoded at setup
    assert dm.splits["test"] is val and train.folder == coco_layout / "train2017"  # test = val2017, indexed once
    # the index: numpy arrays and one string buffer, no per-image Python objects
    index = train.index
    assert isinstance(index.file_names, StringArena) and index.file_names[0] == "000000000001.jpg"
    for array in (index.image_ids, index.sizes, index.box_offsets, index.boxes, index.labels):
        assert isinstance(array, np.ndarray) and array.dtype != object
    instances = json.loads((coco_layout / "annotations/instances_train2017.json").read_text())
    assert index.box_offsets[-1] == len(instances["annotations"]) == len(index.boxes) == len(index.labels)
    for i, info in enumerate(instances["images"]):
        boxes, labels = train.target_boxes(i)
        mine = [a for a in instances["annotations"] if a["image_id"] == info["id"]]
        assert boxes.tolist() == [a["bbox"] for a in mine] and labels.tolist() == [a["category_id"] - 1 for a in mine]
    # batches come from a worker process and equal the dataset's own decoding
    loader = dm.train_dataloader()
    assert loader.num_workers == 1
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["targets"]) == 2
    again = train.__getitems__([(int(i), 0) for i in batch["index"]])
    assert torch.equal(again["image"], batch["image"])
    for mine, theirs in zip(again["targets"], batch["targets"]):
        assert torch.equal(mine["boxes"], theirs["boxes"]) and mine["image_id"] == theirs["image_id"]
    assert {t["image_id"] for t in next(iter(dm.val_dataloader()))["targets"]} <= {1, 2, 3}


def test_preload_is_optional_and_gives_the_same_batches(coco_layout: Path) -> None:
    lazy = CocoDetection(coco_layout / "val2017", image_size=64, annotations=coco_layout / "annotations/instances_val2017.json")
    loaded = CocoDetection(coco_layout / "val2017", image_size=64, annotations=coco_layout / "annotations/instances_val2017.json", preload=True)
    assert lazy.images is None and len(loaded.images) == 3
    a, b = lazy.__getitems__([0, 1, 2]), loaded.__getitems__([0, 1, 2])
    assert torch.equal(a["image"], b["image"]) and all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a["targets"], b["targets"]))


def test_lazy_errors_name_the_file(coco_layout: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(coco_layout, root)
    jpeg = root / "val2017/000000000002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # cut short: found at setup, fails when read
    dm = CocoDetectionDataModule(root=str(root), image_size=64, num_workers=0)
    dm.setup("fit")
    with pytest.raises(OSError, match="cannot read image .*000000000002.jpg"):
        dm.splits["val"][1]
    jpeg.unlink()
    with pytest.raises(FileNotFoundError, match="000000000002.jpg"):
        CocoDetectionDataModule(root=str(root), num_workers=0).setup("fit")
    (root / "annotations/instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json.*COCO 2017"):
        CocoDetectionDataModule(root=str(root), layout="coco2017").prepare_data()
    with pytest.raises(ValueError, match="layout must be one of"):
        CocoDetectionDataModule(root=str(root), layout="voc")
