"""Reading weights from files without unpickling arbitrary objects, and file fingerprints."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """The local path a weights argument names: ``zoo:NAME`` fetched (and verified) from the zoo,
    ``~`` expanded."""
    if str(path).startswith("zoo:"):
        from mmkd import zoo

        return zoo.fetch(str(path)[len("zoo:") :])
    return Path(path).expanduser()


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a weights file, or of an FSDP2 checkpoint folder (every file's relative name and
    content, in name order); ``zoo:NAME`` and ``~`` as :func:`load_state_dict_file` reads them."""
    path = resolve_checkpoint(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{sha256_file(file)}".encode())
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Fingerprint of a module's weights (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_state_dict_file(path: str | Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors``, a Lightning ``.ckpt`` or a plain ``torch.save`` file.

    Pickled files are read with ``weights_only=True``. For a Lightning checkpoint the
    ``state_dict`` entry is used. ``prefix`` (e.g. ``"model."``) keeps only keys under it and strips
    it; by default a Lightning checkpoint of an mmkd ``Classifier``/``Distiller`` is stripped of
    ``model.`` so that the network alone loads. Files that keep the weights under ``"model"``
    (the MAE and DeiT releases) are read from there, and an FSDP2 checkpoint folder is read
    through :func:`consolidated_checkpoint`; ``zoo:NAME`` is a model of the zoo (:mod:`mmkd.zoo`).
    """
    path = resolve_checkpoint(path)
    state = read_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
        if prefix is None and any(k.startswith("model.") for k in state):
            prefix = "model."
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):  # MAE / DeiT release files
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} does not hold a state dict of tensors")
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise RuntimeError(f"{path} has no weights under the prefix {prefix!r}")
    return state


def read_checkpoint(path: str | Path) -> Any:
    """What a weights file or checkpoint holds, without unpickling objects: a ``.safetensors``
    file's tensors, a ``torch.save``d file (a Lightning checkpoint: its whole dict), or an FSDP2
    checkpoint folder consolidated. Missing and unreadable files are clear errors."""
    path = Path(path)
    try:
        if (path / ".metadata").is_file():
            return consolidated_checkpoint(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        detail = (str(err).strip().splitlines() or [""])[-1]  # its text holds every rank's traceback: the cause is last
        raise RuntimeError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {detail}). It is corrupt, truncated (a run killed "
            "while saving?) or not a weights file; re-create or re-download it, or use an earlier checkpoint."
        ) from err


def consolidated_checkpoint(folder: str | Path) -> dict:
    """A Lightning checkpoint saved by FSDP2 as a folder of shards (torch.distributed.checkpoint),
    read back in one process as a single checkpoint: weights (``state_dict``) and the metadata
    (epoch, loops, ``mmkd`` records). The optimizer states are left out: this is for evaluation,
    export and initialising other runs; resuming stays with the folder under FSDP2."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/full.pt")
        shards = torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=True)
    meta = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True) if (folder / "meta.pt").is_file() else {}
    return {**meta, "state_dict": shards["state_dict"]}


def load_weights(module: nn.Module, path: str | Path, prefix: str | None = None) -> None:
    """Strictly load weights from ``path`` into ``module``; a mismatch names the keys and shapes.

    A module with a ``convert_state_dict(state) -> state`` method (like timm's
    ``checkpoint_filter_fn``) first gets to map another layout of its weights onto its own.
    """
    load_state(module, load_state_dict_file(path, prefix), str(path))


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state`` (read from ``source``) into ``module``; see :func:`load_weights`."""
    if hasattr(module, "convert_state_dict"):
        state = module.convert_state_dict(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [f"missing keys: {head(missing)}"] if missing else []
        parts += [f"unexpected keys: {head(unexpected)}"] if unexpected else []
        parts += [f"shape mismatches: {head(wrong_shape)}"] if wrong_shape else []
        raise RuntimeError(
            f"weights in {source} do not fit {type(module).__name__}: " + "; ".join(parts)
            + ". Check that the model config matches the one the checkpoint was trained with." + _prefix_hint(set(own), set(state))
        )
    module.load_state_dict(state)


def _prefix_hint(own: set[str], found: set[str]) -> str:
    """Where the file's keys are the model's under another prefix (``module.`` of DDP, ``student.``
    of a distiller, or none where one is expected), a sentence that says so."""
    for key in list(found)[:1] + list(own)[:1]:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            if {k.removeprefix(prefix) for k in found} == own:
                return f" The file's keys are the model's with the prefix {prefix!r} in front: strip it when saving the weights."
            if {prefix + k for k in found} == own:
                return f" The file's keys are the model's without the prefix {prefix!r}."
    return ""


def remove_path(path: Path) -> None:
    """Delete a file or a folder, if there is one."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def swap_in(staged: Path, target: Path) -> None:
    """Put the complete file or folder ``staged`` in the place of ``target`` by two renames, so the
    old ``target`` stays whole until the new one takes its name. A kill between the renames leaves
    the old one as ``.NAME.old`` (see :func:`restore_swapped_out`)."""
    old = target.with_name(f".{target.name}.old")
    remove_path(old)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    remove_path(old)


def restore_swapped_out(target: Path) -> None:
    """Put back a ``target`` that a kill between :func:`swap_in`'s renames left as ``.NAME.old``."""
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        old.rename(target)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks: the checkpoint is written to a
    hidden temporary file in the target's folder, flushed to disk, then renamed over the target
    (``os.replace`` is atomic within one file system). A process killed while saving leaves the
    previous ``last.ckpt`` whole; the partial temporary file it leaves is removed by the next save
    of that path. (Lightning's own writer stages the file in the system temp folder and moves it,
    which is a copy, not a rename, when that folder is another file system.) Remote paths go
    through Lightning's writer. ``mmkd`` uses this writer unless the config sets another ``CheckpointIO`` plugin.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
