"""Objects named by import path (``"package.module.name"``), with errors that say what to fix."""

from __future__ import annotations

import difflib
import importlib
from typing import Any


def import_object(path: str, role: str = "object") -> Any:
    """The attribute ``name`` of ``package.module``, given ``"package.module.name"``.

    Args:
        path: the import path, e.g. ``"torchdistill.models.classification.resnet.resnet20"``.
        role: what the path names, for the error messages (``"builder"``, ``"class_path"``).

    Raises:
        ValueError: the path has no module part, its module does not import, or the module has
            no such attribute (the error lists close names).
    """
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{role} {path!r} is not an import path: write it as 'package.module.name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for the {role} {path!r}: {error}; is its package installed?") from error
    if not hasattr(module, attribute):
        near = difflib.get_close_matches(attribute, [n for n in dir(module) if not n.startswith("_")], n=5)
        raise ValueError(f"{module_name!r} has no {attribute!r}; close names: {near}")
    return getattr(module, attribute)
