"""Predictions written to files: ``mmkd predict``.

:class:`PredictionWriter` is a Lightning callback that writes one row per predicted sample (its
path, or its index for the in-memory data sets, and the top-k classes by name with their
probabilities) to CSV or JSONL. The ``mmkd predict -c CONFIG`` command (LightningCLI) adds one
unless the config has a prediction writer. Under DDP every process writes its own part, and
process 0 merges the parts in sample order; the file appears only complete (written to a
temporary file, then renamed).

Without a config, :func:`main` predicts image files with a zoo model (``--zoo NAME``, with the
preprocessing its manifest entry publishes) or an ONNX classifier (``--onnx FILE``, onnxruntime),
decoding them with :class:`~mmkd.data.files.ImageFilesDataModule` (folders, file lists, single
images) through a Lightning ``Trainer``, so the progress bar and the writer are the same.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

FORMAT_OF_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PredictError(ValueError):
    """Input that ``mmkd predict`` cannot take (a missing file, a model that is not a classifier, ...)."""


def output_format(path: str | Path, given: str | None = None) -> str:
    """``"csv"`` or ``"jsonl"``: ``given``, else by the suffix of ``path``."""
    if given is not None:
        if given not in ("csv", "jsonl"):
            raise PredictError(f"the prediction format must be 'csv' or 'jsonl', got {given!r}")
        return given
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_OF_SUFFIX:
        raise PredictError(f"cannot tell the format of {path} from its suffix: name it .csv or .jsonl, or give --format csv|jsonl")
    return FORMAT_OF_SUFFIX[suffix]


def one_line(err: BaseException) -> str:
    """An error's message on one line (a DataLoader worker's error: the original message)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) > 1 and lines[0].startswith("Caught "):  # re-raised from a worker, with its traceback
        return re.sub(r"^[\w.]+: ", "", lines[-1])
    return " ".join(lines)


def sample_name(dataset: Any, index: int) -> str:
    """A sample's path (data sets over files: their ``source.name(i)`` or ``name(i)``), else its index."""
    source = getattr(dataset, "source", dataset)
    return source.name(index) if hasattr(source, "name") else str(index)


