"""Teacher-output cache: run the teacher once over the training set, read its outputs back by
sample index instead of running it at every step.

The rule: a cache is valid only when the teacher's input for a sample is the same every time it
is seen, i.e. the training split is read without random augmentation (Fast Knowledge Distillation
stores the crop parameters with the outputs to lift that; not supported here). A data module
declares this through ``teacher_cache_loader(batch_size)``, which returns a loader over the
training split in index order (batches carry ``"index"``) and a fingerprint of its content and
transform, and refuses when the transform is random.

A cache is a folder of ``.npy`` files (memory-mapped on read) plus ``meta.json``, which records
the teacher's weights sha256, the data fingerprint, how the teacher input was made and what was
stored. A distiller given ``teacher_cache=PATH`` checks all of them against the current run and
stops with the difference when one does not match: stale targets are never used silently.

Logits may be stored as the top-k only: the k largest logits exactly, and for every other class
one "tail" logit chosen so that the softmax at T = 1 keeps the tail's total probability (at other
temperatures the tail is approximate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.core.checkpoint import restore_swapped_out, swap_in

CACHE_VERSION = 1
LOGITS = "logits"  # same key as mmkd.core.distiller.LOGITS (not imported: that module imports this one)
DTYPES = {"float32": np.float32, "float16": np.float16}


class TeacherCacheError(RuntimeError):
    """A cache that is missing, corrupt, or made for another teacher, data or transform."""


def refuse_random_augmentation(datamodule: object) -> None:
    """A data module's ``teacher_cache_loader`` refuses a training split augmented at random."""
    if getattr(datamodule, "augment", False):
        raise TeacherCacheError(
            f"{type(datamodule).__name__} augments the training images at random, so the teacher would see other "
            "inputs than the cached ones: set --data.init_args.augment=false to use a teacher cache"
        )


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over the raw bytes of tensors, in order (their content fingerprint)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = logits.topk(k, dim=1)
    lse = logits.logsumexp(dim=1)
    tail_mass = (1 - (values - lse[:, None]).exp().sum(dim=1)).clamp_min(1e-30)
    tail = tail_mass.log() - np.log(max(1, logits.shape[1] - k)) + lse
    return values, indices, tail


class TeacherCache:
    """Read side of a cache folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise TeacherCacheError(
                f"no teacher cache at {self.path} (meta.json missing): build it with "
                f"`mmkd cache -c CONFIG --out {self.path}`"
            )
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise TeacherCacheError(f"{meta_file} is corrupt ({err}); rebuild the cache with `mmkd cache`") from err
        if self.meta.get("version") != CACHE_VERSION:
            raise TeacherCacheError(f"{self.path} was written by cache format {self.meta.get('version')}, this mmkd reads {CACHE_VERSION}; rebuild it")
        self.arrays: dict[str, np.ndarray] = {}
        for name, entry in self.meta["files"].items():
            file = self.path / entry["file"]
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise TeacherCacheError(f"cannot read {file} ({err}); the cache is incomplete or corrupt: rebuild it") from err
            if list(array.shape) != entry["shape"]:
                raise TeacherCacheError(f"{file} holds shape {list(array.shape)}, meta.json says {entry['shape']}: rebuild the cache")
            self.arrays[name] = array

    @property
    def sources(self) -> list[str]:
        return self.meta["sources"]

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def verify(self, teacher_sha256: str, fingerprint: dict[str, Any], sources: set[str]) -> None:
        """Raise :class:`TeacherCacheError` naming what differs from the current run."""
        if self.meta["teacher_weights_sha256"] != teacher_sha256:
            raise TeacherCacheError(
                f"teacher cache {self.path} was built from other teacher weights (sha256 "
                f"{self.meta['teacher_weights_sha256'][:12]}, now {teacher_sha256[:12]}): rebuild it with `mmkd cache`"
            )
        for key in sorted(set(fingerprint) | set(self.meta["fingerprint"])):
            cached, current = self.meta["fingerprint"].get(key), fingerprint.get(key)
            if cached != current:
                raise TeacherCacheError(
                    f"teacher cache {self.path} does not match this run's data or transform: {key} is "
                    f"{cached!r} in the cache and {current!r} now; rebuild it with `mmkd cache`"
                )
        missing = sorted(sources - set(self.sources))
        if missing:
            raise TeacherCacheError(
                f"teacher cache {self.path} holds {self.sources} but this distiller also needs the teacher's "
                f"{missing}: rebuild it with this config"
            )

    def lookup(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Teacher outputs of the samples ``indices`` (float32, on ``device``)."""
        rows = indices.detach().cpu().numpy()
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise TeacherCacheError(f"sample index {int(rows.max())} outside the cache of {len(self)} samples")

        def read(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(self.arrays[name][rows])).to(device)

        outputs = {}
        for source in self.sources:
            if source == LOGITS and self.meta["topk"]:
                values, top, tail = read("logits.values").float(), read("logits.indices").long(), read("logits.tail").float()
                dense = tail[:, None].expand(len(rows), self.meta["num_classes"]).clone()
                outputs[source] = dense.scatter_(1, top, values)
            else:
                outputs[source] = read(source).float()
        return outputs


