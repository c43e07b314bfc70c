"""Image transforms (Pillow, imported lazily; ``pip install 'fetcher[images]'``).

``thumbnail:SIZE``  fit within SIZE (``256`` or ``320x200``), keep the aspect ratio and
                    the format; JPEG is decoded in draft mode (DCT scaling), so large
                    photos shrink fast.
``resize:WxH``      exactly WxH; ``Wx`` or ``xH`` keeps the aspect ratio.
``grayscale``       one channel (alpha kept where the format has it), same format.
``convert:FORMAT``  re-encode as jpeg, png, webp, gif, bmp or tiff (new extension).

Common arguments: ``max_pixels=N`` (default 89,478,485, Pillow's own threshold):
larger images are refused as decompression bombs before their pixels are decoded;
``quality=1..95`` for JPEG/WebP output (default 85). Only the raster formats above
are opened (``Image.open(formats=...)``), never the long tail of Pillow plug-ins.
EXIF orientation is applied. An animated GIF/WebP keeps its first frame. Output:
``DEST/.fetcher/derived/<transform>/<input path>`` (see ``derived_path``).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError, ProcessingError
from .registry import (
    Transform,
    atomic_output,
    derived_path,
    display_path,
    parse_int,
    register,
    take,
)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
          "TIFF": ".tiff"}
_ALIASES = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF",
            "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}
DEFAULT_MAX_PIXELS = 89_478_485
_ORIENTATION = 0x0112


class _ImageTransform(Transform):
    suffixes: ClassVar[tuple[str, ...] | None] = (
        ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
    options: ClassVar[tuple[str, ...]] = ("max_pixels", "quality")

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        take(args, spec, self.positional + self.options)
        if importlib.util.find_spec("PIL") is None:
            raise ConfigError(f"--post {spec} needs Pillow: pip install 'fetcher[images]'")
        self.max_pixels = parse_int(spec, "max_pixels", args.get("max_pixels", "")) \
            if "max_pixels" in args else DEFAULT_MAX_PIXELS
        self.quality = parse_int(spec, "quality", args["quality"]) if "quality" in args else 85
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--post {spec}: quality must be 1..100")

    # -- helpers
    def _fail(self, message: str, path: Path, dest: Path) -> ProcessingError:
        return ProcessingError(message, transform=self.spec, path=display_path(path, dest))

    def _open(self, path: Path, dest: Path) -> Any:
        """Open (header only), refusing unexpected formats and pixel bombs."""
        from PIL import Image, UnidentifiedImageError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(path, formats=list(FORMATS))
            except Image.DecompressionBombError as exc:
                raise self._fail(f"refused as a decompression bomb: {exc}", path, dest) from None
            except UnidentifiedImageError:
                raise self._fail(f"not a {'/'.join(FORMATS)} image", path, dest) from None
        w, h = img.size
        if w * h > self.max_pixels:
            img.close()
            raise self._fail(f"image is {w}x{h} = {w * h:,} pixels, over the limit of "
                             f"{self.max_pixels:,} (decompression bomb?)", path, dest)
        return img

    def _load(self, img: Any, path: Path, dest: Path) -> Any:
        from PIL import Image, ImageOps

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
                return ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise self._fail(f"cannot decode image: {exc}", path, dest) from None

    def _save(self, img: Any, fmt: str, final: Path) -> Path:
        params: dict[str, Any] = {}
        if fmt in ("JPEG", "WEBP"):
            params["quality"] = self.quality
        if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
            img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
        with atomic_output(final) as tmp:
            try:
                img.save(tmp, format=fmt, **params)
            except (OSError, ValueError, KeyError):  # "cannot write mode X as FMT"
                alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                img.convert("RGBA" if alpha and fmt != "JPEG" else "RGB").save(
                    tmp, format=fmt, **params)
        return final

    def _parse_size(self, value: str | None, *, partial: bool) -> tuple[int, int]:
        """``N`` or ``WxH`` (thumbnail); ``WxH``, ``Wx`` or ``xH`` (resize, 0 = keep aspect)."""
        example = "800x600" if partial else "256"
        m = re.fullmatch(r"\s*(\d*)\s*(?:([xX])\s*(\d*))?\s*", value or "")
        if value is None or not m or not (m.group(1) or m.group(3)):
            raise ConfigError(f"--post {self.spec}: a size is required, e.g. "
                              f"{self.name}:{example}")
        if m.group(2) is None:
            if partial:
                raise ConfigError(f"--post {self.spec}: size must be WxH, Wx or xH, "
                                  f"got {value!r}")
            w = h = int(m.group(1))
        else:
            w = int(m.group(1) or 0)
            h = int(m.group(3) or 0)
        if (not partial and (w == 0 or h == 0)) or (w == 0 and h == 0):
            raise ConfigError(f"--post {self.spec}: size must be positive, got {value!r}")
        if max(w, h) > 65_535:
            raise ConfigError(f"--post {self.spec}: size {value!r} is too large")
        return w, h


@register("thumbnail")
class Thumbnail(_ImageTransform):
    """Fit within SIZE (``N`` or ``WxH``), keeping aspect ratio and format."""

    positional = ("size",)

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        self.size = self._parse_size(args.get("size"), partial=False)

    def apply(self, path: Path, dest: Path) -> list[Path]:
        from PIL import Image

        img = self._open(path, dest)
        with img:
            fmt = img.format
            w, h = self.size
            if fmt == "JPEG":
                orientation = img.getexif().get(_ORIENTATION, 1)
                box = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
                img.draft(None, box)  # decode at 1/2, 1/4 or 1/8 scale when that suffices
            out = self._load(img, path, dest)
            out.thumbnail((w, h), Image.Resampling.LANCZOS)
            return [self._save(out, fmt, derived_path(path, dest, self.name))]


@register("resize")
class Resize(_ImageTransform):
    """Resize to exactly WxH; ``Wx``/``xH`` keep the aspect ratio."""

    positional = ("size",)

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        self.size = self._parse_size(args.get("size"), partial=True)

    def apply(self, path: Path, dest: Path) -> list[Path]:
        from PIL import Image

        img = self._open(path, dest)
        with img:
            fmt = img.format
            out = self._load(img, path, dest)
            w, h = self.size
            if not w:
                w = max(1, round(out.width * h / out.height))
            if not h:
                h = max(1, round(out.height * w / out.width))
            if w * h > self.max_pixels:
                raise self._fail(f"target size {w}x{h} is over the pixel limit", path, dest)
            out = out.resize((w, h), Image.Resampling.LANCZOS)
            return [self._save(out, fmt, derived_path(path, dest, self.name))]


@register("grayscale")
class Grayscale(_ImageTransform):
    """Convert to one channel (plus alpha where present), same format."""

    def apply(self, path: Path, dest: Path) -> list[Path]:
        img = self._open(path, dest)
        with img:
            fmt = img.format
            out = self._load(img, path, dest)
            has_alpha = out.mode in ("RGBA", "LA", "PA") or "transparency" in out.info
            out = out.convert("LA" if has_alpha and fmt in ("PNG", "WEBP", "TIFF") else "L")
            return [self._save(out, fmt, derived_path(path, dest, self.name))]


@register("convert")
class Convert(_ImageTransform):
    """Re-encode as FORMAT (jpeg, png, webp, gif, bmp, tiff); the extension follows."""

    positional = ("format",)

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        value = args.get("format", "").strip().lower()
        if value not in _ALIASES:
            raise ConfigError(f"--post {spec}: format must be one of "
                              f"{', '.join(sorted(_ALIASES))}, got {value!r}")
        self.format = _ALIASES[value]

    def apply(self, path: Path, dest: Path) -> list[Path]:
        img = self._open(path, dest)
        with img:
            out = self._load(img, path, dest)
            final = derived_path(path, dest, self.name, suffix=SUFFIX[self.format])
            return [self._save(out, self.format, final)]
