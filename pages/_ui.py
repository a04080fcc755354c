"""Shared helpers of the Streamlit pages: workspace from the URL, cached resources, error display,
URL state, crop/image rendering. No algorithm here: everything computed comes from ``explainer``
and ``data_index``; this module only caches, converts to pictures and lays out.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw

from explorer_core.errors import ExplorerError

log = logging.getLogger("concept_explorer.app")

DEFAULT_WORKSPACE = "demo"
METHODS = ("deeplift", "grad_x_act", "deeplift_smoothgrad")
# URL keys this app keeps across pages (Streamlit drops the query string on page switches, so
# the last values are remembered in the session and written back on every page).
SHARED_KEYS = ("ws", "a", "b", "n", "method", "images", "seed", "excl")


# --------------------------------------------------------------------------------------------
# navigation


def ensure_app_navigation() -> None:
    """Make sure the page runs under ``app.py``'s ``st.navigation``.

    Streamlit decides at server start that an app with a ``pages/`` folder is a v1 multipage app,
    until the first run of ``app.py`` calls ``st.navigation``. If the very first request of a
    fresh server opens a page URL (``/explain``, a participant link to ``/participant``), that
    page would run on its own with every file of ``pages/`` listed in the sidebar. Switch the
    v1 mode off and rerun, so ``app.py`` routes (and hides the lead pages from participants)."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if not st.session_state.to_dict():  # a first request: no widget input can be lost
            st.rerun()


# --------------------------------------------------------------------------------------------
# access: the lead key and participant-only sessions

LEAD_KEY_ENV = "CONCEPT_EXPLORER_LEAD_KEY"
_LEAD_OK = "_lead_unlocked"
PARTICIPANT_KEY = "_participant_link"
_KEY_ERROR = "_lead_key_error"


def lead_key() -> str:
    """The server's lead key (``$CONCEPT_EXPLORER_LEAD_KEY``, stripped); ``""`` = no key, the
    app is open to everyone who can reach the server (single-user local use)."""
    return os.environ.get(LEAD_KEY_ENV, "").strip()


def _key_matches(given: str, key: str) -> bool:
    return hmac.compare_digest(given.strip().encode(), key.encode())


def participant_session() -> dict[str, str] | None:
    """The participant link of this session (``study``, ``participant``, ``sig``), or None for a
    lead session.

    A session that was opened with ``?study=`` is marked participant-only in its session state:
    it stays on the participant page even when the query parameters are dropped later. The
    ``sig`` always comes with the ``participant`` it was given with (a link naming another
    participant without a signature does not inherit one); the participant page checks it
    (``study.verify_participant``) before showing any trial."""
    token = st.query_params.get("study")
    if token:
        rec = st.session_state.setdefault(PARTICIPANT_KEY, {})
        if rec.get("study") not in (None, token):  # another study: nothing of the old link
            rec.clear()
        rec["study"] = token
        pid, sig = st.query_params.get("participant"), st.query_params.get("sig")
        if pid:
            rec["participant"] = pid
            rec["sig"] = sig or ""
        elif sig:  # a signature without a name: checked against the name the form is given
            rec["sig"] = sig
    return st.session_state.get(PARTICIPANT_KEY)


def lead_unlocked() -> bool:
    """Whether this session may see the lead pages.

    Never for a participant session; always when no lead key is configured; otherwise once the
    key was given in this browser session (the form, or ``?key=`` in the URL, which is removed
    from the URL at once)."""
    if participant_session() is not None:
        return False
    key = lead_key()
    if not key:
        return True
    if st.session_state.get(_LEAD_OK):
        if "key" in st.query_params:
            del st.query_params["key"]
        return True
    given = st.query_params.get("key")
    if given is not None:
        del st.query_params["key"]  # never leave the key in the address bar or the history
        if _key_matches(given, key):
            st.session_state[_LEAD_OK] = True
            return True
        st.session_state[_KEY_ERROR] = "The key in the link is wrong."
    return False


