"""Teacher-output cache: run the teacher once over the training set, read its outputs back by
sample index (and view) instead of running it at every step.

Two kinds, one format:

* **Fixed inputs** (``mmkd cache`` without ``--views``): valid only when the teacher's input for a
  sample is the same every time it is seen, i.e. the training split is read without random
  augmentation; a data module refuses a randomly augmented split then.
* **Recorded views** (``--views V``), Fast Knowledge Distillation's scheme (Shen & Xing, ECCV
  2022) generalised: for each sample, V augmented views are drawn as training draws them (the
  file data modules' RandomResizedCrop + flip, and RandAugment / random erasing where
  configured), and the crop box and flip of each view are stored beside the teacher's outputs
  for it. Training replays them: epoch ``e`` cuts every image with its view ``e % V``'s
  recorded crop, and takes every other random draw with ``e % V`` as the epoch (those draws
  are functions of (seed, epoch, index) in mmkd's data modules), so student and teacher see
  the same pixels, the consistent-teaching rule of Beyer et al. (CVPR 2022). ``V`` equal to the
  number of epochs gives each epoch its own views; fewer views are a pool cycled over epochs.
  Mixup and CutMix are recorded when the data module mixes single samples
  (``--data.init_args.mixup``, :mod:`mmkd.data.mixing`): each view's partner and draw (ratio,
  CutMix or not, box centre) are stored too, and the teacher's outputs are those of the mixed
  view. A model's ``mixup`` (timm's, on the batch) depends on which samples share a batch and
  cannot be recorded: with a cache it is an error.

A data module declares its training split through ``teacher_cache_dataset(views)``: the
dataset (keys ``index``, or ``(index, view)`` with views) and a fingerprint of its content,
transform and augmentation. Rows of the cache are ``view * num_samples + index``.

A cache is a folder of ``.npy`` files (memory-mapped on read) plus ``meta.json``, which records
the teacher's weights sha256, the data fingerprint, how the teacher input was made and what was
stored. A distiller given ``teacher_cache=PATH`` checks all of them against the current run and
stops with the difference when one does not match: stale targets are never used silently.

Building is resumable and parallel: rows are cut into shards; each finished shard is written
(atomically) into ``.NAME.partial/`` and kept when the build is killed, so the next build of the
same cache starts with the shards still to do (a build of another teacher, data or recipe
discards them). Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes every
``WORLD_SIZE``-th shard and rank 0 assembles the cache; DataLoader workers decode in parallel
within each rank. The folder takes its name only when complete.

Logits may be stored as the top-k only (``--topk``): the k largest logits, their class indices
(int16 below 32,768 classes) and, for every other class, one "tail" logit chosen so that the
softmax at T = 1 keeps the tail's total probability (the rest of the mass spread evenly over
the other classes; at other temperatures the tail is approximate). Values and tail are stored
in ``--dtype`` (float16 halves the size), tapped features too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mmkd.core.checkpoint import remove_path, restore_swapped_out, swap_in
from mmkd.data.mixing import MIX_PARAMS, MIX_PARTNER

CACHE_VERSION = 2  # 2: rows of (view, sample), a mask of written rows; 1 (fixed inputs only) is read too
LOGITS = "logits"  # same key as mmkd.core.distiller.LOGITS (not imported: that module imports this one)
DTYPES = {"float32": np.float32, "float16": np.float16}
WRITTEN, CROP_BOX, FLIP = "written", "crop_box", "flip"  # rows with outputs; the recorded crops


class TeacherCacheError(RuntimeError):
    """A cache that is missing, corrupt, or made for another teacher, data or transform."""


def refuse_random_augmentation(datamodule: object) -> None:
    """A data module's ``teacher_cache_dataset`` refuses a training split augmented at random
    when the cache is of fixed inputs (no recorded views)."""
    if getattr(datamodule, "augment", False):
        raise TeacherCacheError(
            f"{type(datamodule).__name__} augments the training images at random, so the teacher would see other "
            "inputs than the cached ones: record the augmented views (`mmkd cache --views V`, file data modules) "
            "or set --data.init_args.augment=false"
        )


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over the raw bytes of tensors, in order (their content fingerprint)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as meta.json reads it back (tuples as lists)."""
    return json.loads(json.dumps(value))


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
        if self.meta.get("version") not in (1, CACHE_VERSION):
            raise TeacherCacheError(f"{self.path} was written by cache format {self.meta.get('version')}, this mmkd reads {CACHE_VERSION}; rebuild it")
        self.views: int | None = self.meta.get("views")
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
        fingerprint = _plain(fingerprint)
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

    def recorded_views(self) -> dict[str, np.ndarray]:
        """The crop of every recorded view: ``crop_box`` [V, N, 4] (left, top, right, bottom in the
        image file's pixels) and ``flip`` [V, N], and where samples were mixed ``mix_partner``
        [V, N] and ``mix_params`` [V, N, 4], memory-mapped (what a data module replays)."""
        if not self.views:
            raise TeacherCacheError(f"teacher cache {self.path} holds fixed inputs, no recorded views")
        names = [name for name in (CROP_BOX, FLIP, MIX_PARTNER, MIX_PARAMS) if name in self.arrays]
        return {name: self.arrays[name].reshape(self.views, len(self), *self.arrays[name].shape[1:]) for name in names}

    def lookup(self, indices: torch.Tensor, device: torch.device | str = "cpu", views: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher outputs of the samples ``indices`` (in their recorded ``views`` for a cache of
        views), float32, on ``device``."""
        rows = indices.detach().cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise TeacherCacheError(f"sample index {int(rows.max())} outside the cache of {len(self)} samples")
        if self.views:
            if views is None:
                raise TeacherCacheError(
                    f"teacher cache {self.path} holds {self.views} recorded views per sample, but the batch does not say which "
                    "view it holds: the data module does not replay the cached views (a file data module does)"
                )
            view_rows = views.detach().cpu().numpy().astype(np.int64)
            if view_rows.size and (view_rows.min() < 0 or view_rows.max() >= self.views):
                raise TeacherCacheError(f"view {int(view_rows.max())} outside the {self.views} views of teacher cache {self.path}")
            rows = view_rows * len(self) + rows
        if WRITTEN in self.arrays and rows.size and not self.arrays[WRITTEN][rows].all():
            row = int(rows[~self.arrays[WRITTEN][rows].astype(bool)][0])
            raise TeacherCacheError(
                f"teacher cache {self.path} has no outputs for sample {row % len(self)} (view {row // len(self)}): its file "
                "could not be decoded when the cache was built; training skips such files with on_bad_file=skip"
            )

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


# -- building ------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` a gloo process group of the ranks, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _open_partial(partial: Path, build: dict[str, Any]) -> int:
    """The folder of a build's finished shards: kept from a killed build of the same cache (the
    number of shards kept is returned), else made afresh."""
    build_file = partial / "build.json"
    if partial.is_dir() and build_file.is_file() and json.loads(build_file.read_text()) == build:
        for stale in partial.glob("*.tmp"):  # a shard being written when the build was killed
            stale.unlink()
        return len(list(partial.glob("shard-*.npz")))
    remove_path(partial)
    partial.mkdir(parents=True)
    build_file.write_text(json.dumps(build, indent=2))
    return 0


def _stored_outputs(distiller: Any, batch: dict, device: torch.device, topk: int | None, np_dtype: type) -> dict[str, np.ndarray]:
    """What a cache row holds for each sample of ``batch``: the teacher's logits (or their top-k
    and tail) and tapped features, in ``np_dtype``."""
    logits = distiller.teacher_forward({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).float()
    if topk:
        values, top, tail = _topk_with_tail(logits, min(topk, logits.shape[1]))
        index_dtype = np.int16 if logits.shape[1] <= np.iinfo(np.int16).max else np.int32
        stored = {"logits.values": values.cpu().numpy().astype(np_dtype), "logits.indices": top.cpu().numpy().astype(index_dtype),
                  "logits.tail": tail.cpu().numpy().astype(np_dtype)}  # fmt: skip
    else:
        stored = {LOGITS: logits.cpu().numpy().astype(np_dtype)}
    stored.update({path: value.float().cpu().numpy().astype(np_dtype) for path, value in distiller.teacher_tap.pop().items()})
    stored["num_classes"] = np.array(logits.shape[1])
    return stored


def _write_shard(partial: Path, shard: int, parts: list[dict[str, np.ndarray]]) -> None:
    """One finished shard, atomically (a kill leaves a ``.tmp`` file, removed on resume)."""
    arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0] if name != "num_classes"}
    target = partial / f"shard-{shard:05d}.npz"
    staged = target.with_name(target.name + ".tmp")
    with open(staged, "wb") as file:
        np.savez(file, num_classes=parts[0]["num_classes"], **arrays)
    os.replace(staged, target)


def _assemble(partial: Path, num_shards: int, num_rows: int, meta: dict[str, Any]) -> None:
    """The shards' rows into one memory-mapped ``.npy`` file per stored output, and meta.json."""
    arrays: dict[str, np.ndarray] = {}
    written = np.zeros(num_rows, dtype=np.uint8)
    for shard in range(num_shards):
        file = partial / f"shard-{shard:05d}.npz"
        with np.load(file) as parts:
            rows = parts["rows"]
            meta["num_classes"] = int(parts["num_classes"])
            for name in parts.files:
                if name in ("rows", "num_classes"):
                    continue
                values = parts[name]
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(partial / f"{len(arrays)}.npy", mode="w+", dtype=values.dtype, shape=(num_rows, *values.shape[1:]))
                arrays[name][rows] = values
            written[rows] = 1
    meta["missing_rows"] = int(num_rows - written.sum())
    if meta["missing_rows"]:
        arrays[WRITTEN] = np.lib.format.open_memmap(partial / f"{len(arrays)}.npy", mode="w+", dtype=np.uint8, shape=(num_rows,))
        arrays[WRITTEN][:] = written
    for array in arrays.values():
        array.flush()
    meta["files"] = {name: {"file": Path(array.filename).name, "shape": list(array.shape)} for name, array in arrays.items()}
    for shard in range(num_shards):
        (partial / f"shard-{shard:05d}.npz").unlink()
    (partial / "build.json").unlink()
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))


