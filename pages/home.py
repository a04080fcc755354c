"""Workspace page: open a workspace (``demo`` by default, created on first start; ``demo-seg``,
the same world with a segmentation model, likewise on first opening) or create one
(model, layers, crop grid, storage); build or resume its catalog with a progress bar; show its
status (counts, layers with their dimensions, the crop grid)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from explorer_core.errors import ExplorerError
from pages.ui import access, errors, jobs, resources, state, trust, widgets

access.lead_page()

st.title("Concept explorer")
st.caption("Concept based explanations and class contrasting (Herdt & Otero Baguer): pick a "
           "workspace, then explain a class, contrast two classes, test hypotheses or run an "
           "intruder study.")
state.restore_shared()

names = resources.workspace_names()
current = state.qp("ws", resources.DEFAULT_WORKSPACE) or resources.DEFAULT_WORKSPACE
if current not in names:
    names.append(current)
state.init_widget("home_ws", current)
if st.session_state["home_ws"] not in names:
    st.session_state["home_ws"] = current
col_ws, col_new = st.columns([2, 1])
name = col_ws.selectbox("Workspace", names, key="home_ws",
                        help="Workspaces live under $CONCEPT_EXPLORER_HOME (default ./workspaces)")
if name != state.qp("ws"):
    # another workspace: forget the classes of the previous one
    state.set_qp(ws=name, a=None, b=None)
state.scope_to_workspace(name)


@st.cache_data(show_spinner=False, ttl=120, max_entries=16)
def _count_files(folder: str) -> int:
    from data_index.datasets import ImageFolder

    try:
        return len(ImageFolder(folder))
    except (ExplorerError, OSError):
        return 0


def _n_files(ws) -> int:
    """Image files the build will read (0 when the folder cannot be listed); one listing per
    folder and two minutes, not one per rerun of the page."""
    return _count_files(str(ws.images_path))


def _stop_building() -> None:
    st.session_state.pop("building", None)  # a cancelled build is not resumed by itself


def _build(ws, container=None) -> bool:
    """Build (or resume) the catalog with a progress bar and a Cancel button where the user
    started it (``container``); True when it completed. The message of a completed build is
    kept for the next run (``home_built``)."""
    from data_index.catalog import build_catalog

    st.session_state["building"] = str(ws.root)
    n = _n_files(ws)
    job = jobs.Job(f"Building the catalog of '{ws.name}'", "home_job", container=container,
                   on_cancel=_stop_building, kind="build", model=f"{ws.model}/{ws.mode}",
                   units=n)
    try:
        stats = build_catalog(ws, progress=job)
        job.finished()
    except Exception:
        _stop_building()  # a failed build is not retried on every visit; the button stays
        raise
    finally:
        job.done()
    st.session_state.pop("building", None)
    st.session_state["home_built"] = (
        str(ws.root), f"Catalog complete: {stats.n_images} images, {stats.n_crops} crops, "
        f"{stats.n_skipped} skipped ({stats.seconds:.0f}s"
        f"{', resumed ' + str(stats.chunks_resumed) + ' chunks' if stats.chunks_resumed else ''}"
        ").")
    return True


def _open_when_free(ws, wait_s: float = 5.0) -> None:
    """Open the catalog; while the workspace is 'in use' (a build cancelled a moment ago is
    still closing its files), retry for up to ``wait_s`` seconds before saying so."""
    import time

    t_end = time.monotonic() + wait_s
    while True:
        try:
            resources.open_catalog(ws)
            return
        except ExplorerError as err:
            if "is in use" not in str(err) or time.monotonic() >= t_end:
                if "is in use" in str(err):
                    raise ExplorerError(f"{err} If you just cancelled a build, reload the page "
                                        "in a few seconds.") from None
                raise
            time.sleep(0.25)


def _build_estimate(ws) -> None:
    n = _n_files(ws)
    guess = jobs.estimate("build", f"{ws.model}/{ws.mode}", n) if n else None
    st.caption(f":material/schedule: {guess}" if guess else
               f":material/schedule: {n} image files to index"
               + (" (no build measured on this server yet: the rate and ETA show once it runs)"
                  if n else ""))


def _status(ws) -> None:
    cat = resources.open_catalog(ws)
    s = cat.status()
    lm = resources.model(ws.model, ws.device)
    c = st.columns(4)
    c[0].metric("Images", s["images"])
    c[1].metric("Crops", s["crops"])
    c[2].metric("Skipped files", s["skipped"])
    c[3].metric("Classes predicted", len(s["predicted_counts"]))
    st.caption(f"model `{ws.model}` · default layer `{s['layer']}` · input {ws.input_size}px "
               f"· embedding mode `{ws.mode}` · images `{ws.images_path}` · built "
               f"{s.get('built_at') or '?'}")
    st.markdown(f"**Crop grid:** {s['grid']} · **storage:** {s['storage']}")
    st.dataframe([{"layer": name, "channels": s["dims"][name],
                   "default": name == s["layer"],
                   "non-negative": cat.nonnegative(name),
                   "search index": s["index"][name],
                   "recall@8": s["recall_at_8"][name],
                   "MiB": round(s["store_bytes"][name] / 2**20, 2)} for name in s["layers"]],
                 hide_index=True, key="home_layers")
    with errors.guard("reading what is precomputed"):
        _precomputed(ws)
    counts = s["predicted_counts"]
    if counts:
        import plotly.express as px

        rows = sorted(((widgets.class_name(lm, k), v) for k, v in counts.items()),
                      key=lambda r: -r[1])
        fig = px.bar(x=[r[0] for r in rows[:60]], y=[r[1] for r in rows[:60]],
                     labels={"x": "predicted class", "y": "images"},
                     title="Images per predicted class" + (" (top 60)" if len(rows) > 60 else ""))
        fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10))
        st.plotly_chart(fig, key="home_counts")
    if s["skipped"]:
        with st.expander(f"{s['skipped']} skipped files"):
            st.dataframe([{"path": p, "reason": r} for p, r in cat.skipped()],
                         hide_index=True)
    st.page_link("pages/explain.py", label="Explain a class →", icon=":material/extension:")


def _precomputed(ws) -> None:
    """How many classes / pairs a ``python -m explainer precompute`` stored for this catalog."""
    from explainer.precompute import precompute_status

    runs = precompute_status(ws)
    if not runs:
        st.caption("Nothing precomputed yet: `python -m explainer precompute --workspace "
                   f"{ws.name} --all --pairs confusable` stores every class's concepts and the "
                   "classifiers of its confusable pairs, and the pages then open them at once.")
        return
    r = runs[0]
    c = st.columns(3)
    c[0].metric("Precomputed classes", r["classes"])
    c[1].metric("Precomputed pairs", r["pairs"],
                help="A-vs-B classifiers stored (each pair once; B vs A is its sign flip)")
    c[2].metric("Precomputed contrasts", r["contrasts"])
    st.caption(f"by `python -m explainer precompute`, last on {r['updated']}: n = {r['n']}, "
               f"`{r['method']}`, at most {r['max_images']} images, seed {r['seed']}"
               + (f"; {r['failed']} failed (see the command's output)" if r["failed"] else ""))
    if len(runs) > 1:
        with st.expander(f"{len(runs)} precomputed settings"):
            st.dataframe(runs, hide_index=True)


def _show(name: str) -> None:
    from data_index.workspace import workspace_from_url

    # one slot whether or not the demo is being built, so the page keeps its structure and
    # the 'Create a workspace' expander below keeps its open state across reruns
    prep = st.empty()
    if resources.is_embedded(name) and not resources.demo_ready(name):
        resources.ensure_demo(container=prep, name=name)
    ws = workspace_from_url(name)  # a name from the URL: never a folder path
    if not trust.confirm(ws.model, "home_trust"):
        return  # its model runs a user's file: nothing is built or loaded before the OK
    try:
        _open_when_free(ws)
        complete = True
    except ExplorerError as err:
        complete = False
        missing = err
    if not complete:
        resume = st.session_state.get("building") == str(ws.root)
        notes = st.empty()  # what is said about the unfinished catalog: gone once it is built
        with notes.container():
            if jobs.was_cancelled("home_job"):
                st.warning("Build cancelled. What was indexed is saved: **Build / resume** "
                           "continues where it stopped.", icon=":material/cancel:")
            elif resume:
                st.info("Resuming the catalog build you started (it continues where it "
                        "stopped).")
            else:
                st.warning(f"{missing}", icon=":material/build:")
            if not resume:
                _build_estimate(ws)
            pressed = not resume and st.button("Build / resume the catalog", type="primary",
                                               key="home_build")
        if resume or pressed:
            if pressed:
                notes.empty()  # the bar takes the button's place
            try:  # a resume keeps its note above the bar while it runs
                complete = _build(ws)
            finally:
                notes.empty()
    done = st.session_state.pop("home_built", None)
    built = st.empty()  # always there (see prep above); the message shows once
    if done is not None and done[0] == str(ws.root):
        built.success(done[1], icon=":material/check_circle:")
    if complete:
        _status(ws)


with errors.guard("opening the workspace"):
    _show(name)


# --------------------------------------------------------------------------------------------
st.divider()
with st.expander("Create a workspace", expanded=False):
    from explorer_core.models import KNOWN_SPECS

    st.caption("Model specs: " + ", ".join(f"`{s}`" for s in KNOWN_SPECS))
    new_name = st.text_input("Name", key="new_name", placeholder="my-photos")
    # empty by default: a collapsed form must not load a model on every visit of the home page
    spec = st.text_input("Model spec", key="new_spec", placeholder="efficientnet_lite0")
    layer = None
    more: list[str] = []
    lm = None
    options: list[str] = []
    if spec:
        with errors.guard("loading the model"):
            # a python: spec runs its file: only after the warning and this session's OK
            if trust.confirm(spec.strip(), "new_trust"):
                lm = resources.model(spec.strip(), "auto", allow_code=True)
    if lm is not None:
        with errors.guard("listing the model's layers"):
            layers = [l for l in lm.candidate_layers()]
            labels = {l.name: l.label() for l in layers}
            rec = lm.recommended_layer if lm.recommended_layer in labels else layers[-1].name
            options = [l.name for l in layers]
            layer = st.selectbox("Layer (post-ReLU, spatial; deeper is better)", options,
                                 index=options.index(rec),
                                 format_func=lambda n: labels.get(n, n),
                                 key="new_layer")
            more = st.multiselect("More layers (embedded in the same forward; pick the layer "
                                  "on the Explain and Contrast pages)",
                                  [o for o in options if o != layer],
                                  format_func=lambda n: labels.get(n, n), key="new_layers")
    images = st.text_input("Image folder", key="new_images", placeholder="/data/photos")
    size0 = lm.input_size if lm is not None else 224
    grid_for = spec.strip() if lm is not None else None
    if st.session_state.get("_new_grid_for", "") != grid_for:
        # the crop grid's defaults follow the model (its input size, a 3x3 grid) until edited
        st.session_state.update(new_image_size=size0, new_crop_size=max(1, size0 // 3),
                                new_stride=max(1, size0 // 3), _new_grid_for=grid_for)

    def _grid_follows_size() -> None:
        third = max(1, int(st.session_state["new_image_size"]) // 3)
        st.session_state.update(new_crop_size=third, new_stride=third)

    g1, g2, g3, g4 = st.columns(4)
    image_size = g1.number_input("Image size (px)", 8, 16384, key="new_image_size",
                                 on_change=_grid_follows_size,
                                 help="images are resized and center-cropped to this side "
                                      "(default: the model input)")
    crop_size = g2.number_input("Crop size (px)", 1, 16384, key="new_crop_size",
                                help="default: a third of the image (the paper's 3x3 grid)")
    stride = g3.number_input("Stride (px)", 1, 16384, key="new_stride",
                             help="pixels between crops; smaller than the crop: overlap")
    storage = g4.selectbox("Storage", ["float16", "float32"], key="new_storage",
                           help="embedding storage on disk; float16 halves it")
    c1, c2, c3 = st.columns(3)
    mode = c1.selectbox("Crop embedding", ["crop", "cell"], key="new_mode",
                        help="crop: each crop through the model (paper); cell: pooled cells "
                             "of one forward (faster)")
    seed = c2.number_input("Seed", 0, 2**31 - 1, 0, key="new_seed")
    device = c3.selectbox("Device", ["auto", "cpu", "cuda"], key="new_device")
    create_pressed = st.button("Create workspace and build its catalog", key="new_create",
                               type="primary")
    create_slot = st.container()
    if create_pressed:
        with errors.guard("creating the workspace"):
            from data_index.workspace import Workspace

            if not new_name:
                raise ExplorerError("Give the workspace a name (letters, digits, '_', '-', '.')")
            if lm is None or layer is None:
                raise ExplorerError("Give a model spec that loads, then pick a layer")
            if not images or not Path(images).expanduser().is_dir():
                raise ExplorerError(f"Image folder '{images}' not found; give an existing "
                                    "folder of images (class subfolders or a labels.csv are "
                                    "optional)")
            chosen = [o for o in options if o == layer or o in more]  # forward order
            ws = Workspace.create(new_name, model=spec.strip(), layer=layer, layers=chosen,
                                  images=str(Path(images).expanduser().resolve()),
                                  input_size=lm.input_size, mode=mode, seed=int(seed),
                                  device=device, image_size=int(image_size),
                                  crop_size=int(crop_size), stride=int(stride),
                                  storage=storage)
            state.set_qp(ws=ws.name, a=None, b=None)
            st.session_state.pop("home_ws", None)
            # built here, under the button the user pressed (a page left mid-build resumes it
            # at the top of the Workspace page)
            _build(ws, container=create_slot)
            st.rerun()