def lead_key_form() -> None:
    """The only thing a locked session sees: a password form for the lead key."""
    st.title("Concept explorer: lead key needed")
    st.markdown("This server is protected with a **lead key**. Enter it to open the explorer.  \n"
                "Taking part in a study? Use the participant link you were given.")
    err = st.session_state.pop(_KEY_ERROR, None)
    with st.form("lead_key_form", border=True, width=420):
        given = st.text_input("Lead key", type="password", key="lead_key_input",
                              help=f"The value of ${LEAD_KEY_ENV} on the server")
        ok = st.form_submit_button("Unlock", type="primary", icon=":material/lock_open:")
    if ok:
        if _key_matches(given or "", lead_key()):
            st.session_state[_LEAD_OK] = True
            st.rerun()
        err = "Wrong key. Ask whoever runs this server for the lead key."
    if err:
        st.error(err, icon=":material/lock:")


def lead_page() -> None:
    """First call of every lead page: ``app.py``'s navigation, and no lead content unless this
    session is unlocked (a second line of defence: ``app.py`` does not run locked pages)."""
    ensure_app_navigation()
    if lead_unlocked():
        return
    if participant_session() is not None:
        st.info("This browser tab belongs to a study participant: only the trials are available. "
                "Open your participant link again to continue.", icon=":material/lock:")
    else:
        lead_key_form()
    st.stop()


# --------------------------------------------------------------------------------------------
# errors


