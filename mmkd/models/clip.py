"""open_clip models: building them (a hub tag, a local file, or a config shipped here), the
zero-shot classifier a CLIP becomes as a teacher, and contrastive training of a small CLIP on a
labelled image set whose captions are built from class names and templates."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmkd.core.checkpoint import load_state, load_state_dict_file
from mmkd.core.classifier import TrainingModule
from mmkd.models.adapter import ImageAdapter, set_input_normalization

# CLIP's "ensemble of 7" ImageNet prompts, as used by Tip-Adapter and DHO's ImageNet scripts.
IMAGENET_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)  # fmt: skip
# Captions for contrastive training on a labelled set: varied wording around the class name.
CAPTION_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
    "a close-up photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a photo of my {}.", "a cropped photo of the {}.", "a {}.",
)  # fmt: skip
TEMPLATE_SETS = {"imagenet7": IMAGENET_TEMPLATES, "captions": CAPTION_TEMPLATES, "simple": ("a photo of a {}.",)}

CONFIG_DIR = Path(__file__).parent / "clip_configs"


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named set (``"imagenet7"``, ``"captions"``, ``"simple"``), one template, or a list."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        templates = [templates]
    templates = tuple(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates must be one of {sorted(TEMPLATE_SETS)} or strings with '{{}}' for the class name; got {bad or templates}")
    return templates


def _register_configs() -> None:
    import open_clip

    if "mmkd-clip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def create_clip(name: str, pretrained: str | None = None) -> nn.Module:
    """An open_clip model by name, with weights from a tag (``"openai"``, ``"dfn5b"``: downloaded
    by open_clip) or a local file, loaded strictly: a ``torch.save(model.state_dict())`` file
    (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, an open_clip training checkpoint
    (``state_dict`` with DDP's ``module.`` prefix, stripped), or a checkpoint of
    :class:`CLIPTrainer`. Configs shipped with mmkd (``mmkd-clip-tiny``) are registered with
    open_clip first."""
    import open_clip

    _register_configs()
    if name not in open_clip.list_models():
        near = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model {name!r}; close names: {near}. `open_clip.list_models()` lists all.")
    local = pretrained is not None and (Path(pretrained).suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors") or "/" in pretrained)
    if not local:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained is not None and pretrained not in tags:
            raise ValueError(f"{name} has no pretrained tag {pretrained!r} (tags: {tags}); a local weights file needs its path")
        try:
            return open_clip.create_model(name, pretrained=pretrained)
        except RuntimeError as err:
            raise RuntimeError(
                f"cannot get the {pretrained!r} weights of {name}: {err}. Without network access, download "
                "the weights elsewhere and pass the local file as `pretrained`."
            ) from err
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path}. Train them with `mmkd fit -c configs/dho/clip_fmnist.yaml` or fix the path.")
    model = _random_init_quietly(name)
    load_state(model, load_state_dict_file(path), str(path))  # a DDP run's ``module.`` prefix is stripped there
    return model


def _random_init_quietly(name: str) -> nn.Module:
    """open_clip's model, built without weights, which mmkd loads next: without open_clip's
    warning that it stays randomly initialised."""
    import open_clip

    def not_the_random_init_warning(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(not_the_random_init_warning)
    try:
        return open_clip.create_model(name)
    finally:
        root.removeFilter(not_the_random_init_warning)


@torch.no_grad()
def zero_shot_weights(
    model: nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: str | Sequence[str] = "imagenet7",
    normalize_prompts: bool = True,
    renormalize: bool = True,
    replace_underscores: bool = True,
) -> torch.Tensor:
    """Class weights ``[D, C]`` of a zero-shot classifier: each class's prompts encoded by the
    text tower, each L2-normalised (``normalize_prompts``), averaged over templates, and the mean
    L2-normalised again (``renormalize``). DHO's code renormalises for OpenAI CLIP teachers but
    not for DFN5B, and initialises its student heads from unnormalised means (both off).

    ``replace_underscores`` writes ``_`` in class names as spaces in the prompts. DHO's code does
    so on its OpenAI-CLIP paths (``clip_classifier`` of every training script and the student
    heads' text initialisation of ``train_imgnet_semi.py``) but not on its DFN5B teacher path
    (``train_imgnet_semi.py:369-385``; ``reference/dho_g2sd.md`` §1.3), where names go into the
    templates as they are: set it off to reproduce that path."""
    templates = resolve_templates(templates)
    device = next(model.parameters()).device
    columns = []
    for name in class_names:
        prompt_name = name.replace("_", " ") if replace_underscores else name
        texts = [template.format(prompt_name) for template in templates]
        embeddings = model.encode_text(tokenizer(texts).to(device)).float()
        if normalize_prompts:
            embeddings = F.normalize(embeddings, dim=-1)
        mean = embeddings.mean(0)
        columns.append(F.normalize(mean, dim=0) if renormalize else mean)
    return torch.stack(columns, dim=1)


def clip_adapter(visual: nn.Module, input_mean: float | None = None, input_std: float | None = None) -> ImageAdapter:
    """The :class:`ImageAdapter` to an open_clip image tower's resolution and normalisation."""
    cfg = getattr(visual, "preprocess_cfg", {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    return ImageAdapter(
        size, cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
        input_mean=input_mean, input_std=input_std, interpolation=cfg.get("interpolation", "bicubic"),
    )  # fmt: skip


class ZeroShotClassifier(nn.Module):
    """A CLIP image tower plus text-derived class weights: ``logits = scale * normalize(f) @ W``.

    As DHO's teacher (``clip_classifier`` and the teacher forward of its training scripts): ``W``
    from :func:`zero_shot_weights` over ``templates``, the image feature L2-normalised, a fixed
    ``logit_scale`` of 100 (``None`` uses the model's learned ``exp(logit_scale)``). The text
    tower runs once here and is not kept. Inputs are the data's normalised batches; the
    :class:`ImageAdapter` resizes them to the tower's resolution and normalisation (the data's
    mean/std come from ``input_mean``/``input_std`` or, in a distiller, from the data module).

    Args:
        model_name: open_clip model name (``"ViT-B-16"``, ``"mmkd-clip-tiny"``, ...).
        pretrained: open_clip tag or local weights file (see :func:`create_clip`).
        class_names: one name per class, in label order.
        templates: ``"imagenet7"``, ``"simple"``, one template or a list.
        renormalize: renormalise the class weights after the template mean (off for DFN5B in DHO).
        logit_scale: the fixed scale, or ``None`` for the model's own.
        replace_underscores: ``_`` in class names as spaces in the prompts (DHO's OpenAI-CLIP
            teachers: on; its DFN5B teacher: off; see :func:`zero_shot_weights`).
    """

    def __init__(
        self,
        model_name: str,
        class_names: list[str],
        pretrained: str | None = None,
        templates: str | list[str] = "imagenet7",
        renormalize: bool = True,
        logit_scale: float | None = 100.0,
        input_mean: float | None = None,
        input_std: float | None = None,
        replace_underscores: bool = True,
    ) -> None:
        super().__init__()
        import open_clip

        model = create_clip(model_name, pretrained)
        model.eval()
        weights = zero_shot_weights(
            model, open_clip.get_tokenizer(model_name), class_names, templates, renormalize=renormalize, replace_underscores=replace_underscores
        )
        self.visual = model.visual
        self.register_buffer("class_weights", weights)
        self.logit_scale = float(model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale)
        self.adapter = clip_adapter(self.visual, input_mean, input_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.visual(self.adapter(images)).float(), dim=-1)
        return self.logit_scale * features @ self.class_weights


class CLIPTrainer(TrainingModule):
    """Contrastive (CLIP) training of an open_clip model on a labelled image set.

    Each training image is paired with a caption: a template drawn at random from
    ``caption_templates`` filled with its class name. The loss is open_clip's ``ClipLoss``
    (symmetric InfoNCE with the learned temperature; gathered over processes under DDP). All
    ``templates x classes`` captions are encoded once per step and indexed, which gives the same
    features and gradients as encoding each caption of the batch, for far fewer text tokens.
    Validation and test report the zero-shot accuracy (``val/acc``, ``test/acc``) of the
    classifier built from ``zero_shot_templates``, as :class:`ZeroShotClassifier` would.

    Args:
        model_name: open_clip model (``mmkd-clip-tiny`` ships with mmkd).
        class_names: class names in label order.
        pretrained: optional starting weights (tag or file).
        caption_templates: templates for training captions.
        zero_shot_templates: templates of the evaluation classifier.
        export_path: at the end of fit, the model's weights in open_clip's layout (safetensors),
            loadable as ``pretrained`` by :func:`create_clip` and :class:`ZeroShotClassifier`.
        **kwargs: optimisation keys of :class:`~mmkd.core.classifier.TrainingModule`.
    """

    def __init__(
        self,
        model_name: str,
        class_names: list[str],
        pretrained: str | None = None,
        caption_templates: str | list[str] = "captions",
        zero_shot_templates: str | list[str] = "imagenet7",
        export_path: str | None = None,
        input_key: str = "image",
        label_key: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        import open_clip

        self.model = create_clip(model_name, pretrained)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.class_names = list(class_names)
        templates = resolve_templates(caption_templates)
        tokens = self.tokenizer([t.format(c.replace("_", " ")) for t in templates for c in self.class_names])
        self.register_buffer("caption_tokens", tokens, persistent=False)  # [templates * classes, L]
        self.zero_shot_templates = zero_shot_templates
        self.adapter = clip_adapter(self.model.visual)
        self.export_path = export_path
        self.input_key, self.label_key = input_key, label_key
        self.val_acc = MulticlassAccuracy(len(self.class_names), average="micro")
        self.test_acc = MulticlassAccuracy(len(self.class_names), average="micro")
        self._class_weights: torch.Tensor | None = None
        self._loss: nn.Module | None = None

    def setup(self, stage: str) -> None:
        from open_clip import ClipLoss

        set_input_normalization(self, self.trainer.datamodule)
        world = self.trainer.world_size
        self._loss = ClipLoss(gather_with_grad=world > 1, rank=self.global_rank, world_size=world)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch[self.input_key], batch[self.label_key]
        num_classes = len(self.class_names)
        template = torch.randint(len(self.caption_tokens) // num_classes, labels.shape, device=labels.device)
        caption_features = self.model.encode_text(self.caption_tokens, normalize=True)
        text_features = caption_features[template * num_classes + labels]
        image_features = self.model.encode_image(self.adapter(images), normalize=True)
        loss = self._loss(image_features, text_features, self.model.logit_scale.exp())
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), on_step=True, on_epoch=False)
        return self.total_loss({"contrastive": loss}, "train", len(labels))

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():  # as open_clip's training loop: the temperature stays below 100
            self.model.logit_scale.clamp_(0, 4.6052)

    # -- zero-shot evaluation ------------------------------------------------------------------
    def _zero_shot(self, batch: dict, metric: MulticlassAccuracy, stage: str) -> None:
        if self._class_weights is None:
            self._class_weights = zero_shot_weights(self.model, self.tokenizer, self.class_names, self.zero_shot_templates)
        features = F.normalize(self.model.encode_image(self.adapter(batch[self.input_key])).float(), dim=-1)
        metric.update(features @ self._class_weights, batch[self.label_key])
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(features))

    def on_validation_epoch_start(self) -> None:
        self._class_weights = None

    def on_test_epoch_start(self) -> None:
        self._class_weights = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._zero_shot(batch, self.val_acc, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._zero_shot(batch, self.test_acc, "test")

    def on_fit_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            from safetensors.torch import save_file

            path = Path(self.export_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            tmp = path.with_suffix(path.suffix + ".tmp")
            save_file(state, str(tmp))
            tmp.replace(path)
            logging.getLogger(__name__).info("CLIP weights written to %s", path)
