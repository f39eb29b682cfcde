"""A timm ViT with a DeiT-style distillation token, in G2SD's layout."""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from mmkd.models.mae import load_mae_encoder


class DistilledViT(nn.Module):
    """A timm ``VisionTransformer`` plus a distillation token with its own head.

    As G2SD's ``models_vit.py`` (not timm's ``VisionTransformerDistilled``): the token is appended
    at the *end* of the sequence *after* the position embeddings are added, so it has no position
    embedding; the class output is ``norm(x)[:, 0]`` through ``encoder.head`` and the
    distillation output ``norm(x)[:, -1]`` through ``head_dist``. The class head starts from
    ``trunc_normal(std=2e-5)`` (``main_finetune_dis.py``, after loading the generic checkpoint),
    the distillation head from ``trunc_normal(std=0.02)`` (``models_vit.py``:
    ``head_dist.apply(self._init_weights)``, timm 0.3's ViT init), both with zero bias.

    ``forward`` returns the mean of the two heads' logits (G2SD's and DeiT's inference);
    :meth:`forward_heads` returns both, for training.

    Args:
        encoder: a timm ``VisionTransformer`` with a class token, ``global_pool="token"`` and
            ``num_classes`` outputs.
        encoder_checkpoint: MAE-style encoder weights to start from (a G2SD generic-stage or MAE
            checkpoint; see :func:`mmkd.models.mae.load_mae_encoder`).
    """

    fsdp_forward_methods = ("forward_heads", "forward_features")  # entry points besides forward (FSDP2)

    def __init__(self, encoder: nn.Module, encoder_checkpoint: str | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None or encoder.global_pool != "token":
            raise TypeError("DistilledViT needs a timm VisionTransformer with a class token and global_pool='token'")
        if encoder.num_classes <= 0:
            raise ValueError("the encoder needs a classifier: set num_classes > 0")
        self.encoder = encoder
        self.dist_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.head_dist = nn.Linear(encoder.embed_dim, encoder.num_classes)
        trunc_normal_(self.dist_token, std=0.02)
        for head, std in ((encoder.head, 2e-5), (self.head_dist, 0.02)):
            trunc_normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)
        # jsonargparse turns `--...encoder_checkpoint=null` into the string "None" inside a nested
        # class_path; it means "no checkpoint", as an empty value does.
        if encoder_checkpoint and encoder_checkpoint not in ("None", "null"):
            load_mae_encoder(encoder, encoder_checkpoint)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm: cls first, distillation token last."""
        encoder = self.encoder
        x = encoder._pos_embed(encoder.patch_embed(images))
        x = torch.cat([x, self.dist_token.expand(x.shape[0], -1, -1)], dim=1)
        x = encoder.blocks(encoder.norm_pre(encoder.patch_drop(x)))
        return encoder.norm(x)

    def forward_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class-head logits, distillation-head logits)``."""
        tokens = self.forward_features(images)
        return self.encoder.head(self.encoder.head_drop(tokens[:, 0])), self.head_dist(tokens[:, -1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = self.forward_heads(images)
        return (cls_logits + dist_logits) / 2

    # -- timm's optimiser hooks (layer decay): the final norm, the token and the heads are left
    # unmatched, so they form the top group (scale 1), as MAE's lr_decay.get_layer_id_for_vit puts
    # everything after the blocks at num_layers; timm's own ViT matcher joins the final norm to the
    # last block instead (scale 0.75 at layer_decay 0.75)
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)", blocks=r"^encoder\.blocks\.(\d+)")

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos_embed", "encoder.cls_token", "dist_token"}