@contextlib.contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show an :class:`ExplorerError` as ``st.error`` (its message says what to do); anything
    else as a short 'this is a bug' message, with the traceback only in the server log."""
    try:
        yield
    except ExplorerError as err:
        st.error(str(err), icon=":material/warning:")
    except Exception as exc:  # noqa: BLE001 - never show a traceback to the user
        if type(exc).__module__.startswith("streamlit"):  # rerun / stop control flow
            raise
        log.error("unexpected error %s\n%s", what, traceback.format_exc())
        st.error(f"Unexpected error{(' while ' + what) if what else ''}: "
                 f"{type(exc).__name__}: {exc}. This is a bug; the details are in the server "
                 "log. Try other settings or reload the page.", icon=":material/bug_report:")


def run_guarded(fn: Callable[[], Any], what: str = "") -> Any:
    with guard(what):
        return fn()
    return None


# --------------------------------------------------------------------------------------------
# URL state


def _memory() -> dict[str, str]:
    return st.session_state.setdefault("_url_memory", {})


def qp(key: str, default: str | None = None) -> str | None:
    """A URL parameter, else the value remembered in this session, else ``default``."""
    v = st.query_params.get(key)
    if v is None or v == "":
        v = _memory().get(key, default)
    return v


def set_qp(**values: Any) -> None:
    """Write values to the URL (and the session memory); ``None`` removes a key."""
    mem = _memory()
    for k, v in values.items():
        if v is None:
            mem.pop(k, None)
            if k in st.query_params:
                del st.query_params[k]
        else:
            s = str(v)
            mem[k] = s
            if st.query_params.get(k) != s:
                st.query_params[k] = s


def restore_shared() -> None:
    """Put remembered shared keys back into the URL (after a page switch dropped them)."""
    mem = _memory()
    for k in SHARED_KEYS:
        if k in st.query_params and st.query_params[k] != "":
            mem[k] = st.query_params[k]
        elif k in mem:
            st.query_params[k] = mem[k]


def int_qp(key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    try:
        v = int(qp(key, str(default)))
    except (TypeError, ValueError):
        v = default
    if lo is not None:
        v = max(lo, v)
    if hi is not None:
        v = min(hi, v)
    return v


def bool_qp(key: str, default: bool = False) -> bool:
    v = qp(key)
    return default if v is None else v in ("1", "true", "True", "yes")


def init_widget(key: str, value: Any) -> None:
    """Give a keyed widget its first value (from the URL) unless it already has one."""
    if key not in st.session_state:
        st.session_state[key] = value


# --------------------------------------------------------------------------------------------
# progress


class Progress:
    """Adapts the callbacks of the method (``(done, total)``, ``(fraction, text)``, objects with
    ``done``/``total``/``phase``) to one ``st.progress`` bar."""

    def __init__(self, text: str, container: Any = None) -> None:
        self.text = text
        self.bar = (container or st).progress(0.0, text=text)
        self.t0 = time.perf_counter()

    def __call__(self, *args: Any, **kw: Any) -> None:
        frac, note = 0.0, ""
        if args and hasattr(args[0], "done") and hasattr(args[0], "total"):
            p = args[0]
            frac = p.done / max(1, p.total)
            rate = getattr(p, "images_per_s", 0.0) or 0.0
            eta = getattr(p, "eta_s", 0.0) or 0.0
            note = (f"{getattr(p, 'phase', '')}: {p.done}/{p.total} images"
                    f"{f', {rate:.0f} img/s' if rate else ''}{f', ETA {eta:.0f}s' if eta else ''}")
        elif len(args) >= 2 and isinstance(args[0], (int, float)) and isinstance(args[1], (int, float)):
            frac = float(args[0]) / max(1.0, float(args[1]))
            note = f"{args[0]}/{args[1]}"
        elif args and isinstance(args[0], (int, float)):
            frac = float(args[0])
            note = str(args[1]) if len(args) > 1 else ""
        elif args and isinstance(args[0], str):
            note = args[0]
            frac = float(args[1]) if len(args) > 1 and isinstance(args[1], (int, float)) else 0
        if "fraction" in kw:
            frac = float(kw["fraction"])
        if "text" in kw or "message" in kw:
            note = str(kw.get("text", kw.get("message")))
        frac = min(1.0, max(0.0, frac))
        el = time.perf_counter() - self.t0
        self.bar.progress(frac, text=f"{self.text} — {note} ({el:.0f}s)" if note else
                          f"{self.text} ({el:.0f}s)")

    def done(self) -> None:
        self.bar.empty()


# --------------------------------------------------------------------------------------------
# cached resources (keyed on explicit arguments)


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def load_model_cached(spec: str, device: str = "auto") -> Any:
    from explorer_core.models import load_model

    return load_model(spec, device)


@st.cache_resource(show_spinner=False, max_entries=8)
def _catalog_cached(root: str, generation: int) -> Any:
    from data_index.catalog import Catalog

    return Catalog.open(Path(root))


def catalog_generation() -> int:
    return int(st.session_state.get("_catalog_generation", 0))


def bump_catalog_generation() -> None:
    st.session_state["_catalog_generation"] = catalog_generation() + 1
    _catalog_cached.clear()


def open_catalog(ws: Any) -> Any:
    return _catalog_cached(str(ws.root), catalog_generation())


@st.cache_resource(show_spinner=False)
def results_store() -> ResultStore:
    """The process-wide store of computed results (explanations, contrasts, tests)."""
    return ResultStore()


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


def computed(key: tuple, compute: Callable[[], Any]) -> Any:
    store = results_store()
    hit = store.get(key)
    if hit is not None:
        return hit
    return store.put(key, compute())


# --------------------------------------------------------------------------------------------
# workspace


def workspace_names() -> list[str]:
    from data_index.workspace import list_workspaces

    names = [w.name for w in list_workspaces()]
    if DEFAULT_WORKSPACE not in names:
        names.insert(0, DEFAULT_WORKSPACE)
    return names


def ensure_demo(container: Any = None) -> Any:
    """Open the demo workspace, creating it (world + catalog) with a visible progress bar."""
    from demo_world.workspace import ensure_demo_workspace

    box = container or st.container()
    with box:
        st.info("Preparing the demo workspace (synthetic world + catalog); the first time takes "
                "a minute or two. Leaving the page is safe: the build resumes.")
        prog = Progress("Building the demo catalog")
        ws = ensure_demo_workspace(progress=prog)
        prog.done()
    bump_catalog_generation()
    return ws


def demo_ready() -> bool:
    from data_index.workspace import workspaces_home

    root = workspaces_home() / DEFAULT_WORKSPACE
    if not (root / "workspace.toml").is_file():
        return False
    try:
        open_catalog_root(root)
        return True
    except ExplorerError:
        return False


def open_catalog_root(root: Path) -> Any:
    return _catalog_cached(str(root), catalog_generation())


def current_workspace(build_demo: bool = True) -> Any:
    """The workspace named in the URL (``ws``, default ``demo``), opened; the demo is created on
    first use. Raises ExplorerError for an unknown name and for anything that is not a plain
    workspace name under the workspace home (a URL never names a folder path)."""
    from data_index.workspace import workspace_from_url

    name = qp("ws", DEFAULT_WORKSPACE) or DEFAULT_WORKSPACE
    set_qp(ws=name)
    if name == DEFAULT_WORKSPACE and build_demo and not demo_ready():
        return ensure_demo()
    return workspace_from_url(name)


def require_catalog(ws: Any) -> Any:
    """The workspace's catalog, or stop the page with a pointer to the home page."""
    try:
        return open_catalog(ws)
    except ExplorerError as err:
        st.error(f"{err}", icon=":material/warning:")
        st.page_link("pages/home.py", label="Go to the workspace page to build or resume it",
                     icon=":material/home:")
        st.stop()


