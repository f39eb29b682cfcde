"""Strategy presets. ``--trainer.strategy=ddp`` is Lightning's own; ``--trainer.strategy=fsdp2``
is :class:`FSDP2`, registered here under that name."""

from __future__ import annotations

import re
from typing import Iterator

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

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


def shard_units(root: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks under ``root`` (see ``SHARD_UNIT``), innermost first."""
    for name, module in reversed(list(root.named_modules())):
        if SHARD_UNIT.search(name):
            yield module


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2, description="FSDP2 (fully_shard) over all processes, by mmkd")
