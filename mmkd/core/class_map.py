"""Teacher classes mapped onto the student's: a 1000-class ImageNet teacher distilled into a
student of 10 of those classes, or of classes that each gather several teacher classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import nn

#: what a config gives as ``class_map``: one list of teacher classes (indices or names) per student
#: class, a ``{student class name: [teacher classes]}`` dict, or the path of a JSON file with either
ClassMapSpec = Union[list[list[Union[int, str]]], dict[str, list[Union[int, str]]], str]


class ClassMapError(ValueError):
    """A class map that does not fit the teacher or the student."""


class ClassMap(nn.Module):
    """Teacher logits over ``T`` classes mapped to logits over the student's ``S`` classes.

    Student class ``s`` gathers the teacher classes ``G_s`` (``groups[s]``); its mapped logit is
    the logsumexp of the teacher's logits over them::

        mapped_s = log sum_{t in G_s} exp(z_t)

    which is, up to a constant shared by all classes, the log of the teacher's probability mass on
    ``G_s``. So ``softmax(mapped)_s = sum_{t in G_s} p_t / sum_{s'} sum_{t in G_s'} p_t`` with
    ``p = softmax(z)``: the teacher's probabilities summed over each group and renormalised over
    the mapped classes (the teacher classes outside every group drop out). With one teacher class
    per student class, ``mapped`` is those logits themselves, and a loss's temperature ``T`` gives
    the teacher's tempered distribution renormalised over them. With groups, the temperature
    applies to the mapped logits: ``softmax(mapped / T)_s`` is proportional to
    ``(sum_{t in G_s} p_t) ** (1 / T)``, i.e. the groups' mass is summed at temperature 1, then
    softened.

    Each teacher class belongs to at most one student class. The map has no weights (its index
    buffers are not written into checkpoints).

    Args:
        groups: one non-empty list of teacher class indices per student class.
        names: the student class names, in order (from a ``{name: [...]}`` spec), if known.
    """

    def __init__(self, groups: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> None:
        super().__init__()
        groups = [[int(t) for t in group] for group in groups]
        if not groups:
            raise ClassMapError("class_map is empty: give one list of teacher classes per student class")
        empty = [s for s, group in enumerate(groups) if not group]
        if empty:
            raise ClassMapError(f"class_map: student classes {empty} have no teacher class")
        negative = sorted({t for group in groups for t in group if t < 0})
        if negative:
            raise ClassMapError(f"class_map: teacher class indices must be >= 0, got {negative}")
        owner: dict[int, int] = {}
        for s, group in enumerate(groups):
            for t in group:
                if t in owner:
                    where = f"student class {s}" if owner[t] == s else f"student classes {owner[t]} and {s}"
                    raise ClassMapError(
                        f"class_map: teacher class {t} is listed twice ({where}); each teacher class can belong to "
                        "one student class only, or its probability would be counted twice"
                    )
                owner[t] = s
        if names is not None and len(names) != len(groups):
            raise ClassMapError(f"class_map: {len(names)} names for {len(groups)} student classes")
        self.groups = groups
        self.names = list(names) if names is not None else None
        width = max(len(group) for group in groups)
        index = torch.zeros(len(groups), width, dtype=torch.long)
        padding = torch.full((len(groups), width), float("-inf"))  # 0 where a group has a member
        for s, group in enumerate(groups):
            index[s, : len(group)] = torch.tensor(group)
            padding[s, : len(group)] = 0.0
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("padding", padding, persistent=False)

    @property
    def num_student_classes(self) -> int:
        return len(self.groups)

    @property
    def max_teacher_class(self) -> int:
        return max(t for group in self.groups for t in group)

    def check(self, teacher_classes: int, student_classes: int) -> None:
        """Refuse a map that does not fit logits of ``teacher_classes`` and ``student_classes``."""
        if self.num_student_classes != student_classes:
            raise ClassMapError(
                f"class_map has {self.num_student_classes} student classes but the student's logits have "
                f"{student_classes}: give one list of teacher classes per student class, in the student's label order"
            )
        if self.max_teacher_class >= teacher_classes:
            bad = sorted({t for group in self.groups for t in group if t >= teacher_classes})
            raise ClassMapError(
                f"class_map names teacher classes {bad[:10]}, but the teacher's logits have {teacher_classes} "
                f"classes (0..{teacher_classes - 1})"
            )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` teacher logits -> ``[..., S]`` mapped logits (see the class docstring)."""
        if logits.shape[-1] <= self.max_teacher_class:
            self.check(logits.shape[-1], self.num_student_classes)
        gathered = logits[..., self.index]  # [..., S, width]
        if self.index.shape[1] == 1:
            return gathered[..., 0]
        return torch.logsumexp(gathered + self.padding, dim=-1)

    def ordered_as(self, class_names: Sequence[str]) -> "ClassMap":
        """This map with its student classes in the order of ``class_names`` (a data module's),
        for a map given by name; the names must be the same set."""
        if self.names is None or list(self.names) == list(class_names):
            return self
        if sorted(self.names) != sorted(class_names):
            missing = sorted(set(class_names) - set(self.names))
            unknown = sorted(set(self.names) - set(class_names))
            raise ClassMapError(
                f"class_map's student classes are not the data's: not in the map {missing[:10]}, not in the data "
                f"{unknown[:10]} (the data's classes: {list(class_names)[:20]})"
            )
        position = {name: s for s, name in enumerate(self.names)}
        return ClassMap([self.groups[position[name]] for name in class_names], list(class_names)).to(self.index.device)

    def extra_repr(self) -> str:
        return f"{self.num_student_classes} student classes <- {sum(len(g) for g in self.groups)} teacher classes"


