"""The model zoo: the repository's students against their recorded metrics, and downloads from a
real HTTP server on loopback (resume after a cut, a tampered file, 404, connection refused, a
pickle payload that must never run)."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.detection import MeanAveragePrecision

from mmkd import zoo
from mmkd.cli import lightning_cli, main
from mmkd.core import Teacher
from mmkd.data.detection import detection_predictions, detection_targets
from mmkd.models import timm_model

from conftest import CONFIGS, REPO, SHORT  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import compose_detection  # noqa: E402
import zoo_publish  # noqa: E402


class Files(BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes) with HTTP range requests; ``cut`` (path -> bytes) closes
    the connection after that many bytes of the body, once."""

    files: dict[str, bytes] = {}
    cut: dict[str, int] = {}
    ranges: list[str | None] = []

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.ranges.append(self.headers.get("Range"))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        limit = self.cut.pop(self.path, None)
        self.wfile.write(body[start : start + limit] if limit is not None else body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    Files.files, Files.cut, Files.ranges = {}, {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def student_file(tmp_path: Path) -> bytes:
    torch.manual_seed(0)
    model = timm_model("resnet10t", num_classes=10, in_chans=1, model_args={"channels": [4, 8, 16, 32], "stem_width": 4})
    save_file(model.state_dict(), str(tmp_path / "student.safetensors"))
    return (tmp_path / "student.safetensors").read_bytes()


def use_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: str, payload: bytes, name: str = "tiny") -> None:
    """A manifest with one entry for ``payload``, served at ``server``; no repository files."""
    architecture = json.loads((zoo.REPO_ZOO / "manifest.json").read_text())["models"][0]["architecture"]
    entry = {"name": name, "architecture": architecture, "file": f"{name}.safetensors", "url": None,
             "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("MMKD_ZOO_MANIFEST", str(tmp_path / "manifest.json"))
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMKD_ZOO_URL", server)
    monkeypatch.setattr(zoo, "REPO_ZOO", tmp_path / "no-repository")


def cached_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "zoo").glob("*") if p.is_file())


def test_repository_students_load_and_score_their_recorded_metrics(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "cache"))  # nothing cached: read from model_zoo/files
    for name, entry in zoo.entries().items():
        assert entry["sha256"] and entry["size"] and entry["licence"] and entry["metrics"]["command"]
        model = zoo.load(name)
        if "test/map" in entry["metrics"]:  # a detector, measured on the composed scenes' test split
            # every scene is a function of (seed, split, index): the 500 test scenes alone are the same
            scenes = compose_detection.compose(tmp_path / "fmnist-det", data_root / "fashion-mnist", {"test": 500})
            data, metric = zoo.evaluation_data(name, root=str(scenes), batch_size=100), MeanAveragePrecision(backend="pycocotools")

            def update(batch: dict, outputs: dict) -> None:
                sizes = torch.stack([target["orig_size"] for target in batch["targets"]])
                metric.update(detection_predictions(outputs["pred_logits"], outputs["pred_boxes"], sizes), detection_targets(batch["targets"]))

            key, value = "test/map", lambda: metric.compute()["map"]
        else:
            data, metric = zoo.evaluation_data(name, root=str(data_root), batch_size=500), MulticlassAccuracy(10, average="micro")
            update, key, value = (lambda batch, logits: metric.update(logits, batch["label"])), "test/acc", lambda: metric.compute()
        data.setup("test")
        with torch.no_grad():
            for batch in data.test_dataloader():
                update(batch, model(batch[entry.get("input_key", "image")]))
        assert float(value()) == pytest.approx(entry["metrics"][key], abs=1e-4), name
    assert cached_files(tmp_path) == []  # the repository's files were used where they are


def test_a_zoo_model_as_teacher_weights_records_the_file_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "cache"))
    entry = zoo.info("fmnist-resnet10t-kd")
    teacher = Teacher(zoo.build(entry["architecture"]), checkpoint="zoo:fmnist-resnet10t-kd")
    assert teacher.reference()["checkpoint_sha256"] == entry["sha256"]
    torch.testing.assert_close(teacher.model.state_dict(), zoo.load("fmnist-resnet10t-kd").state_dict())


