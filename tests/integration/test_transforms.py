"""Transforms on real images and archives the tests generate; unsafe archives refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from fetcher.errors import ConfigError, ProcessingError
from fetcher.transforms import available, derived_path, parse_post, run_chain

Image = pytest.importorskip("PIL.Image")

DERIVED = Path(".fetcher/derived")


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def photo(dest: Path) -> Path:
    """A 1600x1200 JPEG with detail (a gradient), as a camera would write."""
    img = Image.linear_gradient("L").resize((1600, 1200)).convert("RGB")
    path = dest / "photos" / "cat.jpg"
    path.parent.mkdir()
    img.save(path, format="JPEG", quality=90)
    return path


@pytest.fixture
def logo(dest: Path) -> Path:
    """A 300x200 PNG with transparency."""
    path = dest / "logo.png"
    Image.new("RGBA", (300, 200), (0, 0, 200, 128)).save(path, format="PNG")
    return path


def test_registry_lists_the_builtins() -> None:
    assert {"thumbnail", "resize", "grayscale", "convert", "sha256", "md5", "gunzip",
            "extract"} <= set(available())


# --------------------------------------------------------------------------- images


def test_thumbnail_fits_the_box_keeps_format_and_leaves_the_original(
        dest: Path, photo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    drafts: list[tuple[object, object]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: object, mode: object, size: object) -> object:
        drafts.append((mode, size))
        return real_draft(self, mode, size)  # type: ignore[arg-type]

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    before = digest(photo)
    outs = run_chain(["thumbnail:256"], "photos/cat.jpg", dest)
    assert outs == [str(DERIVED / "thumbnail/photos/cat.jpg")]
    with Image.open(dest / outs[0]) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (256, 192)
    assert digest(photo) == before
    assert drafts and drafts[0][1] == (256, 256)  # JPEG decoded in draft mode


def test_thumbnail_of_a_png_with_box(dest: Path, logo: Path) -> None:
    outs = run_chain(["thumbnail:60x60"], logo, dest)
    with Image.open(dest / outs[0]) as thumb:
        assert thumb.format == "PNG" and thumb.size == (60, 40) and thumb.mode == "RGBA"


@pytest.mark.parametrize(("spec", "size"), [("resize:100x50", (100, 50)),
                                            ("resize:400x", (400, 300)),
                                            ("resize:x60", (80, 60))])
def test_resize(dest: Path, photo: Path, spec: str, size: tuple[int, int]) -> None:
    outs = run_chain([spec], photo, dest)
    with Image.open(dest / outs[0]) as out:
        assert out.size == size


def test_grayscale_keeps_alpha_where_the_format_has_it(dest: Path, photo: Path,
                                                       logo: Path) -> None:
    with Image.open(dest / run_chain(["grayscale"], photo, dest)[0]) as g:
        assert g.mode == "L" and g.format == "JPEG"
    with Image.open(dest / run_chain(["grayscale"], logo, dest)[0]) as g:
        assert g.mode == "LA" and g.format == "PNG"


@pytest.mark.parametrize(("fmt", "suffix", "pil"), [("webp", ".webp", "WEBP"),
                                                    ("jpg", ".jpg", "JPEG"),
                                                    ("gif", ".gif", "GIF"),
                                                    ("tiff", ".tiff", "TIFF")])
def test_convert_changes_format_and_extension(dest: Path, logo: Path, fmt: str, suffix: str,
                                              pil: str) -> None:
    outs = run_chain([f"convert:{fmt}"], logo, dest)
    assert outs == [str(DERIVED / "convert" / ("logo" + suffix))]
    with Image.open(dest / outs[0]) as out:
        assert out.format == pil and out.size == (300, 200)


def test_pixel_bomb_is_refused_before_decoding(dest: Path) -> None:
    path = dest / "huge.png"
    Image.new("L", (3000, 3000)).save(path)  # tiny file, 9 Mpx
    with pytest.raises(ProcessingError, match="decompression bomb") as info:
        run_chain(["thumbnail:64,max_pixels=1000000"], path, dest)
    assert info.value.transform == "thumbnail:64,max_pixels=1000000"
    assert info.value.path == "huge.png"
    assert not (dest / DERIVED).exists()


def test_pillow_own_bomb_limit_is_a_processing_error(dest: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = dest / "big.png"
    Image.new("L", (2000, 2000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2x this
    with pytest.raises(ProcessingError, match="decompression bomb"):
        run_chain(["grayscale"], path, dest)


def test_only_expected_formats_are_opened(dest: Path) -> None:
    pcx = dest / "sneaky.png"
    Image.new("RGB", (10, 10)).save(pcx, format="PCX")  # Pillow reads PCX, we must not
    with pytest.raises(ProcessingError, match="not a JPEG/PNG"):
        run_chain(["thumbnail:8"], pcx, dest)
    text = dest / "fake.jpg"
    text.write_text("<html>not an image</html>")
    with pytest.raises(ProcessingError, match="not a JPEG/PNG"):
        run_chain(["grayscale"], text, dest)


def test_truncated_image_is_a_processing_error(dest: Path, photo: Path) -> None:
    broken = dest / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:4000])
    with pytest.raises(ProcessingError, match="cannot decode"):
        run_chain(["grayscale"], broken, dest)
    assert list((dest / DERIVED).rglob("*.jpg")) == []  # no partial output


# --------------------------------------------------------------------------- digests, gzip


def test_sha256_and_md5_sidecars(dest: Path, photo: Path) -> None:
    outs = run_chain(["sha256"], photo, dest)
    assert outs == [str(DERIVED / "sha256/photos/cat.jpg.sha256")]
    assert (dest / outs[0]).read_text() == f"{digest(photo)}  cat.jpg\n"
    md5 = run_chain(["md5"], photo, dest)
    assert (dest / md5[0]).read_text().split()[0] == hashlib.md5(photo.read_bytes()).hexdigest()


def test_gunzip(dest: Path) -> None:
    src = dest / "data.csv.gz"
    src.write_bytes(gzip.compress(b"a,b\n1,2\n" * 1000))
    outs = run_chain(["gunzip"], src, dest)
    assert outs == [str(DERIVED / "gunzip/data.csv")]
    assert (dest / outs[0]).read_bytes() == b"a,b\n1,2\n" * 1000


def test_gunzip_bomb_is_refused_and_leaves_nothing(dest: Path) -> None:
    src = dest / "zeros.gz"
    src.write_bytes(gzip.compress(bytes(50 << 20), compresslevel=1))
    with pytest.raises(ProcessingError, match="max_size"):
        run_chain(["gunzip:max_size=10M"], src, dest)
    with pytest.raises(ProcessingError, match="max_ratio"):
        run_chain(["gunzip"], src, dest)  # default limits: 50 MiB from ~50 KiB
    assert [p for p in (dest / DERIVED).rglob("*") if p.is_file()] == []


def test_gunzip_refuses_non_gzip(dest: Path) -> None:
    src = dest / "plain.gz"
    src.write_text("hello")
    with pytest.raises(ProcessingError, match="not a gzip file"):
        run_chain(["gunzip"], src, dest)


# --------------------------------------------------------------------------- archives


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None,
             mode: str = "w:gz") -> Path:
    data = data or {}
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_extract_zip(dest: Path) -> None:
    arc = make_zip(dest / "bundle.zip", {"a.txt": b"A", "sub/b.txt": b"B", "sub/": b""})
    outs = run_chain(["extract"], arc, dest)
    root = dest / DERIVED / "extract/bundle.zip"
    assert sorted(outs) == [str(DERIVED / "extract/bundle.zip/a.txt"),
                            str(DERIVED / "extract/bundle.zip/sub/b.txt")]
    assert (root / "sub/b.txt").read_bytes() == b"B"
    # extracting again replaces the directory, with nothing left over
    make_zip(arc, {"only.txt": b"new"})
    run_chain(["extract"], arc, dest)
    assert files_under(root) == ["only.txt"]
    assert [p.name for p in root.parent.iterdir()] == ["bundle.zip"]


def test_extract_tar_gz_with_internal_links(dest: Path) -> None:
    members = [tar_member("pkg/lib.so.1"), tar_member("pkg/lib.so", tarfile.SYMTYPE, "lib.so.1"),
               tar_member("pkg/hard", tarfile.LNKTYPE, "pkg/lib.so.1"),
               tar_member("pkg/bin/", tarfile.DIRTYPE),
               tar_member("pkg/bin/up", tarfile.SYMTYPE, "../lib.so.1")]
    arc = make_tar(dest / "pkg.tar.gz", members, {"pkg/lib.so.1": b"ELF"})
    run_chain(["extract"], arc, dest)
    root = dest / DERIVED / "extract/pkg.tar.gz/pkg"
    assert (root / "lib.so").read_bytes() == b"ELF" and (root / "lib.so").is_symlink()
    assert (root / "hard").read_bytes() == b"ELF"
    assert (root / "bin/up").read_bytes() == b"ELF"


@pytest.mark.parametrize(("name", "match"), [("../evil.txt", "outside the target"),
                                             ("a/../../evil.txt", "outside the target"),
                                             ("/tmp/abs-evil.txt", "absolute path"),
                                             ("C:/evil.txt", "absolute path")])
def test_zip_slip_and_absolute_members_are_refused(dest: Path, name: str, match: str) -> None:
    arc = make_zip(dest / "evil.zip", {"fine.txt": b"ok", name: b"pwned"})
    with pytest.raises(ProcessingError, match=match):
        run_chain(["extract"], arc, dest)
    assert not (dest / ".fetcher/derived/evil.txt").exists()
    assert not (dest / ".fetcher/evil.txt").exists()
    assert not Path("/tmp/abs-evil.txt").exists()
    assert files_under(dest / DERIVED) == []  # nothing partial left behind


@pytest.mark.parametrize(("members", "match"), [
    ([tar_member("link", tarfile.SYMTYPE, "/etc/passwd")], "absolute path"),
    ([tar_member("link", tarfile.SYMTYPE, "../../../../etc")], "points outside"),
    ([tar_member("d", tarfile.SYMTYPE, "."), tar_member("e", tarfile.SYMTYPE, "d/../..")],
     "points outside"),
    ([tar_member("dot", tarfile.SYMTYPE, "."), tar_member("up", tarfile.SYMTYPE, "dot/../x")],
     "resolves outside"),  # lexically inside, really outside: caught on the finished tree
    ([tar_member("hard", tarfile.LNKTYPE, "/etc/passwd")], "absolute path"),
    ([tar_member("hard", tarfile.LNKTYPE, "../outside")], "outside the target"),
    ([tar_member("hard", tarfile.LNKTYPE, "missing")], "not a file extracted before"),
    ([tar_member("dev", tarfile.CHRTYPE)], "device, FIFO"),
    ([tar_member("fifo", tarfile.FIFOTYPE)], "device, FIFO"),
], ids=["abs-symlink", "dotdot-symlink", "chained-symlink", "link-through-link",
        "abs-hardlink", "dotdot-hardlink", "dangling-hardlink", "char-device", "fifo"])
def test_unsafe_tar_links_and_special_files_are_refused(
        dest: Path, members: list[tarfile.TarInfo], match: str) -> None:
    arc = make_tar(dest / "evil.tar", [tar_member("ok.txt"), *members], {"ok.txt": b"ok"},
                   mode="w")
    with pytest.raises(ProcessingError, match=match):
        run_chain(["extract"], arc, dest)
    assert not (dest / DERIVED / "extract").exists() or \
        list((dest / DERIVED / "extract").iterdir()) == []


def test_writing_through_a_symlink_is_refused(dest: Path) -> None:
    outside = dest.parent / "outside"
    outside.mkdir()
    members = [tar_member("d", tarfile.SYMTYPE, "sub"), tar_member("sub/", tarfile.DIRTYPE),
               tar_member("d/x.txt")]
    arc = make_tar(dest / "through.tar", members, {"d/x.txt": b"x"}, mode="w")
    with pytest.raises(ProcessingError, match="through a symbolic link"):
        run_chain(["extract"], arc, dest)


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_archive_bombs_are_refused(dest: Path, fmt: str) -> None:
    zeros = bytes(50 << 20)
    if fmt == "zip":
        arc = make_zip(dest / "bomb.zip", {"zeros.bin": zeros})
    else:
        arc = make_tar(dest / "bomb.tar.gz", [tar_member("zeros.bin")], {"zeros.bin": zeros})
    with pytest.raises(ProcessingError, match="max_size"):
        run_chain(["extract:max_size=10M"], arc, dest)
    with pytest.raises(ProcessingError, match="max_ratio"):
        run_chain(["extract"], arc, dest)  # default limits: ratio far beyond 200
    assert [p for p in (dest / DERIVED).rglob("*") if p.is_file()] == []


def test_too_many_members_is_refused(dest: Path) -> None:
    arc = make_zip(dest / "many.zip", {f"f{i}.txt": b"" for i in range(20)})
    with pytest.raises(ProcessingError, match="max_files"):
        run_chain(["extract:max_files=10"], arc, dest)


def test_extract_refuses_non_archives(dest: Path) -> None:
    (dest / "x.zip").write_text("not really")
    with pytest.raises(ProcessingError, match="not a zip or tar"):
        run_chain(["extract"], dest / "x.zip", dest)


# --------------------------------------------------------------------------- chains, custom


def test_chain_feeds_each_stage_the_outputs_it_accepts(dest: Path, photo: Path) -> None:
    arc = make_zip(dest / "album.zip", {"img/cat.jpg": photo.read_bytes(), "README": b"hi"})
    outs = run_chain(["extract", "thumbnail:64", "sha256"], arc, dest)
    assert outs == [
        str(DERIVED / "extract/album.zip/img/cat.jpg"),
        str(DERIVED / "extract/album.zip/README"),
        str(DERIVED / "extract+thumbnail/album.zip/img/cat.jpg"),
        str(DERIVED / "extract+thumbnail+sha256/album.zip/img/cat.jpg.sha256"),
    ]
    with Image.open(dest / outs[2]) as thumb:
        assert max(thumb.size) == 64


def test_chain_never_writes_over_an_earlier_output(dest: Path, photo: Path) -> None:
    run_chain(["thumbnail:128"], photo, dest)
    first = digest(dest / DERIVED / "thumbnail/photos/cat.jpg")
    # thumbnail of the thumbnail goes elsewhere
    outs = run_chain(["thumbnail:128", "thumbnail:32"], photo, dest)
    assert outs[1] == str(DERIVED / "thumbnail+thumbnail/photos/cat.jpg")
    assert digest(dest / DERIVED / "thumbnail/photos/cat.jpg") == first


def test_outputs_of_inputs_outside_dest_are_named_by_basename(dest: Path,
                                                              tmp_path: Path) -> None:
    src = tmp_path / "elsewhere" / "notes.txt"
    src.parent.mkdir()
    src.write_text("x")
    assert run_chain(["sha256"], src, dest) == [str(DERIVED / "sha256/notes.txt.sha256")]
    assert derived_path(src, dest, "md5") == dest / DERIVED / "md5/notes.txt"


def test_custom_transform(dest: Path) -> None:
    (dest / "a.txt").write_text("shout")
    assert run_chain(["test_transform_helpers:upper_copy"], "a.txt", dest) == \
        [str(DERIVED / "upper/a.txt")]
    assert (dest / DERIVED / "upper/a.txt").read_text() == "SHOUT"
    assert run_chain(["test_transform_helpers:relative_output"], "a.txt", dest) == \
        ["notes/a.txt.txt"]
    assert run_chain(["test_transform_helpers:nothing"], "a.txt", dest) == []


@pytest.mark.parametrize(("fn", "match"), [("outside", "outside"),
                                           ("in_place", "its input"),
                                           ("explode", "RuntimeError: cannot handle a.txt")])
def test_custom_transform_failures(dest: Path, fn: str, match: str) -> None:
    (dest / "a.txt").write_text("x")
    with pytest.raises(ProcessingError, match=match) as info:
        run_chain([f"test_transform_helpers:{fn}"], "a.txt", dest)
    assert info.value.transform == f"test_transform_helpers:{fn}"
    assert info.value.path == "a.txt"
    if fn == "explode":
        assert "test_transform_helpers.py" in info.value.traceback_text


def test_missing_input_is_a_processing_error(dest: Path) -> None:
    with pytest.raises(ProcessingError, match="no such file"):
        run_chain(["sha256"], "gone.bin", dest)


# --------------------------------------------------------------------------- parsing


def test_specs_parse_and_pickle() -> None:
    for spec in ["thumbnail:256", "thumbnail:320x200,quality=70", "resize:800x", "grayscale",
                 "convert:PNG", "sha256", "md5", "gunzip:max_size=2G", "extract:max_files=10",
                 "test_transform_helpers:upper_copy"]:
        t = parse_post(spec)
        assert pickle.loads(pickle.dumps(t)) == t


@pytest.mark.parametrize("spec", [
    "", "nope", "thumbnail", "thumbnail:abc", "thumbnail:0", "thumbnail:100x0",
    "thumbnail:256,color=red", "resize:800", "resize:x", "convert:psd", "sha256:fast",
    "extract:max_size=lots", "extract:max_files=0", "gunzip:1G", "grayscale:quality=500",
    "no_such_module_xyz:fn", "test_transform_helpers:missing",
    "test_transform_helpers:NOT_CALLABLE", "os.path",
])
def test_bad_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_post(spec)


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(ConfigError, match="thumbnail") as info:
        parse_post("thumbnial:64")
    assert "package.module:function" in str(info.value)


def test_image_transforms_need_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "PIL" else real(name, *a))
    with pytest.raises(ConfigError, match="Pillow"):
        parse_post("thumbnail:64")
    assert parse_post("sha256").name == "sha256"

