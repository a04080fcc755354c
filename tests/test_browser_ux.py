"""Point, don't type, in a real headless Chromium (issue 12): on the demo, one click under a
concept crop sends it to the Test bench's stitch list and another makes it the patch; the bench
shows and stitches it; a box drawn on a catalog image becomes the region (the numeric fields
follow); a click on the preview places the patch there.

Needs Debian's ``chromium`` (see tests/test_browser.py); screenshots go to
``artifacts/screenshots/``.
"""

from __future__ import annotations

import re

import pytest

from tests.test_browser import (  # skips this module too when chromium is absent (not in CI)
    KEY,
    T_LONG,
    _shot,
    _shot_on_failure,
    _wait_idle,
    browser_session,
)

IFRAME = "iframe[title='streamlit_image_coordinates.streamlit_image_coordinates']"


def _crop_ids(page) -> list[int]:
    return [int(t[1:]) for t in page.locator("[data-testid='stImageCaption']").filter(
        has_text=re.compile(r"^#\d+$")).all_inner_texts()]


def _field(page, label: str) -> int:
    return int(page.get_by_label(label, exact=True).input_value())


def _img_box(page, nth: int) -> dict:
    """Page coordinates of the picture inside the ``nth`` image component."""
    frame = page.frame_locator(IFRAME).nth(nth)
    img = frame.locator("img")
    img.wait_for(state="visible", timeout=120_000)
    box = img.bounding_box()
    assert box and box["width"] > 50, box
    return box


