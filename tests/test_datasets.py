"""ImageFolder scanning / labels and robust image loading, on real photos and made-up files."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import NIPS17, SAMPLES, requires_shared
from PIL import Image

from data_index.datasets import ImageFolder, load_rgb, try_load_rgb
from explorer_core.errors import ExplorerError


@requires_shared
def test_shared_folder_has_both_sets_sorted_with_csv_labels():
    f = ImageFolder(NIPS17.parent)
    assert len(f) == 2000 and f.label_source == "csv"
    rels = [e.rel for e in f]
    assert rels == sorted(rels)
    assert sum(r.startswith("imagenet-nips17/") for r in rels) == 1000
    # labels come from each set's own labels.csv (paths relative to that set's folder)
    for ds in (NIPS17, SAMPLES):
        with (ds / "labels.csv").open() as fh:
            truth = {row["file"]: int(row["label"]) for row in csv.DictReader(fh)}
        got = {e.rel.split("/", 1)[1]: e.label for e in f if e.rel.startswith(ds.name + "/")}
        assert got == truth
    assert f.class_names[0] == "tench"


def _png(path: Path, size=(96, 80), color=(10, 200, 30), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def test_class_folders_give_sorted_label_indices_and_other_files_are_ignored(tmp_path):
    for cls in ("zebra", "ant"):
        (tmp_path / cls).mkdir()
        _png(tmp_path / cls / "a.PNG")
        _png(tmp_path / cls / "b.jpeg")
    (tmp_path / "ant" / "notes.txt").write_text("x")
    (tmp_path / "readme.md").write_text("x")
    f = ImageFolder(tmp_path)
    assert f.label_source == "folders"
    assert [(e.rel, e.label) for e in f] == [("ant/a.PNG", 0), ("ant/b.jpeg", 0),
                                             ("zebra/a.PNG", 1), ("zebra/b.jpeg", 1)]
    assert f.class_names == {0: "ant", 1: "zebra"}


def test_flat_folder_has_no_labels_and_missing_folder_is_a_user_error(tmp_path):
    _png(tmp_path / "x.png")
    f = ImageFolder(tmp_path)
    assert f.label_source == "none" and f[0].label is None
    with pytest.raises(ExplorerError, match="not found"):
        ImageFolder(tmp_path / "nope")


def test_nested_labels_csv_applies_relative_to_its_folder(tmp_path):
    (tmp_path / "setA" / "img").mkdir(parents=True)
    _png(tmp_path / "setA" / "img" / "1.png")
    _png(tmp_path / "top.png")
    (tmp_path / "setA" / "labels.csv").write_text("file,label,label_name\nimg/1.png,7,seven\n")
    (tmp_path / "labels.csv").write_text("file,label\ntop.png,3\nsetA/img/1.png,9\n")
    f = ImageFolder(tmp_path)
    assert {e.rel: e.label for e in f} == {"setA/img/1.png": 7, "top.png": 3}  # nearest wins


def test_modes_are_converted_to_rgb(tmp_path):
    gray = _png(tmp_path / "g.png", mode="L", color=128)
    assert load_rgb(gray).getpixel((0, 0)) == (128, 128, 128)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (90, 90), (0, 255, 255, 0)).save(cmyk)
    r, g, b = load_rgb(cmyk).getpixel((45, 45))
    assert r > 200 and g < 60 and b < 60  # CMYK red
    rgba = Image.new("RGBA", (90, 90), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 45, 90))  # left half fully transparent
    rgba.save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and img.getpixel((10, 10)) == (255, 255, 255)
    assert img.getpixel((80, 10)) == (255, 0, 0)
    p = Image.new("P", (90, 90), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    assert load_rgb(tmp_path / "p.png").getpixel((5, 5)) == (255, 255, 255)
    arr16 = (np.ones((90, 90)) * 65535 * 0.5).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "d16.png")
    assert abs(load_rgb(tmp_path / "d16.png").getpixel((3, 3))[0] - 128) <= 1


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (120, 80), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "o.jpg").size == (80, 120)


def _huge_png(path: Path, w: int, h: int) -> None:
    """A tiny PNG file whose header declares ``w x h`` pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # 'IHDR' + 13 bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@requires_shared
def test_bad_files_give_reasons_not_exceptions(tmp_path):
    photo = sorted((NIPS17 / "images").glob("*.jpg"))[0].read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(photo[: len(photo) // 3])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    _png(tmp_path / "small.png", size=(10, 10))
    _huge_png(tmp_path / "huge.png", 20000, 20000)
    reasons = {}
    for name in ("trunc.jpg", "zero.jpg", "text.jpg", "small.png", "huge.png"):
        img, reason = try_load_rgb(tmp_path / name, min_side=74)
        assert img is None and isinstance(reason, str) and reason, name
        reasons[name] = reason
    assert "truncated" in reasons["trunc.jpg"].lower() or "decode" in reasons["trunc.jpg"]
    assert "empty" in reasons["zero.jpg"]
    assert "not a decodable image" in reasons["text.jpg"]
    assert "too small" in reasons["small.png"]
    assert "too large" in reasons["huge.png"]
    with pytest.raises(ExplorerError, match="too small"):
        load_rgb(tmp_path / "small.png", min_side=74)
    img, reason = try_load_rgb(tmp_path / "small.png", min_side=0)
    assert reason is None and img.size == (10, 10)
