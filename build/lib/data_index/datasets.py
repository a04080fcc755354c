"""Image folders and robust image loading.

:class:`ImageFolder` scans a folder recursively and lists its images in a deterministic order
(sorted by relative POSIX path). Labels come from ``labels.csv`` files (columns ``file``,
``label`` and optionally ``label_name``) found at the root or in any sub-folder -- each applies to
the files relative to its own folder, the nearest one winning -- else from class sub-folders
(sorted folder names -> label index), else there are none.

:func:`try_load_rgb` decodes one file into an RGB PIL image, or gives a *reason* (a string) why
the file is skipped: not decodable, truncated, empty, too small for a crop, or too large
(decompression bomb: more than :data:`MAX_PIXELS`, Pillow's own warning threshold of 89.5 Mpx).
:func:`load_rgb` is the same but raises :class:`ExplorerError`.

File names that are not valid UTF-8 (Linux names are bytes: ``b"caf\\xe9.jpg"``) reach Python as
``str`` with surrogate escapes (``"caf\\udce9.jpg"``), which neither DuckDB nor a UTF-8 text file
can hold. The catalog stores every relative path through :func:`escape_rel`: each byte that is
not valid UTF-8 is written ``%XX`` (``XX`` its hex value, 80..FF, upper case) and a literal ``%``
that would read as such an escape (or as ``%25``) is written ``%25``; every other name, UTF-8
ones with a ``%`` included, is stored unchanged. :func:`unescape_rel` reverses it exactly, so
such files are indexed and read back like any other.

Sub-folders that cannot be listed (no permission, vanished) are recorded in
:attr:`ImageFolder.unreadable` with the reason instead of being dropped silently.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from explorer_core.errors import ExplorerError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "ImageEntry", "ImageFolder", "escape_rel",
           "load_rgb", "try_load_rgb", "unescape_rel"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Larger images are refused: Pillow's decompression-bomb warning threshold
# (Image.MAX_IMAGE_PIXELS, 89.5 Mpx), which Image.open itself checks first.
MAX_PIXELS = 89_478_485
LABELS_CSV = "labels.csv"

_ESCAPE_HEX = frozenset(["25"] + [f"{b:02X}" for b in range(0x80, 0x100)])
_UNESCAPE_RE = re.compile("%(25|[89A-F][0-9A-F])")


def escape_rel(rel: str) -> str:
    """A relative path as stored in the catalog: valid UTF-8 text, reversible by
    :func:`unescape_rel` (see the module docstring; unchanged for every UTF-8 name that has no
    ``%`` followed by ``25`` or ``80``..``FF``)."""
    if "%" not in rel:
        try:
            rel.encode("utf-8")
            return rel
        except UnicodeEncodeError:
            pass
    out = []
    for i, ch in enumerate(rel):
        if "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (surrogate escape)
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        elif ch == "%" and rel[i + 1:i + 3] in _ESCAPE_HEX:
            out.append("%25")
        elif "\ud800" <= ch <= "\udfff":  # cannot come from os.fsdecode; keep it visible
            out.append(ch.encode("utf-8", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def unescape_rel(stored: str) -> str:
    """The relative path (``str`` with surrogate escapes, as ``os.fsdecode`` gives) of a path
    stored by :func:`escape_rel`."""
    if "%" not in stored:
        return stored

    def sub(m: re.Match[str]) -> str:
        v = int(m.group(1), 16)
        return "%" if v == 0x25 else chr(0xDC00 + v)

    return _UNESCAPE_RE.sub(sub, stored)


@dataclass(frozen=True)
class ImageEntry:
    """One image file of a folder: ``rel`` is its POSIX path relative to the folder root."""

    path: Path
    rel: str
    label: int | None = None
    label_name: str | None = None


def _read_labels_csv(csv_path: Path) -> dict[str, tuple[int | None, str | None]]:
    """``{relative file (posix, normalised): (label, label_name)}`` of one labels.csv."""
    out: dict[str, tuple[int | None, str | None]] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "file" not in reader.fieldnames \
                    or "label" not in reader.fieldnames:
                raise ExplorerError(f"{csv_path} needs the columns 'file' and 'label' "
                                    f"(found: {', '.join(reader.fieldnames or [])})")
            for row in reader:
                file = (row.get("file") or "").strip().replace("\\", "/")
                if not file:
                    continue
                try:
                    label: int | None = int(str(row.get("label", "")).strip())
                except ValueError:
                    label = None
                name = row.get("label_name")
                out[os.path.normpath(file).replace(os.sep, "/")] = (
                    label, name.strip() if name else None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ExplorerError(f"Cannot read {csv_path}: {exc}") from exc
    return out


class ImageFolder:
    """All images under ``root`` (recursive), sorted by relative POSIX path.

    Attributes
    ----------
    root : Path
    entries : list of ImageEntry
    label_source : str
        ``"csv"``, ``"folders"`` or ``"none"``.
    class_names : dict[int, str]
        Label index -> name where known (csv ``label_name`` or the class folder's name).
    unreadable : list of (str, str)
        ``(relative POSIX folder path + "/", reason)`` of each sub-folder that could not be
        listed; its images are not in ``entries``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ExplorerError(f"Image folder '{root}' not found; give an existing folder of "
                                "images (jpg, png, ...)")
        files: list[tuple[str, Path]] = []
        csvs: list[Path] = []
        walk_errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=walk_errors.append,
                                                    followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                p = Path(dirpath) / fn
                if fn.lower() == LABELS_CSV:
                    csvs.append(p)
                elif p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append((p.relative_to(self.root).as_posix(), p))
        files.sort(key=lambda t: t[0])
        self.unreadable: list[tuple[str, str]] = []
        for exc in walk_errors:
            where = Path(exc.filename) if exc.filename else self.root
            if where == self.root:
                raise ExplorerError(f"Cannot list the image folder '{root}': "
                                    f"{exc.strerror or exc}")
            self.unreadable.append((where.relative_to(self.root).as_posix() + "/",
                                    f"cannot list folder: {exc.strerror or exc}; "
                                    "its images are not indexed"))
        self.unreadable.sort()
        self.class_names: dict[int, str] = {}
        if csvs:
            self.label_source = "csv"
            # nearest labels.csv wins: deeper folders first
            tables = sorted(((c.parent, _read_labels_csv(c)) for c in csvs),
                            key=lambda t: -len(t[0].parts))
            entries = []
            for rel, p in files:
                label = name = None
                for folder, table in tables:
                    if folder == self.root or folder in p.parents:
                        key = p.relative_to(folder).as_posix()
                        if key in table:
                            label, name = table[key]
                            break
                if label is not None and name:
                    self.class_names.setdefault(label, name)
                entries.append(ImageEntry(p, rel, label, name))
        else:
            top = sorted({rel.split("/", 1)[0] for rel, _ in files if "/" in rel})
            if top:
                self.label_source = "folders"
                index = {d: i for i, d in enumerate(top)}
                self.class_names = {i: d for d, i in index.items()}
                entries = []
                for rel, p in files:
                    d = rel.split("/", 1)[0] if "/" in rel else None
                    lab = index.get(d) if d else None
                    entries.append(ImageEntry(p, rel, lab, d))
            else:
                self.label_source = "none"
                entries = [ImageEntry(p, rel) for rel, p in files]
        self.entries: list[ImageEntry] = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> ImageEntry:
        return self.entries[i]

    def __iter__(self):
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, labels={self.label_source})"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency composited on white; 16-bit scaled to 8-bit."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def try_load_rgb(path: str | os.PathLike, min_side: int = 0, max_pixels: int = MAX_PIXELS
                 ) -> tuple[Image.Image | None, str | None]:
    """Decode ``path`` to an RGB image with EXIF orientation applied.

    Returns ``(image, None)``, or ``(None, reason)`` where the file must be skipped (the reason
    is a short human-readable string). Never raises for a bad file."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        return None, f"cannot read file: {exc.strerror or exc}"
    if size == 0:
        return None, "empty file (0 bytes)"
    prev_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return None, (f"image too large: {w}x{h} = {w * h / 1e6:.1f} Mpixels "
                                  f"(limit {max_pixels / 1e6:.1f})")
                if min(w, h) < min_side:
                    return None, (f"image too small: {w}x{h}, shorter side < {min_side} px "
                                  "(one crop)")
                im.load()
                img = ImageOps.exif_transpose(im)
                img = _to_rgb(img)
                if img is im:
                    img = im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"image too large (decompression bomb guard): {exc}"
    except Image.UnidentifiedImageError:
        return None, "not a decodable image (unknown or broken format)"
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            MemoryError, RuntimeError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            return None, f"truncated image: {msg}"
        return None, f"cannot decode image: {msg}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = prev_truncated
    w, h = img.size
    if min(w, h) < min_side:  # EXIF rotation does not change the shorter side, but be safe
        return None, f"image too small: {w}x{h}, shorter side < {min_side} px (one crop)"
    return img, None


def load_rgb(path: str | os.PathLike, min_side: int = 0) -> Image.Image:
    """Like :func:`try_load_rgb` but raises :class:`ExplorerError` with the reason."""
    img, reason = try_load_rgb(path, min_side)
    if img is None:
        raise ExplorerError(f"Cannot use image '{path}': {reason}")
    return img