class PredictionWriter(BasePredictionWriter):
    """Writes one row per predicted sample: ``path`` (the file, or the sample index for data sets
    held in memory) and the ``topk`` most probable classes, by name, with their probabilities,
    most probable first.

    CSV: ``path,class_1,prob_1,...,class_k,prob_k``. JSONL: ``{"path": ..., "topk": [{"class":
    name, "index": i, "prob": p}, ...]}``. Rows are in the data set's order; a file that a
    skipping loader left out (``on_bad_file: skip``) has no row. Takes the predictions of
    classification modules (``predict_step`` returning a dict with ``probs`` and ``index``, as
    :class:`~mmkd.core.Classifier` does); others are skipped with a warning.

    Args:
        output: the file to write (``.csv`` or ``.jsonl``). Default: ``predictions.csv`` in the
            run's log folder (the first logger's), else beside the checkpoint predicted with,
            else in the trainer's ``default_root_dir``.
        topk: classes per row (at most the model's class count).
        output_format: ``"csv"`` or ``"jsonl"``; default from the suffix of ``output``.
        class_names: names of the classes in label order; default the data module's
            ``class_names``, else the module's, else the class indices.
    """

    def __init__(
        self,
        output: str | None = None,
        topk: int = 5,
        output_format: Literal["csv", "jsonl"] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__("batch")
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        if output is not None and output_format is None:
            output_format = _format_of(output)  # checked now: a config with a bad suffix fails at once
        self.output, self.topk, self.output_format = output, topk, output_format
        self.class_names = list(class_names) if class_names is not None else None
        self.written: Path | None = None  # where the last run wrote (process 0)
        self._part = None
        self._target: Path | None = None
        self._format = "csv"
        self._num_classes: int | None = None
        self._unsupported: str | None = None

    # -- where ---------------------------------------------------------------------------------
    def resolve_output(self, trainer: L.Trainer) -> Path:
        """The file this run writes (called on every process: the log folder is broadcast)."""
        if self.output:
            return Path(self.output).expanduser()
        name = f"predictions.{self.output_format or 'csv'}"
        if trainer.loggers:
            return Path(trainer.log_dir) / name
        if trainer.ckpt_path and Path(trainer.ckpt_path).exists():
            return Path(trainer.ckpt_path).parent / name
        return Path(trainer.default_root_dir) / name

    def _part_path(self, rank: int) -> Path:
        assert self._target is not None
        return self._target.with_name(f".{self._target.name}.part{rank}")

    # -- writing -------------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._target = self.resolve_output(trainer)
        self._format = output_format(self._target, self.output_format)
        self._target.parent.mkdir(parents=True, exist_ok=True)
        self._num_classes, self._unsupported, self.written = None, None, None
        self._part = open(self._part_path(trainer.global_rank), "w")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict) or not isinstance(prediction.get("probs"), torch.Tensor):
            if self._unsupported is None:
                self._unsupported = type(prediction).__name__
                rank_zero_warn(
                    f"PredictionWriter writes class probabilities (predict_step returning a dict with 'probs'); "
                    f"{type(pl_module).__name__}.predict_step returned a {self._unsupported}: its predictions are not written"
                )
            return
        probs = prediction["probs"].detach().float()
        index = prediction.get("index")
        if index is None:
            if batch_indices is None:
                raise ValueError("PredictionWriter needs the sample indices: return 'index' from predict_step")
            index = list(batch_indices)
        indices = index.tolist() if isinstance(index, torch.Tensor) else [int(i) for i in index]
        self._num_classes = probs.shape[-1]
        values, classes = probs.topk(min(self.topk, probs.shape[-1]), dim=-1)  # sorted, largest first
        assert self._part is not None
        for i, top, p in zip(indices, classes.tolist(), values.cpu().tolist()):
            self._part.write(json.dumps([dataloader_idx, int(i), top, p]) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None
        trainer.strategy.barrier("mmkd_prediction_parts")
        if trainer.is_global_zero:
            self.written = self._merge(trainer, pl_module)
        trainer.strategy.barrier("mmkd_predictions_written")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None
            self._part_path(trainer.global_rank).unlink(missing_ok=True)

    # -- merging -------------------------------------------------------------------------------
    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        rows: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
        for rank in range(trainer.world_size):
            part = self._part_path(rank)
            with open(part) as f:
                for line in f:
                    loader, index, top, probs = json.loads(line)
                    rows[(loader, index)] = (top, probs)  # a sample seen twice (a padding sampler) counts once
            part.unlink()
        if not rows and self._unsupported is not None:
            return None
        loaders = trainer.predict_dataloaders
        loaders = list(loaders.values()) if isinstance(loaders, dict) else list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        datasets = [getattr(loader, "dataset", None) for loader in loaders]
        names = self._names(trainer, pl_module)
        several = len(datasets) > 1
        k = max((len(top) for top, _ in rows.values()), default=min(self.topk, self._num_classes or self.topk))
        assert self._target is not None
        target = self._target
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f) if self._format == "csv" else None
                if writer is not None:
                    header = ["path", *(["dataloader"] if several else [])]
                    writer.writerow(header + [column for j in range(1, k + 1) for column in (f"class_{j}", f"prob_{j}")])
                for (loader, index), (top, probs) in sorted(rows.items()):
                    path = sample_name(datasets[loader], index)
                    labels = [names[c] if names is not None else str(c) for c in top]
                    if writer is not None:
                        cells = [path, *([loader] if several else [])]
                        writer.writerow(cells + [cell for label, p in zip(labels, probs) for cell in (label, format(p, ".6g"))])
                    else:
                        record = {"path": path, **({"dataloader": loader} if several else {})}
                        record["topk"] = [{"class": label, "index": c, "prob": p} for label, c, p in zip(labels, top, probs)]
                        f.write(json.dumps(record) + "\n")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {len(rows)} predictions to {target}")
        return target

    def _names(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str] | None:
        names = self.class_names
        if names is None:
            datamodule = trainer.datamodule
            try:
                names = getattr(datamodule, "class_names", None) if datamodule is not None else None
            except (OSError, ValueError):  # a data module that cannot name its classes without its training split
                names = None
            names = names or getattr(pl_module, "class_names", None)
        if not names:
            return None
        names = [str(name) for name in names]
        if self._num_classes is not None and len(names) != self._num_classes:
            rank_zero_warn(f"the data names {len(names)} classes, the model predicts {self._num_classes}: rows name classes by index")
            return None
        return names


