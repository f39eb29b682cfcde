"""``mmkd plot RUN...``: the curves of Lightning ``CSVLogger`` runs as PNG files.

Lightning writes one ``metrics.csv`` row per logging call, so the values of one step (the
learning rate, the step's losses, the epoch-end validation metrics) sit on separate, half-empty
rows. :func:`read_metrics` merges them back into one row per step, and :func:`plot_runs` draws:

- ``losses.png``: every ``train/loss*`` term per step, and the validation losses per epoch;
- ``lr.png``: the ``lr-*`` columns of Lightning's ``LearningRateMonitor`` per step;
- ``metrics.png``: the validation metrics per epoch, the student's solid and the teachers'
  (``val/teacher_acc``, MST's ``val/acc_mm`` and ``val/acc_cm``) dashed;
- ``mst_routing.png``: MST's stage-3 router, the share of the top-k selections each specialised
  teacher gets per epoch (``train/route_<i>``), and its ``w_kl``/``w_lb`` schedule;
- ``dfine_sharpness.png``: D-FINE's edge distributions per decoder layer, their mean entropy
  normalised by ``log(bins)`` (``train/corner_entropy_<layer>``: 1 is uniform, 0 is one bin);
- ``dho_mix.png``: DHO's validation accuracy over the ``alpha``/``beta`` grid of the head mix in the
  last validation epoch (``dho_mix_surface.csv`` beside ``metrics.csv``), with the mix in use, and
  ``val/alpha``/``val/beta`` per epoch.

A figure whose columns no run has is skipped. Several runs go on the same figures, one line style
per run, named in the legends.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

TEACHER_COLUMNS = ("val/acc_mm", "val/acc_cm")  # MST's co-trained teachers; other teachers' names hold "teacher"
NOT_METRICS = ("val/alpha", "val/beta")  # DHO's mix: its own figure
DHO_SURFACE = "dho_mix_surface.csv"  # written by mmkd.distillers.dho beside metrics.csv
LINE_STYLES = ("-", "--", ":", "-.")


class PlotError(ValueError):
    """A run that cannot be read, or nothing to plot; the message says which and why."""


@dataclass
class Run:
    """One run's merged metrics: ``rows`` in logging order, each ``{column: value}`` with the
    cells that were logged (``step`` and ``epoch`` included where known)."""

    name: str
    folder: Path
    rows: list[dict[str, float]]
    columns: list[str] = field(default_factory=list)
    source: Path | None = None  # the metrics.csv

    def series(self, column: str, x: str = "step") -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of the rows that have both ``x`` and ``column``."""
        points = [(row[x], row[column]) for row in self.rows if x in row and column in row]
        return [p[0] for p in points], [p[1] for p in points]

    def has(self, column: str) -> bool:
        return any(column in row for row in self.rows)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(path: Path | str) -> tuple[list[str], list[dict[str, float]]]:
    """The columns of a Lightning ``metrics.csv`` and its rows merged per step.

    Rows of the same ``step`` are one row: the ``LearningRateMonitor``'s rows (a ``step``, no
    ``epoch``) join the step's other rows, and rows of the same step but another ``epoch`` stay
    apart. A value logged twice for a step (a resumed run) keeps the later one. Empty and
    non-numeric cells are left out; rows without a step are kept as they are."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        raw = [{key: value for key, text in row.items() if key and text not in (None, "") and (value := _number(text)) is not None} for row in reader]
    merged: list[dict[str, float]] = []
    by_key: dict[tuple[float, float | None], dict[str, float]] = {}
    last_of_step: dict[float, dict[str, float]] = {}
    for values in raw:
        step, epoch = values.get("step"), values.get("epoch")
        if step is None:
            merged.append(values)
            continue
        target = by_key.get((step, epoch))
        if target is None:
            latest = last_of_step.get(step)
            if latest is not None and (epoch is None or latest.get("epoch", epoch) == epoch):
                target = latest
            else:
                target = {}
                merged.append(target)
        target.update(values)
        by_key[(step, target.get("epoch"))] = target
        last_of_step[step] = target
    return columns, merged


def load_run(path: Path | str) -> Run:
    """A run from its ``CSVLogger`` folder (``.../version_0``) or its ``metrics.csv``."""
    path = Path(path)
    if not path.exists():
        raise PlotError(f"{path} does not exist")
    if path.is_dir():
        csv_path = path / "metrics.csv"
        if not csv_path.is_file():
            inside = sorted(str(p.parent.relative_to(path)) for p in path.rglob("metrics.csv"))
            shown = ", ".join(inside[:8]) + (f" and {len(inside) - 8} more" if len(inside) > 8 else "")
            hint = f"; the runs inside it: {shown} (give one or more of them)" if inside else (
                " (give a CSVLogger run folder such as runs/logs/NAME/version_0, or its metrics.csv)"
            )
            raise PlotError(f"{path} has no metrics.csv{hint}")
    else:
        csv_path = path
    folder = csv_path.parent
    try:
        columns, rows = read_metrics(csv_path)
    except (UnicodeDecodeError, csv.Error) as err:
        raise PlotError(f"{csv_path} is not a metrics.csv ({err})") from None
    if not columns:
        raise PlotError(f"{csv_path} is empty (no header row)")
    name = f"{folder.parent.name}/{folder.name}" if folder.name.startswith("version_") else folder.name
    return Run(name or str(folder), folder, rows, columns, csv_path)


# -- figures ----------------------------------------------------------------------------------
def _figure(panels: int, width: float = 6.4, height: float = 4.4):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed (Agg canvas)

    figure = Figure(figsize=(width * panels, height), layout="constrained")
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def _lines(ax, runs: list[Run], columns_of, x: str, label_of, many: bool) -> int:
    """One line per (run, column): the column's colour, the run's line style. Returns the count."""
    colours: dict[str, str] = {}
    drawn = 0
    for r, run in enumerate(runs):
        for column in columns_of(run):
            xs, ys = run.series(column, x)
            if not xs:
                continue
            colour = colours.setdefault(label_of(column), f"C{len(colours) % 10}")
            label = f"{label_of(column)} ({run.name})" if many else label_of(column)
            ax.plot(xs, ys, LINE_STYLES[r % len(LINE_STYLES)], color=colour, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
            drawn += 1
    if drawn:
        ax.set_xlabel(x)
        if x == "epoch":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return drawn


def _train_loss_columns(run: Run) -> list[str]:
    """Each ``train/loss*`` term once: its per-step values where logged, else its epoch values."""
    chosen: dict[str, str] = {}
    for column in run.columns:
        if not column.startswith("train/loss") or not run.has(column):
            continue
        base = column.removesuffix("_step").removesuffix("_epoch")
        if base not in chosen or column.endswith("_step"):
            chosen[base] = column
    return list(chosen.values())


def _val_loss_columns(run: Run) -> list[str]:
    return [c for c in run.columns if c.startswith("val/loss") and run.has(c)]


def _term(column: str) -> str:
    term = column.split("/", 1)[-1].removesuffix("_step").removesuffix("_epoch")
    return "loss (total)" if term == "loss" else term


def plot_losses(runs: list[Run], out: Path, many: bool) -> Path | None:
    train, val = any(_train_loss_columns(r) for r in runs), any(_val_loss_columns(r) for r in runs)
    if not (train or val):
        return None
    figure, axes = _figure(train + val)
    if train:
        _lines(axes[0], runs, _train_loss_columns, "step", _term, many)
        axes[0].set_title("training losses")
    if val:
        _lines(axes[-1], runs, _val_loss_columns, "epoch", _term, many)
        axes[-1].set_title("validation losses")
    return _save(figure, out / "losses.png")


def _lr_columns(run: Run) -> list[str]:
    return [c for c in run.columns if c.startswith("lr-") and not c.endswith(("-momentum", "-weight_decay")) and run.has(c)]


def plot_lr(runs: list[Run], out: Path, many: bool) -> Path | None:
    if not any(_lr_columns(r) for r in runs):
        return None
    figure, [ax] = _figure(1)
    _lines(ax, runs, _lr_columns, "step", lambda c: c.removeprefix("lr-"), many)
    ax.set_title("learning rate (LearningRateMonitor)")
    ax.set_ylabel("learning rate")
    return _save(figure, out / "lr.png")


def _is_teacher(column: str) -> bool:
    return "teacher" in column or column in TEACHER_COLUMNS


def _metric_columns(run: Run) -> list[str]:
    return [
        c for c in run.columns
        if c.startswith("val/") and "loss" not in c and c not in NOT_METRICS and run.has(c)
        and not all(v == -1 for v in run.series(c, "epoch")[1])  # torchmetrics' -1: no such objects (map_small, ...)
    ]  # fmt: skip


def plot_metrics(runs: list[Run], out: Path, many: bool) -> Path | None:
    if not any(_metric_columns(r) for r in runs):
        return None
    figure, [ax] = _figure(1, width=7.2)
    colours: dict[str, str] = {}
    teachers = False
    for r, run in enumerate(runs):
        for column in _metric_columns(run):
            points = [(x, y) for x, y in zip(*run.series(column, "epoch")) if y != -1]
            if not points:
                continue
            teacher = _is_teacher(column)
            teachers |= teacher
            name = _term(column) + (" (teacher)" if teacher and "teacher" not in column else "")
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            style = (2, 2) if teacher else (None if r == 0 else (6, 2 + r))
            label = f"{name} ({run.name})" if many else name
            line, = ax.plot(*zip(*points), color=colour, label=label, marker="s" if teacher else "o", markersize=4)
            if style:
                line.set_dashes(style)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("validation: student (solid) vs teacher (dotted, squares)" if teachers else "validation metrics")
    return _save(figure, out / "metrics.png")


def _route_columns(run: Run) -> list[str]:
    found = [c for c in run.columns if re.fullmatch(r"train/route_\d+", c) and run.has(c)]
    return sorted(found, key=lambda c: int(c.rsplit("_", 1)[1]))


def _mst_teacher_names(run: Run) -> list[str]:
    """The stage-3 teachers in router order (``MST.specialised_teachers``), from the run's config.yaml."""
    config = _config(run)
    args = (config.get("model") or {}).get("init_args") or {}
    if "mm_mask_layers" not in args or "cm_mask_layers" not in args:
        return []
    return [f"{base}{i} ({path})" for base in ("mm", "cm") for i, path in enumerate(args[f"{base}_mask_layers"])]


