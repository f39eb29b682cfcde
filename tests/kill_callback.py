"""A callback that SIGKILLs its own training process after a given optimizer step (for the
fault-tolerance test; loaded by `mmkd fit` through PYTHONPATH)."""

import os
import signal
import time

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """``stall_seconds``: how long the other processes wait at that step before their next collective."""

    def __init__(self, step: int, rank: int = 0, stall_seconds: float = 0.0) -> None:
        self.step, self.rank, self.stall_seconds = step, rank, stall_seconds

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
        elif trainer.global_step == self.step:
            time.sleep(self.stall_seconds)


class KillDuringSave(Callback):
    """SIGKILLs its process half-way through writing ``last.ckpt`` at a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step:
            return
        import io

        import torch

        real_save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            if "last.ckpt" not in str(getattr(f, "name", f)):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die