def teacher_class_names(model: nn.Module) -> list[list[str]] | None:
    """Names of a teacher's classes, several per class (each is accepted in a class map): the
    model's own ``class_names`` if it has them, else for a timm model of an ImageNet label space
    (``timm.data.infer_imagenet_subset``) each class's WordNet id (``n01440764``), its description
    (``tench, Tinca tinca``) and each comma-separated part of it (``tench``)."""
    names = getattr(model, "class_names", None)
    if names:
        return [[str(name)] for name in names]
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
    except Exception:  # not a timm model, or a label space timm has no names for
        return None
    out = []
    for index in range(info.num_classes()):
        description = info.index_to_description(index)
        out.append([info.index_to_label_name(index), description, *(part.strip() for part in description.split(","))])
    return out


def _teacher_index(entry: int | str, names: list[list[str]] | None, student: str) -> int:
    if isinstance(entry, int) or (isinstance(entry, str) and entry.strip().lstrip("-").isdigit()):
        return int(entry)
    if names is None:
        raise ClassMapError(
            f"class_map: student class {student} names the teacher class {entry!r}, but the teacher's class names are "
            "unknown (mmkd knows them for timm ImageNet models and for teachers with a class_names attribute); use indices"
        )
    wanted = entry.strip().lower()
    found = [t for t, aliases in enumerate(names) if wanted in (alias.lower() for alias in aliases)]
    if len(found) == 1:
        return found[0]
    if not found:
        import difflib

        choices = sorted({alias for aliases in names for alias in aliases})
        near = difflib.get_close_matches(entry, choices, n=5)
        raise ClassMapError(f"class_map: student class {student}: no teacher class named {entry!r}; close names: {near}")
    raise ClassMapError(
        f"class_map: student class {student}: the teacher name {entry!r} is ambiguous (teacher classes {found}); use an index"
    )


def build_class_map(spec: ClassMapSpec | ClassMap | None, teacher: nn.Module | None = None) -> ClassMap | None:
    """A :class:`ClassMap` from what a config gives: a list of lists (one per student class) of
    teacher class indices or names, a ``{student class name: [teacher indices or names]}`` dict
    (a single index or name may stand for a one-element list), or the path of a JSON file holding
    either. Names are resolved through :func:`teacher_class_names` of ``teacher``."""
    if spec is None or isinstance(spec, ClassMap):
        return spec
    source = "class_map"
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class_map file not found: {path}")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ClassMapError(f"class_map file {path} is not valid JSON: {err}") from None
        source = str(path)
    names = None
    if isinstance(spec, dict):
        names = [str(name) for name in spec]
        entries: list[Any] = list(spec.values())
    elif isinstance(spec, (list, tuple)):
        entries = list(spec)
    else:
        raise ClassMapError(f"{source}: expected a list of lists or a {{student class: [teacher classes]}} dict, got {type(spec).__name__}")
    teacher_names = None
    needs_names = any(isinstance(t, str) and not t.strip().lstrip("-").isdigit() for e in entries for t in (e if isinstance(e, (list, tuple)) else [e]))
    if needs_names and teacher is not None:
        teacher_names = teacher_class_names(teacher)
    groups = []
    for s, entry in enumerate(entries):
        label = repr(names[s]) if names else str(s)
        members = entry if isinstance(entry, (list, tuple)) else [entry]
        if not all(isinstance(t, (int, str)) and not isinstance(t, bool) for t in members):
            raise ClassMapError(f"{source}: student class {label}: teacher classes must be indices or names, got {entry!r}")
        groups.append([_teacher_index(t, teacher_names, label) for t in members])
    return ClassMap(groups, names)
