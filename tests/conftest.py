"""Shared fixtures. Tests read the real data in ../shared/data (Fashion-MNIST, MNIST digits);
where that folder is absent (a user's clone), the data-dependent tests are skipped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DATA_ROOT = Path(os.environ.get("MMKD_DATA") or SHARED_DATA).resolve()  # tests chdir into tmp dirs

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernels are defined (at import of mmkd.losses).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def one_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Runs ``mmkd argv``, which must end in exactly one ``mmkd: error:`` line and exit code 2; returns that line."""
    from mmkd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err and err[-1].startswith("mmkd: error: ") and sum("mmkd: error" in line for line in err) == 1, err
    return err[-1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT} (set MMKD_DATA)")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if (DATA_ROOT / "fashion-mnist").is_dir():
        monkeypatch.setenv("MMKD_DATA", str(DATA_ROOT))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs write runs/ and logs relative to the working directory: keep them in tmp."""
    monkeypatch.chdir(tmp_path)


# -- a teacher trained once per session by the shipped recipe, for the distillation tests --------
CONFIGS = REPO / "configs"
TEACHER_CKPT = "runs/teachers/fmnist_resnet10t/last.ckpt"  # where configs/kd/*.yaml look for it
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A teacher trained for 40 real batches with the shipped teacher recipe."""
    from mmkd.cli import lightning_cli  # imported late: mmkd must see TRITON_INTERPRET set above

    workdir = tmp_path_factory.mktemp("teacher")
    lightning_cli([
        "fit", "-c", str(CONFIGS / "teachers/fmnist_resnet10t.yaml"), *SHORT, "--trainer.limit_train_batches=40",
        f"--trainer.callbacks.init_args.dirpath={workdir}", f"--trainer.logger.init_args.save_dir={workdir}/logs",
        f"--data.init_args.root={data_root}",
    ])  # fmt: skip
    return workdir / "last.ckpt"


@pytest.fixture
def teacher_in_place(trained_teacher: Path) -> Path:
    """The teacher copied to where the shipped KD configs expect it, under the test's cwd."""
    target = Path(TEACHER_CKPT)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained_teacher, target)
    return target