def _format_of(output: str) -> str:
    return output_format(output)  # (PredictionWriter's argument of the same name hides this function)


def add_prediction_writer(trainer: L.Trainer, options: dict[str, Any]) -> None:
    """A :class:`PredictionWriter` with ``options`` (``output``, ``topk``, ``output_format``) for
    ``trainer``, unless its callbacks have a prediction writer; given options then go to it."""
    given = {key: value for key, value in options.items() if value is not None}
    writers = [callback for callback in trainer.callbacks if isinstance(callback, BasePredictionWriter)]
    if not writers:
        trainer.callbacks.append(PredictionWriter(**given))
        return
    for writer in writers:
        if isinstance(writer, PredictionWriter):
            for key, value in given.items():
                setattr(writer, key, value)
            if "output" in given and "output_format" not in given:
                writer.output_format = output_format(given["output"])
        elif given:
            rank_zero_warn(f"--output, --topk and --format set mmkd's PredictionWriter; the config's {type(writer).__name__} writes these predictions")


# -- predicting files without a config -----------------------------------------------------------
class OnnxClassifier(L.LightningModule):
    """An ONNX image classifier run with onnxruntime (CPU): one float input ``[batch, C, H, W]``,
    one output of class scores ``[batch, classes]`` (logits or log-probabilities)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise PredictError(f"ONNX model {path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise PredictError(f"cannot load {path} as an ONNX model: {one_line(err)}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
            described = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise PredictError(f"{path} takes {described}; mmkd predict takes models of one float image input [batch, C, H, W]")
        if len(outputs) != 1:
            raise PredictError(f"{path} has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); mmkd predict takes classifiers with one output of class scores")
        self.path, self.input_name = path, inputs[0].name
        self.input_shape = [dim if isinstance(dim, int) else None for dim in inputs[0].shape[1:]]
        self.preprocessing, self.class_names = self._exported_metadata(self.session.get_modelmeta().custom_metadata_map)

    def _exported_metadata(self, metadata: dict[str, str]) -> tuple[dict[str, Any] | None, list[str] | None]:
        """The preprocessing and class names that ``mmkd export`` records (none in other files)."""
        from mmkd.export import CLASS_NAMES_KEY, PREPROCESSING_KEY

        try:
            preprocessing = json.loads(metadata[PREPROCESSING_KEY]) if PREPROCESSING_KEY in metadata else None
            names = json.loads(metadata[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in metadata else None
        except json.JSONDecodeError as err:
            raise PredictError(f"{self.path}: its mmkd metadata is not JSON ({err}); give --image-size, --mean, --std ... and --classes") from None
        return preprocessing, [str(name) for name in names] if names else None

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: images.detach().cpu().float().numpy()})[0])

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.scores(batch["image"]).float().softmax(-1)
        return {"index": batch["index"], "probs": probs, "pred": probs.argmax(-1)}


def class_scores_count(run: Any, shape: Sequence[int], what: str) -> int:
    """The class count of an image classifier, from one forward of a zero image of ``shape``."""
    try:
        with torch.no_grad():
            out = run(torch.zeros(1, *shape))
    except Exception as err:  # a shape the model does not take: say which one was tried
        raise PredictError(f"{what} does not run on a {'x'.join(map(str, shape))} input: {one_line(err)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {list(out.shape)}"
        raise PredictError(f"{what} returns {got}, not class scores [batch, classes]: mmkd predict writes the predictions of classifiers")
    return int(out.shape[1])


def read_class_names(path: str | Path) -> list[str]:
    """Class names in label order: one per line of a text file, or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"class names file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        names = json.loads(text)
        if not isinstance(names, list):
            raise PredictError(f"{path} must hold a JSON list of class names")
        return [str(name) for name in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _zoo_class_names(name: str) -> list[str] | None:
    from mmkd import zoo

    entry = zoo.info(name)
    if entry.get("class_names"):
        return list(entry["class_names"])
    try:  # the data module that measured the entry names its classes
        names = getattr(zoo.evaluation_data(name), "class_names", None)
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        return None
    return [str(n) for n in names] if names else None


def zoo_classifier(name: str) -> tuple[L.LightningModule, dict[str, Any], list[str] | None, int]:
    """A zoo classifier as a LightningModule, its published preprocessing (for an image model as
    a ViewSpec dict; for an audio model the manifest's ``kind: audio`` dict), its class names and
    its class count."""
    from mmkd import zoo
    from mmkd.core.classifier import Classifier

    entry = zoo.info(name)
    key, shape = entry.get("input_key", "image"), entry.get("input_shape")
    published = entry.get("preprocessing") or {}
    if key == "audio" and published.get("kind") == "audio":
        model = zoo.load(name)
        num_classes = class_scores_count(model, shape, name)
        return Classifier(model, num_classes=num_classes, input_key="audio"), dict(published), _zoo_class_names(name), num_classes
    if key != "image" or not shape or len(shape) != 3:
        raise PredictError(f"{name} takes {key} input of shape {shape}; mmkd predict on files takes image and audio classifiers")
    model = zoo.load(name)
    num_classes = class_scores_count(model, shape, name)
    norm = entry.get("input_normalization") or {}
    view = {
        "size": tuple(shape[1:]), "channels": int(shape[0]),
        "mean": norm.get("mean") if norm.get("mean") is not None else 0.0,  # null: pixels in [0, 1]
        "std": norm.get("std") if norm.get("std") is not None else 1.0,
        "interpolation": published.get("interpolation", "bilinear"),
        "crop_pct": published.get("crop_pct", 1.0),  # the zoo's data modules feed whole images
    }  # fmt: skip
    return Classifier(model, num_classes=num_classes), view, _zoo_class_names(name), num_classes


def merge_sources(sources: list[Any]) -> Any:
    """The samples of several locations as one index (image files and file lists)."""
    from mmkd.data.sources import FileSource, StringArena

    if len(sources) == 1:
        return sources[0]
    if not all(isinstance(source, FileSource) for source in sources):
        raise PredictError("several inputs must each be an image file, a folder or a .csv/.jsonl file list; give shards or a dataset on their own")
    names = (str(source.path(i)) for source in sources for i in range(len(source)))
    return FileSource(Path(""), StringArena(names), np.concatenate([source.labels for source in sources]))


def files_datamodule(
    locations: Sequence[str], view: dict[str, Any], batch_size: int = 64, num_workers: int = 2, on_bad_file: str = "raise"
) -> Any:
    """An :class:`~mmkd.data.files.ImageFilesDataModule` whose predict split is the images at
    ``locations`` (folders with or without class folders, file lists, shards, image files),
    decoded into ``view``."""
    from mmkd.data.files import ImageFilesDataModule
    from mmkd.data.sources import is_image_file

    dm = ImageFilesDataModule(views={"image": view}, batch_size=batch_size, eval_batch_size=batch_size,
                              num_workers=num_workers, on_bad_file=on_bad_file)  # fmt: skip
    sources = []
    for location in locations:
        path = Path(location).expanduser()
        pattern = any(c in location for c in "*?{")
        if not pattern and not path.exists():
            raise PredictError(f"{location} does not exist")
        if path.is_file() and not (is_image_file(path.name) or path.suffix.lower() in (".csv", ".jsonl", ".tar")):
            raise PredictError(f"{location} is not an image file ({', '.join(('.jpg', '.png', '...'))}), a .csv/.jsonl file list or a .tar shard")
        sources.append(dm.open_location(location if pattern else path, "predict"))
    dm.splits = {"predict": dm.dataset(merge_sources(sources), train=False)}  # no training split: setup has nothing to do
    return dm


class AudioFeatures(torch.utils.data.Dataset):
    """Audio files as the input a zoo audio student was trained on (its manifest's
    ``preprocessing``, see :class:`~mmkd.data.av_files.AudioSpec`). With
    ``training_noise_snr_db`` the white noise of its training data is mixed in, seeded by the
    sample's position (a model trained only on noisy speech scores far lower on clean
    recordings; the README gives the numbers)."""

    def __init__(self, source: Any, preprocessing: dict[str, Any], training_noise: bool = True) -> None:
        from mmkd.data.av_files import AudioSpec

        self.source = source
        self.noise_snr_db = preprocessing.get("training_noise_snr_db") if training_noise else None
        fields = ("sample_rate", "duration", "n_mels", "n_fft", "hop_length", "mean", "std")
        self.spec = AudioSpec(**{key: preprocessing[key] for key in fields}, noise_snr_db=self.noise_snr_db)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from mmkd.data.av_files import audio_input

        return {"audio": audio_input(self.source.path(index), self.spec, torch.Generator().manual_seed(index)), "index": index}


def audio_source(locations: Sequence[str]) -> Any:
    """The audio files at ``locations`` (files, folders searched recursively, .csv/.jsonl lists);
    a video file stands for its sound track."""
    from mmkd.data.av_files import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS
    from mmkd.data.sources import FileSource, StringArena, file_list

    names: list[str] = []
    for location in locations:
        path = Path(location).expanduser()
        if not path.exists():
            raise PredictError(f"{location} does not exist")
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)
            if not found:
                raise PredictError(f"{location} holds no audio or video files ({', '.join(AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)})")
            names += found
        elif path.suffix.lower() in (".csv", ".jsonl"):
            listed = file_list(path)[0]
            names += [str(listed.path(i)) for i in range(len(listed))]
        elif path.suffix.lower() in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS:
            names.append(str(path))
        else:
            raise PredictError(f"{location} is not an audio or video file ({', '.join(AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)}), a folder or a .csv/.jsonl file list")
    return FileSource(Path(""), StringArena(names), np.full(len(names), -1))


