"""Issue 12, part A: the seven bugs a new user hit, and the new controls (send a crop to the
bench, draw a region, place a patch by clicking, estimates and Cancel), driven through the
pages with ``streamlit.testing.v1.AppTest`` where they render, and as plain functions where the
browser component (streamlit-image-coordinates) delivers the clicks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from explorer_core.errors import ExplorerError

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
T = 900


def _app(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=T)
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def _captions(at) -> str:
    return "\n".join(c.value for c in at.caption)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def demo_ws(demo_workspace, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return demo_workspace


def _two_class_images(demo_workspace, dest: Path, per_class: int = 8) -> Path:
    """The first ``per_class`` demo gallery images of lupo and husko (a small folder in which
    8 of the 10 demo classes have no images)."""
    src = demo_workspace.images_path
    dest.mkdir(parents=True, exist_ok=True)
    rows, taken = [], {}
    with (src / "labels.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            cls = r["file"].split("/")[0]
            if cls not in ("lupo", "husko") or taken.get(cls, 0) >= per_class:
                continue
            taken[cls] = taken.get(cls, 0) + 1
            (dest / cls).mkdir(exist_ok=True)
            shutil.copy(src / r["file"], dest / r["file"])
            rows.append(r)
    with (dest / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "label_name"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dest


@pytest.fixture(scope="module")
def small_home(tmp_path_factory, demo_workspace):
    """A workspace home with two built workspaces (``small-b``, ``small-c``) over 16 demo
    images of two classes, and the image folder for a third one made from the form."""
    from data_index.catalog import build_catalog
    from data_index.workspace import Workspace
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    home = tmp_path_factory.mktemp("ux_home")
    images = _two_class_images(demo_workspace, home.parent / f"{home.name}_images")
    for name in ("small-b", "small-c"):
        ws = Workspace.create(home / name, model="demo", layer=DEMO_LAYER, images=str(images),
                              input_size=DEMO_INPUT_SIZE, device="cpu")
        build_catalog(ws, device="cpu", batch_size=8)
    return home, images


@pytest.fixture
def small(small_home, monkeypatch):
    home, images = small_home
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(home))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    return home, images


# ---- bug 1: a region with x0 > x1 --------------------------------------------------------------


def test_normalized_box_orders_corners_and_refuses_an_empty_region():
    from pages.ui.bench_send import normalized_box

    assert normalized_box(60, 50, 10, 5, 96) == (10, 5, 60, 50)
    assert normalized_box(-3, 0, 200, 40, 96) == (0, 0, 96, 40)  # clipped to the image
    with pytest.raises(ExplorerError, match="is empty"):
        normalized_box(10, 0, 10, 40, 96)


def test_region_with_swapped_corners_gives_a_patch(demo_ws):
    at = _app(ws="demo", a="lupo", b="husko")
    at.switch_page("pages/test_bench.py").run()
    at.radio(key="tb_source").set_value("region of a catalog image").run()
    at.number_input(key="tb_x0").set_value(40)
    at.number_input(key="tb_x1").set_value(10)
    at.number_input(key="tb_y0").set_value(30)
    at.number_input(key="tb_y1").set_value(0).run()
    assert not at.exception, at.exception
    assert not any("bug" in e for e in _errors(at)), _errors(at)
    assert "Region (10, 0, 40, 30)" in _captions(at)
    caps = [c for im in at.image for c in im.captions if c.startswith("patch ")]
    assert caps == ["patch 60x60"]  # 30x30, tiled 2x2 (the demo's default size)
    at.radio(key="tb_tile").set_value("1x").run()
    assert [c for im in at.image for c in im.captions if c.startswith("patch ")] == [
        "patch 30x30"]


# ---- point, don't type: drags and clicks -> boxes and positions ---------------------------------


def test_box_from_drag_and_click_in_image_pixels():
    from pages.ui.bench_send import box_from_drag

    # the component reports displayed pixels: a 96 px image shown 288 px wide (3x)
    drag = {"x1": 150, "y1": 30, "x2": 30, "y2": 90, "width": 288, "height": 288}
    assert box_from_drag(drag, 96) == (10, 10, 50, 30)
    # a plain click: a crop-sized box (a third of the side) centred there, kept inside
    assert box_from_drag({"x": 144, "y": 144, "width": 288}, 96) == (32, 32, 64, 64)
    assert box_from_drag({"x": 2, "y": 280, "width": 288}, 96) == (0, 64, 32, 96)
    assert box_from_drag(None, 96) is None


def test_position_from_click_centres_the_patch_inside_the_image():
    from pages.ui.bench_send import position_from_click

    assert position_from_click({"x": 144, "y": 72, "width": 288}, 96, 32, 32) == (32, 8)
    assert position_from_click({"x": 287, "y": 287, "width": 288}, 96, 64, 64) == (32, 32)
    assert position_from_click({"x": 0, "y": 0, "width": 288}, 96, 32, 32) == (0, 0)


def test_send_buttons_fill_the_bench_per_workspace(demo_ws):
    at = _app(ws="demo", a="lupo", n=4)
    at.switch_page("pages/explain.py").run()
    if "ex_run" in [b.key for b in at.button]:
        at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    sends = [b for b in at.button if b.key and b.key.startswith("ex_send_")]
    stitch = [b for b in sends if b.key.endswith("_stitch")]
    assert len(stitch) == 32  # one under every crop shown
    first = int(stitch[0].key.split("_")[3])
    second = int(stitch[1].key.split("_")[3])
    stitch[0].click().run()
    at.button(key=stitch[1].key).click().run()
    patch_btn = [b for b in at.button if b.key and b.key.endswith(f"_{second}_patch")][0]
    patch_btn.click().run()
    assert at.session_state["_bench"]["demo"] == {"stitch": [first, second], "patch": second}
    # the Test bench shows them: stitched at once, and the patch preselected
    at.switch_page("pages/test_bench.py").run()
    assert not at.exception, at.exception
    assert at.multiselect(key="tb_pick").value == [first, second]
    verdicts = [s.value for s in at.success] + _errors(at)
    assert any("the stitched crops are classified" in v for v in verdicts), verdicts
    assert {f"#{first}", f"#{second}"} <= {c for im in at.image for c in im.captions}
    assert at.radio(key="tb_source").value == "concept crop"
    assert at.selectbox(key="tb_patch_crop").value == second
    assert set(at.session_state["_bench"]) == {"demo"}  # kept per workspace


# ---- bug 2 and bug 3: create a workspace, build where the user is --------------------------------


def test_create_from_form_builds_in_place_without_stale_notes(small, demo_workspace):
    home, images = small
    at = _app(ws="small-b").run()
    assert not at.exception, at.exception
    at.text_input(key="new_name").input("fresh")
    at.text_input(key="new_spec").input("demo")
    at.run()
    at.text_input(key="new_images").input(str(images))
    at.button(key="new_create").click().run()
    assert not at.exception, at.exception
    assert _errors(at) == []
    assert at.query_params["ws"] in ("fresh", ["fresh"])
    # the fresh build is not called a resume, nothing says 'no catalog yet' above the result
    assert not any("Resuming" in i.value for i in at.info), [i.value for i in at.info]
    assert not any("catalog" in w.value.lower() for w in at.warning), [w.value for w in
                                                                        at.warning]
    assert any(s.value.startswith("Catalog complete: 16 images") for s in at.success)
    assert not at.get("progress")  # the bar is gone
    assert int({m.label: m.value for m in at.metric}["Images"]) == 16


def test_build_button_shows_an_estimate_then_builds(small):
    home, images = small
    from data_index.workspace import Workspace
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    Workspace.create(home / "later", model="demo", layer=DEMO_LAYER, images=str(images),
                     input_size=DEMO_INPUT_SIZE, device="cpu")
    at = _app(ws="later").run()
    assert not at.exception, at.exception
    assert "16 image files to index" in _captions(at) or "for 16 images" in _captions(at)
    assert [b.key for b in at.button if b.key == "home_build"] == ["home_build"]
    at.button(key="home_build").click().run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("Catalog complete: 16 images") for s in at.success)
    assert not at.warning and not at.get("progress")


# ---- bug 4: classes without images; no bar left after an error ---------------------------------


def test_explain_offers_only_classes_with_images(small):
    at = _app(ws="small-b", a="zebrox")
    at.switch_page("pages/explain.py").run()
    assert not at.exception, at.exception
    opts = at.selectbox(key="ex_class").options
    assert 1 <= len(opts) <= 3 and all(not o.endswith("(0 images)") for o in opts), opts
    assert any("has no images predicted as it" in c.value for c in at.sidebar.caption)


def test_run_or_load_leaves_no_bar_after_an_error():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from explorer_core.errors import ExplorerError
        from pages.ui import views

        def fail(progress):
            from explorer_core.progress import Progress

            progress(Progress("attribution", 0, 10, "images"))
            raise ExplorerError("No images are predicted as this class")

        views.run_or_load(("explain", "r", "v", 1), "ex", "Explain", "explaining x", fail,
                          "press Explain")
        st.write("after")

    at = AppTest.from_function(page, default_timeout=60).run()
    at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    assert _errors(at) == ["No images are predicted as this class"]
    assert not at.get("progress")
    assert "ex_job_cancel" not in [b.key for b in at.button]


# ---- bug 5: an unreadable upload is named as the user named it -----------------------------------


def test_unreadable_upload_is_reported_under_the_users_file_name():
    from explorer_core.models import load_model
    from pages.ui.bench_send import patch_from_upload

    lm = load_model("demo", "cpu")
    with pytest.raises(ExplorerError) as err:
        patch_from_upload(lm, "my grass.png", b"not an image at all")
    msg = str(err.value)
    assert "'my grass.png'" in msg and "upload" not in msg and "/tmp" not in msg, msg
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (0, 200, 0)).save(buf, format="PNG")
    patch = patch_from_upload(lm, "green.png", buf.getvalue())
    assert tuple(patch.shape) == (3, lm.crop_size, lm.crop_size)


# ---- bug 6 -----------------------------------------------------------------------------------------


def test_bench_target_follows_class_a_and_image_ids_are_categories(demo_ws):
    from explorer_core.models import load_model

    names = load_model("demo", "cpu").class_names
    at = _app(ws="demo", a="lupo", b="husko")
    at.switch_page("pages/test_bench.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="tb_target").value == names.index("lupo")
    at.text_input(key="tb_patch_crop_typed").input("4").run()
    at.button(key="tb_run").click().run()
    assert not at.exception, at.exception
    per_image = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert per_image["layout"]["xaxis"]["type"] == "category"
    assert len(per_image["data"][0]["x"]) == 32


def test_exclude_toggle_does_not_leak_into_another_workspace(small):
    at = _app(ws="small-b", a="lupo", n=2, images=16)
    at.switch_page("pages/explain.py").run()
    if "ex_run" in [b.key for b in at.button]:
        at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    at.toggle(key="ex_excl").set_value(True).run()
    assert at.query_params["excl"] in ("1", ["1"])
    at.query_params["ws"] = "small-c"
    at.run()
    if "ex_run" in [b.key for b in at.button]:
        at.button(key="ex_run").click().run()
    assert not at.exception, at.exception
    assert at.toggle(key="ex_excl").value is False
    assert at.query_params.get("excl") in (None, "0", ["0"])


def test_changing_n_keeps_the_previous_result_greyed(small):
    at = _app(ws="small-b", a="lupo", n=2, images=16)
    at.switch_page("pages/explain.py").run()
    if "ex_run" in [b.key for b in at.button]:
        at.button(key="ex_run").click().run()
    crops = [c for im in at.image for c in im.captions if c.startswith("#")]
    assert len(crops) == 16
    at.slider(key="ex_n").set_value(3).run()
    assert not at.exception, at.exception
    assert [c for im in at.image for c in im.captions if c.startswith("#")] == crops
    assert "Showing the previous result for n=2" in _captions(at)
    assert "ex_run" in [b.key for b in at.button]


# ---- bug 7: the demo's patch insertion shows a clear effect ---------------------------------------


def test_demo_patch_insertion_default_size_moves_p_lupo_clearly(demo_workspace):
    """The README's walkthrough (step 4): the grass concept's top crop, tiled 2x2 (the bench's
    default on the demo), raises P(lupo) in every one of 32 husko images, far more than the
    control and than the crop at 1x (bench/bench_patch_demo.py prints the same figures)."""
    from demo_world import groundtruth as gt
    from explainer.concepts import get_context
    from explainer.contrast import contrast_classes
    from explainer.faithfulness import patch_from_crop, patch_insertion, tile_patch

    ctx = get_context(demo_workspace, device="cpu")
    names = ctx.lm.class_names
    a, b = names.index("lupo"), names.index("husko")
    ex = contrast_classes(ctx, a, b, device="cpu")
    k = gt.find_concept(gt.explanation_truth(ex, input_size=ctx.lm.input_size), "bg_grass")
    assert k is not None
    ids = ctx.catalog.images_predicted_as(b)[:32]
    pix = ctx.catalog.image_pixels(ids, ctx.lm)
    crop = patch_from_crop(ctx.lm, ctx.catalog, ex.concepts[k].crops[0].crop_id)
    one = patch_insertion(ctx.lm, pix, crop, a, b, image_ids=ids)
    two = patch_insertion(ctx.lm, pix, tile_patch(crop, 2), a, b, image_ids=ids)
    d1 = one.prob_a_after - one.prob_a_before
    d2 = two.prob_a_after - two.prob_a_before
    c2 = two.prob_a_control - two.prob_a_before
    assert d2.mean() >= 0.08 and d2.mean() >= 5 * max(c2.mean(), 0.005)
    assert (d2 > 0).mean() >= 0.9
    assert d2.mean() > 3 * d1.mean()
    assert tuple(tile_patch(crop, 2).shape) == (3, 2 * crop.shape[1], 2 * crop.shape[2])
    assert np.isfinite(d1).all()


def test_stale_description_names_what_differs():
    from pages.ui.views import stale_description

    old = ("explain", "root", "v1", "demo", "layer4", 0, 4, "deeplift", 500, 0, 8)
    assert stale_description(old, old[:6] + (6,) + old[7:]) == "n=4"
    assert stale_description(old, old[:5] + (1, 6) + old[7:]) == "another class, n=4"
    new = old[:4] + ("layer3",) + old[5:9] + (2, 8)
    assert stale_description(old, new) == "layer=layer4, seed=0"
    co = ("contrast", "r", "v", "demo", "l", 0, 1, 4, "deeplift", 500, 0, 8)
    assert stale_description(co, co[:6] + (2,) + co[7:]) == "another class B"


def test_stitch_list_is_bounded_and_kept_per_workspace():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from pages.ui import bench_send

        for c in range(70):
            bench_send.add_to_stitch("w1", c)
        bench_send.add_to_stitch("w1", 69)  # once only
        bench_send.set_patch("w2", 5)
        st.write(repr(bench_send.bench_state("w1")["stitch"]))
        st.write(repr(bench_send.bench_state("w2")))

    at = AppTest.from_function(page, default_timeout=60).run()
    assert not at.exception, at.exception
    assert at.markdown[0].value == repr(list(range(6, 70)))
    assert at.markdown[1].value == repr({"stitch": [], "patch": 5})


def test_patch_size_default_is_1x_on_demo_seg(demo_seg_workspace, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXPLORER_HOME", str(demo_seg_workspace.root.parent))
    monkeypatch.delenv("CONCEPT_EXPLORER_LEAD_KEY", raising=False)
    at = _app(ws="demo-seg", a="lupo", b="husko")
    at.switch_page("pages/test_bench.py").run()
    at.text_input(key="tb_patch_crop_typed").input("4").run()
    assert not at.exception, at.exception
    assert at.radio(key="tb_tile").value == "1x"
    assert [c for im in at.image for c in im.captions if c.startswith("patch ")] == [
        "patch 32x32"]


def test_bench_click_on_preview_places_the_patch_and_keeps_it_inside(demo_ws):
    """The preview component's click (its value, as the browser sends it) sets the position
    fields; a later, larger patch is moved inside the image."""
    at = _app(ws="demo", a="lupo", b="husko")
    at.switch_page("pages/test_bench.py").run()
    at.text_input(key="tb_patch_crop_typed").input("4").run()
    at.session_state["tb_place"] = {"x": 285, "y": 150, "width": 288, "height": 288,
                                    "unix_time": 1}
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="tb_pos").value == "at x, y (click the preview)"
    # 64 px patch (32 px crop tiled) centred on (95, 50), moved inside the 96 px image
    assert (at.number_input(key="tb_px").value, at.number_input(key="tb_py").value) == (32, 18)
    assert "Box (32, 18, 96, 82)" in _captions(at)
    at.number_input(key="tb_px").set_value(90).run()
    assert "Moved to (32, 18)" in _captions(at)
    at.button(key="tb_run").click().run()
    assert not at.exception and not _errors(at), _errors(at)
    assert any(m.label.startswith("mean ΔP(lupo) patch") for m in at.metric)


def test_bench_box_drawn_on_the_image_fills_the_region_fields(demo_ws):
    at = _app(ws="demo", a="lupo", b="husko")
    at.switch_page("pages/test_bench.py").run()
    at.radio(key="tb_source").set_value("region of a catalog image").run()
    at.session_state["tb_region_draw"] = {"x1": 150, "y1": 120, "x2": 30, "y2": 30,
                                          "width": 288, "height": 288, "unix_time": 7}
    at.run()
    assert not at.exception, at.exception
    got = [at.number_input(key=k).value for k in ("tb_x0", "tb_y0", "tb_x1", "tb_y1")]
    assert got == [10, 10, 50, 40]
    assert "Region (10, 10, 50, 40)" in _captions(at)
    # the fields refine the drawn box (the same drag is not applied again)
    at.number_input(key="tb_x1").set_value(44).run()
    assert "Region (10, 10, 44, 40)" in _captions(at)
    assert [c for im in at.image for c in im.captions if c.startswith("patch ")] == [
        "patch 68x60"]


def test_create_form_crop_grid_follows_the_model(small):
    """The form's image size, crop size and stride follow the model spec (demo: 96 / 32 / 32),
    not the 224 px shown before a model was given; the crop grid follows an edited size."""
    at = _app(ws="small-b").run()
    assert at.number_input(key="new_image_size").value == 224
    at.text_input(key="new_spec").input("demo").run()
    assert not at.exception, at.exception
    assert [at.number_input(key=k).value for k in ("new_image_size", "new_crop_size",
                                                   "new_stride")] == [96, 32, 32]
    at.number_input(key="new_image_size").set_value(120).run()
    assert [at.number_input(key=k).value for k in ("new_crop_size", "new_stride")] == [40, 40]
    at.number_input(key="new_stride").set_value(20).run()
    assert at.number_input(key="new_stride").value == 20  # an edit stays
    assert not at.warning, [w.value for w in at.warning]
