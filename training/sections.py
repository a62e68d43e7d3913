"""The params sections of the commands around training (`generate:`, `evaluate:`, `registry:`,
`compare:`): each is given as a Params (its raw section) or as the raw section mapping itself.
Kept apart from `training.config` so that reading one pulls in no training stack (torch)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from pipeline.config import Params, build


def section_config(cls: type, params: Params | Mapping[str, Any] | None, name: str,
                   overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """Build dataclass `cls` from the `name:` section: a Params' raw section, or the raw section
    mapping itself (None: the defaults); `overrides` (top-level keys; None values ignored) replace
    the section's keys. The caller checks what goes beyond the field types."""
    raw = params.extra.get(name) if isinstance(params, Params) else params
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        raw = {**dict(raw or {}), **given}
    return build(cls, raw or {}, name)
