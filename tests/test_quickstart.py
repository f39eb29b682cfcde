"""The README's quick start, end to end on real data (shortened schedule)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_trains_teacher_student_and_kd(data_root: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "tools/quickstart.py"), "--teacher-epochs=1", "--student-epochs=1",
         "--limit-train-batches=0.2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    accuracies = dict(re.findall(r"\| (teacher|student alone|student \+ KD)[^|]*\|[^|]*\|\s+([\d.]+)%", run.stdout))
    assert set(accuracies) == {"teacher", "student alone", "student + KD"}, run.stdout
    # 86 batches of real data: the teacher is well past chance, the students learn too.
    assert float(accuracies["teacher"]) > 75.0
    assert float(accuracies["student alone"]) > 50.0 and float(accuracies["student + KD"]) > 50.0
    assert Path("runs/teachers/fmnist_resnet10t/last.ckpt").is_file()
    again = subprocess.run([sys.executable, str(REPO / "tools/quickstart.py"), "--teacher-epochs=1", "--student-epochs=1",
                            "--limit-train-batches=0.05", "--out=demo.json"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0 and "reusing the teacher" in again.stdout
    assert f"{accuracies['teacher']}%" in again.stdout  # the same teacher, tested again
    recorded = json.loads(Path("demo.json").read_text())  # the table as JSON, with the machine it ran on
    assert f"{100 * recorded['results']['teacher (ResNet-10-T, 1/2 width)']['test/acc']:.2f}" == accuracies["teacher"]
    assert recorded["results"]["student + KD (T=4)"]["params"] == 20423 and recorded["machine"]["threads"] >= 1
    longer = subprocess.run([sys.executable, str(REPO / "tools/quickstart.py"), "--teacher-epochs=2", "--student-epochs=1",
                             "--limit-train-batches=0.05"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert longer.returncode == 0 and "is from an unfinished run (fewer than 2 epochs): training the teacher again" in longer.stdout
