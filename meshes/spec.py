"""Mesh specs: how many devices a phase gets and how it splits them.

A spec is ``TPxDP`` (``4x1``: 4-way tensor parallel, one replica; ``2x2``: two replicas, each 2-way tensor
parallel) or the explicit ``tp=4,dp=1``. The text form is what users type on the command line, so parsing
errors name the text and the expected forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TPXDP = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_KEYVAL = re.compile(r"^\s*(tp|dp)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class MeshSpec:
    """Tensor-parallel degree ``tp`` inside one replica, ``dp`` independent replicas."""

    tp: int
    dp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"mesh spec needs tp >= 1 and dp >= 1, got tp={self.tp}, dp={self.dp}")

    @property
    def num_devices(self) -> int:
        return self.tp * self.dp

    def __str__(self) -> str:
        return f"{self.tp}x{self.dp}"


def parse_mesh_spec(text: str | MeshSpec) -> MeshSpec:
    """Parse ``"4x1"`` or ``"tp=4,dp=1"`` (either key may be omitted and defaults to 1)."""
    if isinstance(text, MeshSpec):
        return text
    match = _TPXDP.match(text)
    if match:
        return MeshSpec(tp=int(match.group(1)), dp=int(match.group(2)))
    values = {"tp": 1, "dp": 1}
    parts = [p for p in text.split(",") if p.strip()]
    seen: set[str] = set()
    for part in parts:
        kv = _KEYVAL.match(part)
        if not kv or kv.group(1) in seen:
            parts = []
            break
        seen.add(kv.group(1))
        values[kv.group(1)] = int(kv.group(2))
    if not parts:
        raise ValueError(f"invalid mesh spec {text!r}: expected 'TPxDP' (e.g. '4x1', '2x2') or 'tp=N,dp=M'")
    return MeshSpec(tp=values["tp"], dp=values["dp"])
