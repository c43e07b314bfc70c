"""Digest transforms: ``sha256`` and ``md5`` write a sidecar checksum file.

The sidecar is ``DEST/.fetcher/derived/<sha256|md5>/<input path>.<sha256|md5>`` and
holds one line in ``sha256sum``/``md5sum`` format (``<hex>  <file name>``), so
``sha256sum -c`` works from the input's directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .registry import Transform, atomic_output, derived_path, register, take

_BLOCK = 1 << 20


class _Digest(Transform):
    algorithm = ""

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        take(args, spec, ())

    def apply(self, path: Path, dest: Path) -> list[Path]:
        h = hashlib.new(self.algorithm, usedforsecurity=False)
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        final = derived_path(path, dest, self.name, append=f".{self.name}")
        with atomic_output(final) as tmp:
            tmp.write_text(f"{h.hexdigest()}  {path.name}\n", encoding="utf-8")
        return [final]


@register("sha256")
class Sha256(_Digest):
    """SHA-256 sidecar file."""

    algorithm = "sha256"


@register("md5")
class Md5(_Digest):
    """MD5 sidecar file (for matching published checksums, not for security)."""

    algorithm = "md5"