def context(build_demo: bool = True) -> tuple[Any, Any, Any]:
    """(workspace, catalog, loaded model) for a page; stops the page with a message on error."""
    restore_shared()
    try:
        ws = current_workspace(build_demo)
    except ExplorerError as err:
        st.error(str(err), icon=":material/warning:")
        st.page_link("pages/home.py", label="Open or create a workspace", icon=":material/home:")
        st.stop()
    cat = require_catalog(ws)
    try:
        lm = load_model_cached(ws.model, ws.device)
    except ExplorerError as err:
        st.error(str(err), icon=":material/warning:")
        st.stop()
    return ws, cat, lm


# --------------------------------------------------------------------------------------------
# classes


@st.cache_data(show_spinner=False, max_entries=16)
def predicted_counts(root: str, generation: int) -> dict[int, int]:
    return dict(_catalog_cached(root, generation).predicted_counts())


def class_counts(ws: Any) -> dict[int, int]:
    return predicted_counts(str(ws.root), catalog_generation())


def parse_class(value: str | None, names: Sequence[str]) -> int | None:
    """A class from the URL: its name (preferred) or its index."""
    if value is None or value == "":
        return None
    if value in names:
        return list(names).index(value)
    try:
        i = int(value)
    except ValueError:
        return None
    return i if 0 <= i < len(names) else None


def class_picker(label: str, names: Sequence[str], counts: dict[int, int], *, key: str,
                 url_key: str, default: int | None = None, container: Any = None,
                 exclude: int | None = None) -> int:
    """Select a class by name (type to search); options read 'name (N images)'; the most
    populated classes come first. The choice is kept in the URL (by name)."""
    opts = sorted(range(len(names)), key=lambda i: (-counts.get(i, 0), names[i]))
    if exclude is not None and len(opts) > 1:
        opts = [i for i in opts if i != exclude]
    first = parse_class(qp(url_key), names)
    if first is None or first not in opts:
        first = default if default in opts else opts[0]
    init_widget(key, first)
    if st.session_state[key] not in opts:
        st.session_state[key] = first
    box = container or st
    cls = box.selectbox(label, opts, key=key,
                        format_func=lambda i: f"{names[i]} ({counts.get(i, 0)} images)")
    set_qp(**{url_key: names[cls]})
    return int(cls)


def class_name(lm: Any, c: int) -> str:
    return lm.class_names[c] if 0 <= c < len(lm.class_names) else f"class {c}"


# --------------------------------------------------------------------------------------------
# pictures


def to_uint8(t: Any) -> np.ndarray:
    """(3, H, W) [0, 1] tensor/array -> (H, W, 3) uint8."""
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    if a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return a