def test_download_verifies_caches_and_resumes_a_cut_transfer(server: str, student_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manifest(monkeypatch, tmp_path, server, student_file)
    Files.files["/tiny.safetensors"] = student_file
    Files.cut["/tiny.safetensors"] = len(student_file) // 3
    with pytest.raises(zoo.ZooError, match="transfer of tiny was cut.*run the download again to resume"):
        zoo.fetch("tiny", progress=False)
    assert cached_files(tmp_path) == []  # only the partial file, out of the cache proper
    assert (tmp_path / "cache/zoo/.partial/tiny.safetensors").stat().st_size == len(student_file) // 3
    path = zoo.fetch("tiny", progress=False)
    assert Files.ranges == [None, f"bytes={len(student_file) // 3}-"]  # the second request resumed
    assert path.read_bytes() == student_file and cached_files(tmp_path) == ["tiny.safetensors"]
    model = zoo.load("tiny")  # from the cache: no new request
    assert len(Files.ranges) == 2 and not model.training
    torch.testing.assert_close(model.state_dict()["fc.weight"], timm_model("resnet10t", checkpoint="zoo:tiny", model_args={"channels": [4, 8, 16, 32], "stem_width": 4}).state_dict()["fc.weight"])
    # a partial file longer than the entry's (left from an older, larger version of it) is started over
    (tmp_path / "cache/zoo/.partial/tiny.safetensors").write_bytes(b"x" * (len(student_file) + 10))
    assert zoo.fetch("tiny", progress=False, force=True).read_bytes() == student_file and Files.ranges[-1] is None


def test_a_tampered_file_is_deleted_and_reported(server: str, student_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manifest(monkeypatch, tmp_path, server, student_file)
    tampered = bytearray(student_file)
    tampered[-10] ^= 0xFF
    Files.files["/tiny.safetensors"] = bytes(tampered)
    with pytest.raises(zoo.ZooError, match="checksum mismatch for tiny.*The file was deleted"):
        zoo.fetch("tiny", progress=False)
    assert cached_files(tmp_path) == [] and not list((tmp_path / "cache/zoo/.partial").iterdir())


def test_missing_file_and_unreachable_server_are_clear_errors(server: str, student_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_manifest(monkeypatch, tmp_path, server, student_file)
    with pytest.raises(zoo.ZooError, match="answered HTTP 404"):
        zoo.fetch("tiny", progress=False)
    monkeypatch.setenv("MMKD_ZOO_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(zoo.ZooError, match="cannot reach http://127.0.0.1:9/tiny.safetensors.*Connection refused"):
        zoo.fetch("tiny", progress=False)
    assert cached_files(tmp_path) == []
    monkeypatch.delenv("MMKD_ZOO_URL")
    with pytest.raises(zoo.ZooError, match="tiny.safetensors of tiny is neither in .* nowhere to download it from: set MMKD_ZOO_URL"):
        zoo.fetch("tiny", progress=False)
    with pytest.raises(zoo.ZooError, match="no zoo model named 'tinny'; close names: \\['tiny'\\]"):
        zoo.info("tinny")


def test_build_names_a_bad_class_path():
    """A manifest's evaluation-data spec with a mistyped class_path: the error names the module and
    the close names, as a config's would (not a bare AttributeError)."""
    with pytest.raises(ValueError, match="'mmkd.data' has no 'FashionMNISTDataModul'; close names: \\['FashionMNISTDataModule'"):
        zoo.build({"class_path": "mmkd.data.FashionMNISTDataModul", "init_args": {}})
    with pytest.raises(ValueError, match="cannot import 'mmdk.data' for the class_path"):
        zoo.build({"class_path": "mmdk.data.FashionMNISTDataModule"})


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("pickle-payload-ran"),))


def test_a_pickle_is_never_unpickled(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"fc.weight": Payload()}, tmp_path / "evil.pt")
    payload = (tmp_path / "evil.pt").read_bytes()
    use_manifest(monkeypatch, tmp_path, server, payload)  # even with the manifest's checksum matching it
    Files.files["/tiny.safetensors"] = payload
    with pytest.raises(zoo.ZooError, match="is not a safetensors file.*never unpickled"):
        zoo.load("tiny")
    assert not Path("pickle-payload-ran").exists()


def test_publish_tool_writes_an_entry_that_rebuilds_the_student(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = str(CONFIGS / "g2sd/vit_alone.yaml")  # a timm ViT: jsonargparse fills in class objects as defaults
    lightning_cli(["fit", "-c", config, *SHORT, "--trainer.callbacks.init_args.dirpath=vit"])
    monkeypatch.setattr(zoo, "REPO_ZOO", tmp_path / "zoo")
    monkeypatch.setenv("MMKD_ZOO_MANIFEST", str(tmp_path / "zoo" / "manifest.json"))
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["zoo_publish.py", "--name", "vit-3-steps", "-c", config, "--ckpt", "vit/last.ckpt", "--distiller", "none",
                                      "--teacher", "none", "--data", "3 batches", "--summary", "a ViT", "--trainer.limit_test_batches=2"])  # fmt: skip
    zoo_publish.main()  # ends by checking that zoo.load gives the checkpoint's outputs
    entry = zoo.info("vit-3-steps")
    path = tmp_path / "zoo" / "files" / "vit-3-steps.safetensors"
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and entry["size"] == path.stat().st_size
    assert entry["params"] == 116938 and 0.0 <= entry["metrics"]["test/acc"] <= 1.0
    assert entry["metrics"]["command"].startswith(f"mmkd test -c {config} --ckpt_path vit/last.ckpt")
    assert "embed_layer" not in entry["architecture"]["init_args"] and entry["architecture"]["init_args"]["embed_dim"] == 48
    assert "root" not in entry["evaluation_data"]["init_args"]  # no local paths
    vit = {"class_path": "timm.models.vision_transformer.VisionTransformer", "init_args": {"embed_layer": torch.nn.Identity}}
    with pytest.raises(ValueError, match="embed_layer=.*Identity.*a Python object, not a default"):
        zoo_publish.portable(vit)
    # a publication that fails to measure leaves the published file and the manifest as they were
    published = {p.name: p.read_bytes() for p in (path, tmp_path / "zoo" / "manifest.json")}
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--data.init_args.root=no-data-here", "--data.init_args.download=false"])
    with pytest.raises(FileNotFoundError):
        zoo_publish.main()
    assert {p.name: p.read_bytes() for p in (tmp_path / "zoo").rglob("*") if p.is_file()} == published
    (tmp_path / "zoo" / "manifest.json").write_text('{"models": [')  # cut short
    with pytest.raises(SystemExit):
        main(["zoo", "list"])
    assert "is not a valid manifest (JSONDecodeError" in capsys.readouterr().err


def test_zoo_command(capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKD_CACHE", str(tmp_path / "cache"))
    main(["zoo", "list"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in zoo.entries())
    assert "acc 88.54 %" in listed and "mAP " in listed  # each entry with its own metric
    main(["zoo", "info", "fmnist-resnet10t-kd"])
    assert json.loads(capsys.readouterr().out)["distiller"] == "KD"
    main(["zoo", "verify"])
    assert "fmnist-resnet10t-kd" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["zoo", "download", "no-such-model"])
    assert exit_.value.code == 2 and "no zoo model named 'no-such-model'" in capsys.readouterr().err
