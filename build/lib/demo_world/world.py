"""The embedded demo world: a seeded, procedural image generator with ground-truth concept masks.

Every image is ``size x size`` RGB (default 96, the demo model's input size, so the catalog's 3x3
crop grid gives 32x32 crops). An image shows one *background* texture (grass, snow, sand, water,
rock) and the 2-3 *parts* that define its class. A part is a shape (circle, triangle, square, bar)
filled with a colour and a texture (solid, stripes, dots, checker). Parts are placed in distinct
cells of the 3x3 grid (with jitter), so each part dominates at least one 32x32 crop.

Every pixel is labelled in a ground-truth mask with the id of the concept covering it (an index
into :data:`CONCEPTS`): backgrounds first, then parts.

The paper's shortcut is planted: the two look-alike classes :data:`SHORTCUT_GRASS_CLASS` (``lupo``)
and :data:`SHORTCUT_LOOKALIKE_CLASS` (``husko``) share their two big parts and differ only in one
small part (a small triangle with black dots vs black stripes), visible in only half of their
images. In the default splits ``lupo`` is
shown on grass and ``husko`` on snow in 90 % of the images (the other backgrounds uniformly
otherwise); every other class draws its background uniformly at random. A model trained on this
world leans on the background to tell the two apart.

Everything is deterministic: given its background, image ``i`` of class ``c`` in split ``s``
depends only on ``(seed, s, c, i)``; the background assignment depends on ``(seed, s, c)`` and the
number of images per class (so the shortcut share is exact).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "CLASS_PARTS",
    "CONCEPTS",
    "DEFAULT_SIZE",
    "PARTS",
    "PART_PRESENCE",
    "SHORTCUT_GRASS_CLASS",
    "SHORTCUT_LOOKALIKE_CLASS",
    "SHORTCUT_PROB",
    "SPLITS",
    "WorldArrays",
    "background_for_image",
    "concept_id",
    "dominant_concept",
    "generate_arrays",
    "generate_world",
    "mask_path_for",
    "render",
]

DEFAULT_SIZE = 96
"""Default image side in pixels (the demo model's input size)."""

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

BACKGROUNDS: list[str] = ["bg_grass", "bg_snow", "bg_sand", "bg_water", "bg_rock"]
"""Background concept names; concept id of ``BACKGROUNDS[k]`` is ``k``."""

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 40),
    "yellow": (242, 206, 38),
    "purple": (116, 46, 168),
    "orange": (240, 128, 24),
    "pink": (242, 120, 186),
    "black": (28, 26, 30),
    "brown": (116, 66, 30),
}
# Second colour of a textured part: dark ink on light colours, light ink on dark ones.
_INK: dict[str, tuple[int, int, int]] = {
    "red": (30, 20, 20),
    "yellow": (30, 25, 20),
    "purple": (250, 230, 120),
    "orange": (30, 20, 15),
    "pink": (90, 20, 70),
    "black": (245, 245, 235),
    "brown": (245, 210, 150),
}
_TEXTURES = ("solid", "stripes", "dots", "checker")
_SHAPES = ("circle", "triangle", "square", "bar")


@dataclass(frozen=True)
class _Part:
    colour: str
    texture: str
    shape: str
    scale: float = 1.0  # relative size; 1.0 spans most of a 32-px cell at size 96
    presence: float = 1.0  # probability that the part is visible in an image of its class

    @property
    def name(self) -> str:
        return f"part_{self.colour}_{self.texture}_{self.shape}"


SHORTCUT_GRASS_CLASS = "lupo"
"""The class shown on grass in :data:`SHORTCUT_PROB` of its images."""
SHORTCUT_LOOKALIKE_CLASS = "husko"
"""The look-alike of :data:`SHORTCUT_GRASS_CLASS`, shown on snow in :data:`SHORTCUT_PROB` of its images."""
SHORTCUT_PROB = 0.9
"""Share of shortcut-class images drawn on their shortcut background (default splits)."""
_SHORTCUT_BACKGROUND = {SHORTCUT_GRASS_CLASS: "bg_grass", SHORTCUT_LOOKALIKE_CLASS: "bg_snow"}