def _size_line(parts: dict[str, np.ndarray], batch_rows: int, num_rows: int, num_samples: int, views: int | None) -> str:
    per_row = {name: value.nbytes / batch_rows for name, value in parts.items() if name not in ("num_classes", "rows")}
    total = sum(per_row.values()) * num_rows
    detail = ", ".join(f"{name} {size:,.0f} B" for name, size in per_row.items())
    rows = f"{num_samples} samples x {views} views" if views else f"{num_samples} samples"
    return f"teacher cache: {rows}, {sum(per_row.values()):,.0f} bytes per {'view' if views else 'sample'} ({detail}): {total / 2**20:,.1f} MiB in all"


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
    views: int | None = None,
    shard_size: int = 8192,
) -> TeacherCache:
    """Run ``distiller``'s teacher over ``datamodule``'s training split once (in ``views``
    recorded augmented views per sample, or on fixed inputs) and store its logits and every
    tapped teacher feature the distiller's terms use (see the module docstring).

    Resumable: finished shards of ``shard_size`` rows are kept through a kill; the cache takes
    its name only when complete, so an interrupted build never leaves one that looks complete.
    """
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if views is not None and views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(out)
    rank, world = _distributed()
    if rank == 0:
        restore_swapped_out(out)
    _barrier(world)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to rebuild it")
    if not hasattr(datamodule, "teacher_cache_dataset"):
        raise TeacherCacheError(f"{type(datamodule).__name__} does not declare teacher_cache_dataset(); it cannot be cached")
    if hasattr(datamodule, "views_for"):  # a file data module: each model's view, as in training
        datamodule.views_for(distiller)
    distiller.check_training_data(datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    distiller.prepare_teacher(datamodule)  # the teacher's input as training makes it (normalisation, adapter)
    dataset, data_fingerprint = datamodule.teacher_cache_dataset(views)
    teacher = distiller.teacher
    device = next(teacher.parameters()).device
    num_samples = len(dataset)
    num_rows = num_samples * (views or 1)
    build = _plain({
        "version": CACHE_VERSION, "num_samples": num_samples, "views": views, "num_classes": None,
        "sources": [LOGITS, *sorted(distiller.teacher_tap.paths)], "topk": topk, "dtype": dtype,
        "teacher_weights_sha256": teacher.reference()["weights_sha256"], "teacher_checkpoint": teacher.checkpoint,
        "fingerprint": distiller.teacher_cache_fingerprint(data_fingerprint), "shard_size": shard_size,
    })  # fmt: skip

    partial = out.with_name(f".{out.name}.partial")
    if rank == 0:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a build of an earlier mmkd that was killed
            shutil.rmtree(stale, ignore_errors=True)
        kept = _open_partial(partial, build)
        if kept:
            print(f"teacher cache: resuming {out}, {kept} finished shard(s) kept in {partial}", flush=True)
    _barrier(world)
    shards = [(shard, start, min(start + shard_size, num_rows)) for shard, start in enumerate(range(0, num_rows, shard_size))]
    done = {int(file.name[6:11]) for file in partial.glob("shard-*.npz")}
    mine = [(shard, start, end) for shard, start, end in shards if shard % world == rank and shard not in done]
    batches = [(shard, end, list(range(b, min(b + batch_size, end)))) for shard, start, end in mine for b in range(start, end, batch_size)]

    def sample_key(row: int) -> int | tuple[int, int]:
        return (row % num_samples, row // num_samples) if views else row

    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_sampler=[[sample_key(row) for row in rows] for _, _, rows in batches],
                        collate_fn=getattr(datamodule, "collate_fn", None), num_workers=getattr(datamodule, "num_workers", 0))  # fmt: skip
    stream: Iterator = zip(batches, loader)
    if progress and rank == 0:
        from rich.progress import track

        stream = track(stream, description=f"teacher cache -> {out}", total=len(batches))
    parts: list[dict[str, np.ndarray]] = []
    size_said = rank != 0 or bool(done)
    try:
        for (shard, shard_end, rows), batch in stream:
            if isinstance(batch, dict) and "bad_files" in batch:
                for name in batch.pop("bad_files"):
                    print(f"teacher cache: skipped an image that cannot be decoded: {name}", flush=True)
            part = _stored_outputs(distiller, batch, device, topk, DTYPES[dtype])
            indices = batch["index"].cpu().numpy().astype(np.int64)
            part["rows"] = indices + num_samples * batch["view"].cpu().numpy().astype(np.int64) if views else indices
            if views:
                part[CROP_BOX] = batch[CROP_BOX].cpu().numpy().astype(np.float32)
                part[FLIP] = batch[FLIP].cpu().numpy().astype(np.uint8)
                if MIX_PARTNER in batch:
                    part[MIX_PARTNER] = batch[MIX_PARTNER].cpu().numpy().astype(np.int64)
                    part[MIX_PARAMS] = batch[MIX_PARAMS].cpu().numpy().astype(np.float32)
            if not size_said:
                print(_size_line(part, len(indices), num_rows, num_samples, views), flush=True)
                size_said = True
            parts.append(part)
            if rows[-1] == shard_end - 1:  # the shard's last batch
                _write_shard(partial, shard, parts)
                parts = []
    except BaseException:
        finished = len(list(partial.glob("shard-*.npz")))
        print(f"teacher cache: interrupted; {finished} of {len(shards)} shards are kept in {partial}: the same command resumes", flush=True)
        raise
    _barrier(world)
    if rank == 0:
        meta = {name: value for name, value in build.items() if name != "shard_size"}
        _assemble(partial, len(shards), num_rows, meta)
        swap_in(partial, out)  # an old cache stays whole until the new one takes its name
    _barrier(world)
    return TeacherCache(out)
