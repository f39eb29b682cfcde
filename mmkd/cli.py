"""The ``mmkd`` command: LightningCLI for fit/validate/test/predict, plus ``inspect``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

HELP = """usage: mmkd COMMAND [options]

Multi-modal knowledge distillation on PyTorch Lightning.

training (LightningCLI; every config value can be overridden, e.g. --model.init_args.temperature=2):
  fit        train a model:               mmkd fit -c configs/kd/fmnist_kd.yaml
  validate   evaluate on the val split:    mmkd validate -c CONFIG --ckpt_path PATH
  test       evaluate on the test split:   mmkd test -c CONFIG --ckpt_path PATH
  predict    write predictions to a file:  mmkd predict -c CONFIG --ckpt_path PATH [--output preds.csv --topk 5]
             image files, no config:       mmkd predict --zoo NAME FILES_OR_FOLDERS... [--output preds.jsonl]
                                           mmkd predict --onnx model.onnx --classes classes.txt FILES...

tools:
  inspect    list a model's module paths with output shapes, to choose what to distil:
             mmkd inspect resnet18 --input-size 1 28 28
             mmkd inspect -c configs/kd/fmnist_fitnets.yaml
  cache      run a config's teacher once and store its outputs (train with them after):
             mmkd cache -c configs/kd/fmnist_kd.yaml --out runs/cache/kd --data.init_args.augment=false
             mmkd cache -c CONFIG --out runs/cache/views --views 8 --topk 10   (augmented views, file data)
  consolidate  turn an FSDP2 checkpoint folder into one file for single-process test/predict/export:
             mmkd consolidate runs/students/fmnist_kd/last.ckpt
  zoo        pretrained students: mmkd zoo list | info NAME | download NAME | verify
             (in Python: mmkd.zoo.load(NAME); in a config: checkpoint: zoo:NAME)
  export     write a trained student to ONNX (checked against PyTorch with onnxruntime):
             mmkd export -c configs/kd/fmnist_kd.yaml --ckpt_path runs/students/fmnist_kd/last.ckpt
             mmkd export --zoo fmnist-resnet10t-kd
  plot       draw a run's curves as PNG files (losses, learning rate, student vs teacher, MST/D-FINE/DHO figures):
             mmkd plot runs/logs/kd_fmnist/version_0 [more runs, overlaid] [--out DIR]

Run `mmkd COMMAND --help` for the options of one command.
"""


class ConfigError(ValueError):
    """A config that parses but whose objects cannot be built (missing weights, bad paths, ...)."""


def _cause_lines(message: str) -> list[str]:
    """The causes in a jsonargparse union error, without the 'Expected NoneType' alternative."""
    causes = [line[4:] for line in message.splitlines() if line.startswith("  - ")]
    return [line for line in causes if not line.startswith("Expected a <class 'NoneType'>")]


def lightning_cli(args: Sequence[str] | None = None, run: bool = True, predict_writer: dict | None = None):
    """Build the LightningCLI (model and data in subclass mode, omegaconf parser mode). ``predict``
    adds an :class:`mmkd.predict.PredictionWriter` (``predict_writer``: its options) unless the
    config has a prediction writer."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    import mmkd.strategies  # registers --trainer.strategy=fsdp2
    from mmkd.core.checkpoint import AtomicCheckpointIO

    mmkd.strategies.explain_dead_processes()

    class MMKDCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            # jsonargparse reports an error raised while building the model as one alternative
            # of a Union among pages of config dump; keep only the error itself.
            try:
                super().instantiate_classes()
            except ValueError as err:
                causes = _cause_lines(str(err))
                if not causes:
                    raise
                raise ConfigError("cannot build the objects of this config: " + "; ".join(causes)) from None
            if hasattr(self.datamodule, "views_for"):  # a file data module: each model's own view, trainer or not
                self.datamodule.views_for(self.model)
            _checkpoints_per_sweep_trial(self.trainer)
            strategy = self.trainer.strategy
            if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not one from the config
                strategy.checkpoint_io = AtomicCheckpointIO()

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            except BaseException:
                _remove_unused_log_folders(self.trainer)
                raise

        def before_predict(self) -> None:
            from mmkd.predict import add_prediction_writer

            add_prediction_writer(self.trainer, predict_writer or {})
            if self.config_init["predict"].get("return_predictions") is None:  # written to a file, not also kept in memory
                self.config_init["predict"]["return_predictions"] = False

    class LoggedConfig(SaveConfigCallback):
        """Writes config.yaml beside the logs, and gives every logger the resolved config."""

        def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            config = self.config.clone()
            config.pop("config", None)  # the paths of the -c files
            for logger in trainer.loggers:
                logger.log_hyperparams(config.as_dict())

    return MMKDCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=list(args) if args is not None else None,
        run=run,
    )


