"""Experiment loggers. :class:`WandbLogger` is Lightning's, made usable without an account or
network (offline runs that ``wandb sync`` uploads later)."""

from __future__ import annotations

import netrc
import os
import socket
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_warn


def wandb_offline_reason() -> str | None:
    """Why W&B cannot log online here (no API key, server unreachable), or ``None`` if it can."""
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return None  # the user chose; wandb honours it
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base_url).hostname or "api.wandb.ai"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "no W&B API key (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((host, urlparse(base_url).port or 443), timeout=3).close()
    except OSError as err:
        return f"{host} is unreachable ({err})"
    return None


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that falls back to offline mode, saying so once, when there is
    no API key or the W&B server cannot be reached; the run is kept in ``<save_dir>/wandb`` and
    uploaded later with ``wandb sync``. ``offline=True``/``False`` forces a mode. Everything
    ``self.log``s reaches W&B (every loss term, the student's metrics, the teacher's
    ``val/teacher_acc``), and ``mmkd`` logs the resolved config as the run's config.
    ``log_model=True`` logs the checkpoints (the final student, without the teacher's weights) as
    artifacts of type ``model``, offline too (staged, then uploaded by ``wandb sync``).
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            reason = wandb_offline_reason()
            offline = reason is not None
            if offline:
                save_dir = kwargs.get("save_dir") or os.environ.get("WANDB_DIR") or "."
                rank_zero_warn(f"W&B logs offline: {reason}. Upload the run later with `wandb sync {save_dir}/wandb/offline-run-*`.")
        # Lightning refuses log_model offline, but W&B records artifacts in an offline run and
        # `wandb sync` uploads them with the rest: bypass the check, then run offline all the same.
        super().__init__(*args, offline=offline and not kwargs.get("log_model"), **kwargs)
        self._offline = offline
