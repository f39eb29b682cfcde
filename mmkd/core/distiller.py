"""The distillation LightningModule: student, frozen teacher, feature taps, heads, loss terms."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmkd.core.cache import TeacherCache, TeacherCacheError
from mmkd.core.class_map import ClassMap, build_class_map
from mmkd.core.classifier import Classifier, DataMismatchError, input_keys, to_channels_last
from mmkd.core.taps import FeatureTap
from mmkd.core.teacher import Teacher, check_teacher, record_teacher
from mmkd.heads import ShapeMismatchError, build_head

LOGITS = "logits"
TEACHER_VIEW = "teacher_image"  # batch entry of the teacher's own view of each image (file data modules)


class LossTerm(nn.Module):
    """One weighted distillation term: ``loss(head(student[source]), teacher[source])``.

    Args:
        name: logged as ``train/loss_{name}``.
        loss: a loss module with its own ``loss_weight`` (``mmkd.losses``); if its class sets
            ``needs_labels = True`` it also receives the labels.
        student: ``"logits"`` (the model output) or a module path in the student.
        teacher: ``"logits"`` or a module path in the teacher.
        head: alignment head from student to teacher shape (``mmkd.heads.HEAD_KINDS``), built
            from the shapes seen in a dry forward pass. Without a head, a loss whose class sets
            ``requires_equal_shapes = True`` gets equal shapes or fails at setup.
    """

    def __init__(
        self,
        name: str,
        loss: nn.Module,
        student: str = LOGITS,
        teacher: str = LOGITS,
        head: str | None = None,
    ) -> None:
        super().__init__()
        self.name, self.loss = name, loss
        self.student_source, self.teacher_source, self.head_kind = student, teacher, head
        self.head: nn.Module = nn.Identity()

    def build_head(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        student_shape, teacher_shape = list(student_shape), list(teacher_shape)
        same_classes_needed = getattr(self.loss, "requires_equal_shapes", False) and self.head_kind is None
        if self.student_source == self.teacher_source == LOGITS and same_classes_needed and student_shape != teacher_shape:
            raise ShapeMismatchError(
                f"loss term '{self.name}': the student's logits are {student_shape} and the teacher's {teacher_shape}; "
                "distilling logits needs the same classes: check num_classes of both models, or, for a teacher of "
                "other classes, set the distiller's class_map (one list of teacher class indices per student class, "
                "e.g. model.init_args.class_map=[[3], [7, 8], ...]) to map the teacher's logits onto the student's; "
                "a student of unrelated classes can learn from feature terms only"
            )
        try:
            if self.head_kind is not None:
                self.head = build_head(self.head_kind, student_shape, teacher_shape)
            elif getattr(self.loss, "requires_equal_shapes", False):
                build_head(None, student_shape, teacher_shape)
        except ShapeMismatchError as err:
            raise ShapeMismatchError(
                f"loss term '{self.name}' (student '{self.student_source}' -> teacher "
                f"'{self.teacher_source}'): {err}"
            ) from None

    def forward(self, student_value: torch.Tensor, teacher_value: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prediction = self.head(student_value)
        if getattr(self.loss, "needs_labels", False):
            return self.loss(prediction, teacher_value, labels)
        return self.loss(prediction, teacher_value)


def _shape(value: Any) -> list[int]:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a tapped module returned {type(value).__name__}, not a tensor; tap a submodule that returns one")
    return list(value.shape[1:])


def _run(model: nn.Module, role: str, batch: dict, keys: list[str], forward: Any) -> Any:
    """``forward()`` of the set-up dry run, with a model that cannot take the data's inputs (a
    3-channel teacher on grey images, a ViT of a fixed size on smaller ones) said in one line."""
    try:
        return forward()
    except RuntimeError as err:
        shapes = {key: list(batch[key].shape[1:]) for key in keys if key in batch}
        fix = (
            "Set model.init_args.teacher_input (pretrained: the teacher's own size, channels and normalisation; "
            "or e.g. {channels: 3, size: 224}) or give the teacher its own view with a file data module"
            if role == "teacher"
            else "Build the student for this input (in_chans, img_size) or change the data's size"
        )
        message = str(err).strip().splitlines()[0]
        raise DataMismatchError(f"the {role} ({type(model).__name__}) cannot take the data's inputs {shapes}: {message}. {fix}") from None


class Distiller(Classifier):
    """Trains ``student`` with cross-entropy (``ce_weight``) plus weighted distillation terms.

    The teacher is wrapped in :class:`~mmkd.core.teacher.Teacher` (frozen, eval, no_grad) and is
    not written into checkpoints (its reference is). Features named by the terms are tapped by
    module path; heads are built at ``setup`` from one dry forward pass on ``input_size`` (or the
    data module's ``input_shape``). Every term is logged as ``train/loss_{name}``; validation logs
    the student's ``val/acc`` and, on the first validation epoch, the teacher's
    ``val/teacher_acc``.

    Method distillers (``mmkd.distillers``) are subclasses that build their terms from a few
    arguments; ``Distiller`` itself takes any list of terms from the config.

    Args:
        student: the network being trained.
        teacher: a ``Teacher`` or any module (then wrapped, without loading weights).
        terms: the distillation terms.
        ce_weight: weight of the cross-entropy on labels (0 disables it).
        input_size: input shape without batch, e.g. ``[1, 28, 28]``, or one per batch key; default from
            the data module.
        teacher_cache: a folder built by ``mmkd cache`` (see :mod:`mmkd.core.cache`): training
            steps read the teacher's outputs from it instead of running the teacher; validation
            still runs the teacher. Checked against the teacher weights, data and transform; a
            cache of recorded views (``mmkd cache --views V``) also makes the data module cut
            each training image as the teacher saw it.
        teacher_input_key: batch entries the teacher takes instead of the student's input, e.g.
            ``audio`` for a cross-modal teacher or ``[image, audio]`` for a fusion teacher; the
            data module's ``input_shape`` is then a dict of shapes per entry.
        class_map: for a teacher of other classes than the student's: one list of teacher class
            indices per student class (a 10-class student of 10 ImageNet classes: ``[[0], [217],
            ...]``; a student class made of several teacher classes: ``[[281, 282, 283], ...]``),
            a ``{student class name: [teacher indices or names]}`` dict, or a JSON file with
            either (see :func:`~mmkd.core.class_map.build_class_map`; names are ImageNet WordNet
            ids or descriptions for timm teachers; a dict's student classes are put in the data
            module's ``class_names`` order at setup). The teacher's logits are mapped onto the
            student's classes (:class:`~mmkd.core.class_map.ClassMap`: the logsumexp over each
            class's teacher classes, so their softmax is the teacher's probabilities summed per
            student class and renormalised over the mapped classes) before every logit term and
            the teacher's accuracy, from the teacher's forward pass and the teacher cache alike.
            Without a map, logits of different class counts are an error for logit terms; feature
            terms work, and ``val/teacher_acc`` is then skipped.
        teacher_input: how the teacher's input differs from the student's, for data modules that
            give one view (the in-memory ones; a file data module already gives the teacher its
            own view, ``teacher_image``): ``pretrained`` (the teacher's own size, interpolation and
            normalisation from its timm / open_clip config, e.g. an ImageNet teacher at 224 px on
            28 px grey images) or a dict of ``size``, ``channels``, ``mean``, ``std``,
            ``interpolation`` (left-out keys as the data has them; ``{channels: 3}`` only repeats
            grey to RGB). Built at setup as an :class:`~mmkd.models.adapter.ImageAdapter` from the
            data module's mean/std (see :func:`~mmkd.models.adapter.teacher_input_adapter`).
        **kwargs: optimisation and data keys of :class:`~mmkd.core.classifier.Classifier`.
    """

    supports_mixup = False  # a subclass that mixes batches in its own training step sets True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        terms: list[LossTerm] | None = None,
        ce_weight: float = 1.0,
        input_size: list[int] | dict[str, list[int]] | None = None,
        teacher_cache: str | None = None,
        teacher_input_key: str | list[str] | None = None,
        class_map: list[list[int | str]] | dict[str, list[int | str]] | str | None = None,
        teacher_input: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=student, **kwargs)
        if self.mixup is not None and not self.supports_mixup:
            raise ValueError(f"{type(self).__name__} does not support mixup; remove model.init_args.mixup")
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
        self.class_map: ClassMap | None = build_class_map(class_map, self.teacher.model)
        self._teacher_acc_skipped = False
        if self.channels_last:
            to_channels_last(self.teacher.model)
        terms = list(terms or [])
        names = [term.name for term in terms]
        if len(set(names)) != len(names) or "ce" in names:
            raise ValueError(f"loss term names must be unique and not 'ce', got {names}")
        self.terms = nn.ModuleDict({term.name: term for term in terms})
        self.ce_weight = ce_weight
        self.input_size = input_size
        self.student_tap = FeatureTap(self.model, {t.student_source for t in terms} - {LOGITS})
        self.teacher_tap = FeatureTap(self.teacher.model, {t.teacher_source for t in terms} - {LOGITS})
        self.teacher_val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.teacher_val_result: float | None = None
        self.feature_shapes: dict[str, dict[str, list[int]]] | None = None
        self.teacher_cache = teacher_cache
        if not isinstance(self.input_key, str) and teacher_input_key is None:
            raise ValueError(f"the student takes several inputs {self.input_key}: set teacher_input_key to the teacher's")
        self.teacher_input_key = teacher_input_key
        if teacher_input is not None and teacher_input_key is not None:
            raise ValueError("teacher_input adapts the student's images for the teacher; with teacher_input_key the teacher reads other entries: set one")
        self.teacher_input_spec = teacher_input
        self.teacher_adapter: nn.Module | None = None  # built at setup, when the data's normalisation is known
        self._cache: TeacherCache | None = None

    @property
    def student(self) -> nn.Module:
        return self.model

    # -- set-up: heads from observed shapes ----------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.prepare_teacher(getattr(self._trainer, "datamodule", None) if self._trainer else None)
        if self.feature_shapes is None:
            self.build_heads(self.observe_shapes())
        if stage == "fit" and self.teacher_cache and self._cache is None:
            self._cache = self.open_teacher_cache()

    def prepare_teacher(self, datamodule: Any) -> None:
        """What the teacher's outputs depend on in the data module: the label order of a class map
        by name and the ``teacher_input`` adapter (also run by ``mmkd cache``, which has no trainer)."""
        class_names = getattr(datamodule, "class_names", None)
        if self.class_map is not None and class_names:  # a map by name follows the data's label order
            self.class_map = self.class_map.ordered_as(list(class_names))
        if self.teacher_input_spec is not None and self.teacher_adapter is None:
            from mmkd.models.adapter import teacher_input_adapter

            try:
                self.teacher_adapter = teacher_input_adapter(self.teacher_input_spec, self.teacher.model, datamodule)
            except ValueError as err:
                raise DataMismatchError(f"model.init_args.teacher_input: {err}") from None

    def teacher_cache_fingerprint(self, data_fingerprint: dict[str, Any]) -> dict[str, Any]:
        """What, besides the teacher's weights, must match for cached outputs to be valid."""
        teacher_input = f"{type(self).teacher_input.__module__}.{type(self).teacher_input.__qualname__}"
        return {**data_fingerprint, "teacher_input": teacher_input, "teacher_input_key": self.teacher_input_key,
                "teacher_input_spec": self.teacher_input_spec}  # fmt: skip

    def open_teacher_cache(self) -> TeacherCache:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "teacher_cache_dataset"):
            raise TeacherCacheError(f"{type(datamodule).__name__} does not declare teacher_cache_dataset(); it cannot use a teacher cache")
        cache = TeacherCache(self.teacher_cache)
        _, data_fingerprint = datamodule.teacher_cache_dataset(cache.views)
        needed = {LOGITS, *self.teacher_tap.paths}
        cache.verify(self.teacher.reference()["weights_sha256"], self.teacher_cache_fingerprint(data_fingerprint), needed)
        if cache.views:  # train on the views the teacher saw
            if not hasattr(datamodule, "replay_views"):
                raise TeacherCacheError(f"{type(datamodule).__name__} cannot replay the recorded views of teacher cache {cache.path}")
            datamodule.replay_views(cache.recorded_views())
        return cache

    def example_batch(self) -> dict[str, torch.Tensor]:
        """Two samples of zeros for every input the student and the teacher take."""
        size = self.input_size
        if size is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
            size = getattr(datamodule, "input_shape", None)
        if size is None:
            raise DataMismatchError(
                f"the input shape is unknown ({type(datamodule).__name__ if datamodule is not None else 'no data module'} has no "
                "input_shape): set model.init_args.input_size to the shape of one input without the batch, e.g. [3, 224, 224]"
            )
        keys = set(input_keys(self.input_key)) | set(input_keys(self.teacher_input_key or []))
        if isinstance(size, dict) and self.teacher_input_key is None and TEACHER_VIEW in size:
            keys.add(TEACHER_VIEW)
        shapes = size if isinstance(size, dict) else dict.fromkeys(keys, size)
        if keys - shapes.keys():
            raise ValueError(f"no input shape for {sorted(keys - shapes.keys())}: the shapes known are {shapes}")
        device = next(self.model.parameters()).device
        return {key: torch.zeros(2, *shapes[key], device=device) for key in keys}

    @torch.no_grad()
    def observe_shapes(self) -> dict[str, dict[str, list[int]]]:
        """One forward pass of student and teacher on a zero batch, in eval mode (so BatchNorm
        statistics are untouched), returning the shapes at every tapped source."""
        batch = self.example_batch()
        was_training = self.model.training
        self.model.eval()
        try:
            student_features = {LOGITS: _run(self.model, "student", batch, input_keys(self.input_key), lambda: self.model(*self.model_inputs(batch)))}
            student_features.update(self.student_tap.pop())
            teacher_keys = input_keys(self.teacher_input_key or (TEACHER_VIEW if TEACHER_VIEW in batch else self.input_key))
            teacher_logits = _run(self.teacher.model, "teacher", batch, teacher_keys, lambda: self.teacher_forward(batch))
            if self.class_map is not None:
                self.class_map.check(_shape(teacher_logits)[-1], _shape(student_features[LOGITS])[-1])
            teacher_features = {LOGITS: self.map_teacher_logits(teacher_logits), **self.teacher_tap.pop()}
        finally:
            self.model.train(was_training)
        return {
            "student": {path: _shape(v) for path, v in student_features.items()},
            "teacher": {path: _shape(v) for path, v in teacher_features.items()},
        }

    def build_heads(self, shapes: dict[str, dict[str, list[int]]]) -> None:
        for term in self.terms.values():
            term.build_head(shapes["student"][term.student_source], shapes["teacher"][term.teacher_source])
        self.feature_shapes = shapes

    # -- one training step ---------------------------------------------------------------------
    def teacher_input(self, student_input: torch.Tensor) -> torch.Tensor:
        """What the teacher sees of the student's input: through the ``teacher_input`` adapter
        when one is set; methods with their own teacher resolution override this."""
        return student_input if self.teacher_adapter is None else self.teacher_adapter(student_input)

    def teacher_forward(self, batch: dict) -> torch.Tensor:
        """The teacher's output: on ``teacher_input_key``'s entries when set, else on the
        teacher's own view of the batch (``teacher_image``) when the data gives one, else on
        :meth:`teacher_input` of the student's input."""
        if self.teacher_input_key is not None:
            return self.teacher(*(batch[key] for key in input_keys(self.teacher_input_key)))
        if TEACHER_VIEW in batch:
            return self.teacher(batch[TEACHER_VIEW])
        return self.teacher(self.teacher_input(batch[self.input_key]))

    def input_views(self) -> dict[str, Any]:
        """The student's view (:meth:`Classifier.input_views`) and, when the teacher's own
        preprocessing (timm / open_clip config) differs from it, the teacher's as
        ``teacher_image``: a file data module then crops each image once and gives each model
        that crop in its own size and normalisation. Not with ``teacher_input_key`` (the
        teacher reads other entries)."""
        from mmkd.data.views import view_of_model

        views = super().input_views()
        if self.teacher_input_key is None and isinstance(self.input_key, str):
            teacher_view = view_of_model(self.teacher.model)
            if teacher_view is not None and teacher_view != views.get(self.input_key):
                views[TEACHER_VIEW] = teacher_view
        return views

    def map_teacher_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the student's classes: through ``class_map`` when one is set."""
        return logits if self.class_map is None else self.class_map(logits)

    def teacher_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The teacher's logits and tapped features for ``batch``: read from the teacher cache in
        training when one is set, else from a forward pass; the logits mapped onto the student's
        classes (:meth:`map_teacher_logits`) either way."""
        if self._cache is not None and self.training:
            outputs = self._cache.lookup(batch["index"], batch[self.label_key].device, batch.get("view"))
        else:
            outputs = {LOGITS: self.teacher_forward(batch), **self.teacher_tap.pop()}
        outputs[LOGITS] = self.map_teacher_logits(outputs[LOGITS])
        return outputs

    def term_scale(self, name: str) -> float:
        """Schedule factor of a term (1 here; DKD's warm-up overrides it)."""
        return 1.0

    def distillation_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch[self.label_key]
        student = {LOGITS: self.model(*self.model_inputs(batch)), **self.student_tap.pop()}
        teacher = self.teacher_outputs(batch)
        losses = {"ce": self.ce_weight * self.ce_loss(student[LOGITS], self.training_targets(batch))} if self.ce_weight else {}
        for name, term in self.terms.items():
            value = term(student[term.student_source], teacher[term.teacher_source], labels)
            losses[name] = value * self.term_scale(name)
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.total_loss(self.distillation_losses(batch), "train", len(batch[self.label_key]))

    # -- validation: the student, and the teacher once -----------------------------------------
    def update_teacher_accuracy(self, batch: dict) -> None:
        """The teacher's validation accuracy is measured once, in the first validation epoch, on
        its logits mapped by ``class_map``; a teacher whose logits are not over the student's
        classes (no map) has none, which is said once."""
        if self.teacher_val_result is None and not self.trainer.sanity_checking and not self._teacher_acc_skipped:
            logits = self.map_teacher_logits(self.teacher_forward(batch))
            if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
                self._teacher_acc_skipped = True
                rank_zero_info(
                    f"val/teacher_acc skipped: the teacher's outputs {list(logits.shape[1:])} are not logits over the "
                    f"student's {self.num_classes} classes (set class_map to map a teacher of other classes)"
                )
                return
            self.teacher_val_acc.update(logits, batch[self.label_key])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.update_teacher_accuracy(batch)
        self.student_tap.clear()
        self.teacher_tap.clear()

    def on_validation_epoch_end(self) -> None:
        if self.teacher_val_result is None and not self.trainer.sanity_checking and not self._teacher_acc_skipped:
            self.teacher_val_result = float(self.teacher_val_acc.compute())
            self.teacher_val_acc.reset()
            self.warn_if_teacher_at_chance(self.teacher_val_result)
        if self.teacher_val_result is not None:
            self.log("val/teacher_acc", self.teacher_val_result)

    def warn_if_teacher_at_chance(self, accuracy: float) -> None:
        """A teacher that is no better than chance on the validation data is nearly always a
        teacher from elsewhere whose classes are in another order than the data's (a folder's
        classes are sorted by name) or whose input is prepared differently: said once, with the
        data's class order, rather than distilling its mistakes for a whole run. "No better"
        is less than a tenth of the way from chance to 100 %."""
        chance = 1.0 / self.num_classes
        if accuracy >= chance + 0.1 * (1.0 - chance):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        names = tuple(getattr(datamodule, "class_names", ()) or ())
        order = f" (the data's classes in label order: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else ""
        rank_zero_warn(
            f"val/teacher_acc is {accuracy:.1%}, no better than chance ({chance:.1%} for {self.num_classes} classes): the teacher "
            f"probably numbers its classes in another order than the data{order}; give its order as "
            "data.init_args.classes, or map its classes with model.init_args.class_map. If the order is right, its input "
            "is prepared differently from its training: check the data's mean, std, image_size and channels "
            "(or teacher_input / teacher_view)."
        )

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self.student_tap.clear()

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        output = super().predict_step(batch, batch_idx)
        self.student_tap.clear()
        return output

    # -- checkpoints: no teacher weights, but its reference ------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        record_teacher(checkpoint, self.teacher)
        checkpoint["mmkd"].update(feature_shapes=self.feature_shapes, teacher_val_acc=self.teacher_val_result)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        check_teacher(checkpoint, self.teacher)
        info = checkpoint.get("mmkd", {})
        if self.feature_shapes is None and info.get("feature_shapes"):
            self.build_heads(info["feature_shapes"])
        self.teacher_val_result = info.get("teacher_val_acc", self.teacher_val_result)
