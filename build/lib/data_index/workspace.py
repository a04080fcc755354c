"""Workspaces: a folder holding ``workspace.toml``, the crop catalog, its FAISS index and caches.

A workspace records everything needed to reopen it by name: the model spec, the hidden layer,
the model input size, the image folder, the crop-embedding mode and the seed.

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

from explorer_core.errors import ExplorerError

__all__ = ["Workspace", "workspaces_home", "resolve_workspace", "list_workspaces",
           "workspace_from_url"]

TOML_NAME = "workspace.toml"
MODES = ("crop", "cell")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


@dataclass
class Workspace:
    """One workspace. ``root`` is its folder; the other fields are stored in ``workspace.toml``."""

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
        fields = {k: data[k] for k in ("model", "layer", "images", "input_size") if k in data}
        missing = {"model", "layer", "images", "input_size"} - set(fields)
        if missing:
            raise ExplorerError(f"{toml} lacks {', '.join(sorted(missing))}")
        extra = {k: data[k] for k in ("mode", "seed", "device", "created") if k in data}
        return cls(root=root, **fields, **extra)

    @classmethod
    def create(cls, name_or_path: str | os.PathLike, *, model: str, layer: str, images: str,
               input_size: int, mode: str = "crop", seed: int = 0,
               device: str = "auto") -> Workspace:
        """Create (or reopen, when the settings match) a workspace.

        Reusing a folder with different settings is refused so nothing built is mixed up."""
        if mode not in MODES:
            raise ExplorerError(f"Unknown embedding mode '{mode}'; use one of {', '.join(MODES)}")
        _require_utf8("image folder", str(images))  # stored as given in workspace.toml
        root = resolve_workspace(name_or_path)
        ws = cls(root=root, model=model, layer=layer, images=str(images), input_size=input_size,
                 mode=mode, seed=seed, device=device)
        if ws.toml_path.is_file():
            old = cls.open(root)
            same = (old.model, old.layer, old.images_path, old.input_size, old.mode) == (
                ws.model, ws.layer, ws.images_path, ws.input_size, ws.mode)
            if not same:
                raise ExplorerError(
                    f"Workspace '{root}' already exists with model={old.model} layer={old.layer} "
                    f"images={old.images} mode={old.mode}; choose another name or delete it")
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

