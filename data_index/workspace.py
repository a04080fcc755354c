"""Workspaces: a folder holding ``workspace.toml``, the crop catalog, its embeddings and caches.

A workspace records everything needed to reopen it by name: the model spec, the catalog's
hidden layers (``layers``, in model forward order) and its default layer (``layer``, the first of
``layers`` unless given), the model input size, the image folder, the crop grid (``image_size``,
``crop_size``, ``stride``; default the paper's 3 x 3 grid of ``input_size // 3`` crops on
``input_size`` images), the embedding storage (``float16`` or ``float32``), the crop-embedding
mode and the seed. A ``workspace.toml`` with only ``layer`` (written before several layers
existed) opens as a one-layer workspace with the default grid and float16 storage.

Folder layout::

    workspace.toml
    catalog.duckdb              tables images, image_classes, crops, skipped, chunks, meta
    index/<layer folder>/       one float16 EmbeddingStore per layer (data_index.store)
    index/emb_00000.npy ...     chunk files of a build in progress (deleted when complete)
    shards/<i>/                 a sharded build's shard i (its own catalog.duckdb + index/)
    cache/                      result cache
    study.duckdb                intruder studies

A layer's folder name is :func:`layer_folder` of its module name: reversible, safe on any file
system (``layer4.2`` and ``blocks.6.0.conv_pwl`` stay as they are).

Workspaces live under :func:`workspaces_home` (``$CONCEPT_EXPLORER_HOME`` or ``./workspaces``)
and are opened by name, or anywhere else by path. A path is accepted only from the command line
and the app's workspace form; a URL names a workspace under the home by its plain name
(:func:`workspace_from_url`), so a link can never point the app at an arbitrary folder.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from explorer_core.errors import ExplorerError

from .crops import CropGrid

__all__ = ["Workspace", "workspaces_home", "resolve_workspace", "list_workspaces",
           "workspace_from_url", "layer_folder", "layer_from_folder", "STORAGES"]

TOML_NAME = "workspace.toml"
MODES = ("crop", "cell")
STORAGES = ("float16", "float32")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def layer_folder(layer: str) -> str:
    """A file-system-safe, reversible folder name for the module name ``layer``.

    Letters, digits, ``.``, ``_`` and ``-`` stay; every other character (``/``, ``%``, spaces,
    non-ASCII ...) is written ``%XX`` per UTF-8 byte, and so is a leading ``.`` (no hidden,
    ``.`` or ``..`` folders): ``layer4.2`` -> ``layer4.2``, ``a/b`` -> ``a%2Fb``."""
    if not layer:
        raise ExplorerError("Empty layer name; pick one of the model's candidate layers")
    out = []
    for i, ch in enumerate(layer):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def layer_from_folder(folder: str) -> str:
    """The module name of a :func:`layer_folder` name."""
    raw = bytearray()
    i = 0
    while i < len(folder):
        if folder[i] == "%":
            raw.append(int(folder[i + 1:i + 3], 16))
            i += 3
        else:
            raw.extend(folder[i].encode())
            i += 1
    return raw.decode("utf-8", "surrogatepass")


def workspaces_home() -> Path:
    """Folder that holds named workspaces (``$CONCEPT_EXPLORER_HOME``, default ``./workspaces``)."""
    return Path(os.environ.get("CONCEPT_EXPLORER_HOME", "workspaces")).expanduser().resolve()


def _require_utf8(what: str, path: str) -> None:
    """DuckDB and ``workspace.toml`` hold paths as UTF-8 text: refuse any other bytes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ExplorerError(f"The {what} '{shown}' is not valid UTF-8 (DuckDB cannot open such "
                            "paths); rename it or choose another folder") from None


def resolve_workspace(name_or_path: str | os.PathLike) -> Path:
    """A workspace folder from a name (under :func:`workspaces_home`) or a path."""
    s = str(name_or_path)
    if not s:
        raise ExplorerError("No workspace given; pass a workspace name or folder")
    p = Path(s).expanduser()
    if os.sep in s or p.is_absolute() or s.startswith("."):
        root = p.resolve()
    elif not _NAME_RE.match(s):
        raise ExplorerError(f"Bad workspace name '{s}': use letters, digits, '_', '-', '.'")
    else:
        root = workspaces_home() / s
    _require_utf8("workspace path", str(root))
    return root