def _config(run: Run) -> dict:
    path = run.folder / "config.yaml"  # LightningCLI's SaveConfigCallback writes it beside metrics.csv
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def plot_mst(runs: list[Run], out: Path, many: bool) -> Path | None:
    routed = [r for r in runs if _route_columns(r)]
    if not routed:
        return None
    weights = any(r.has("train/w_kl") or r.has("train/w_lb") for r in routed)
    figure, axes = _figure(1 + weights)
    for r, run in enumerate(routed):
        names = _mst_teacher_names(run)
        for i, column in enumerate(_route_columns(run)):
            xs, ys = run.series(column, "epoch")
            teacher = names[i] if i < len(names) else f"teacher {i}"
            axes[0].plot(xs, ys, LINE_STYLES[r % len(LINE_STYLES)], color=f"C{i % 10}", marker="o", markersize=3,
                         label=f"{teacher} ({run.name})" if many else teacher)  # fmt: skip
    axes[0].set(title="MST router: share of the top-k selections per teacher", xlabel="epoch", ylabel="share")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if weights:
        _lines(axes[1], routed, lambda run: [c for c in ("train/w_kl", "train/w_lb") if run.has(c)], "epoch", _term, many)
        axes[1].set_title("MST stage-3 loss weights")
    return _save(figure, out / "mst_routing.png")