def _checkpoints_per_sweep_trial(trainer) -> None:
    """In a W&B sweep trial (``wandb agent`` sets WANDB_SWEEP_ID and WANDB_RUN_ID) every
    checkpoint folder of the config gets the run id appended: all trials run the same config,
    and would otherwise overwrite each other's ``last.ckpt``."""
    from lightning.pytorch.utilities import rank_zero_info

    run_id, sweep_id = os.environ.get("WANDB_RUN_ID"), os.environ.get("WANDB_SWEEP_ID")
    if not (run_id and sweep_id):
        return
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is not None and Path(callback.dirpath).name != run_id:  # None: Lightning's per-run folder
            callback.dirpath = str(Path(callback.dirpath) / run_id)
            rank_zero_info(f"sweep {sweep_id}, trial {run_id}: checkpoints in {callback.dirpath}")


#: what a run writes into its log folder before its first logged value
SETUP_ONLY_FILES = {"hparams.yaml", "config.yaml"}


def _remove_unused_log_folders(trainer) -> None:
    """A run that fails before it logs anything leaves only its config in ``version_N``: remove
    those folders, so the next run's version number and the logs folder stay meaningful."""
    import shutil

    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        folder = Path(getattr(logger, "log_dir", None) or "")
        if str(folder) not in ("", ".") and folder.is_dir() and {entry.name for entry in folder.iterdir()} <= SETUP_ONLY_FILES:
            shutil.rmtree(folder)


def inspect_main(argv: Sequence[str]) -> None:
    import torch

    from mmkd.inspect import inspect_modules, print_inspection

    parser = argparse.ArgumentParser(
        prog="mmkd inspect",
        description="List module paths and output shapes of a timm model, or of the student and "
        "teacher of a config. These paths are what feature taps and distillers take.",
    )
    parser.add_argument("model", nargs="?", help="a timm model name (alternative to -c)")
    parser.add_argument("-c", "--config", help="a training config: inspects its student and teacher")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, help="input shape without batch, e.g. 1 28 28")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels of the timm model (default: from --input-size, else 1)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--depth", type=int, default=None, help="show paths up to this many dots deep")
    args, overrides = parser.parse_known_args(list(argv))
    if bool(args.model) == bool(args.config):
        parser.error("give either a timm model name or -c CONFIG")
    if overrides and not args.config:
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (config overrides go with -c CONFIG)")
    if args.model:
        from mmkd.models import timm_model

        if args.in_chans is not None and args.input_size and args.input_size[0] != args.in_chans:
            parser.error(f"--input-size {' '.join(map(str, args.input_size))} has {args.input_size[0]} channels but --in-chans is {args.in_chans}: give one of them")
        args.in_chans = args.in_chans or (args.input_size[0] if args.input_size and len(args.input_size) == 3 else 1)

        models = {args.model: timm_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)}
        size = args.input_size or [args.in_chans, 224, 224]
    else:
        cli = lightning_cli(["-c", args.config, *overrides], run=False)
        module = cli.model
        models = {"student": module.student if hasattr(module, "student") else module.model}
        if hasattr(module, "teacher"):
            models["teacher"] = module.teacher.model
        size = args.input_size or getattr(cli.datamodule, "input_shape", [3, 224, 224])
    sizes = dict.fromkeys(models, size)
    if isinstance(size, dict):  # several modalities: each network on its own input
        teacher_key = getattr(module, "teacher_input_key", None) or ("teacher_image" if "teacher_image" in size else module.input_key)
        keys = {"student": module.input_key, "teacher": teacher_key}
        for title in list(models):
            if isinstance(keys[title], str):
                sizes[title] = size[keys[title]]
            else:
                print(f"({title} skipped: it takes several inputs {keys[title]})")
                del models[title]
    for title, model in models.items():
        print_inspection(title, inspect_modules(model, torch.zeros(1, *sizes[title])), max_depth=args.depth)


