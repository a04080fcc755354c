"""What the pages share within a server process: the loaded models, the open catalogs, computed
results, and the workspace of the current view.

One invalidation rule for everything cached here: a cache key holds the catalog's version
(:meth:`data_index.workspace.Workspace.catalog_version`, which changes whenever the catalog is
built or rebuilt) and every parameter of the computation; nothing is invalidated by hand.
Models are the process-wide ones of :func:`explorer_core.models.shared_model` (one per spec and
device, shared with the method's own calls).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import streamlit as st

from data_index.catalog import Catalog
from data_index.workspace import Workspace, list_workspaces, workspace_from_url, workspaces_home
from explorer_core.errors import ExplorerError
from explorer_core.models import UserCodeRefused, shared_model

from .progress import ProgressBar
from .state import qp, restore_shared, scope_to_workspace, set_qp

DEFAULT_WORKSPACE = "demo"


# --------------------------------------------------------------------------------------------
# models and catalogs


def model(spec: str, device: str = "auto", *, allow_code: bool = False) -> Any:
    """The process-wide loaded model of ``spec`` on ``device``. A ``python:`` spec loads only
    when this browser session trusted its file (:mod:`pages.ui.trust`) or with ``allow_code``
    (the Workspace page's create form, after its warning and confirmation)."""
    from . import trust

    trust.apply()
    return shared_model(spec, device, allow_code=allow_code)


@st.cache_resource(show_spinner=False, max_entries=8)
def _catalog(root: str, version: str) -> Catalog:
    return Catalog.open(Workspace.open(root))


def catalog_key(ws: Workspace) -> tuple[str, str]:
    """``(root, catalog version)``: the key of everything cached about this catalog."""
    return str(ws.root), ws.catalog_version()


def catalog_for_key(root: str, version: str) -> Catalog:
    return _catalog(root, version)


def open_catalog(ws: Workspace) -> Catalog:
    """The workspace's catalog, opened once per catalog version."""
    return _catalog(*catalog_key(ws))


@st.cache_data(show_spinner=False, max_entries=16)
def _predicted_counts(root: str, version: str) -> dict[int, int]:
    return dict(_catalog(root, version).predicted_counts())


def class_counts(ws: Workspace) -> dict[int, int]:
    """``{class: images predicted as it}`` of the workspace's catalog."""
    return _predicted_counts(*catalog_key(ws))


# --------------------------------------------------------------------------------------------
# computed results


class ResultStore:
    """A small LRU of computed results, keyed on every argument that changes them.

    Used instead of decorating the long computations directly so their progress bars are drawn
    live (Streamlit would record and replay elements drawn inside a cached function)."""

    def __init__(self, max_entries: int = 48) -> None:
        self._d: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, key: tuple) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: tuple, value: Any) -> Any:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)
        return value

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._d)


@st.cache_resource(show_spinner=False)
def results_store() -> ResultStore:
    """The process-wide store of computed results (explanations, contrasts, tests)."""
    return ResultStore()


def result_key(kind: str, ws: Workspace, *params: Any, layer: str | None = None) -> tuple:
    """The store key of a result: its kind, the catalog (root and version), the layer (default:
    the workspace's default layer) and its parameters."""
    return (kind, *catalog_key(ws), ws.model, layer or ws.layer, *params)


def computed(key: tuple, compute: Callable[[], Any]) -> Any:
    store = results_store()
    hit = store.get(key)
    if hit is not None:
        return hit
    return store.put(key, compute())


# --------------------------------------------------------------------------------------------
# the workspace of the current view


def workspace_names() -> list[str]:
    """The workspaces under the home, the embedded ones (``demo``, ``demo-seg``) first even
    before they are built (opening one builds it)."""
    from demo_world.workspace import EMBEDDED_WORKSPACES

    names = [w.name for w in list_workspaces()]
    embedded = list(EMBEDDED_WORKSPACES)
    return embedded + [n for n in names if n not in embedded]


def is_embedded(name: str) -> bool:
    """Whether ``name`` is an embedded workspace (``demo``, ``demo-seg``)."""
    from demo_world.workspace import is_embedded as embedded

    return embedded(name)


def ensure_demo(container: Any = None, name: str = DEFAULT_WORKSPACE) -> Workspace:
    """Open the embedded workspace ``name`` (``demo`` or ``demo-seg``), creating it (world +
    catalog) with a visible progress bar."""
    from demo_world.workspace import ensure_embedded_workspace

    slot = (container or st).empty()  # the note and the bar in one slot, emptied at the end
    try:
        with slot.container():
            st.info(f"Preparing the {name} workspace (synthetic world + catalog); the first "
                    "time takes a minute or two. Leaving the page is safe: the build resumes.")
            prog = ProgressBar(f"Building the {name} workspace")
        ws = ensure_embedded_workspace(name, progress=prog)
    finally:
        slot.empty()
    return ws


def demo_ready(name: str = DEFAULT_WORKSPACE) -> bool:
    """Whether the embedded workspace ``name`` exists with a complete, current catalog."""
    root = workspaces_home() / name
    if not (root / "workspace.toml").is_file():
        return False
    try:
        open_catalog(Workspace.open(root))
        return True
    except ExplorerError:
        return False


def current_workspace(build_demo: bool = True) -> Workspace:
    """The workspace named in the URL (``ws``, default ``demo``), opened; an embedded one
    (``demo``, ``demo-seg``) is created on first use. A URL names workspaces under the workspace
    home only, never a path. Raises ExplorerError for an unknown or refused name."""
    name = qp("ws", DEFAULT_WORKSPACE) or DEFAULT_WORKSPACE
    if is_embedded(name) and build_demo and not demo_ready(name):
        ws = ensure_demo(name=name)
        set_qp(ws=name)
        return ws
    ws = workspace_from_url(name)
    set_qp(ws=name)
    return ws


def require_catalog(ws: Workspace) -> Catalog:
    """The workspace's catalog, or stop the page with a pointer to the home page."""
    try:
        return open_catalog(ws)
    except ExplorerError as err:
        st.error(f"{err}", icon=":material/warning:")
        st.page_link("pages/home.py", label="Go to the workspace page to build or resume it",
                     icon=":material/home:")
        st.stop()


def context(build_demo: bool = True) -> tuple[Workspace, Catalog, Any]:
    """(workspace, catalog, loaded model) for a page; stops the page with a message on error."""
    restore_shared()
    try:
        ws = current_workspace(build_demo)
    except ExplorerError as err:
        st.error(str(err), icon=":material/warning:")
        st.page_link("pages/home.py", label="Open or create a workspace", icon=":material/home:")
        st.stop()
    scope_to_workspace(ws.name)
    cat = require_catalog(ws)
    try:
        lm = model(ws.model, ws.device)
    except UserCodeRefused as err:  # a link never runs a user's model file
        st.error(str(err), icon=":material/code_off:")
        st.page_link("pages/home.py", label="Review the model file on the Workspace page",
                     icon=":material/home:")
        st.stop()
    except ExplorerError as err:
        st.error(str(err), icon=":material/warning:")
        st.stop()
    return ws, cat, lm