# Class -> its defining parts, in drawing order (the first is the biggest, "body").
_CLASS_DEFS: dict[str, list[_Part]] = {
    # The look-alike pair: same body and head, they differ in one small part only, and that part
    # is hidden in half of the images (as a husky's eyes often are): there the background is the
    # only cue, which is what makes a trained model learn the grass/snow shortcut.
    "lupo": [
        _Part("orange", "solid", "square"),
        _Part("brown", "solid", "circle"),
        _Part("black", "dots", "triangle", 0.8, presence=0.5),
    ],
    "husko": [
        _Part("orange", "solid", "square"),
        _Part("brown", "solid", "circle"),
        _Part("black", "stripes", "triangle", 0.8, presence=0.5),
    ],
    "ladyblob": [_Part("red", "dots", "circle"), _Part("black", "solid", "triangle")],
    "zebrox": [_Part("black", "stripes", "square"), _Part("yellow", "solid", "circle")],
    "sunflop": [_Part("yellow", "checker", "circle"), _Part("brown", "solid", "bar")],
    "plumtop": [_Part("purple", "solid", "triangle"), _Part("pink", "dots", "square")],
    "checkbox": [_Part("red", "checker", "square"), _Part("yellow", "stripes", "bar")],
    "tigrin": [_Part("orange", "stripes", "circle"), _Part("black", "solid", "bar")],
    "pinkus": [_Part("pink", "stripes", "triangle"), _Part("purple", "dots", "circle")],
    "mudbot": [
        _Part("brown", "checker", "square"),
        _Part("red", "solid", "triangle"),
        _Part("yellow", "dots", "circle", 0.85),
    ],
}

CLASSES: list[str] = list(_CLASS_DEFS)
"""Class names; class index = position."""

CLASS_PARTS: dict[str, list[str]] = {c: [p.name for p in parts] for c, parts in _CLASS_DEFS.items()}
"""Class name -> names of its defining part concepts (drawing order, biggest first)."""

PART_PRESENCE: dict[str, float] = {
    p.name: p.presence for parts in _CLASS_DEFS.values() for p in parts
}
"""Part name -> probability that it is visible in an image of a class that has it (1.0 = always)."""

PARTS: list[str] = sorted({p.name for parts in _CLASS_DEFS.values() for p in parts})
"""All part concept names (sorted)."""

CONCEPTS: list[str] = BACKGROUNDS + PARTS
"""Concept names; a concept id is an index into this list and a value of a ground-truth mask."""

_CONCEPT_ID = {name: i for i, name in enumerate(CONCEPTS)}
_PART_BY_NAME = {p.name: p for parts in _CLASS_DEFS.values() for p in parts}

SPLITS: dict[str, int] = {"train": 0, "heldout": 1, "test": 2, "probe": 3}
"""Known split names and their seed-stream codes (any other name hashes to its own stream)."""


def concept_id(name: str) -> int:
    """Concept id of a concept name (index into :data:`CONCEPTS`)."""
    try:
        return _CONCEPT_ID[name]
    except KeyError:
        raise KeyError(f"unknown concept {name!r}; known: {CONCEPTS}") from None


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _upsample(low: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a 2-D array ``(gh, gw)`` to ``(h, w)`` (float32)."""
    gh, gw = low.shape
    ys = np.linspace(0.0, gh - 1.0, h, dtype=np.float32)
    xs = np.linspace(0.0, gw - 1.0, w, dtype=np.float32)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, gh - 1)
    x1 = np.minimum(x0 + 1, gw - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = low[y0][:, x0] * (1 - wx) + low[y0][:, x1] * wx
    bot = low[y1][:, x0] * (1 - wx) + low[y1][:, x1] * wx
    return (top * (1 - wy) + bot * wy).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in ``[-1, 1]``, shape ``(size, size)``, from a ``cells x cells`` grid."""
    return _upsample(rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32), size, size)