def cache_main(argv: Sequence[str]) -> None:
    from mmkd.core import Distiller, TeacherCacheError, build_teacher_cache

    parser = argparse.ArgumentParser(
        prog="mmkd cache",
        description="Run a distillation config's teacher once over its training split and store its logits and "
        "tapped features by sample index; then train with --model.init_args.teacher_cache=OUT. Without --views "
        "the training split must be read without random augmentation; with --views V each sample's V augmented "
        "views are recorded (crop box and flip) and training replays them. Under torchrun the ranks share the "
        "work; a killed build resumes where it stopped. Other arguments are config overrides.",
    )
    parser.add_argument("-c", "--config", required=True, help="a distillation config")
    parser.add_argument("--out", required=True, help="the cache folder to write")
    parser.add_argument("--views", type=int, default=None, help="record V augmented views per sample (epoch e replays view e %% V)")
    parser.add_argument("--topk", type=int, default=None, help="store only the k largest logits (and one tail logit)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=8192, help="rows per shard (the unit of resuming and of sharing among ranks)")
    parser.add_argument("--device", default="auto", help="where the teacher runs: auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda:0, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    args, overrides = parser.parse_known_args(list(argv))
    if (args.views is not None and args.views < 1) or args.shard_size < 1 or (args.topk is not None and args.topk < 1):
        parser.error("--views, --shard-size and --topk must be at least 1")
    cli = lightning_cli(["-c", args.config, *overrides], run=False)
    if not isinstance(cli.model, Distiller):
        parser.error(f"{args.config} trains a {type(cli.model).__name__}, not a distiller: there is no teacher to cache")
    import torch

    device = args.device
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    cli.model.to(device)
    try:
        cache = build_teacher_cache(cli.model, cli.datamodule, args.out, args.topk, args.dtype, args.batch_size, args.overwrite,
                                    views=args.views, shard_size=args.shard_size)  # fmt: skip
    except (TeacherCacheError, FileExistsError) as err:
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        size = sum(f.stat().st_size for f in cache.path.iterdir())
        views = f" x {cache.views} views" if cache.views else ""
        print(f"wrote {cache.path}: {len(cache)} samples{views}, {', '.join(cache.sources)}, {size / 2**20:.1f} MiB")


def consolidate_main(argv: Sequence[str]) -> None:
    from mmkd.core.checkpoint import AtomicCheckpointIO, read_checkpoint

    parser = argparse.ArgumentParser(
        prog="mmkd consolidate",
        description="Turn a checkpoint folder written under --trainer.strategy=fsdp2 into one file that a single "
        "process can test, predict with or start from (weights and metadata; no optimizer state).",
    )
    parser.add_argument("folder", help="the checkpoint folder, e.g. runs/students/x/last.ckpt")
    parser.add_argument("--out", default=None, help="output file (default: FOLDER.consolidated.ckpt)")
    args = parser.parse_args(list(argv))
    if not (Path(args.folder) / ".metadata").is_file():
        print(f"mmkd: error: {args.folder} is not a distributed checkpoint folder (no .metadata inside)", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out or f"{args.folder.rstrip('/')}.consolidated.ckpt")
    try:
        checkpoint = read_checkpoint(args.folder)
    except RuntimeError as err:  # shards missing or cut short
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    AtomicCheckpointIO().save_checkpoint(checkpoint, out)  # an existing file stays whole until the new one is
    print(f"wrote {out}")


def export_main(argv: Sequence[str]) -> None:
    from torch import nn

    from mmkd.export import example_batch, export_metadata, export_onnx, image_preprocessing, onnx_max_difference, student_from_checkpoint

    parser = argparse.ArgumentParser(
        prog="mmkd export",
        description="Write a student to ONNX (the student of a config with the weights of a checkpoint, or a zoo "
        "model) and check the ONNX model against PyTorch with onnxruntime on a batch of the data (validation, else test, "
        "else training split). Other arguments "
        "are config overrides.",
    )
    parser.add_argument("-c", "--config", help="the config the student was trained with")
    parser.add_argument("--ckpt_path", help="a checkpoint of that config (file or FSDP2 folder)")
    parser.add_argument("--zoo", metavar="NAME", help="a zoo model instead of a config and a checkpoint")
    parser.add_argument("--data-root", default=None, help="with --zoo: the folder of its evaluation data (default: the data module's own)")
    parser.add_argument("--out", default=None, help="the .onnx file (default: CKPT_PATH or NAME with .onnx)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference to PyTorch")
    args, overrides = parser.parse_known_args(list(argv))
    from_config = bool(args.config or args.ckpt_path)
    if bool(args.zoo) == from_config or (from_config and not (args.config and args.ckpt_path)):
        parser.error("give either -c CONFIG --ckpt_path CKPT or --zoo NAME")
    if args.data_root and not args.zoo:
        parser.error("--data-root goes with --zoo; with a config, override --data.init_args.root")
    try:
        if args.zoo:
            from mmkd import zoo

            student, key = zoo.load(args.zoo), zoo.info(args.zoo).get("input_key", "image")
            root = {"root": args.data_root} if args.data_root else {}
            datamodule, out = zoo.evaluation_data(args.zoo, **root), args.out or f"{args.zoo}.onnx"
        else:
            cli = lightning_cli(["-c", args.config, *overrides], run=False)
            if not isinstance(getattr(cli.model, "model", None), nn.Module) or not hasattr(cli.model, "input_key"):
                raise ValueError(
                    f"{type(cli.model).__name__} has no student network to export (G2SD's generic stage writes its "
                    "encoder to export_dir; export the student of a classification or detection config)"
                )
            student, key, datamodule = student_from_checkpoint(cli.model.model, args.ckpt_path), cli.model.input_key, cli.datamodule
            out = args.out or f"{str(args.ckpt_path).rstrip('/')}.onnx"
    except (FileNotFoundError, RuntimeError, ValueError) as err:  # missing or corrupt weights, unknown zoo names
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not isinstance(key, str):
        print(f"mmkd: error: the student takes several inputs {key}; export takes single-input students", file=sys.stderr)
        raise SystemExit(2)
    datamodule.prepare_data()
    try:
        batch = example_batch(datamodule, key)
    except ValueError as err:
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    metadata = export_metadata(image_preprocessing(datamodule, key), getattr(datamodule, "class_names", None))
    out = Path(out)
    staged = out.with_name(f".{out.name}.unchecked")  # replaces `out` only once it passed the check
    try:
        export_onnx(student, batch, staged, args.opset, input_name=key, metadata=metadata)
        difference = onnx_max_difference(student, staged, [batch, batch[:1]])
        if difference > args.atol:
            print(f"mmkd: error: the ONNX model differs from PyTorch by {difference:.2e} > --atol {args.atol}; "
                  f"{out} was not written", file=sys.stderr)  # fmt: skip
            raise SystemExit(1)
        staged.replace(out)
    except ValueError as err:  # a model whose outputs are not predictions
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        staged.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB); onnxruntime vs PyTorch on a batch of the data: max |diff| = {difference:.2e}")


def zoo_main(argv: Sequence[str]) -> None:
    from mmkd import zoo

    parser = argparse.ArgumentParser(prog="mmkd zoo", description="Pretrained students: list, describe, download, verify.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the zoo's students with their measured metrics")
    commands.add_parser("info", help="one entry of the manifest").add_argument("name")
    download = commands.add_parser("download", help="fetch a student's weights into the cache ($MMKD_CACHE/zoo)")
    download.add_argument("name")
    download.add_argument("--force", action="store_true", help="download even if a verified copy exists")
    commands.add_parser("verify", help="check the sha256 of every local zoo file")
    args = parser.parse_args(list(argv))
    try:
        if args.command == "list":
            print(f"{'name':32} {'distiller':10} {'test metric':>15} {'size':>9}  architecture")
            for name, entry in zoo.entries().items():
                metric = next(((label, entry["metrics"][key]) for key, label in (("test/acc", "acc"), ("test/map", "mAP")) if key in entry["metrics"]), None)
                metric = f"{metric[0]} {100 * metric[1]:.2f} %" if metric else "-"
                print(f"{name:32} {entry['distiller']:10} {metric:>15} {entry['size'] / 2**10:>6.0f} KiB  {entry['architecture_summary']}")
        elif args.command == "info":
            print(json.dumps(zoo.info(args.name), indent=2))
        elif args.command == "download":
            print(zoo.fetch(args.name, force=args.force))
        else:
            status = zoo.verify()
            for name, state in status.items():
                print(f"{name:32} {state}")
            if any(state.startswith("corrupt") for state in status.values()):
                raise SystemExit(1)
    except zoo.ZooError as err:
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def plot_main(argv: Sequence[str]) -> None:
    from mmkd.plot import main as plot

    plot(argv)


def predict_main(argv: Sequence[str]) -> None:
    from mmkd.predict import main as predict

    predict(argv)


COMMANDS = {"predict": predict_main, "zoo": zoo_main, "inspect": inspect_main, "cache": cache_main, "consolidate": consolidate_main, "export": export_main, "plot": plot_main}


def main(argv: Sequence[str] | None = None) -> None:
    explicit = argv is not None
    argv = list(argv if explicit else sys.argv[1:])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return
    # Lightning 2.6 still builds torch's deprecated LeafSpec: a warning in every training or
    # prediction command that says nothing about the user's run
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        if argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
        else:
            lightning_cli(argv if explicit else None)
    except ConfigError as err:
        print(f"mmkd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except _user_errors() as err:  # mmkd's own errors say what is wrong and what to do: no traceback
        if os.environ.get("MMKD_TRACEBACK") == "1":
            raise
        print(f"mmkd: error: {err} (MMKD_TRACEBACK=1 shows where)", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:
        if not _lost_a_peer(err):
            raise
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        print(
            f"mmkd: error: process {rank} stopped because another training process died ({str(err).strip()}). "
            "Find the first error of the run in the logs of the other processes; restart all of them with "
            "--ckpt_path=last to resume from the last checkpoint.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors about the user's input (data, shapes, module paths, caches, a diverging loss) that
    mmkd raises while a run sets up or trains, each with a message that names the fix."""
    from mmkd.core import ClassMapError, NonFiniteLossError, TeacherCacheError, UnknownModulePathError
    from mmkd.core.classifier import DataMismatchError
    from mmkd.data.sources import DataSourceError
    from mmkd.heads import ShapeMismatchError

    return (
        ClassMapError, DataMismatchError, DataSourceError, FileNotFoundError, NonFiniteLossError, ShapeMismatchError,
        TeacherCacheError, UnknownModulePathError,
    )  # fmt: skip


def _lost_a_peer(err: RuntimeError) -> bool:
    """A collective failed because a peer process disappeared (gloo's TCP transport says so)."""
    message = str(err)
    return "gloo" in message and any(words in message for words in ("closed by peer", "reset by peer", "Broken pipe"))


if __name__ == "__main__":
    main()
