"""Reading weights from files without unpickling arbitrary objects, and file fingerprints."""

from __future__ import annotations

import argparse
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


#: entries of a checkpoint dict that hold the weights, in the order timm's ``load_state_dict`` tries
#: them: EMA weights first (``use_ema``), then the trained ones, then the MAE / DeiT release layout.
EMA_ENTRIES = ("state_dict_ema", "model_ema")
WEIGHT_ENTRIES = ("state_dict", "model")
#: wrapper prefixes that every key of a saved state dict carries: DDP / DataParallel and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | Path, prefix: str | None = None, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Load a state dict from a weights file or a checkpoint.

    Reads, without unpickling arbitrary objects (``weights_only=True``; the ``argparse.Namespace``
    of ``args`` that timm's and DeiT's training scripts store is allowed):

    - ``.safetensors``, and ``.pth``/``.pt``/``.bin`` files of a plain ``torch.save``d state dict;
    - a timm training checkpoint (``state_dict`` and ``state_dict_ema``; with ``use_ema``, the
      default as in timm's ``load_checkpoint``, the EMA weights when the file has them);
    - a dict that keeps the weights under ``model`` (the MAE and DeiT releases; ``model_ema``
      first with ``use_ema``);
    - a Lightning ``.ckpt`` (its ``state_dict``): for an mmkd run its keys under ``model.`` are
      taken and stripped, so that the network alone loads (of a ``Distiller`` checkpoint: the
      student);
    - an FSDP2 checkpoint folder, through :func:`consolidated_checkpoint`; ``zoo:NAME`` is a model
      of the zoo (:mod:`mmkd.zoo`).

    A wrapper prefix that *every* key carries, ``module.`` of DDP / DataParallel or ``_orig_mod.``
    of ``torch.compile``, is stripped (timm's ``clean_state_dict``). ``prefix`` (e.g.
    ``"backbone."``) keeps only the keys under it, stripped of it.
    """
    from timm.models import clean_state_dict

    path = resolve_checkpoint(path)
    state = read_checkpoint(path)
    if isinstance(state, dict) and not _is_state_dict(state):
        entries = (EMA_ENTRIES if use_ema else ()) + WEIGHT_ENTRIES
        entry = next((key for key in entries if isinstance(state.get(key), dict)), None)
        if entry is not None:
            state = state[entry]
            if entry == "state_dict" and prefix is None and any(k.startswith("model.") for k in state):  # Lightning
                prefix = "model."
    if not _is_state_dict(state):
        entries = f" (entries: {sorted(map(str, state))[:10]})" if isinstance(state, dict) else ""
        raise RuntimeError(
            f"{path} does not hold a state dict of tensors{entries}; mmkd reads a state dict itself, or one under "
            f"{', '.join(repr(e) for e in EMA_ENTRIES + WEIGHT_ENTRIES)}"
        )
    if state and all(k.startswith(WRAPPER_PREFIXES) for k in state):
        state = clean_state_dict(state)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise RuntimeError(f"{path} has no weights under the prefix {prefix!r}")
    return state


def _is_state_dict(state: Any) -> bool:
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


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
        # timm's and DeiT's training checkpoints keep their argparse arguments next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
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


def load_weights(
    module: nn.Module, path: str | Path, prefix: str | None = None, drop_head: bool = False, use_ema: bool = True
) -> None:
    """Strictly load weights from ``path`` (any form :func:`load_state_dict_file` reads) into
    ``module``; see :func:`load_state` for ``drop_head`` and for what a mismatch reports."""
    load_state(module, load_state_dict_file(path, prefix, use_ema), str(path), drop_head=drop_head)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str, drop_head: bool = False) -> None:
    """Strictly load ``state`` (read from ``source``) into ``module``.

    A module with a ``convert_state_dict(state) -> state`` method (like timm's
    ``checkpoint_filter_fn``) first gets to map another layout of its weights onto its own; a timm
    EfficientNet also reads EfficientNet-PyTorch's layout (:mod:`mmkd.models.convert`).
    ``drop_head`` leaves the classifier out, as timm does when pretrained weights meet another
    number of classes: the file's classifier weights (the names in the model's
    ``pretrained_cfg["classifier"]``, else its last ``nn.Linear``) are dropped and the model keeps
    its own new classifier; every other key must still match.

    A mismatch is a ``RuntimeError`` that names the first missing, unexpected and wrongly shaped
    keys and says what they suggest (:func:`_diagnosis`): a prefix that would make the keys match,
    a classifier of another size (``num_classes`` of the model vs the file's), another input
    channel count, or another architecture or width.
    """
    if hasattr(module, "convert_state_dict"):
        state = module.convert_state_dict(state)
    from mmkd.models.convert import efficientnet_pytorch_to_timm, is_efficientnet_pytorch

    if is_efficientnet_pytorch(state) and hasattr(module, "blocks") and hasattr(module, "conv_stem"):
        state = efficientnet_pytorch_to_timm(state, module)  # EfficientNet-PyTorch's layout, onto timm's modules
    own = module.state_dict()
    head: set[str] = set()
    if drop_head:
        head = classifier_keys(module)
        if not head:
            raise ValueError(
                f"drop_head: cannot tell which weights of {type(module).__name__} are its classifier (no timm "
                "pretrained_cfg['classifier'] and no nn.Linear); load the weights without drop_head"
            )
        state = {k: v for k, v in state.items() if k not in head}
    missing = sorted(set(own) - set(state) - head)
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def first(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [f"missing keys: {first(missing)}"] if missing else []
        parts += [f"unexpected keys: {first(unexpected)}"] if unexpected else []
        shapes = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in wrong]
        parts += [f"shape mismatches: {first(shapes)}"] if wrong else []
        raise RuntimeError(
            f"weights in {source} do not fit {type(module).__name__}: " + "; ".join(parts) + "."
            + _diagnosis(module, own, state, missing, unexpected, wrong)
        )
    module.load_state_dict(state, strict=not head)


def classifier_keys(module: nn.Module) -> set[str]:
    """State-dict keys of a model's classifier: ``weight`` and ``bias`` of the modules named by
    timm's ``pretrained_cfg["classifier"]`` (one name or several, e.g. a distilled ViT's two
    heads), else of the model's last ``nn.Linear`` (torchvision's ``fc``, ``classifier.6``, ...)."""
    names = (getattr(module, "pretrained_cfg", None) or {}).get("classifier")
    if not names:
        linear = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
        names = linear[-1:]
    names = [names] if isinstance(names, str) else list(names)
    return {f"{name}.{param}" for name in names for param in ("weight", "bias")}


def _diagnosis(
    module: nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
    missing: list[str], unexpected: list[str], wrong: list[str],
) -> str:  # fmt: skip
    """What a mismatch of ``state`` with ``module``'s own weights suggests, and the fix, as
    sentences: a prefix that would make the keys match (:func:`_prefix_hint`), a classifier of
    another size, another number of input channels, or another architecture or width."""
    hint = _prefix_hint(set(own), set(state))
    if hint:
        return hint
    head = classifier_keys(module)
    first_conv = (getattr(module, "pretrained_cfg", None) or {}).get("first_conv")
    first_conv_weight = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    sentences = []
    if set(missing) | set(unexpected) | set(wrong) <= head | {first_conv_weight}:
        head_wrong = [k for k in wrong if k in head]
        if head_wrong:
            key = next((k for k in head_wrong if k.endswith(".weight")), head_wrong[0])
            model_classes, file_classes = own[key].shape[0], state[key].shape[0]
            sentences.append(
                f"Only the classifier differs ({key}): the model has num_classes={model_classes}, the file's classifier "
                f"has {file_classes} outputs. To keep the file's classifier (a teacher), set the model's "
                f"num_classes: {file_classes}; to train a new classifier on the file's backbone (a student of other "
                "classes), load it with checkpoint_drop_head: true (mmkd.models.timm_model / torchvision_model)."
            )
        elif missing or unexpected:
            has = "has no classifier weights" if missing else "has classifier weights that the model (num_classes=0?) lacks"
            sentences.append(
                f"Only the classifier differs: the file {has}; load it with checkpoint_drop_head: true "
                "(mmkd.models.timm_model / torchvision_model) to keep the model's own classifier."
            )
        if first_conv_weight in wrong:
            file_shape, model_shape = list(state[first_conv_weight].shape), list(own[first_conv_weight].shape)
            if len(file_shape) == 4 and file_shape[:1] + file_shape[2:] == model_shape[:1] + model_shape[2:]:
                sentences.append(
                    f"The file's first convolution ({first_conv}) takes {file_shape[1]} input channel(s), the model's "
                    f"{model_shape[1]}: set in_chans: {file_shape[1]} (and feed {file_shape[1]}-channel images)."
                )
    if sentences:
        return " " + " ".join(sentences)
    common = set(own) & set(state)
    if wrong or (missing and unexpected):
        return (
            f" The file seems to hold another architecture or width than this {type(module).__name__}: "
            f"{len(wrong)} of the {len(common)} tensors that both have differ in shape, and {len(missing)} of the "
            f"model's {len(own)} keys are not in the file. Check the model name and its model_args (channels, "
            "width, depth, patch size) against those the file was trained with."
        )
    if missing:
        return " The file holds only part of the model (a backbone alone?). Check that the model config matches the one the checkpoint was trained with."
    return " The file holds more than the model. Check that the model config matches the one the checkpoint was trained with."


def _key_prefixes(keys: set[str], depth: int = 2) -> set[str]:
    """The dotted prefixes (``"module."``, ``"model.backbone."``) of ``keys``, up to ``depth`` parts."""
    prefixes = set()
    for key in keys:
        parts = key.split(".")
        prefixes.update(".".join(parts[:d]) + "." for d in range(1, min(depth, len(parts) - 1) + 1))
    return prefixes


def _prefix_hint(own: set[str], found: set[str]) -> str:
    """Where the file's keys are the model's under a prefix (``module.`` of DDP, ``model.`` of a
    Lightning module, ``student.`` or ``backbone.`` of a larger model), or without one the model
    has, a sentence that says so and how to load them: the prefix that makes the most keys match,
    if it matches more than the keys as they are and at least half of the smaller side."""
    base = len(own & found)
    best: tuple[int, str, str] = (base, "", "")
    for prefix in sorted(_key_prefixes(found)):
        matched = len({k[len(prefix) :] for k in found if k.startswith(prefix)} & own)
        if matched > best[0]:
            best = (matched, "strip", prefix)
    for prefix in sorted(_key_prefixes(own)):
        matched = len({prefix + k for k in found} & own)
        if matched > best[0]:
            best = (matched, "add", prefix)
    matched, direction, prefix = best
    if not direction or matched < 0.5 * min(len(own), len(found)):
        return ""
    if direction == "strip":
        under = {k[len(prefix) :] for k in found if k.startswith(prefix)}
        fix = (
            f"load them with checkpoint_prefix: {prefix!r} (an argument of mmkd.core.Teacher and of "
            "mmkd.models.timm_model / torchvision_model)"
        )
        if under == own and len(under) == len(found):
            return f" The file's keys are the model's with the prefix {prefix!r} in front: {fix}, or save the unwrapped model's state_dict."
        if under == own:
            return f" The model's weights are the file's keys under the prefix {prefix!r} ({len(under)} of its {len(found)} keys): {fix}."
        return (
            f" With the prefix {prefix!r} stripped, {matched} of the model's {len(own)} keys are in the file "
            f"(without it: {base}): {fix}, and check the model config against the file's for the rest."
        )
    exact = {prefix + k for k in found} == own
    return (
        f" The file's keys are the model's without the prefix {prefix!r}"
        + ("" if exact else f" ({matched} of the file's {len(found)} keys match with it)")
        + f": the file holds the weights of the model's {prefix[:-1]!r} part alone; load it into that part, "
        "or save the whole model's state_dict."
    )


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
