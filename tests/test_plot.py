"""`mmkd plot`: metrics.csv's half-empty rows merged per step, and the PNG figures of real short
runs (KD with a teacher, DHO's mix, D-FINE's edge distributions) drawn through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmkd.cli import main
from mmkd.plot import DHO_SURFACE, load_run, plot_runs, read_dho_surface, read_metrics

from conftest import CONFIGS, SHORT, one_error  # noqa: E402
from test_dfine import scenes  # noqa: E402, F401  (the fixture: composed Fashion-MNIST detection scenes)
from test_dho import clip_file  # noqa: E402, F401  (the fixture: a random tiny CLIP teacher)

LR_MONITOR = ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor", "--trainer.log_every_n_steps=1"]
TWO_EPOCHS = [*SHORT, "--trainer.max_epochs=2", "--trainer.logger.init_args.save_dir=logs"]

# Lightning's layout: the LearningRateMonitor's row (no epoch) before the step's losses, the
# epoch-end rows (validation, training epoch means) at the epoch's last step, then a resumed run
# logging step 3 again (the later value is kept) and a validation at step 3 of the next epoch.
HALF_EMPTY = """\
epoch,lr-SGD,step,train/loss_step,train/loss_epoch,val/acc,val/loss
,0.1,0,,,,
0,,0,2.5,,,
,0.05,1,,,,
0,,1,2.25,,,
0,,1,,,0.5,2.0
0,,1,,2.375,,
,0.025,3,,,,
1,,3,9.0,,,
1,,3,1.75,,,
2,,3,,,0.75,1.5
"""


def test_half_empty_rows_are_merged_per_step_and_epoch(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(HALF_EMPTY)
    columns, rows = read_metrics(path)
    assert columns == ["epoch", "lr-SGD", "step", "train/loss_step", "train/loss_epoch", "val/acc", "val/loss"]
    assert rows == [
        {"epoch": 0, "step": 0, "lr-SGD": 0.1, "train/loss_step": 2.5},
        {"epoch": 0, "step": 1, "lr-SGD": 0.05, "train/loss_step": 2.25, "val/acc": 0.5, "val/loss": 2.0, "train/loss_epoch": 2.375},
        {"epoch": 1, "step": 3, "lr-SGD": 0.025, "train/loss_step": 1.75},
        {"epoch": 2, "step": 3, "val/acc": 0.75, "val/loss": 1.5},
    ]
    run = load_run(tmp_path)  # the folder or the file itself
    assert run.series("val/acc", "epoch") == ([0, 2], [0.5, 0.75])
    assert run.series("lr-SGD") == ([0, 1, 3], [0.1, 0.05, 0.025])
    assert load_run(path).rows == rows


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300, (path, image.size)
        low, high = image.convert("L").getextrema()
        assert high - low > 100, f"{path} is blank"


def plot(capsys: pytest.CaptureFixture, *args: str) -> list[Path]:
    capsys.readouterr()
    main(["plot", *args])
    return [Path(line.removeprefix("wrote ")) for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]


def test_a_kd_run_plots_losses_lr_and_student_vs_teacher(teacher_in_place: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    main(["fit", "-c", str(CONFIGS / "kd/fmnist_kd.yaml"), *TWO_EPOCHS, *LR_MONITOR, "--trainer.limit_train_batches=3"])
    run_dir = Path("logs/kd_fmnist/version_0")
    run = load_run(run_dir)
    val = [row for row in run.rows if "val/acc" in row]
    assert [row["epoch"] for row in val] == [0, 1] and all("val/teacher_acc" in row and "train/loss_kd_epoch" in row for row in val)
    assert all("epoch" in row and "train/loss_step" in row for row in run.rows if "lr-SGD" in row)  # 6 steps, one row each
    assert len([row for row in run.rows if "lr-SGD" in row]) == 6

    written = plot(capsys, str(run_dir))
    assert [p.name for p in written] == ["losses.png", "lr.png", "metrics.png"]
    assert all(p.parent == run_dir / "plots" for p in written)
    for path in written:
        assert_png(path)

    # two runs overlaid, one of them given as its metrics.csv
    main(["fit", "-c", str(CONFIGS / "kd/fmnist_kd.yaml"), *TWO_EPOCHS, "--trainer.limit_train_batches=2"])  # version_1, no LR monitor
    both = plot(capsys, str(run_dir), "logs/kd_fmnist/version_1/metrics.csv", "--out", "both")
    assert [p.name for p in both] == ["losses.png", "lr.png", "metrics.png"] and all(p.parent == Path("both") for p in both)
    for path in both:
        assert_png(path)
    notes: list[str] = []
    plot_runs(["logs/kd_fmnist/version_1"], "alone", notes)
    assert any("lr.png" in note and "LearningRateMonitor" in note for note in notes)


def test_dho_plots_its_mix_surface(clip_file: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    Path("runs/dho").mkdir(parents=True)
    Path("runs/dho/clip_fmnist.safetensors").write_bytes(clip_file.read_bytes())
    main(["fit", "-c", str(CONFIGS / "dho/fmnist.yaml"), *TWO_EPOCHS, "--model.init_args.mix=search",
          "--model.init_args.alpha_grid=[0.0, 0.3, 1.0]", "--model.init_args.beta_grid=[1.0, 2.0]"])  # fmt: skip
    run_dir = Path("logs/dho_fmnist/version_0")
    epoch, alphas, betas, grid = read_dho_surface(run_dir / DHO_SURFACE)
    assert (epoch, alphas, betas) == (1, [0.0, 0.3, 1.0], [1.0, 2.0])
    assert all(0 <= acc <= 1 for row in grid for acc in row)
    [last] = [row for row in load_run(run_dir).rows if "val/alpha" in row and row["epoch"] == 1]
    best = max(acc for row in grid for acc in row)  # the search picked a pair of the best accuracy
    assert grid[betas.index(last["val/beta"])][alphas.index(last["val/alpha"])] == best
    written = plot(capsys, str(run_dir))
    assert "dho_mix.png" in [p.name for p in written]
    for path in written:
        assert_png(path)


def test_dfine_logs_and_plots_the_sharpness_of_its_edge_distributions(scenes: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    main(["fit", "-c", str(CONFIGS / "dfine/fmnist_det_small.yaml"), *TWO_EPOCHS, f"--data.init_args.root={scenes}", "--data.init_args.batch_size=4",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])  # fmt: skip
    run_dir = Path("logs/dfine_fmnist_small/version_0")
    run = load_run(run_dir)
    layers = [c for c in run.columns if c.startswith("train/corner_entropy_")]
    assert layers and all(0 < v <= 1 for c in layers for v in run.series(c, "epoch")[1])
    assert len(run.series(layers[0], "epoch")[0]) == 2  # once per epoch
    written = plot(capsys, str(run_dir))
    assert {"losses.png", "metrics.png", "dfine_sharpness.png"} <= {p.name for p in written}
    for path in written:
        assert_png(path)


def test_corner_entropy_is_one_for_uniform_and_near_zero_for_peaked_distributions() -> None:
    from mmkd.distillers.dfine import corner_entropy

    peaked = torch.full((2, 3, 4 * 33), -50.0)
    peaked[..., ::33] = 50.0  # each edge's first bin
    entropy = corner_entropy({"pred_corners": peaked, "aux_outputs": [{"pred_corners": torch.zeros(2, 3, 4 * 33)}]})
    assert set(entropy) == {"train/corner_entropy_0", "train/corner_entropy_1"}
    assert float(entropy["train/corner_entropy_0"]) == pytest.approx(1.0) and float(entropy["train/corner_entropy_1"]) < 1e-6


def test_the_method_figures_from_their_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """MST's router shares (named from the run's config.yaml) and a hand-written DHO surface."""
    mst = tmp_path / "mst" / "version_0"
    mst.mkdir(parents=True)
    (mst / "metrics.csv").write_text(
        "epoch,step,train/route_0,train/route_1,train/route_2,train/route_3,train/w_kl,train/w_lb,val/acc,val/acc_mm,val/acc_cm,val/loss\n"
        "0,9,0.4,0.1,0.3,0.2,1.0,1.0,,,,\n0,9,,,,,,,0.5,0.8,0.7,1.2\n"
        "1,19,0.25,0.25,0.25,0.25,0.9,0.95,,,,\n1,19,,,,,,,0.6,0.8,0.7,1.1\n"
    )
    (mst / "config.yaml").write_text("model:\n  init_args:\n    mm_mask_layers: [concat_identity, fc1]\n    cm_mask_layers: [conv2, conv3]\n")
    from mmkd.plot import _mst_teacher_names

    assert _mst_teacher_names(load_run(mst)) == ["mm0 (concat_identity)", "mm1 (fc1)", "cm0 (conv2)", "cm1 (conv3)"]
    dho = tmp_path / "dho"
    dho.mkdir()
    (dho / "metrics.csv").write_text("epoch,step,val/acc,val/alpha,val/beta\n0,5,0.5,0.3,1.0\n1,11,0.6,1.0,2.0\n")
    (dho / DHO_SURFACE).write_text("epoch,beta,alpha,acc\n" + "".join(
        f"{e},{b},{a},{0.1 * e + a * b / 4}\n" for e in (0, 1) for b in (1.0, 2.0) for a in (0.0, 0.3, 1.0)
    ))  # fmt: skip
    assert read_dho_surface(dho / DHO_SURFACE) == (1, [0.0, 0.3, 1.0], [1.0, 2.0], [[0.1, 0.175, 0.35], [0.1, 0.25, 0.6]])
    written = plot(capsys, str(mst), str(dho), "--out", str(tmp_path / "plots"))
    assert [p.name for p in written] == ["losses.png", "metrics.png", "mst_routing.png", "dho_mix.png"]
    for path in written:
        assert_png(path)


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert one_error(capsys, ["plot", "no/such/run"]) == "mmkd: error: no/such/run does not exist"
    (tmp_path / "logs" / "kd" / "version_0").mkdir(parents=True)
    (tmp_path / "logs" / "kd" / "version_0" / "metrics.csv").write_text(HALF_EMPTY)
    assert one_error(capsys, ["plot", "logs"]) == "mmkd: error: logs has no metrics.csv; the runs inside it: kd/version_0 (give one or more of them)"
    (tmp_path / "empty_dir").mkdir()
    assert "empty_dir has no metrics.csv (give a CSVLogger run folder" in one_error(capsys, ["plot", "empty_dir"])
    (tmp_path / "empty.csv").write_text("")
    assert one_error(capsys, ["plot", "empty.csv"]) == "mmkd: error: empty.csv is empty (no header row)"
    (tmp_path / "bare.csv").write_text("epoch,step,train/logit_scale\n0,0,14.3\n")
    message = one_error(capsys, ["plot", "bare.csv"])
    assert message.startswith("mmkd: error: nothing to plot in bare.csv: its columns train/logit_scale are none of") and not Path("plots").exists()
    assert not math.isnan(load_run("bare.csv").rows[0]["train/logit_scale"])
