"""Machine-readable output shared by every command (shapes: ``formats/json.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON; objects with ``to_json()`` serialise themselves."""
    click.echo(json.dumps(data, indent=2, default=_json_default))