def workspace_from_url(value: object) -> Workspace:
    """Open the workspace a URL names (the app's ``?ws=``): only a plain workspace name under
    :func:`workspaces_home`, never a path.

    Refused with one :class:`ExplorerError`: anything that is not a name of letters, digits,
    ``_``, ``-``, ``.`` (1-64 characters, starting with a letter or digit), so no path
    separator, no ``..``, no absolute path, no NUL; and a name whose folder resolves outside the
    home (a symbolic link leading elsewhere). A missing workspace raises the usual "No
    workspace" error of :meth:`Workspace.open`."""
    s = value if isinstance(value, str) else ""
    home = workspaces_home()
    shown = repr(s[:80] + ("..." if len(s) > 80 else ""))
    how = (f"a link may only name a workspace in the workspace home ({home}) by its name; open "
           "a workspace in another folder from the Workspace page or the command line")
    if (not _NAME_RE.match(s) or ".." in s or "\x00" in s or "/" in s or "\\" in s
            or os.sep in s):
        raise ExplorerError(f"Refused workspace {shown} from the link: {how}")
    root = home / s
    resolved = root.resolve()
    if resolved == home or not resolved.is_relative_to(home):
        raise ExplorerError(f"Refused workspace {shown} from the link: its folder leads outside "
                            f"the workspace home; {how}")
    return Workspace.open(root)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