def _pointer(page, act, done_js: str, tries: int = 4) -> None:
    """``act(box, f)`` on the first image component (``box``: its picture in page pixels,
    ``f``: displayed pixels per image pixel of a 96 px image) until ``done_js`` holds: a click
    that lands while the component's frame is still being redrawn by a rerun is lost."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for k in range(tries):
        _wait_idle(page)
        box = _img_box(page, 0)
        act(box, box["width"] / 96)
        try:
            page.wait_for_function(done_js, timeout=15_000)
            _wait_idle(page)
            return
        except PlaywrightTimeout:
            if k == tries - 1:
                raise


@pytest.mark.timeout(1200)
def test_browser_send_draw_place(demo_workspace, tmp_path):
    from playwright.sync_api import expect

    with browser_session(demo_workspace.root.parent, tmp_path) as (server, page):
        with _shot_on_failure(page, "failure_ux.png"):
            page.goto(f"{server.url}/explain?ws=demo&a=lupo&b=husko&n=4&key={KEY}")
            expect(page.get_by_role("heading", name="Explain a class")).to_be_visible(
                timeout=T_LONG)
            _wait_idle(page, T_LONG)
            run = page.get_by_role("button", name="Explain", exact=True)
            if run.count():
                run.click()
            expect(page.locator("[data-testid='stImageCaption']").filter(
                has_text=re.compile(r"^#\d+$"))).to_have_count(32, timeout=T_LONG)
            _wait_idle(page)
            first = _crop_ids(page)[0]
            # ---- one click: into the stitch list; another: the patch ---------------------
            key = f".st-key-ex_send_0_{first}"  # the buttons under the first crop
            page.locator(f"{key}_stitch button").first.click()
            _wait_idle(page)
            expect(page.locator(f"{key}_stitch button").first).to_be_disabled()
            page.locator(f"{key}_patch button").first.click()
            _wait_idle(page)
            expect(page.locator(f"{key}_patch button").first).to_be_disabled()
            _shot(page, "ux_explain_send.png")
            # ---- another seed (never computed): the previous result stays, greyed --------
            seed = page.get_by_label("Seed", exact=True)
            seed.fill("9173")
            seed.press("Enter")
            expect(page.get_by_text("Showing the previous result for seed=0")).to_be_visible(
                timeout=60_000)
            _wait_idle(page)
            assert len(_crop_ids(page)) == 32
            opacity = page.evaluate(
                "() => getComputedStyle(document.querySelector("
                "\"[data-testid='stMain'] [data-testid='stImage'] img\")).opacity")
            assert float(opacity) < 0.5, opacity
            expect(page.get_by_role("button", name="Explain", exact=True)).to_be_visible()
            _shot(page, "ux_explain_stale.png")
            nav = page.locator("[data-testid='stSidebarNav']")
            nav.get_by_text("Test bench", exact=True).click()
            _wait_idle(page, T_LONG)
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            expect(page.get_by_text(re.compile(
                r"the stitched crops are classified as")).first).to_be_visible()
            assert f"#{first}" in page.locator(
                "[data-testid='stImageCaption']").all_inner_texts()
            _shot(page, "ux_bench_stitch.png")
            # ---- the patch arrived; place it by clicking the preview ---------------------
            page.get_by_role("tab", name="Patch insertion").click()
            _wait_idle(page)
            expect(page.get_by_text(re.compile(r"^patch 64x64$"))).to_be_visible()
            # the preview shows a 96 px image at 3x: click at image pixel (40, 30)
            _pointer(page, lambda box, f: page.mouse.click(box["x"] + 40 * f,
                                                           box["y"] + 30 * f),
                     "() => [...document.querySelectorAll('input')].some(i => "
                     "i.getAttribute('aria-label') === 'x (left)')")
            _wait_idle(page)
            expect(page.get_by_label("x (left)", exact=True)).to_be_visible()
            # the 64 px patch centred on (40, 30), moved inside the 96 px image
            assert (_field(page, "x (left)"), _field(page, "y (top)")) == (8, 0)
            expect(page.get_by_text("Box (8, 0, 72, 64)")).to_be_visible()
            _shot(page, "ux_bench_place.png")
            # ---- draw a region on a catalog image ----------------------------------------
            page.get_by_text("region of a catalog image", exact=True).click()
            _wait_idle(page)

            def drag(box, f):
                page.mouse.move(box["x"] + 50 * f, box["y"] + 40 * f)
                page.mouse.down()
                page.mouse.move(box["x"] + 30 * f, box["y"] + 30 * f, steps=4)
                page.mouse.move(box["x"] + 10 * f, box["y"] + 10 * f, steps=4)
                page.mouse.up()

            _pointer(page, drag, "() => [...document.querySelectorAll('input')].some(i => "
                                 "i.getAttribute('aria-label') === 'x1' && i.value !== '32')")
            got = [_field(page, k) for k in ("x0", "y0", "x1", "y1")]
            assert all(abs(g - e) <= 1 for g, e in zip(got, (10, 10, 50, 40))), got
            expect(page.get_by_text(re.compile(r"Region \(1[01], 1[01], (49|50|51), "
                                               r"(39|40|41)\)"))).to_be_visible()
            expect(page.get_by_text(re.compile(r"^patch 80x60$|^patch 8[0-2]x(5[8-9]|6[0-2])$"))
                   ).to_be_visible()
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            _shot(page, "ux_bench_region.png")


@pytest.mark.timeout(900)
def test_browser_cancel_a_build_and_resume(demo_workspace, tmp_path):
    """Workspace page: the estimate before the build, the bar under the button with images/s
    and ETA, Cancel mid-build (Streamlit stops the run at the next report), then Build / resume
    continues from the saved chunk to a complete catalog."""
    from conftest import copy_demo_images
    from playwright.sync_api import expect

    from data_index.workspace import Workspace
    from explorer_core.demo_cnn import DEMO_INPUT_SIZE, DEMO_LAYER

    home = tmp_path / "home"
    images = copy_demo_images(demo_workspace, tmp_path / "images", 120)  # 1200: 5 chunks
    Workspace.create(home / "big", model="demo", layer=DEMO_LAYER, images=str(images),
                     input_size=DEMO_INPUT_SIZE, device="cpu")
    with browser_session(home, tmp_path) as (server, page):
        with _shot_on_failure(page, "failure_ux_cancel.png"):
            page.goto(f"{server.url}/?ws=big&key={KEY}")
            expect(page.get_by_text("1200 image files to index")).to_be_visible(
                timeout=T_LONG)
            _wait_idle(page)
            page.get_by_role("button", name="Build / resume the catalog").click()
            bar = page.locator("[data-testid='stProgress']")
            # past the first saved chunk (256 images), with a rate and an ETA
            expect(bar).to_contain_text(re.compile(
                r"index: (2[6-9]\d|[3-9]\d\d|10\d\d)/1200 images, [\d.]+ images/s, ETA"),
                timeout=120_000)
            _shot(page, "ux_build_running.png")
            page.get_by_role("button", name="Cancel", exact=True).click()
            expect(page.get_by_text("Build cancelled")).to_be_visible(timeout=60_000)
            _wait_idle(page)
            expect(bar).to_have_count(0)
            expect(page.locator("[data-testid='stException']")).to_have_count(0)
            _shot(page, "ux_build_cancelled.png")
            page.get_by_role("button", name="Build / resume the catalog").click()
            expect(page.get_by_text(re.compile(
                r"Catalog complete: 1200 images, 10800 crops, 0 skipped \(\d+s, resumed "
                r"[1-4] chunks\)"))).to_be_visible(timeout=T_LONG)
            _wait_idle(page)
            expect(page.get_by_text("Build cancelled")).to_have_count(0)
            _shot(page, "ux_build_resumed.png")


@pytest.mark.timeout(900)
def test_browser_form_build_shows_its_bar_under_the_create_button(demo_workspace, tmp_path):
    """Create a workspace from the form: the build's bar (rate, ETA, Cancel) appears under the
    button the user pressed, not at the top of the page; afterwards only the result shows."""
    from conftest import copy_demo_images
    from playwright.sync_api import expect

    home = tmp_path / "home"
    images = copy_demo_images(demo_workspace, tmp_path / "images", 120)
    # the page opens on another (complete) workspace of the home
    demo_link = home / "demo"
    home.mkdir()
    with browser_session(home, tmp_path) as (server, page):
        with _shot_on_failure(page, "failure_ux_form.png"):
            page.goto(f"{server.url}/?key={KEY}")
            expect(page.get_by_text("Images", exact=True).first).to_be_visible(
                timeout=T_LONG)  # first start: the demo is built in this home
            _wait_idle(page, T_LONG)
            assert demo_link.is_dir()
            page.get_by_text("Create a workspace").click()
            page.get_by_label("Name", exact=True).fill("photos")
            page.get_by_label("Name", exact=True).press("Enter")
            page.get_by_label("Model spec", exact=True).fill("demo")
            page.get_by_label("Model spec", exact=True).press("Enter")
            _wait_idle(page)
            page.get_by_label("Image folder", exact=True).fill(str(images))
            page.get_by_label("Image folder", exact=True).press("Enter")
            _wait_idle(page)
            create = page.get_by_role("button", name="Create workspace and build its catalog")
            create.click()
            bar = page.locator("[data-testid='stProgress']")
            expect(bar).to_contain_text(re.compile(r"images/s, ETA"), timeout=120_000)
            # where the user is looking: right under the button, inside the open form
            ys = page.evaluate(
                "() => { const b = [...document.querySelectorAll('button')].find(e => "
                "e.innerText.includes('Create workspace and build')); const p = "
                "document.querySelector(\"[data-testid='stProgress']\"); return [b ? "
                "b.getBoundingClientRect().bottom : null, p.getBoundingClientRect().top, "
                "document.querySelector(\"[data-testid='stExpander']\")"
                ".getBoundingClientRect().bottom]; }")
            assert ys[0] is not None and ys[0] <= ys[1] <= ys[2], ys
            _shot(page, "ux_form_build.png")
            expect(page.get_by_text(re.compile(
                r"Catalog complete: 1200 images, 10800 crops"))).to_be_visible(
                timeout=T_LONG)
            _wait_idle(page)
            expect(bar).to_have_count(0)
            expect(page.get_by_text("Resuming")).to_have_count(0)
            expect(page.get_by_text("no catalog")).to_have_count(0)
            assert "ws=photos" in page.url
