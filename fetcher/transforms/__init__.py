"""Post-processing transforms: ``--post NAME[:ARGS]`` and ``--post package.module:function``.

Built-ins: ``thumbnail:SIZE``, ``resize:WxH``, ``grayscale``, ``convert:FORMAT``
(``image.py``, needs Pillow), ``sha256``, ``md5`` (``digest.py``), ``gunzip``,
``extract`` (``archive.py``). ``available()`` lists them.

Where outputs go
    Never over the input: under ``DEST/.fetcher/derived/<transform>/`` followed by the
    input's path relative to DEST (its base name when it lies outside DEST), with the
    extension changed where the format changes (``convert``, ``gunzip``) or a
    ``.sha256``/``.md5`` appended. ``extract`` makes a directory
    ``derived/extract/<archive path>/``. Outputs are reported relative to DEST and the
    manifest lists them in ``outputs``.

Chains
    Several ``--post`` specs run in order, each on the outputs of the one before:
    ``--post extract --post thumbnail:256`` thumbnails the images inside an archive.
    The first transform gets the file itself (a wrong format is an error); a later
    one only takes the previous outputs whose names it handles (``thumbnail`` takes
    ``.jpg``/``.png``/..., ``gunzip`` ``.gz``; digests take everything), the others pass
    through. A later stage's directory is named after the whole chain so far
    (``derived/thumbnail+grayscale/...``), so it never collides with a single
    transform's outputs. Every output of every stage is reported.

Custom transforms
    ``--post mypkg.images:watermark`` imports ``watermark`` and calls
    ``watermark(path: Path, dest: Path)``, which returns the Path (or Paths, or None)
    it wrote inside ``dest`` -- ``derived_path(path, dest, "watermark")`` is the
    conventional place. It must be importable in worker processes.

Failures raise ``ProcessingError`` (``.transform``, ``.path``, ``.traceback_text``).
"""

from __future__ import annotations

from .archive import Extract, Gunzip
from .digest import Md5, Sha256
from .image import Convert, Grayscale, Resize, Thumbnail
from .pipeline import PostPipeline, process_paths
from .registry import (
    ChainTask,
    CustomTransform,
    Transform,
    atomic_output,
    available,
    derived_path,
    parse_chain,
    parse_post,
    register,
    run_chain,
)

__all__ = [
    "ChainTask",
    "Convert",
    "CustomTransform",
    "Extract",
    "Grayscale",
    "Gunzip",
    "Md5",
    "PostPipeline",
    "Resize",
    "Sha256",
    "Thumbnail",
    "Transform",
    "atomic_output",
    "available",
    "derived_path",
    "parse_chain",
    "parse_post",
    "process_paths",
    "register",
    "run_chain",
]
