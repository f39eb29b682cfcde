"""Masked autoencoder (He et al. 2022) around a timm ``VisionTransformer`` encoder, its
pre-training recipe, and loading an MAE encoder into a timm ViT for fine-tuning.

The layout follows the official ``models_mae.py``: fixed 2-D sin-cos position embeddings,
per-sample random masking by ``argsort`` of noise, a decoder with its own mask token and position
embeddings, pixel loss on masked patches (optionally per-patch normalised). The encoder *is* a timm
``VisionTransformer`` (``encoder.*`` keys), so a pre-trained encoder loads into timm as it is.
Weights saved by the official code (``cls_token``, ``blocks.*``, ``decoder_embed``, ...) are
mapped onto this layout when loaded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from mmkd.core.checkpoint import load_state_dict_file
from mmkd.core.classifier import TrainingModule


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, ``[1, (1 +) H*W, dim]`` (zeros for the cls token).

    As the official ``get_2d_sincos_pos_embed``: the first half of the channels encodes the column
    index, the second half the row index, each as ``[sin(pos * w), cos(pos * w)]`` with
    ``w = 1 / 10000 ** (k / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size[0], dtype=torch.float64), torch.arange(grid_size[1], dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    embed = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=torch.float64), embed])
    return embed.float().unsqueeze(0)


def _mae_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEOutput(NamedTuple):
    """``tokens``: pixel predictions ``[B, N, patch_pixels]`` or, before the decoder head, hidden
    states ``[B, 1 + N, D]`` (cls first); ``mask``: ``[B, N]``, 1 where a patch was masked."""

    tokens: torch.Tensor
    mask: torch.Tensor


class MAEDecoder(nn.Module):
    """MAE decoder: embed the visible latents, insert the mask token at masked positions, add fixed
    position embeddings, transformer blocks, then LayerNorm and a linear head to pixels."""

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_pixels: int,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid_size), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm) for _ in range(depth))
        self.norm = _layer_norm(dim)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, num_blocks: int | None = None, head: bool = True) -> torch.Tensor:
        """Pixels of every patch ``[B, N, patch_pixels]``; with ``head=False`` the hidden states after
        the first ``num_blocks`` blocks (all by default), before the norm, cls token included."""
        x = self.embed(latent)
        batch, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks[:num_blocks]:
            x = block(x)
        if not head:
            return x
        return self.pred(self.norm(x))[:, 1:]


def _layer_norm(dim: int, **kwargs: Any) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


class MaskedAutoencoder(nn.Module):
    """A timm ``VisionTransformer`` encoder that sees only the visible patches, plus an MAE decoder.

    Args:
        encoder: a timm ``VisionTransformer`` with a class token and position embeddings covering
            it (the classic layout); its classifier is removed and its position embeddings are
            replaced by fixed sin-cos ones, as in MAE.
        decoder_dim / decoder_depth / decoder_heads / mlp_ratio: the decoder (MAE ViT-B: 512 / 8 /
            16; G2SD's light student decoders: 256 / 4 / 8, i.e. half of the teacher's).
        mask_ratio: fraction of patches masked (0.75).
        norm_pix_loss: pixel targets normalised per patch (MAE's ``--norm_pix_loss``).
        initialize: MAE's initialisation (xavier-uniform linears, N(0, 0.02) tokens); turn off to
            keep weights already in ``encoder``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 128,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        initialize: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None or encoder.no_embed_class:
            raise TypeError(
                "the MAE encoder must be a timm VisionTransformer with a class token and position embeddings "
                f"that include it (class_token=True, no_embed_class=False); got {type(encoder).__name__}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        encoder.reset_classifier(0)
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size
        self.grid_size = encoder.patch_embed.grid_size
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = encoder.patch_embed.proj.in_channels
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed_2d(encoder.embed_dim, self.grid_size))
        encoder.pos_embed.requires_grad_(False)
        patch_pixels = self.patch_size[0] * self.patch_size[1] * self.in_chans
        self.decoder = MAEDecoder(encoder.embed_dim, self.grid_size, patch_pixels, decoder_dim, decoder_depth, decoder_heads, mlp_ratio)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        if initialize:
            self.apply(_mae_init)
            proj = encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
            nn.init.normal_(encoder.cls_token, std=0.02)
            nn.init.normal_(self.decoder.mask_token, std=0.02)

    @property
    def decoder_dim(self) -> int:
        return self.decoder.embed.out_features

    # -- the MAE forward pass ------------------------------------------------------------------
    def mask_noise(self, batch_size: int, device: torch.device, seed: int | None = None) -> torch.Tensor:
        """Uniform noise ``[B, N]`` that decides the mask; with ``seed`` the same every time
        (validation masks comparable across epochs)."""
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        return torch.rand(batch_size, self.num_patches, device=device, generator=generator)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, p*q*C]`` in the official (row, col, p, q, channel) order."""
        (p, q), (h, w) = self.patch_size, self.grid_size
        x = images.reshape(images.shape[0], self.in_chans, h, p, w, q)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(images.shape[0], h * w, p * q * self.in_chans)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the patches with the smallest noise: visible tokens, mask ``[B, N]``, restore order."""
        batch, num_patches, dim = x.shape
        keep = int(num_patches * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        visible = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, num_patches, device=x.device)
        mask[:, :keep] = 0
        return visible, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder on the visible patches: latent ``[B, 1 + N_visible, D]`` (after the final norm),
        mask and restore order."""
        encoder = self.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = encoder.blocks(torch.cat([cls, x], dim=1))
        return encoder.norm(x), mask, ids_restore

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None, decoder_blocks: int | None = None, head: bool = True) -> MAEOutput:
        """Mask with ``noise`` (``[B, N]``, uniform; drawn when omitted), encode, decode.

        ``head=False`` returns the decoder's hidden states after ``decoder_blocks`` blocks (all by
        default), before the decoder norm: what G2SD distils.
        """
        if noise is None:
            noise = self.mask_noise(len(images), images.device)
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        return MAEOutput(self.decoder(latent, ids_restore, decoder_blocks, head), mask)

    def reconstruction_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared pixel error over the masked patches (per-patch normalised targets with
        ``norm_pix_loss``)."""
        target = self.patchify(images).float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    # -- loading -------------------------------------------------------------------------------
    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the official MAE layout (``blocks.*``, ``decoder_embed.*``, ...) onto this one, and
        refuse weights without a decoder: G2SD's targets come from the decoder, and the official
        G2SD loader (``strict=False``) silently trains against a random one when it is missing."""
        if any(k.startswith("encoder.") for k in state):
            converted = state
        else:
            renames = {"decoder_embed.": "decoder.embed.", "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.pos_embed",
                       "decoder_blocks.": "decoder.blocks.", "decoder_norm.": "decoder.norm.", "decoder_pred.": "decoder.pred."}  # fmt: skip
            converted = {}
            for key, value in state.items():
                new = next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), "encoder." + key)
                converted[new] = value
        if not any(k.startswith("decoder.") for k in converted):
            missing = sorted(k for k in self.state_dict() if k.startswith("decoder."))
            raise RuntimeError(
                f"these MAE weights hold an encoder only; missing decoder weights: {', '.join(missing[:6])}"
                f"{f' (+{len(missing) - 6} more)' if len(missing) > 6 else ''}. A teacher MAE needs its decoder "
                "(the official encoder-only mae_pretrain_vit_*.pth will not do: use the full checkpoint, e.g. "
                "mae_visualize_vit_base.pth, or one written by configs/g2sd/mae_pretrain.yaml)."
            )
        return converted


class MAEPretrainer(TrainingModule):
    """MAE pre-training: pixel reconstruction of the masked patches (labels are not used).

    Logged: ``train/loss_rec`` and ``val/loss_rec`` (validation masks are drawn from a generator
    seeded by the batch index, so the value is comparable across epochs).

    Args:
        model: the :class:`MaskedAutoencoder`.
        input_key: image key of the batches.
        **kwargs: optimisation keys of :class:`~mmkd.core.classifier.TrainingModule` (MAE: AdamW
            betas (0.9, 0.95), weight decay 0.05 with ``no_weight_decay_1d``, warm-up + cosine).
    """

    def __init__(self, model: MaskedAutoencoder, input_key: str = "image", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model, self.input_key = model, input_key

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch[self.input_key]
        pred, mask = self.model(images)
        return self.total_loss({"rec": self.model.reconstruction_loss(images, pred, mask)}, "train", len(images))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch[self.input_key]
        pred, mask = self.model(images, self.model.mask_noise(len(images), images.device, seed=batch_idx))
        self.total_loss({"rec": self.model.reconstruction_loss(images, pred, mask)}, "val", len(images))


def load_mae_encoder(vit: VisionTransformer, path: str) -> None:
    """Load the encoder of MAE-style weights into a timm ``VisionTransformer`` for fine-tuning.

    Reads a checkpoint of :class:`MAEPretrainer` (``model.encoder.*``), of the G2SD generic stage
    (``student.encoder.*``), an exported ``encoder.safetensors``, or the official MAE layout.
    The classifier (``head``, ``fc_norm``) stays freshly initialised; for an average-pooling ViT
    the encoder's final norm is dropped, as MAE's fine-tuning does. Any other missing or
    mismatched key is an error that names it.
    """
    state = load_state_dict_file(path)
    for prefix in ("student.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    else:
        state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    own = vit.state_dict()
    new = ("head.", "fc_norm.")
    state = {k: v for k, v in state.items() if not k.startswith(new) and (k in own or not k.startswith("norm."))}
    missing = sorted(k for k in own if k not in state and not k.startswith(new))
    unexpected = sorted(k for k in state if k not in own)
    wrong = [f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"the MAE encoder in {path} does not fit this {type(vit).__name__}: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}. The ViT config (width, depth, "
            "patch size, image size) must match the one the MAE was trained with."
        )
    vit.load_state_dict(state, strict=False)


def vit_from_mae(vit: nn.Module, checkpoint: str) -> nn.Module:
    """``vit`` (a timm ``VisionTransformer`` with its classifier) with the encoder weights of the
    MAE in ``checkpoint`` (see :func:`load_mae_encoder`): the starting point of MAE fine-tuning."""
    load_mae_encoder(vit, checkpoint)
    return vit


def feature_predictor(in_dim: int, out_dim: int) -> Mlp:
    """G2SD's prediction head: ``Linear(in, out) -> GELU -> Linear(out, out)``, xavier-initialised."""
    mlp = Mlp(in_dim, hidden_features=out_dim, out_features=out_dim)
    mlp.apply(_mae_init)
    return mlp