@dataclass
class Workspace:
    """One workspace. ``root`` is its folder; the other fields are stored in ``workspace.toml``.

    ``layer`` is the default layer and always one of ``layers``; ``crop_size``, ``stride`` and
    ``image_size`` of 0 mean the default grid (resolved on construction)."""

    root: Path
    model: str
    layer: str
    images: str
    input_size: int
    mode: str = "crop"
    seed: int = 0
    device: str = "auto"
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC)
                         .isoformat(timespec="seconds"))
    layers: list[str] = field(default_factory=list)
    image_size: int = 0
    crop_size: int = 0
    stride: int = 0
    storage: str = "float16"

    def __post_init__(self) -> None:
        layers = [str(x) for x in (self.layers or [])]
        if not self.layer and layers:
            self.layer = layers[0]
        if not self.layer:
            raise ExplorerError("A workspace needs at least one layer")
        if not layers:
            layers = [self.layer]
        if len(set(layers)) != len(layers):
            raise ExplorerError(f"Layers {layers} name a layer twice; give each layer once")
        if self.layer not in layers:
            raise ExplorerError(f"The default layer '{self.layer}' is not one of the catalog's "
                                f"layers ({', '.join(layers)}); add it to the layers")
        self.layers = layers
        if self.storage not in STORAGES:
            raise ExplorerError(f"Unknown storage '{self.storage}'; use one of "
                                f"{', '.join(STORAGES)}")
        size = int(self.image_size or self.input_size)
        crop = int(self.crop_size or size // 3)
        self.image_size, self.crop_size = size, crop
        self.stride = int(self.stride or crop)
        CropGrid(self.image_size, self.crop_size, self.stride)  # validates

    @property
    def grid(self) -> CropGrid:
        """The crop grid of this workspace's catalog."""
        return CropGrid(self.image_size, self.crop_size, self.stride)

    # ---- paths -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def toml_path(self) -> Path:
        return self.root / TOML_NAME

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def layer_dir(self, layer: str) -> Path:
        """``index/<layer folder>``: the layer's embedding store."""
        return self.index_dir / layer_folder(layer)

    def catalog_version(self) -> str:
        """Changes whenever the catalog is (re)built: ``<mtime ns>-<size>`` of its DuckDB file
        (``"none"`` without a catalog). Caches of anything derived from the catalog key on it."""
        try:
            st = os.stat(self.catalog_path)
        except OSError:
            return "none"
        return f"{st.st_mtime_ns}-{st.st_size}"

    @property
    def images_path(self) -> Path:
        """The image folder, absolute with symbolic links resolved (relative paths are relative
        to the workspace folder, so a moved workspace keeps its images)."""
        p = Path(self.images).expanduser()
        return (p if p.is_absolute() else self.root / p).resolve()

    # ---- persistence -----------------------------------------------------------------------
    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("root")
        text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items())
        tmp = self.toml_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.toml_path)

    @classmethod
    def open(cls, name_or_path: str | os.PathLike) -> Workspace:
        """Open an existing workspace by name or path."""
        root = resolve_workspace(name_or_path)
        toml = root / TOML_NAME
        if not toml.is_file():
            known = ", ".join(w.name for w in list_workspaces()) or "none yet"
            raise ExplorerError(f"No workspace at '{root}' (missing {TOML_NAME}); create it with "
                                f"'python -m data_index build ...'. Known workspaces: {known}")
        try:
            data = tomllib.loads(toml.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ExplorerError(f"Broken {toml}: {exc}") from exc
        if "layers" in data and not data.get("layer") and data["layers"]:
            data["layer"] = data["layers"][0]
        fields = {k: data[k] for k in ("model", "layer", "images", "input_size") if k in data}
        missing = {"model", "layer", "images", "input_size"} - set(fields)
        if missing:
            raise ExplorerError(f"{toml} lacks {', '.join(sorted(missing))}")
        extra = {k: data[k] for k in ("mode", "seed", "device", "created", "layers",
                                      "image_size", "crop_size", "stride", "storage")
                 if k in data}
        try:
            return cls(root=root, **fields, **extra)
        except (TypeError, ValueError) as exc:
            raise ExplorerError(f"Broken {toml}: {exc}") from exc

    def settings(self) -> dict[str, Any]:
        """What a catalog is built from (compared when a workspace folder is reused)."""
        return {"model": self.model, "layer": self.layer, "layers": list(self.layers),
                "images": self.images_path, "input_size": self.input_size, "mode": self.mode,
                "image_size": self.image_size, "crop_size": self.crop_size,
                "stride": self.stride, "storage": self.storage}

    @classmethod
    def create(cls, name_or_path: str | os.PathLike, *, model: str, layer: str | None = None,
               images: str, input_size: int, mode: str = "crop", seed: int = 0,
               device: str = "auto", layers: list[str] | tuple[str, ...] | None = None,
               image_size: int | None = None, crop_size: int | None = None,
               stride: int | None = None, storage: str = "float16") -> Workspace:
        """Create (or reopen, when the settings match) a workspace.

        ``layers`` are the catalog's layers (default ``[layer]``), ``layer`` the default one
        (default ``layers[0]``); ``image_size`` / ``crop_size`` / ``stride`` the crop grid
        (default ``input_size`` / ``image_size // 3`` / ``crop_size``). Reusing a folder with
        different settings is refused so nothing built is mixed up."""
        if mode not in MODES:
            raise ExplorerError(f"Unknown embedding mode '{mode}'; use one of {', '.join(MODES)}")
        _require_utf8("image folder", str(images))  # stored as given in workspace.toml
        root = resolve_workspace(name_or_path)
        ws = cls(root=root, model=model, layer=layer or "", images=str(images),
                 input_size=input_size, mode=mode, seed=seed, device=device,
                 layers=list(layers or []), image_size=int(image_size or 0),
                 crop_size=int(crop_size or 0), stride=int(stride or 0), storage=storage)
        if ws.toml_path.is_file():
            old = cls.open(root)
            if old.settings() != ws.settings():
                diff = ", ".join(f"{k}={v}" for k, v in old.settings().items()
                                 if ws.settings()[k] != v)
                raise ExplorerError(
                    f"Workspace '{root}' already exists with other settings ({diff}); choose "
                    "another name or delete it")
            return old
        ws.save()
        return ws


def list_workspaces(home: Path | None = None) -> list[Workspace]:
    """All readable workspaces under ``home`` (default :func:`workspaces_home`), by name."""
    home = home or workspaces_home()
    out = []
    if home.is_dir():
        for toml in sorted(home.glob(f"*/{TOML_NAME}")):
            try:
                out.append(Workspace.open(toml.parent))
            except ExplorerError:
                continue
    return out

