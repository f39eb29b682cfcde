"""Strategy presets. ``--trainer.strategy=ddp`` is Lightning's own; ``--trainer.strategy=fsdp2``
is :class:`FSDP2`, registered here under that name."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from lightning.fabric.strategies.launchers import subprocess_script
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from mmkd.core.checkpoint import remove_path, restore_swapped_out, swap_in

# Repeated blocks of timm models (ViT ``blocks.N``, ConvNeXt/Swin ``stages.N``, ResNet ``layerK.N``)
# and of mmkd's MAE decoder: each becomes its own FSDP2 unit, gathered only while it runs.
SHARD_UNIT = re.compile(r"(^|\.)(blocks|layers|stages|layer\d)\.\d+$")


class FSDP2(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over every process: Lightning's ``ModelParallelStrategy`` with all
    processes in the data-parallel dimension and no tensor parallelism. The module shards itself
    in ``configure_model`` (see :meth:`mmkd.core.classifier.TrainingModule.configure_model`).

    Args:
        save_distributed_checkpoint: checkpoints as a folder of shards (torch.distributed.checkpoint);
            ``False`` gathers a single-file checkpoint on rank 0.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # Lightning's "auto" means num_nodes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None) -> None:
        """Lightning's save, made atomic for folders of shards: every process writes into a hidden
        folder beside the target, which rank 0 then swaps in by two renames. A process killed
        while saving leaves the previous checkpoint whole (Lightning writes the shards into the
        existing folder). Should a kill fall between the two renames, the previous checkpoint
        waits as ``.NAME.old`` and the next save puts it back first."""
        if not self._save_distributed_checkpoint or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staged = path.with_name(f".{path.name}.saving")
        if self.global_rank == 0:
            restore_swapped_out(path)
            remove_path(staged)
        self.barrier("mmkd_checkpoint_staging")
        super().save_checkpoint(checkpoint, staged, storage_options)
        self.barrier("mmkd_checkpoint_written")
        if self.global_rank == 0:
            swap_in(staged, path)
        self.barrier("mmkd_checkpoint_saved")


def shard_units(root: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks under ``root`` (see ``SHARD_UNIT``), innermost first."""
    for name, module in reversed(list(root.named_modules())):
        if SHARD_UNIT.search(name):
            yield module


def dead_process_message(local_rank: int, pid: int, returncode: int) -> str:
    """What mmkd prints when a training process that Lightning launched has died."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a number with no name (real-time signals)
            name = f"signal {-returncode}"
        how = f"was killed by {name}"
        if -returncode == signal.SIGKILL:
            how += " (the kernel's out-of-memory killer sends it: check `dmesg` or the job's memory limit)"
    else:
        how = f"exited with code {returncode} (its error is printed above)"
    return (
        f"mmkd: error: training process {local_rank} on this machine (PID {pid}) {how}; stopping the other training "
        "processes. Restart all of them with --ckpt_path=last to resume from the last checkpoint."
    )


class ExplainingChildObserver(subprocess_script._ChildProcessObserver):
    """Lightning's watcher of the training processes it launched (``ddp``, ``fsdp2``), which SIGKILLs
    them all, itself included, when one exits with an error. This one first says which process
    died and how: Lightning only logs that at INFO level, and its SIGKILL often lands before the
    surviving process can report the failed collective (see :func:`mmkd.cli.main`)."""

    def _terminate_all(self) -> None:
        for local_rank, process in enumerate(self._child_processes, start=1):
            if process.returncode:
                print(dead_process_message(local_rank, process.pid, process.returncode), file=sys.stderr, flush=True)
        super()._terminate_all()


def explain_dead_processes() -> None:
    """Make Lightning's process launcher use :class:`ExplainingChildObserver` (the CLI calls this)."""
    subprocess_script._ChildProcessObserver = ExplainingChildObserver


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2, description="FSDP2 (fully_shard) over all processes, by mmkd")
