"""A concept's atlas (explainer/atlas.py, issue 12 item 2) on the demo world: paged crops,
their breakdown, where else the concept occurs (against the world's ground-truth masks) and the
2-D map of a class's crops."""

from __future__ import annotations

import numpy as np
import pytest

from demo_world import groundtruth as gt
from demo_world import world
from explainer import atlas as A
from explorer_core.errors import ExplorerError

LUPO = world.CLASSES.index("lupo")


@pytest.fixture(scope="module")
def lupo(demo_workspace):
    """The default explanation of lupo (cached in the workspace) and the index of its grass
    concept (the concept whose crops, target class excluded, are mostly grass)."""
    from explainer.concepts import explain_class, get_context

    ctx = get_context(demo_workspace, "cpu")
    e = explain_class(ctx, LUPO, device="cpu", cache=True)
    grass = gt.find_concept(gt.explanation_truth(e, exclude_target=True), "bg_grass")
    assert grass is not None, "the demo model's lupo explanation lost its grass concept"
    return ctx, e, grass


def test_show_more_pages_are_distinct_ordered_and_respect_exclusion(lupo):
    ctx, e, grass = lupo
    con = e.concepts[grass]
    pages = [A.crops_page(ctx.search, con.vector, p, 8) for p in range(3)]
    assert [len(p) for p in pages] == [8, 8, 8]
    # page 0 is the explanation's own top-8
    assert [r.crop_id for r in pages[0]] == [r.crop_id for r in con.crops]
    ids = [r.crop_id for p in pages for r in p]
    assert len(set(ids)) == 24  # distinct across pages
    scores = [r.score for p in pages for r in p]
    assert all(a >= b - 1e-6 for a, b in zip(scores, scores[1:]))  # ordered by score
    # the same ranks as one page of 32
    big = A.crops_page(ctx.search, con.vector, 0, 32)
    assert [r.crop_id for r in big[:24]] == ids
    # exclusion: no crop of lupo, and page 0 is the explanation's excluded view
    ex = A.crops_page(ctx.search, con.vector, 0, 100, exclude_class=LUPO)
    assert len(ex) == 100
    assert all(r.crop_pred != LUPO and r.image_pred != LUPO for r in ex)
    assert [r.crop_id for r in ex[:8]] == [r.crop_id for r in con.crops_excluded]
    assert any(r.image_pred == LUPO for r in A.crops_page(ctx.search, con.vector, 1, 100))
    with pytest.raises(ExplorerError, match="one of 8, 32, 100"):
        A.crops_page(ctx.search, con.vector, 0, 7)
    with pytest.raises(ExplorerError, match="Only the 2000 nearest"):
        A.crops_page(ctx.search, con.vector, 20, 100)


def test_breakdown_counts_sum_to_the_crops_shown(lupo):
    ctx, e, grass = lupo
    names = ctx.lm.class_names
    refs = A.crops_page(ctx.search, e.concepts[grass].vector, 0, 100, exclude_class=LUPO)
    b = A.breakdown(refs, names)
    assert b.n == 100
    for pairs in (b.crop_pred, b.image_pred, b.label):
        assert sum(n for _, n in pairs) == 100
        assert [n for _, n in pairs] == sorted((n for _, n in pairs), reverse=True)
    assert "lupo" not in dict(b.crop_pred) and "lupo" not in dict(b.image_pred)  # excluded
    # the grass crops outside lupo come from several classes (the bias hunter's view)
    assert len(b.image_pred) >= 5
    assert {r["of"] for r in b.rows()} == {"crop predicted", "source image predicted",
                                          "true label"}
    assert sum(r["crops"] for r in b.rows()) == 300
    empty = A.breakdown([], names)
    assert empty.n == 0 and empty.image_pred == []


def test_where_else_finds_the_grass_concept_in_many_classes(lupo):
    ctx, e, grass = lupo
    cat = ctx.catalog
    names = ctx.lm.class_names
    w = A.where_else(cat, e.concepts[grass].vector, layer=e.layer, own_class=LUPO,
                     class_names=names)
    occurs = {o.name for o in w.occurs_in}
    # lupo itself, and most of the 8 other classes drawn on grass in ~20 % of their images
    # (husko never is: the world puts it on snow or any background but grass)
    assert "lupo" in occurs and len(occurs) >= 6, [(o.name, o.share) for o in w.classes]
    assert "husko" not in occurs
    assert w.classes[0].name == "lupo" and w.classes[0].share > 0.7
    assert sum(o.images for o in w.classes) == cat.n_images
    assert all(0 <= o.hits <= o.images for o in w.classes)
    # the best images outside lupo really show grass (ground-truth masks)
    grass_id = world.concept_id("bg_grass")
    assert len(w.top_images) == A.TOP_IMAGES
    shares = [float((gt.load_mask(cat.image_path(i)) == grass_id).mean())
              for i, _ in w.top_images]
    assert sum(s > 0.2 for s in shares) >= 0.9 * len(shares), shares
    assert all(a >= b for (_, a), (_, b) in zip(w.top_images, w.top_images[1:]))
    # another concept of lupo (its brown circle) occurs in far fewer classes
    others = [A.where_else(cat, c.vector, layer=e.layer, own_class=LUPO)
              for k, c in enumerate(e.concepts) if k != grass]
    assert max(len(o.occurs_in) for o in others) < len(occurs)
    # the same answer when streamed in tiny blocks (memory bound)
    small = A.where_else(cat, e.concepts[grass].vector, layer=e.layer, own_class=LUPO,
                         class_names=names, block_rows=1000)
    assert [(o.name, o.hits) for o in small.classes] == [(o.name, o.hits) for o in w.classes]
    with pytest.raises(ExplorerError, match="zero"):
        A.where_else(cat, np.zeros_like(e.concepts[grass].vector), layer=e.layer)
    with pytest.raises(ExplorerError, match="dimensions"):
        A.where_else(cat, np.ones(3), layer=e.layer)


def test_class_map_coordinates_and_colours(lupo):
    ctx, e, _ = lupo
    cm = A.class_map(ctx.catalog, e.image_ids, e.concept_vectors, layer=e.layer)
    n = 9 * len(set(e.image_ids))
    assert cm.xy.shape == (n, 2) and cm.concept.shape == (n,) and cm.score.shape == (n,)
    assert cm.total == n and not cm.sampled
    assert set(cm.concept.tolist()) <= set(range(e.n_concepts))
    assert len(set(cm.concept.tolist())) >= 2  # coloured by more than one concept
    assert 0 < cm.variance[1] <= cm.variance[0] and sum(cm.variance) <= 1 + 1e-9
    assert np.allclose(cm.xy.mean(axis=0), 0, atol=1e-4)  # centred
    assert set((cm.crop_ids // 9).tolist()) == set(e.image_ids)
    assert np.array_equal(cm.image_ids, cm.crop_ids // 9)
    small = A.class_map(ctx.catalog, e.image_ids, e.concept_vectors, layer=e.layer,
                        max_points=100)
    assert small.xy.shape == (100, 2) and small.sampled and small.total == n
    with pytest.raises(ExplorerError, match="do not match"):
        A.class_map(ctx.catalog, e.image_ids, np.ones((2, 5)), layer=e.layer)
