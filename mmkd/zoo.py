"""The model zoo: pretrained students listed in ``model_zoo/manifest.json``, fetched into a cache,
verified by sha256, and rebuilt from their architecture spec plus safetensors weights (nothing is
ever unpickled).

Where a file comes from, in order: the cache (``$MMKD_CACHE/zoo``, default ``~/.cache/mmkd/zoo``),
the repository's ``model_zoo/files/`` (a source checkout works offline), then
``$MMKD_ZOO_URL/<file>`` (or the entry's own ``url``; no public mirror is published yet, so
without either a file outside the repository is an error that says so). Downloads show a
progress bar, resume a cut transfer (the partial file waits in ``<cache>/.partial/``), and reach
the cache only complete and verified (written by an atomic rename).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from torch import nn

from mmkd.core.checkpoint import sha256_file
from mmkd.core.imports import import_object

REPO_ZOO = Path(__file__).resolve().parents[1] / "model_zoo"


class ZooError(RuntimeError):
    """A zoo entry cannot be fetched or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("MMKD_CACHE", Path.home() / ".cache" / "mmkd")).expanduser() / "zoo"


def manifest_path() -> Path:
    return Path(os.environ.get("MMKD_ZOO_MANIFEST", REPO_ZOO / "manifest.json"))


def entries() -> dict[str, dict[str, Any]]:
    """The manifest's entries by name."""
    path = manifest_path()
    if not path.is_file():
        raise ZooError(f"zoo manifest not found at {path}; set MMKD_ZOO_MANIFEST or use a source checkout")
    try:
        return {entry["name"]: entry for entry in json.loads(path.read_text())["models"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ZooError(
            f"zoo manifest {path} is not a valid manifest ({type(err).__name__}: {err}); restore it "
            "(git checkout model_zoo/manifest.json) or point MMKD_ZOO_MANIFEST at a valid one"
        ) from None


def info(name: str) -> dict[str, Any]:
    known = entries()
    if name not in known:
        import difflib

        raise ZooError(f"no zoo model named {name!r}; close names: {difflib.get_close_matches(name, known, n=5)}. `mmkd zoo list` lists all.")
    return known[name]


def _url(entry: dict[str, Any]) -> str:
    if entry.get("url"):
        return entry["url"]
    base = os.environ.get("MMKD_ZOO_URL")
    if not base:  # no public mirror is published yet: the repository's files are the zoo
        raise ZooError(f"{entry['file']} of {entry['name']} is neither in {cache_dir()} nor in the repository's model_zoo/files/, "
                       "and there is nowhere to download it from: set MMKD_ZOO_URL to the base URL of a mirror "
                       "of the zoo files, or use a source checkout")  # fmt: skip
    return f"{base.rstrip('/')}/{entry['file']}"


def _download(url: str, target: Path, entry: dict[str, Any], progress: bool) -> None:
    from tqdm import tqdm

    partial = target.parent / ".partial" / target.name
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > entry["size"]:  # left from another version of the file (the entry was republished): start over
        partial.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have == entry["size"]:  # already complete: only the check is left
            response = None
        else:
            raise ZooError(f"download of {entry['name']} failed: {url} answered HTTP {err.code} ({err.reason}). "
                           "Check MMKD_ZOO_URL or the entry's url.") from None  # fmt: skip
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ZooError(f"cannot reach {url} ({reason}) to download {entry['name']}. Offline, only models already in "
                       f"{cache_dir()} or in the repository's model_zoo/files/ can be loaded.") from None  # fmt: skip
    if response is not None:
        resuming = response.status == 206
        mode = "ab" if resuming else "wb"
        done = have if resuming else 0
        try:
            with response, open(partial, mode) as f, tqdm(total=entry["size"], initial=done, unit="B", unit_scale=True,
                                                          desc=entry["name"], disable=not progress) as bar:  # fmt: skip
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
            raise ZooError(f"the transfer of {entry['name']} was cut ({type(err).__name__}); run the download again to "
                           "resume it") from None  # fmt: skip
    size = partial.stat().st_size
    if size < entry["size"]:
        raise ZooError(f"the transfer of {entry['name']} was cut at {size} of {entry['size']} bytes; run the download again to resume it")
    digest = sha256_file(partial)
    if size != entry["size"] or digest != entry["sha256"]:
        partial.unlink()
        raise ZooError(f"checksum mismatch for {entry['name']} from {url}: sha256 {digest[:16]}..., {size} bytes; the "
                       f"manifest says {entry['sha256'][:16]}..., {entry['size']} bytes. The file was deleted.")  # fmt: skip
    os.replace(partial, target)


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """The verified weights file of a zoo model (see the module docstring for the order)."""
    entry = info(name)
    target = cache_dir() / entry["file"]
    if not force and target.is_file():
        if sha256_file(target) == entry["sha256"]:
            return target
        target.unlink()  # damaged in the cache: fetch it again
    in_repo = REPO_ZOO / "files" / entry["file"]
    if not force and in_repo.is_file() and sha256_file(in_repo) == entry["sha256"]:
        return in_repo
    target.parent.mkdir(parents=True, exist_ok=True)
    _download(_url(entry), target, entry, progress)
    return target


def build(spec: Any) -> Any:
    """Instantiate a ``{"class_path", "init_args"}`` spec (nested specs first), as a config would."""
    if isinstance(spec, dict) and "class_path" in spec:
        factory = import_object(spec["class_path"], "class_path")
        return factory(**{key: build(value) for key, value in spec.get("init_args", {}).items()})
    if isinstance(spec, list):
        return [build(value) for value in spec]
    return spec


def evaluation_data(name: str, **init_args: Any) -> Any:
    """The data module that measured a zoo entry's metrics (its manifest's ``evaluation_data``;
    Fashion-MNIST for the entries older than that field), with ``init_args`` overriding its own
    (``root``, ``batch_size``). Batches hold the model's input under the entry's ``input_key``."""
    spec = info(name).get("evaluation_data") or {"class_path": "mmkd.data.FashionMNISTDataModule", "init_args": {}}
    return build({**spec, "init_args": {**spec.get("init_args", {}), **init_args}})


def load(name: str) -> nn.Module:
    """A zoo model, built and loaded, in eval mode. Usable as a config's student or teacher model:
    ``{"class_path": "mmkd.zoo.load", "init_args": {"name": NAME}}``; ``checkpoint: zoo:NAME``
    loads a zoo file into a model the config builds itself."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmkd.core.checkpoint import load_state

    entry = info(name)
    path = fetch(name)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ZooError(f"{path} is not a safetensors file ({err}); zoo files are never unpickled") from None
    model = build(entry["architecture"])
    load_state(model, state, str(path))
    return model.eval()


def verify() -> dict[str, str]:
    """Status of every entry's local file: ``ok``, ``missing`` or ``corrupt`` (a corrupt cached
    file is deleted, so the next fetch downloads it again)."""
    status = {}
    for name, entry in entries().items():
        found = [p for p in (cache_dir() / entry["file"], REPO_ZOO / "files" / entry["file"]) if p.is_file()]
        if not found:
            status[name] = "missing"
            continue
        bad = [p for p in found if sha256_file(p) != entry["sha256"]]
        for path in bad:
            if path.parent == cache_dir():
                path.unlink()
        status[name] = f"corrupt ({', '.join(map(str, bad))})" if bad else f"ok ({found[0]})"
    return status