def _standalone_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmkd predict",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the predictions of an image classifier on files: one row per image (path, top-k classes "
        "with their probabilities) to CSV or JSONL.\n\n"
        "  mmkd predict --zoo fmnist-resnet10t-kd photos/ --output preds.csv --topk 3\n"
        "  mmkd predict --onnx model.onnx --classes classes.txt a.jpg b.png list.csv\n"
        "  mmkd predict -c CONFIG --ckpt_path CKPT --data.init_args.predict=photos/ [--output F --topk K]\n\n"
        "With -c, the other arguments are LightningCLI's (`mmkd predict -c CONFIG --help`); the config's data "
        "module's predict split is predicted (its test split where it has none), and the predictions go to "
        "predictions.csv in the run's log folder unless --output says otherwise.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--zoo", metavar="NAME", help="a zoo model (its manifest's preprocessing applies)")
    model.add_argument("--onnx", metavar="FILE", help="an ONNX classifier (run with onnxruntime on the CPU)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (with or without class folders), .csv/.jsonl file lists")
    add_writer_arguments(parser)
    parser.add_argument("--classes", metavar="FILE", help="class names, one a line (or a JSON list); default: the zoo entry's or those mmkd export recorded, else indices")
    view = parser.add_argument_group("preprocessing (default: the zoo entry's; for ONNX what mmkd export recorded, else the input shape's size and channels)")
    view.add_argument("--image-size", type=_numbers(int), metavar="PX", help="input size: 224 (square) or HEIGHT,WIDTH")
    view.add_argument("--channels", type=int, choices=[1, 3], help="1 (greyscale) or 3 (RGB)")
    view.add_argument("--mean", type=_numbers(float), help="normalisation mean: one value or one per channel, 0.485,0.456,0.406 (ONNX without mmkd metadata: ImageNet's)")
    view.add_argument("--std", type=_numbers(float), help="normalisation std, as --mean (ONNX without mmkd metadata: ImageNet's)")
    view.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest", "lanczos", "box"], help="resampling (default bilinear)")
    view.add_argument("--crop-pct", type=float, help="centre crop: the shorter side resized to size / crop_pct (default 1.0: the centre square)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--num-workers", type=int, default=2, help="decoding worker processes")
    run.add_argument("--accelerator", default="auto", help="Lightning accelerator for a zoo model (ONNX runs on the CPU)")
    run.add_argument("--on-bad-file", choices=["raise", "skip"], default="raise", help="an image that does not decode: stop, or leave it out (warned)")
    audio = parser.add_argument_group("audio zoo models (wav/flac/ogg files, video files for their sound track, folders, lists)")
    audio.add_argument("--no-training-noise", action="store_true",
                       help="do not mix in the white noise the model was trained with (its manifest's training_noise_snr_db)")  # fmt: skip
    return parser