def upscale(a: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscale of a small picture so it reads on screen."""
    h, w = a.shape[:2]
    f = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    return a.repeat(f, 0).repeat(f, 1) if f > 1 else a


@st.cache_data(show_spinner=False, max_entries=2048)
def crop_image(root: str, generation: int, spec: str, device: str, crop_id: int) -> np.ndarray:
    cat = _catalog_cached(root, generation)
    lm = load_model_cached(spec, device)
    return to_uint8(cat.crop_pixels([int(crop_id)], lm)[0])


@st.cache_data(show_spinner=False, max_entries=512)
def image_array(root: str, generation: int, spec: str, device: str, image_id: int) -> np.ndarray:
    cat = _catalog_cached(root, generation)
    lm = load_model_cached(spec, device)
    return to_uint8(cat.image_pixels([int(image_id)], lm)[0])


def crop_pic(ws: Any, crop_id: int) -> np.ndarray:
    return crop_image(str(ws.root), catalog_generation(), ws.model, ws.device, int(crop_id))


def image_pic(ws: Any, image_id: int) -> np.ndarray:
    return image_array(str(ws.root), catalog_generation(), ws.model, ws.device, int(image_id))


def with_box(img: np.ndarray, box: Sequence[int], color: tuple[int, int, int] = (255, 40, 40)
             ) -> np.ndarray:
    """The image (upscaled) with the crop box drawn."""
    big = upscale(img, 256)
    f = big.shape[0] // img.shape[0]
    pil = Image.fromarray(big)
    x0, y0, x1, y1 = (int(v) * f for v in box)
    ImageDraw.Draw(pil).rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=max(2, f))
    return np.asarray(pil)


def heat_overlay(img: np.ndarray, heat: np.ndarray, vmax: float) -> np.ndarray:
    """Blend a concept heatmap (h, w) over an image (H, W, 3): red where the concept is strong."""
    h = np.asarray(heat, np.float32) / (vmax if vmax > 0 else 1.0)
    h = np.clip(h, 0, 1)
    H, W = img.shape[:2]
    hm = np.asarray(Image.fromarray((h * 255).astype(np.uint8)).resize((W, H),
                                                                        Image.Resampling.BILINEAR),
                    np.float32)[..., None] / 255.0
    base = img.astype(np.float32) * 0.45
    red = np.array([255, 60, 0], np.float32)
    out = base * (1 - hm) + (base * 0.3 + red * 0.7) * hm
    return upscale(out.clip(0, 255).astype(np.uint8), 128)


# --------------------------------------------------------------------------------------------
# shared renderers


def prediction_mark(pt: Any, lm: Any, *, container: Any = None, explanation: bool = True) -> None:
    """PASS/FAIL of a prediction test, with the stitched image and P(A). ``explanation=False``
    for crops the user picked (test bench): no verdict on an explanation then."""
    box = container or st
    a = class_name(lm, pt.target)
    pred = class_name(lm, pt.predicted)
    what = "the stitched top crops" if explanation else "the stitched crops"
    c1, c2 = box.columns([1, 4])
    c1.image(upscale(pt.stitched, 64),
             caption="stitched top-1 crops" if explanation else "stitched crops", width=72)
    if pt.passed:
        c2.success(f"PASS — {what} are classified as **{a}** "
                   f"(P({a}) = {pt.prob_target:.3f}).", icon=":material/check_circle:")
    else:
        c2.error(f"FAIL — {what} are classified as **{pred}** "
                 f"(P = {pt.prob_predicted:.3f}), P({a}) = {pt.prob_target:.3f}."
                 + (" This explanation is not to be trusted." if explanation else ""),
                 icon=":material/cancel:")
    c2.caption(f"Prediction test (paper §4.3): crops {', '.join(map(str, pt.crop_ids))}"
               + (f", target-class crops {'excluded' if pt.exclude_target else 'allowed'}."
                  if explanation else "."))


def provenance(ws: Any, lm: Any, ref: Any) -> None:
    """Where a crop comes from: the source image with the crop box, both predictions."""
    st.image(with_box(image_pic(ws, ref.image_id), ref.box),
             caption=f"image {ref.image_id}, cell ({ref.row}, {ref.col}), box {tuple(ref.box)}",
             width=220)
    crop_pred = (f"{class_name(lm, ref.crop_pred)} ({ref.crop_conf:.2f})"
                 if ref.crop_pred >= 0 else "n/a (cell mode)")
    st.markdown(f"**crop {ref.crop_id}** · similarity {ref.score:.3f}  \n"
                f"crop predicted: {crop_pred}  \n"
                f"image predicted: {class_name(lm, ref.image_pred)} ({ref.image_conf:.2f})"
                + (f"  \nlabel: {class_name(lm, ref.label)}" if ref.label is not None else ""))
    st.caption(Path(ref.path).name)


def concept_grid(ws: Any, lm: Any, explanation: Any, exclude_target: bool,
                 key_prefix: str) -> None:
    """Per concept: the m nearest crops in a grid, each with provenance in a popover."""
    unreadable: list[str] = []
    for con in explanation.concepts:
        refs = con.top_crops(exclude_target)
        st.markdown(f"#### Concept {con.index + 1} · importance {con.importance:.0%}")
        cols = st.columns(max(1, len(refs)))
        for col, ref in zip(cols, refs):
            with col:
                try:
                    pic = upscale(crop_pic(ws, ref.crop_id), 96)
                except ExplorerError as err:  # e.g. the image folder moved since the build
                    unreadable.append(str(err))
                    st.caption(f"#{ref.crop_id} unreadable")
                    continue
                st.image(pic, width=96, caption=f"#{ref.crop_id}")
                with st.popover("where from"):
                    with guard("showing where the crop comes from"):
                        provenance(ws, lm, ref)
        if not refs:
            st.warning("No crops found for this concept (the crop bank may be empty after "
                       "excluding the target class).")
    if unreadable:
        st.error(f"{len(unreadable)} crops could not be drawn: {unreadable[0]}. The workspace's "
                 "images may have moved or been deleted since its catalog was built; put them "
                 "back, or create the workspace again on the Workspace page.",
                 icon=":material/broken_image:")


def heatmaps(ws: Any, lm: Any, explanation: Any, n_images: int) -> None:
    """Concept strength over the first ``n_images`` source images (NMF W, ours, not the paper's)."""
    hm = np.asarray(explanation.heatmaps)
    if hm.size == 0 or not explanation.image_ids:
        st.info("This explanation has no heatmaps.")
        return
    vmax = [float(np.percentile(hm[:, k], 99.5)) or float(hm[:, k].max())
            for k in range(hm.shape[1])]
    k = explanation.n_concepts
    head = st.columns(k + 1)
    head[0].markdown("**image**")
    for c in range(k):
        head[c + 1].markdown(f"**concept {c + 1}**")
    for i, image_id in enumerate(explanation.image_ids[:n_images]):
        img = image_pic(ws, image_id)
        cols = st.columns(k + 1)
        cols[0].image(upscale(img, 128), width=128, caption=f"image {image_id}")
        for c in range(k):
            cols[c + 1].image(heat_overlay(img, hm[i, c], vmax[c]), width=128)


def run_or_load(key: tuple, prefix: str, button: str, what: str, compute: Callable[[Any], Any],
                hint: str) -> Any:
    """The result stored under ``key``, or a run button that computes it with a progress bar.

    A shared link with ``run=1`` computes on its first visit. Stops the page (with ``hint``)
    while there is no result; ``compute(progress)`` is the explainer call."""
    result = results_store().get(key)
    run_slot = st.empty()
    run = result is None and run_slot.button(button, type="primary", key=f"{prefix}_run")
    first_visit = f"{prefix}_seen" not in st.session_state
    st.session_state[f"{prefix}_seen"] = True
    auto = first_visit and st.query_params.get("run") == "1"  # a shared link of a computed view
    if result is None and (run or auto):
        with guard(what):
            prog = Progress(what[:1].upper() + what[1:])
            result = computed(key, lambda: compute(prog))
            prog.done()
            run_slot.empty()
    if result is None:
        set_qp(run=None)
        st.info(hint)
        st.stop()
    set_qp(run=1)
    for w in getattr(result, "warnings", []):
        st.warning(w)
    return result


def method_settings(prefix: str, images_label: str, images_help: str | None = None
                    ) -> tuple[int, str, int, int]:
    """The shared sidebar settings of the explain and contrast pages, kept in the URL:
    (n concepts, attribution method, image count, seed). Call inside ``st.sidebar``."""
    init_widget(f"{prefix}_n", int_qp("n", 4, 1, 10))
    n = st.slider("Concepts", 1, 10, key=f"{prefix}_n")
    method_q = qp("method", "deeplift")
    init_widget(f"{prefix}_method", method_q if method_q in METHODS else "deeplift")
    method = st.selectbox("Attribution method", METHODS, key=f"{prefix}_method")
    init_widget(f"{prefix}_images", int_qp("images", 500, 1, 100000))
    max_images = st.number_input(images_label, 1, 100000, step=50, key=f"{prefix}_images",
                                 help=images_help)
    init_widget(f"{prefix}_seed", int_qp("seed", 0, 0))
    seed = st.number_input("Seed", 0, 2**31 - 1, key=f"{prefix}_seed")
    set_qp(n=n, method=method, images=int(max_images), seed=int(seed))
    return int(n), method, int(max_images), int(seed)