class _CacheWriter:
    """Memory-mapped ``.npy`` files in a folder, one per stored output, filled by sample index."""

    def __init__(self, folder: Path, num_samples: int) -> None:
        self.folder, self.num_samples = folder, num_samples
        self.files: dict[str, np.ndarray] = {}

    def store(self, name: str, values: torch.Tensor, rows: torch.Tensor, np_dtype: type) -> None:
        if name not in self.files:
            shape = (self.num_samples, *values.shape[1:])
            self.files[name] = np.lib.format.open_memmap(self.folder / f"{len(self.files)}.npy", mode="w+", dtype=np_dtype, shape=shape)
        self.files[name][rows.numpy()] = values.cpu().numpy().astype(np_dtype)

    def close(self, meta: dict[str, Any]) -> None:
        for array in self.files.values():
            array.flush()
        meta["files"] = {name: {"file": Path(array.filename).name, "shape": list(array.shape)} for name, array in self.files.items()}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2))


@torch.no_grad()
def build_teacher_cache(
    distiller: Any,
    datamodule: Any,
    out: str | os.PathLike,
    topk: int | None = None,
    dtype: str = "float32",
    batch_size: int = 512,
    overwrite: bool = False,
    progress: bool = True,
) -> TeacherCache:
    """Run ``distiller``'s teacher over ``datamodule``'s training split once and store its logits
    and every tapped teacher feature the distiller's terms use, by sample index.

    Written into a temporary folder and renamed at the end, so an interrupted build never leaves
    a cache that looks complete.
    """
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to rebuild it")
    if not hasattr(datamodule, "teacher_cache_loader"):
        raise TeacherCacheError(f"{type(datamodule).__name__} does not declare teacher_cache_loader(); it cannot be cached")
    if hasattr(datamodule, "views_for"):  # a file data module: each model's view, as in training
        datamodule.views_for(distiller)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader, data_fingerprint = datamodule.teacher_cache_loader(batch_size)
    teacher = distiller.teacher
    device = next(teacher.parameters()).device
    meta = {
        "version": CACHE_VERSION, "num_samples": len(loader.dataset), "num_classes": None,
        "sources": [LOGITS, *sorted(distiller.teacher_tap.paths)], "topk": topk, "dtype": dtype,
        "teacher_weights_sha256": teacher.reference()["weights_sha256"], "teacher_checkpoint": teacher.checkpoint,
        "fingerprint": distiller.teacher_cache_fingerprint(data_fingerprint),
    }  # fmt: skip

    restore_swapped_out(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a build that was killed (SIGKILL, out of memory)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    writer = _CacheWriter(tmp, len(loader.dataset))
    batches = loader
    if progress:
        from rich.progress import track

        batches = track(loader, description=f"teacher cache -> {out}", total=len(loader))
    try:
        for batch in batches:
            rows = batch["index"].cpu()
            logits = distiller.teacher_forward({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).float()
            meta["num_classes"] = logits.shape[1]
            if topk:
                values, top, tail = _topk_with_tail(logits, min(topk, logits.shape[1]))
                writer.store("logits.values", values, rows, DTYPES[dtype])
                writer.store("logits.indices", top, rows, np.int32)
                writer.store("logits.tail", tail, rows, np.float32)
            else:
                writer.store(LOGITS, logits, rows, DTYPES[dtype])
            for path, value in distiller.teacher_tap.pop().items():
                writer.store(path, value.float(), rows, DTYPES[dtype])
        writer.close(meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a cache behind
        raise
    swap_in(tmp, out)  # an old cache stays whole until the new one takes its name
    return TeacherCache(out)