def _numbers(kind: type) -> Any:
    """An argparse type: one number or several separated by commas (or ``x``), as a tuple."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in re.split(r"[,x]", text.strip()) if part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} values separated by commas, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="FILE", default=None, help="the .csv or .jsonl file to write (default predictions.csv)")
    parser.add_argument("--topk", type=int, default=None, help="classes per row (default 5)")
    parser.add_argument("--format", dest="output_format", choices=["csv", "jsonl"], default=None, help="default: by the suffix of --output")


def predict_files(args: argparse.Namespace) -> Path | None:
    """``mmkd predict --zoo NAME|--onnx FILE INPUT...``: the rows written, returns the file."""
    from mmkd.data.views import ViewSpec

    output = args.output or f"predictions.{args.output_format or 'csv'}"
    fmt = output_format(output, args.output_format)
    if args.topk is not None and args.topk < 1:
        raise PredictError(f"--topk must be at least 1, got {args.topk}")
    if args.zoo:
        module, view, names, _ = zoo_classifier(args.zoo)
        what, accelerator = args.zoo, args.accelerator
        if view.get("kind") == "audio":
            return predict_audio_files(args, module, view, names, output, fmt)
    else:
        module = OnnxClassifier(args.onnx)
        channels, height, width = module.input_shape
        view = {"size": (height, width) if height and width else None, "channels": channels, **(module.preprocessing or {})}
        names, what, accelerator = module.class_names, str(args.onnx), "cpu"
    if args.image_size:
        if len(args.image_size) not in (1, 2):
            raise PredictError(f"--image-size takes one value or HEIGHT,WIDTH, got {args.image_size}")
        view["size"] = tuple(args.image_size) * (2 // len(args.image_size))
    for key in ("channels", "mean", "std", "interpolation", "crop_pct"):
        value = getattr(args, key)
        if value is not None:
            view[key] = value
    if view.get("size") is None or view.get("channels") is None:
        raise PredictError(f"the input shape of {what} ({module.input_shape}) does not fix the image size and channels: give --image-size and --channels")
    view.setdefault("crop_pct", 1.0)
    try:
        spec = ViewSpec(**{key: value for key, value in view.items() if value is not None})
    except ValueError as err:
        raise PredictError(f"preprocessing {view}: {err}") from None
    if args.onnx:
        num_classes = class_scores_count(module.scores, spec.shape, what)
    else:
        num_classes = module.num_classes
    if args.classes:
        names = read_class_names(args.classes)
        if len(names) != num_classes:
            raise PredictError(f"{args.classes} names {len(names)} classes; {what} predicts {num_classes}")
    if names is not None and len(names) != num_classes:
        names = None
    dm = files_datamodule(args.inputs, spec.as_dict(), args.batch_size, args.num_workers, args.on_bad_file)
    count = len(dm.splits["predict"])
    print(f"predicting {count} image{'s' * (count != 1)} with {what}: input {'x'.join(map(str, spec.shape))}, "
          f"mean {spec.mean}, std {spec.std}, {spec.interpolation}, crop_pct {spec.crop_pct}"
          f"{' (from its mmkd metadata)' if args.onnx and module.preprocessing else ''}")  # fmt: skip
    writer = PredictionWriter(output, args.topk or 5, fmt, class_names=names or [str(i) for i in range(num_classes)])
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[writer], default_root_dir=os.getcwd())  # fmt: skip
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return writer.written


def predict_audio_files(args: argparse.Namespace, module: L.LightningModule, preprocessing: dict[str, Any],
                        names: list[str] | None, output: str, fmt: str) -> Path | None:  # fmt: skip
    """``mmkd predict --zoo AUDIO_MODEL FILES...``: audio files through the published preprocessing."""
    dataset = AudioFeatures(audio_source(args.inputs), preprocessing, training_noise=not args.no_training_noise)
    noise = f", white noise at {dataset.noise_snr_db:g} dB SNR as in training" if dataset.noise_snr_db is not None else ""
    print(f"predicting {len(dataset)} audio file{'s' * (len(dataset) != 1)} with {args.zoo}: {preprocessing['sample_rate']} Hz, "
          f"{preprocessing['duration']:g} s, {preprocessing['n_mels']}-band log-mel, mean {preprocessing['mean']:.4g}, "
          f"std {preprocessing['std']:.4g}{noise}")  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    writer = PredictionWriter(output, args.topk or 5, fmt, class_names=names or [str(i) for i in range(module.num_classes)])
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[writer], default_root_dir=os.getcwd())  # fmt: skip
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    return writer.written


def main(argv: Sequence[str]) -> None:
    """``mmkd predict``: with ``--zoo``/``--onnx`` on files; otherwise the LightningCLI
    ``predict`` subcommand with a prediction writer (``--output``, ``--topk``, ``--format``)."""
    from mmkd import zoo
    from mmkd.data.audio_visual import AudioDecodeError
    from mmkd.data.files import ImageDecodeError
    from mmkd.data.sources import DataSourceError

    argv = list(argv)
    standalone = any(arg in ("--zoo", "--onnx") or arg.startswith(("--zoo=", "--onnx=")) for arg in argv)
    if not standalone and (not argv or argv in (["-h"], ["--help"])):
        _standalone_parser().print_help()
        return
    try:
        if standalone:
            predict_files(_standalone_parser().parse_args(argv))
            return
        options = argparse.ArgumentParser(prog="mmkd predict", add_help=False, allow_abbrev=False)
        add_writer_arguments(options)
        known, rest = options.parse_known_args(argv)
        if known.output is not None:
            output_format(known.output, known.output_format)
        if known.topk is not None and known.topk < 1:
            raise PredictError(f"--topk must be at least 1, got {known.topk}")
    except (PredictError, zoo.ZooError, DataSourceError, FileNotFoundError, ImageDecodeError, AudioDecodeError) as err:
        if os.environ.get("MMKD_TRACEBACK") == "1":
            raise
        print(f"mmkd: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    import warnings

    from mmkd.cli import lightning_cli

    with warnings.catch_warnings():  # the arguments are the command line's, less the writer's options
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        lightning_cli(["predict", *rest], predict_writer=vars(known))