def _entropy_columns(run: Run) -> list[str]:
    found = [c for c in run.columns if re.fullmatch(r"train/corner_entropy_\d+", c) and run.has(c)]
    return sorted(found, key=lambda c: int(c.rsplit("_", 1)[1]))


def plot_dfine(runs: list[Run], out: Path, many: bool) -> Path | None:
    sharp = [r for r in runs if _entropy_columns(r)]
    if not sharp:
        return None
    figure, axes = _figure(2)
    for r, run in enumerate(sharp):
        columns = _entropy_columns(run)
        last = []
        for column in columns:
            xs, ys = run.series(column, "epoch")
            layer = int(column.rsplit("_", 1)[1])
            label = f"layer {layer}" + (" (last)" if column == columns[-1] else "")
            axes[0].plot(xs, ys, LINE_STYLES[r % len(LINE_STYLES)], color=f"C{layer % 10}", marker="o", markersize=3,
                         label=f"{label} ({run.name})" if many else label)  # fmt: skip
            last.append((layer, ys[-1]))
        axes[1].plot(*zip(*last), LINE_STYLES[r % len(LINE_STYLES)], marker="o", color=f"C{r % 10}", label=run.name)
    axes[0].set(title="D-FINE edge distributions: entropy / log(bins)", xlabel="epoch", ylabel="1 = uniform, 0 = one bin")
    axes[1].set(title="per decoder layer, last epoch", xlabel="decoder layer", ylabel="entropy / log(bins)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(figure, out / "dfine_sharpness.png")


def read_dho_surface(path: Path) -> tuple[float, list[float], list[float], list[list[float]]] | None:
    """The last epoch of a ``dho_mix_surface.csv`` (``epoch,beta,alpha,acc``): ``(epoch, alphas,
    betas, acc[beta][alpha])``; ``None`` where the file is missing or has no complete rows."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [{k: _number(v or "") for k, v in row.items()} for row in csv.DictReader(f)]
    rows = [row for row in rows if None not in (row.get("epoch"), row.get("beta"), row.get("alpha"), row.get("acc"))]
    if not rows:
        return None
    epoch = rows[-1]["epoch"]
    rows = [row for row in rows if row["epoch"] == epoch]
    alphas, betas = sorted({row["alpha"] for row in rows}), sorted({row["beta"] for row in rows})
    grid = [[math.nan] * len(alphas) for _ in betas]
    for row in rows:
        grid[betas.index(row["beta"])][alphas.index(row["alpha"])] = row["acc"]
    return epoch, alphas, betas, grid


def plot_dho(runs: list[Run], out: Path, many: bool) -> Path | None:
    surfaces = [(run, s) for run in runs if (s := read_dho_surface(run.folder / DHO_SURFACE))]
    mixed = [r for r in runs if r.has("val/alpha") or r.has("val/beta")]
    if not (surfaces or mixed):
        return None
    figure, axes = _figure(len(surfaces) + bool(mixed), width=6.0)
    for ax, (run, (epoch, alphas, betas, grid)) in zip(axes, surfaces):
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        figure.colorbar(image, ax=ax, label="validation accuracy")
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], rotation=90, fontsize="x-small")
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        cells = [(acc, i, j) for i, row in enumerate(grid) for j, acc in enumerate(row) if not math.isnan(acc)]
        best = max(cells, key=lambda cell: (cell[0], -cell[1], -cell[2]))  # ties: the search's first beta, then alpha
        ax.plot(best[2], best[1], "w*", markersize=12, label=f"best {best[0]:.4f}")
        used = [row for row in run.rows if "val/alpha" in row and "val/beta" in row and row.get("epoch") == epoch]
        if used and used[-1]["val/alpha"] in alphas and used[-1]["val/beta"] in betas:
            a, b = alphas.index(used[-1]["val/alpha"]), betas.index(used[-1]["val/beta"])
            ax.plot(a, b, "o", markerfacecolor="none", markeredgecolor="red", markersize=12, label=f"in use {grid[b][a]:.4f}")
        ax.set(title=f"DHO head mix, epoch {epoch:g}" + (f" ({run.name})" if many else ""), xlabel="alpha (CE head's weight)", ylabel="beta (KD head's temperature)")
        ax.legend(fontsize="small", loc="upper left")
    if mixed:
        _lines(axes[-1], mixed, lambda run: [c for c in NOT_METRICS if run.has(c)], "epoch", _term, many)
        axes[-1].set_title("DHO mix in use per epoch")
    return _save(figure, out / "dho_mix.png")


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


FIGURES = {
    "losses.png": (plot_losses, "no train/loss* or val/loss* columns"),
    "lr.png": (plot_lr, "no lr-* columns (add a lightning.pytorch.callbacks.LearningRateMonitor to trainer.callbacks)"),
    "metrics.png": (plot_metrics, "no validation metrics (val/...)"),
    "mst_routing.png": (plot_mst, None),  # the method figures: only for their own runs, silently
    "dfine_sharpness.png": (plot_dfine, None),
    "dho_mix.png": (plot_dho, None),
}


def plot_runs(runs: Sequence[Path | str], out: Path | str, notes: list[str] | None = None) -> list[Path]:
    """Draws the figures of one or more runs (``CSVLogger`` folders or ``metrics.csv`` files) into
    ``out`` and returns the PNG paths. Why a general figure was skipped is appended to ``notes``.
    Raises :class:`PlotError` for a run that cannot be read, or when there is nothing to plot."""
    if not runs:
        raise PlotError("no run given")
    loaded = [load_run(path) for path in runs]
    if len({run.name for run in loaded}) < len(loaded):  # the same version_0 of two folders
        for run in loaded:
            run.name = str(run.folder)
    out, many = Path(out), len(loaded) > 1
    written = []
    for name, (draw, why_not) in FIGURES.items():
        path = draw(loaded, out, many)
        if path is not None:
            written.append(path)
        elif why_not and notes is not None:
            notes.append(f"no {name}: {why_not}")
    if not written:
        columns = sorted({c for run in loaded for c in run.columns if run.has(c)} - {"epoch", "step"})
        raise PlotError(
            f"nothing to plot in {', '.join(str(run.source) for run in loaded)}: "
            f"{'its columns ' + ', '.join(columns) + ' are' if columns else 'no values were logged, which is'} "
            "none of train/loss*, val/*, lr-*"
        )
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mmkd plot",
        description="Draw the curves of Lightning CSVLogger runs (losses, learning rate, student vs teacher metrics, "
        "and the method figures of MST, D-FINE and DHO) as PNG files. Several runs are overlaid.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a CSVLogger run folder (runs/logs/NAME/version_0) or its metrics.csv")
    parser.add_argument("--out", default=None, help="the folder of the PNG files (default: RUN/plots for one run, ./plots for several)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is None:
        first = Path(args.runs[0])
        args.out = (first if first.is_dir() else first.parent) / "plots" if len(args.runs) == 1 else Path("plots")
    notes: list[str] = []
    try:
        written = plot_runs(args.runs, args.out, notes)
    except PlotError as err:
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
