"""What the built-in loggers share: the import check and hyperparameters as plain scalars."""

from __future__ import annotations

import importlib.util
from typing import Any


def missing_module(name: str) -> str | None:
    """``name`` when it cannot be imported here, else None (nothing is imported)."""
    try:
        return None if importlib.util.find_spec(name) is not None else name
    except (ImportError, ValueError):
        return name


def scalar_hparams(hparams: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Every value a number, a bool or a string (lists and None as text), as tracking tools take them."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