def _render_background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One background texture, float32 ``(size, size, 3)`` in ``[0, 255]``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    fine = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    if name == "bg_grass":
        # Vertical blades: column noise stretched vertically, plus patches of lighter/darker green.
        blades = _upsample(
            rng.normal(0.0, 1.0, (max(size // 8, 2), size)).astype(np.float32), size, size
        )
        patches = _smooth_noise(rng, size, 4)
        g = 128 + 28 * blades + 18 * patches + 10 * fine
        base = np.stack([0.42 * g, g, 0.30 * g], axis=-1)
    elif name == "bg_snow":
        shade = _smooth_noise(rng, size, 3)
        v = 232 + 12 * shade + 6 * fine
        base = np.stack([v - 10 + 4 * shade, v - 3, np.full_like(v, 252.0) + 3 * fine], axis=-1)
    elif name == "bg_sand":
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(0.12, 0.2)
        ripple = np.sin(
            freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi)
        )
        speck = (rng.random((size, size)) < 0.06).astype(np.float32)
        v = 0.5 * (ripple + 1) * 18 + 14 * fine - 40 * speck + 8 * _smooth_noise(rng, size, 3)
        base = np.stack([208 + v, 178 + v, 122 + 0.7 * v], axis=-1)
    elif name == "bg_water":
        freq = rng.uniform(0.18, 0.32)
        phase = rng.uniform(0, 2 * np.pi)
        wobble = 4.0 * np.sin(0.09 * xx + rng.uniform(0, 2 * np.pi))
        wave = np.sin(freq * (yy + wobble) + phase)
        crest = np.clip(wave, 0.6, 1.0) - 0.6
        v = 22 * wave + 160 * crest + 6 * fine
        base = np.stack([34 + 0.6 * v, 92 + 0.9 * v, 178 + 0.6 * v], axis=-1)
    elif name == "bg_rock":
        blotch = _smooth_noise(rng, size, 6) + 0.5 * _smooth_noise(rng, size, 12)
        cracks = (np.abs(_smooth_noise(rng, size, 5)) < 0.04).astype(np.float32)
        v = 118 + 34 * blotch + 12 * fine - 50 * cracks
        base = np.stack([v, v, v + 6], axis=-1)
    else:  # pragma: no cover - guarded by callers
        raise ValueError(f"unknown background {name!r}; known: {BACKGROUNDS}")
    return base


def _shape_mask(
    shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float
) -> np.ndarray:
    """Boolean mask ``(H, W)`` of a shape centred at ``(cx, cy)`` with half-extent ``r``."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    if shape == "triangle":  # apex up, base down; about as much area as the circle
        t = (dy + 1.25 * r) / (2.5 * r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= 1.25 * r * t)
    if shape == "bar":
        return (np.abs(dx) <= 1.3 * r) & (np.abs(dy) <= 0.6 * r)
    raise ValueError(f"unknown shape {shape!r}; known: {_SHAPES}")


def _texture(
    texture: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator, scale: float
) -> np.ndarray:
    """Boolean ``(H, W)``: True where a textured part shows its ink colour."""
    if texture == "solid":
        return np.zeros(xx.shape, dtype=bool)
    ox, oy = rng.uniform(0, 16, 2)
    if texture == "stripes":
        period = 6.0 * scale
        return ((xx + yy + ox) % period) < period / 2
    if texture == "dots":
        sp = 7.0 * scale
        fx = (xx + ox) % sp - sp / 2
        fy = (yy + oy) % sp - sp / 2
        return fx * fx + fy * fy <= (0.3 * sp) ** 2
    if texture == "checker":
        s = 5.0 * scale
        return ((np.floor((xx + ox) / s) + np.floor((yy + oy) / s)) % 2) == 1
    raise ValueError(f"unknown texture {texture!r}; known: {_TEXTURES}")


def _check_class(class_idx: int) -> str:
    if not 0 <= int(class_idx) < len(CLASSES):
        raise ValueError(f"class_idx {class_idx} out of range 0..{len(CLASSES) - 1}")
    return CLASSES[int(class_idx)]


def render(
    class_idx: int,
    rng: np.random.Generator,
    size: int = DEFAULT_SIZE,
    background: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of a class with its ground-truth concept mask.

    Parameters
    ----------
    class_idx : int
        Index into :data:`CLASSES`.
    rng : numpy.random.Generator
        Source of all randomness (layout, sizes, textures, noise, and the background when
        ``background`` is None).
    size : int, default 96
        Image side in pixels; geometry scales with it.
    background : str, optional
        A name from :data:`BACKGROUNDS`. None draws one uniformly at random (no shortcut: the
        shortcut is a property of a split, see :func:`background_for_image`).

    Returns
    -------
    img : numpy.ndarray
        uint8 ``(size, size, 3)`` RGB image.
    mask : numpy.ndarray
        uint8 ``(size, size)``; ``mask[y, x]`` is the concept id (index into :data:`CONCEPTS`)
        covering the pixel.
    """
    cls = _check_class(class_idx)
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {BACKGROUNDS}")
    k = size / DEFAULT_SIZE
    img = _render_background(background, rng, size)
    mask = np.full((size, size), _CONCEPT_ID[background], dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    parts = _CLASS_DEFS[cls]
    cells = rng.permutation(9)[: len(parts)]
    cell = size / 3.0
    for part, c in zip(parts, cells, strict=True):
        row, col = divmod(int(c), 3)
        r = part.scale * rng.uniform(15.0, 18.0) * k
        jit = 4.0 * k
        cx = (col + 0.5) * cell + rng.uniform(-jit, jit)
        cy = (row + 0.5) * cell + rng.uniform(-jit, jit)
        cx = float(np.clip(cx, r * 0.6, size - 1 - r * 0.6))
        cy = float(np.clip(cy, r * 0.6, size - 1 - r * 0.6))
        visible = rng.random() < part.presence  # always drawn, so the stream does not depend on it
        inside = _shape_mask(part.shape, xx, yy, cx, cy, r) & visible
        ink = _texture(part.texture, xx, yy, rng, k)
        colour = np.asarray(_COLOURS[part.colour], dtype=np.float32) * rng.uniform(0.85, 1.1)
        ink_col = np.asarray(_INK[part.colour], dtype=np.float32)
        fill = np.where(ink[..., None], ink_col, colour)
        shade = 1.0 + 0.08 * _smooth_noise(rng, size, 3)[..., None]
        img = np.where(inside[..., None], fill * shade, img)
        mask[inside] = _CONCEPT_ID[part.name]

    img = img * rng.uniform(0.9, 1.1) + rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def _split_code(split: str) -> int:
    if split in SPLITS:
        return SPLITS[split]
    return 1000 + int.from_bytes(split.encode("utf-8")[:8].ljust(8, b"\0"), "little") % (2**31)


def background_for_image(
    class_idx: int,
    i: int,
    n_per_class: int,
    seed: int,
    split: str,
    shortcut_prob: float = SHORTCUT_PROB,
) -> str:
    """Background of image ``i`` of a class in a split (where the shortcut is planted).

    For the two shortcut classes exactly ``round(shortcut_prob * n_per_class)`` images of the split
    get the shortcut background (grass for :data:`SHORTCUT_GRASS_CLASS`, snow for
    :data:`SHORTCUT_LOOKALIKE_CLASS`) at seeded positions, the rest one of the other backgrounds
    uniformly. Every other class draws uniformly from :data:`BACKGROUNDS`.
    """
    cls = _check_class(class_idx)
    rng = np.random.default_rng([seed, _split_code(split), int(class_idx), 7_777_777])
    if cls not in _SHORTCUT_BACKGROUND:
        choices = rng.integers(len(BACKGROUNDS), size=n_per_class)
        return BACKGROUNDS[int(choices[i])]
    fav = _SHORTCUT_BACKGROUND[cls]
    others = [b for b in BACKGROUNDS if b != fav]
    n_fav = int(round(shortcut_prob * n_per_class))
    order = rng.permutation(n_per_class)
    other_choice = rng.integers(len(others), size=n_per_class)
    return fav if order[i] < n_fav else others[int(other_choice[i])]


def _image_rng(seed: int, split: str, class_idx: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, _split_code(split), int(class_idx), int(i)])


@dataclass
class WorldArrays:
    """A split held in memory.

    Attributes
    ----------
    images : numpy.ndarray
        uint8 ``(N, size, size, 3)``; class-major order (all of class 0, then class 1, ...).
    masks : numpy.ndarray
        uint8 ``(N, size, size)`` concept ids.
    labels : numpy.ndarray
        int64 ``(N,)`` class indices.
    backgrounds : numpy.ndarray
        int64 ``(N,)`` background concept ids (index into :data:`BACKGROUNDS`).
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    backgrounds: np.ndarray


def generate_arrays(
    n_per_class: int,
    seed: int = 0,
    split: str = "train",
    size: int = DEFAULT_SIZE,
    shortcut_prob: float = SHORTCUT_PROB,
    background: str | None = None,
    classes: Sequence[int] | None = None,
) -> WorldArrays:
    """Generate a split in memory (same pixels as :func:`generate_world` writes).

    Parameters
    ----------
    n_per_class : int
        Images per class.
    seed : int
        World seed.
    split : str
        Split name; different splits are independent streams.
    size : int
        Image side.
    shortcut_prob : float
        Share of shortcut-class images on their shortcut background.
    background : str, optional
        Force every image onto this background (for probes such as "lupo on snow").
    classes : sequence of int, optional
        Class indices to generate (default all).

    Returns
    -------
    WorldArrays
        ``N = n_per_class * len(classes)`` images, masks, labels and backgrounds.
    """
    cls_list = list(range(len(CLASSES))) if classes is None else [int(c) for c in classes]
    n = n_per_class * len(cls_list)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    bgs = np.empty(n, dtype=np.int64)
    j = 0
    for c in cls_list:
        for i in range(n_per_class):
            bg = background or background_for_image(c, i, n_per_class, seed, split, shortcut_prob)
            images[j], masks[j] = render(c, _image_rng(seed, split, c, i), size, bg)
            labels[j] = c
            bgs[j] = BACKGROUNDS.index(bg)
            j += 1
    return WorldArrays(images, masks, labels, bgs)


def mask_path_for(image_path: str | Path) -> Path:
    """Path of the ground-truth mask of an image written by :func:`generate_world`.

    ``<root>/images/<split>/<class>/<i>.png`` -> ``<root>/masks/<split>/<class>/<i>.png``
    (the last path component named ``images`` is replaced). Works for absolute and relative paths.
    """
    p = Path(image_path)
    parts = list(p.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "masks"
            return Path(*parts)
    raise ValueError(f"{image_path} is not under an 'images' folder of a demo world")


def generate_world(
    out_dir: str | Path,
    n_per_class: int = 60,
    seed: int = 0,
    split: str | Sequence[str] = ("train", "heldout"),
    size: int = DEFAULT_SIZE,
    shortcut_prob: float = SHORTCUT_PROB,
) -> Path:
    """Write a demo world to disk.

    Layout::

        out_dir/images/<split>/<class>/<i>.png   RGB uint8 (size x size)
        out_dir/masks/<split>/<class>/<i>.png    L uint8 concept ids (see mask_path_for)
        out_dir/labels.csv                       file,label,label_name (file relative to out_dir)
        out_dir/world.json                       concepts, classes, class_parts, shortcut, seed, counts

    Calling it again on the same folder with another split adds that split (rows of the other
    splits in ``labels.csv`` are kept; ``world.json`` counts are merged).

    Parameters
    ----------
    out_dir : str or Path
        Target folder (created).
    n_per_class : int
        Images per class and split.
    seed : int
        World seed.
    split : str or sequence of str
        Split name(s), e.g. ``"train"``, ``"heldout"``.
    size : int
        Image side in pixels.
    shortcut_prob : float
        Share of shortcut-class images on their shortcut background.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = [split] if isinstance(split, str) else list(split)
    meta_path = out / "world.json"
    labels_path = out / "labels.csv"
    old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if old_meta and (old_meta.get("seed") != seed or old_meta.get("size") != size):
        raise ValueError(
            f"{out} already holds a world with seed={old_meta.get('seed')}, size={old_meta.get('size')}"
        )

    rows: list[tuple[str, int, str]] = []
    if labels_path.exists():
        with labels_path.open(newline="") as fh:
            for r in csv.DictReader(fh):
                if Path(r["file"]).parts[1] not in splits:
                    rows.append((r["file"], int(r["label"]), r["label_name"]))

    counts: dict[str, dict[str, int]] = dict(old_meta.get("counts", {}))
    backgrounds: dict[str, dict[str, dict[str, int]]] = dict(old_meta.get("background_counts", {}))
    for sp in splits:
        arr = generate_arrays(n_per_class, seed, sp, size, shortcut_prob)
        counts[sp] = {}
        backgrounds[sp] = {}
        for c, name in enumerate(CLASSES):
            (out / "images" / sp / name).mkdir(parents=True, exist_ok=True)
            (out / "masks" / sp / name).mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(arr.labels == c)
            for i, j in enumerate(idx):
                rel = Path("images") / sp / name / f"{i:05d}.png"
                Image.fromarray(arr.images[j], "RGB").save(out / rel, optimize=False)
                Image.fromarray(arr.masks[j], "L").save(mask_path_for(out / rel), optimize=False)
                rows.append((rel.as_posix(), c, name))
            counts[sp][name] = int(idx.size)
            backgrounds[sp][name] = {
                b: int(np.sum(arr.backgrounds[idx] == k)) for k, b in enumerate(BACKGROUNDS)
            }

    rows.sort()
    with labels_path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "label", "label_name"])
        w.writerows(rows)
    meta = {
        "name": "concept-explorer demo world",
        "seed": seed,
        "size": size,
        "concepts": CONCEPTS,
        "backgrounds": BACKGROUNDS,
        "classes": CLASSES,
        "class_parts": CLASS_PARTS,
        "shortcut": {
            "grass_class": SHORTCUT_GRASS_CLASS,
            "lookalike_class": SHORTCUT_LOOKALIKE_CLASS,
            "grass_class_background": _SHORTCUT_BACKGROUND[SHORTCUT_GRASS_CLASS],
            "lookalike_class_background": _SHORTCUT_BACKGROUND[SHORTCUT_LOOKALIKE_CLASS],
            "probability": shortcut_prob,
        },
        "counts": counts,
        "background_counts": backgrounds,
        "mask": "masks/<same path as image>: uint8 concept id per pixel (index into concepts)",
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def dominant_concept(mask: np.ndarray, box: tuple[int, int, int, int] | Sequence[int]) -> int:
    """Most frequent concept id in a box of a mask.

    Parameters
    ----------
    mask : numpy.ndarray
        uint8 ``(H, W)`` concept ids.
    box : (x0, y0, x1, y1)
        Pixel box, half-open (``mask[y0:y1, x0:x1]``).

    Returns
    -------
    int
        The concept id covering most pixels of the box (the smallest id on ties).
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    region = np.asarray(mask)[y0:y1, x0:x1]
    if region.size == 0:
        raise ValueError(f"empty box {box} for mask of shape {np.shape(mask)}")
    return int(np.argmax(np.bincount(region.ravel(), minlength=len(CONCEPTS))))
