"""The unit x unit interaction heatmap (views/heatmap_view.py): tick labels that tell the units
apart, the full names on hover, the selected row outlined (its values kept), the colour bar's
title and orientation, and the cells that Shapley did not compute. Kernel-free: the matrices
are given to the view as an engine job would (``HeatmapView._show``)."""
import pathlib

import ipywidgets as W
import numpy as np
import pytest

from multiviz_widgets.adapter import Class
from multiviz_widgets.results import Interaction
from multiviz_widgets.views.heatmap_view import (COLOURS, NOT_COMPUTED, TICK_CHARS, common_prefix,
                                                 num_ticks, shorten, tick_labels)



def hover(mark, **data):
    mark._handle_custom_msg({"event": "hover", "data": data}, [])


def show(hv, matrix, rows, cols, method="second_order", **params):
    inter = Interaction(method=method, target=Class(0), modalities=("question", "image"),
                        matrix=np.asarray(matrix, dtype=float), row_labels=rows,
                        col_labels=cols, params=params)
    hv._show((0, Class(0), inter, "class 0"))
    return inter


PATCHES = [f"patch r{r}c{c}" for r in range(8) for c in range(8)]
WORDS = ["what", "is", "the", "red", "shape"]


# -- (a) tick labels ----------------------------------------------------------------------------
def test_long_unit_names_keep_the_part_that_tells_them_apart():
    series = [f"{ch} t{8 * w}-{8 * w + 7}" for w in range(4) for ch in ("ecg", "respiration",
                                                                         "spo2")]
    ticks = tick_labels(series, len(series))
    assert all(len(t) <= TICK_CHARS for t in ticks) and len(set(ticks)) == len(ticks)
    assert ticks[:3] == ["ecg t0-7", "respirat\u2026 t0-7", "spo2 t0-7"]
    assert shorten("respiration t16-23") == "respir\u2026 t16-23"      # the window survives
    assert ticks[7] == "respir\u2026 t16-23" and "(2)" not in "".join(ticks)
    # a common prefix is left out: 64 patches read r0c0 .. r7c7, all different
    assert common_prefix(PATCHES) == "patch "
    ticks = tick_labels(PATCHES, 64)
    assert ticks[:3] == ["r0c0", "r0c1", "r0c2"] and ticks[-1] == "r7c7"
    assert len(set(ticks)) == 64
    # no prefix to drop: words, or one label only, or a label that is all prefix
    assert common_prefix(WORDS) == "" and common_prefix(["patch r0c0"]) == ""
    assert common_prefix(["ecg", "ecg t0-7"]) == ""
    assert tick_labels(["what", "what", "x"], 4) == ["what", "what (2)", "x", ""]


def test_tick_labels_stay_distinct_when_a_unit_is_named_like_a_renamed_duplicate():
    """A second "a" became "a (2)" even when a unit was named "a (2)": two equal labels, one
    tick of the ordinal scale for two rows. The suffix grows until the name is new."""
    assert tick_labels(["a", "a", "a (2)"], 3) == ["a", "a (3)", "a (2)"]
    assert tick_labels(["x", "a (2)", "a", "a"], 4) == ["x", "a (2)", "a", "a (3)"]
    assert tick_labels(["a", "a", "a", "a (3)", "a (2)"], 6) == \
        ["a", "a (4)", "a (5)", "a (3)", "a (2)", ""]
    for labels in (["a"] * 5 + ["a (2)", "a (3)"], ["b (2)", "b", "b", "b (2)"], ["", "", " "]):
        ticks = tick_labels(labels, len(labels) + 1)
        assert len(set(ticks)) == len(ticks), ticks


def test_dense_axes_label_every_kth_unit_and_the_columns_hang_below_the_axis(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    show(hv, np.ones((5, 64)), WORDS, PATCHES)
    assert list(hv.grid.column[:2]) == ["r0c0", "r0c1"] and list(hv.grid.row) == WORDS
    assert hv.col_axis.num_ticks == 17           # every 4th patch: r0c0, r0c4, r1c0, ..., r7c4
    assert hv.row_axis.num_ticks is None         # 5 words: all labelled
    assert num_ticks(12, 16) is None and num_ticks(64, 16) == 17 and num_ticks(64, 10) == 9
    assert num_ticks(30, 20) == 16 and num_ticks(31, 20) == 16
    # rotated labels end at their tick: they hang below the axis, not over the cells
    assert hv.col_axis.tick_style["text-anchor"] == "end"
    assert "rotate(-45deg)" in hv.col_axis.tick_style["transform"]


def test_hovering_a_cell_names_its_two_units_in_full_and_its_value(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    long = ["respiration t16-23", "respiration t24-31"]
    m = np.array([[0.5, -1.25], [2.0, 0.0]])
    inter = Interaction(method="second_order", target=Class(0), modalities=("question", "image"),
                        matrix=m, row_labels=["what", "<b>is</b>"], col_labels=long)
    hv._show((0, Class(0), inter, "class 0"))
    assert hv.grid.tooltip is hv.tip and hv.grid.interactions.get("hover") == "tooltip"
    hover(hv.grid, rowNum=0, columnNum=1, row="what", column="respir\u2026 t24-31", color=-1.25)
    assert hv.tip.value == "question 'what' x image 'respiration t24-31': -1.25"
    hover(hv.grid, rowNum=1, columnNum=0)
    # the text as it is, never read as markup (the browser sets it as textContent)
    assert "respiration t16-23" in hv.tip.value and "<b>is</b>" in hv.tip.value
    assert hv.cell_text(5, 0) == "" and hv.cell_text(0, 1).endswith("-1.25")
    # quoted as written (repr doubled a backslash), a control character escaped
    show(hv, m, ["\\frac", "a\tb"], ["C:\\data", "x"])
    assert hv.cell_text(0, 0) == "question '\\frac' x image 'C:\\data': 0.5"
    assert hv.cell_text(1, 1) == "question 'a\\tb' x image 'x': 0"
    neg_zero = m.copy()
    neg_zero[1, 1] = -0.0                                   # shown as 0, not "-0"
    show(hv, neg_zero, ["\\frac", "a\tb"], ["C:\\data", "x"])
    assert hv.cell_text(1, 1).endswith(": 0")


def test_the_tooltip_says_which_cell_its_text_is_for_and_the_browser_checks_it(vqa):
    """bqplot shows the tooltip before the kernel has the hover: the text comes with the cell
    it is for, the browser shows it only over that cell (an ellipsis meanwhile), and a new
    matrix clears it (no text of the previous one over the new cells)."""
    from multiviz_widgets.views.heatmap_view import CellTip
    root = pathlib.Path(__file__).resolve().parent.parent
    source = (root / "js" / "cell_tip.js").read_text(encoding="utf-8")
    bundle = (root / "multiviz_widgets" / "static" / "cell_tip.js").read_text(encoding="utf-8")
    ex, _ = vqa
    hv = ex.heatmap_view
    m = np.array([[0.5, -1.25], [2.0, 0.0]])
    show(hv, m, ["what", "is"], ["patch r0c0", "patch r0c1"])
    assert isinstance(hv.tip, CellTip) and hv.grid.tooltip is hv.tip
    assert hv.tip.tip == {} and hv.tip.value == ""
    hover(hv.grid, rowNum=1, columnNum=0)
    assert hv.tip.tip == {"row": 1, "col": 0,
                          "text": "question 'is' x image 'patch r0c0': 2"}
    hover(hv.grid, rowNum=0, columnNum=1)                 # the text and its cell, together
    assert (hv.tip.tip["row"], hv.tip.tip["col"]) == (0, 1) and hv.tip.value.endswith("-1.25")
    # a new matrix drawn under a resting pointer (no new hover comes): the hovered cell's new
    # text, never the old one
    show(hv, -m, ["what", "is"], ["patch r0c0", "patch r0c1"])
    assert hv.tip.tip == {"row": 0, "col": 1, "text": "question 'what' x image 'patch r0c1': 1.25"}
    show(hv, np.ones((1, 1)), ["what"], ["patch r0c0"])          # that cell is gone: no text
    assert hv.tip.tip == {} and hv.tip.value == ""
    # the browser's side: the hovered cell from bqplot's datum, before bqplot shows the tip;
    # the kernel's text only over its own cell; text, never markup
    assert "rowNum" in source and "columnNum" in source and "textContent" in source
    assert 'addEventListener("mouseover", over, true)' in source
    for js in (source, bundle):
        assert not any(w in js for w in ("innerHTML", "outerHTML", "insertAdjacentHTML"))
    assert "rowNum" in bundle and "mvz-cell-tip" in bundle
    assert "mathjax_ignore" in hv.tip._dom_classes


# -- (b) the selected row: outlined, its values kept -----------------------------------------
def test_the_selected_row_is_outlined_without_hiding_its_values(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    show(hv, np.arange(5 * 64, dtype=float).reshape(5, 64), WORDS, PATCHES)
    ex.selection.select(unit=("question", 1))
    st = hv.state()
    assert st["selected_row"] == 1
    # no border on the row's cells (a border on each of 64 cells was a black barcode) and no
    # dimming of the others: grid.selected holds only the cells not computed (none here)
    assert hv.grid.selected is None and hv.grid.unselected_style == {}
    assert "stroke" not in hv.grid.selected_style
    # one rectangle around the row: 64 cells wide, one cell high, row 1 of 5 from the top
    assert hv.outline.visible and st["outline"] == {"x": [0, 64, 64, 0, 0],
                                                     "y": [4, 4, 3, 3, 4]}
    assert (hv.outline_x.min, hv.outline_x.max, hv.outline_y.min, hv.outline_y.max) == (
        0, 64, 0, 5)
    # on scales that meet the grid's: no padding on the figure or these scales
    assert hv.figure.padding_x == hv.figure.padding_y == 0
    assert not hv.outline_x.allow_padding and not hv.outline_y.allow_padding
    ex.selection.select(unit=("image", 10))                            # a column: all 5 rows
    assert hv.state()["outline"] == {"x": [10, 11, 11, 10, 10], "y": [5, 5, 0, 0, 5]}
    ex.select(unit=None)
    assert not hv.outline.visible and hv.state()["outline"] is None


def test_a_one_row_matrix_outlines_its_row_not_the_padding(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    show(hv, np.arange(4.0).reshape(1, 4), ["what"], ["p0", "p1", "p2", "p3"])
    assert np.asarray(hv.grid.color).shape == (2, 4)
    assert np.isfinite(np.asarray(hv.grid.color)).all()      # padding: 0 (white), not grey
    ex.select(unit=("image", 2))
    assert hv.state()["outline"] == {"x": [2, 3, 3, 2, 2], "y": [2, 2, 1, 1, 2]}


# -- (c) the colour bar --------------------------------------------------------------------
def test_the_colour_bar_has_a_title_positive_on_top_and_room_for_its_ticks(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    show(hv, [[-0.868, 1.74], [0.2, 0.0]], ["what", "is"], ["p0", "p1"],
         method="pairwise_ablation")
    assert hv.color_axis.label == "interaction"
    cs = hv.color_scale
    # not reversed (bqplot's reverse turns the bar's axis upside down): blue low, red high
    assert not cs.reverse and cs.colors == COLOURS and cs.mid == 0
    assert COLOURS[0].startswith("#05") and COLOURS[-1].startswith("#67")
    assert COLOURS[len(COLOURS) // 2] == "#ffffff"
    assert (cs.min, cs.max) == (-1.74, 1.74)
    # the ticks right of the bar fit the right margin ("-0.868", "-1.74e+3")
    assert hv.figure.fig_margin["right"] >= 130
    # the words: red = the units reinforce each other, blue = they counteract
    legend = hv.state()["legend"]
    assert "Red: they reinforce each other" in legend and "blue: they counteract" in legend
    assert "more than the sum of their separate effects" in legend
    assert "class 'red'" in legend and "Grey" not in legend
    # second-order gradients: a local curvature, whose sign can differ from the ablations'
    show(hv, [[-0.868, 1.74], [0.2, 0.0]], ["what", "is"], ["p0", "p1"])
    legend = hv.state()["legend"]
    assert legend.startswith("Colour: the second-order gradient of the row's unit")
    assert "increasing the two units together raises the explained output (class 'red')" in legend
    assert "its sign can differ from pairwise ablation's and Shapley's" in legend
    assert "reinforce" not in legend


# -- (d) Shapley: the units that are not players ----------------------------------------------
def test_cells_of_units_that_are_not_shapley_players_are_grey_and_the_note_says_so(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    rng = np.random.default_rng(0)
    players = {"image": [3, 9, 27, 40], "question": [0, 4]}    # counts read, not assumed
    m = np.zeros((5, 64))
    m[np.ix_(players["question"], players["image"])] = rng.normal(size=(2, 4))
    show(hv, m, WORDS, PATCHES, method="shapley", max_players=6, players=players)
    st = hv.state()
    computed = np.asarray(st["computed"])
    assert computed.sum() == 8 and computed[0, 3] and not computed[1, 3]
    # grey: bqplot fills the grid's "selected" cells with selected_style (a NaN cell would be
    # black: bqplot sends it as NaN, not null, so null_color is never used)
    shown = np.asarray(hv.grid.color)
    assert np.isfinite(shown).all() and shown[0, 3] == m[0, 3]
    assert hv.grid.selected_style == {"fill": NOT_COMPUTED}
    assert sorted(map(tuple, np.asarray(hv.grid.selected).tolist())) == sorted(
        map(tuple, np.argwhere(~computed).tolist()))
    assert st["matrix"] == m.tolist()                    # the data itself is unchanged
    assert st["note"] == (
        "Shapley interactions are computed only between the players: the 2 of the 5 question "
        "words of largest occlusion effect and the 4 of the 64 image patches of largest "
        "occlusion effect (at most 6 players). The grey cells, of the other units, are not "
        "computed (0 in the matrix). A unit's occlusion effect: how much the output changes "
        "when that unit alone is removed.")
    assert hv.note.layout.display is None and "Grey: not computed" in st["legend"]
    hover(hv.grid, rowNum=1, columnNum=3)
    assert "not computed" in hv.tip.value
    hover(hv.grid, rowNum=0, columnNum=3)
    assert hv.tip.value.endswith(f"{m[0, 3]:.3g}")
    # the players of one side only: all units of the other; no max_players given
    show(hv, m, WORDS, PATCHES, method="shapley", players=dict(players, question=range(5)))
    assert hv.state()["note"].startswith("Shapley interactions are computed only between the "
                                         "players: all 5 question words and the 4 of the 64 "
                                         "image patches of largest occlusion effect. The grey")
    assert np.asarray(hv.state()["computed"]).sum() == 5 * 4
    # every unit a player: no note, no grey
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", max_players=24,
         players={"question": list(range(5)), "image": list(range(4))})
    assert hv.state()["note"] == "" and hv.state()["computed"] is None
    assert hv.note.layout.display == "none" and hv.grid.selected is None
    # other methods carry no players
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4])
    assert hv.state()["note"] == "" and hv.state()["computed"] is None


def test_a_second_order_matrix_the_kernel_calls_blind_says_so_first(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    blind = "Second-order gradients cannot see this model's interactions here: ..."
    show(hv, np.zeros((5, 4)), WORDS, PATCHES[:4], note=blind)
    assert hv.state()["note"] == blind and hv.note.layout.display is None
    show(hv, np.zeros((5, 4)), WORDS, PATCHES[:4])
    assert hv.state()["note"] == ""


def test_the_note_says_whether_shapley_values_are_exact_or_sampled_and_how_noisy(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    every = {"question": list(range(5)), "image": list(range(4))}
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=every,
         approximator="ExactComputer", exact=True, budget=4096)
    assert hv.state()["note"] == ("Exact: all 512 coalitions of the 9 players (a coalition: a "
                                  "set of players kept, the others removed).")
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=every,
         approximator="PermutationSamplingSII", exact=False, budget=4096, coalitions=3994,
         relative_noise=np.float32(0.4679))
    note = hv.state()["note"]
    assert note.startswith("Estimated from 3,994 sampled coalitions (PermutationSamplingSII); "
                           "its error, estimated from two independent halves of the sample, is "
                           "about 47% of the matrix's size: trust its strongest cells")
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=every,
         approximator="PermutationSamplingSII", exact=False, budget=4096, relative_noise=0.79)
    assert hv.state()["note"].endswith("about 79% of the matrix's size: read it as mostly noise, "
                                       "and raise the budget or lower max_players.")
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=every,
         approximator="PermutationSamplingSII", exact=False, budget=np.int64(4096),
         relative_noise=float("inf"))
    assert hv.state()["note"].startswith("Estimated from 4,096 sampled coalitions")
    assert "cancel out: the estimate is noise" in hv.state()["note"]
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=every,
         approximator="KernelSHAPIQ", exact=False, budget=30, relative_noise=None,
         underdetermined=True)
    note = hv.state()["note"]
    assert "its noise is not measured" in note and note.endswith(
        "the estimate is unreliable (Explorer(..., method_params={'shapley': {'budget': ...}}) "
        "raises it).")
    for odd in (True, "0.3", float("nan")):                  # not a measured noise
        show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=every,
             approximator="PermutationSamplingSII", relative_noise=odd)
        assert "its noise is not measured" in hv.state()["note"]
    # the exact computer without an "exact" key; players that are not lists are not counted
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", approximator="ExactComputer",
         players={"question": "all", "image": [0, 1]})
    assert hv.state()["note"] == ("Exact: every coalition of the players (a coalition: a set "
                                  "of players kept, the others removed).")


def test_the_note_of_a_real_shapley_matrix_names_its_players_and_says_exact(vqa):
    from multiviz_widgets.kernels.interactions import interaction
    ex, _ = vqa
    hv, adapter = ex.heatmap_view, ex.analyses.adapter
    inst = adapter.prepare(ex.analyses.dataset[0])
    pair = hv.wanted_pair()
    inter = interaction(adapter, inst, "shapley", modalities=pair, budget=64)
    hv._show((0, Class(0), inter, "class 0"))
    note = hv.state()["note"]
    assert note.startswith("Shapley interactions are computed only between the players:")
    assert "(at most 6 players)" in note and note.endswith(
        "Exact: all 64 coalitions of the 6 players (a coalition: a set of players kept, the "
        "others removed).")
    sampled = interaction(adapter, inst, "shapley", modalities=pair, budget=400, max_players=None)
    hv._show((0, Class(0), sampled, "class 0"))
    note = hv.state()["note"]
    assert f"Estimated from {sampled.params['coalitions']:,} sampled coalitions" in note
    assert f"about {sampled.params['relative_noise']:.0%} of the matrix's size" in note


@pytest.mark.parametrize("players", [{"question": [0, 1]},              # a side missing
                                     {"question": [0], "image": [99]},  # out of range
                                     {"question": "all", "image": [0]},
                                     "not a dict"])
def test_players_that_do_not_fit_the_matrix_are_ignored(vqa, players):
    ex, _ = vqa
    hv = ex.heatmap_view
    show(hv, np.ones((5, 4)), WORDS, PATCHES[:4], method="shapley", players=players)
    assert hv.state()["computed"] is None and hv.state()["note"] == ""


def test_a_non_finite_cell_is_grey_not_black_or_white(vqa):
    ex, _ = vqa
    hv = ex.heatmap_view
    show(hv, [[np.nan, 1.0], [0.5, -2.0]], ["what", "is"], ["p0", "p1"])
    assert np.isfinite(np.asarray(hv.grid.color)).all()
    assert np.asarray(hv.grid.selected).tolist() == [[0, 0]]
    assert (hv.color_scale.min, hv.color_scale.max) == (-2.0, 2.0)
    assert hv.cell_text(0, 0).endswith(": nan") and hv.state()["note"] == ""


def test_wrapped_text_is_text_in_lines_that_fit_and_hides_when_empty():
    from multiviz_widgets.views._common import WrappedText
    w = WrappedText("<b>bold</b> " + "word " * 40, width=30)
    assert all(isinstance(c, W.Label) and len(c.value) <= 30 for c in w.children)
    assert " ".join(c.value for c in w.children) == w.value.strip()
    assert w.children[0].value.startswith("<b>bold</b>")         # as text, never markup
    first = w.children[0]
    w.value = "y " * 15 + "word " * 37                             # as many lines: labels kept
    assert len(w.children) == 8 and w.children[0] is first and w.layout.display is None
    assert w.children[0].value.startswith("y y")
    w.value = ""
    assert w.children == () and w.layout.display == "none"


def test_a_hover_waits_for_a_matrix_being_drawn(vqa):
    """The tooltip reads the matrix, labels and computed cells together, under the engine's
    lock, which the worker holds while it draws: never half of one matrix and half of the
    next (an IndexError in a stress test before)."""
    import threading
    ex, _ = vqa
    hv = ex.heatmap_view
    assert ex.wait(30)
    with hv.engine.lock:                       # a matrix being drawn
        t = threading.Thread(target=lambda: hover(hv.grid, rowNum=0, columnNum=0))
        t.start()
        t.join(0.3)
        assert t.is_alive()
    t.join(10)
    assert not t.is_alive() and hv.tip.value.startswith(f"{hv.pair[0]} ")


# -- a matrix too large to draw whole ------------------------------------------------------------
def test_a_large_matrix_draws_each_sides_strongest_units_and_clicks_select_the_right_one(vqa):
    """2,000 x 128 units were 256,000 SVG cells: the page froze for a minute at every matrix.
    A side of more than MOST_SHOWN units draws its units of strongest interaction, in order;
    hover names them, a click selects the unit drawn (not the row's position), the selected
    unit is outlined where it is drawn and kept among those drawn, and the note says so."""
    from multiviz_widgets.views.heatmap_view import MOST_SHOWN
    ex, _ = vqa
    hv = ex.heatmap_view
    rng = np.random.default_rng(0)
    m = rng.normal(scale=0.01, size=(300, 100))
    strong_r, strong_c = [7, 150, 299], [3, 60]
    m[np.ix_(strong_r, strong_c)] = [[5.0, -6.0], [4.0, 3.0], [-7.0, 2.0]]
    rows = [f"w{k}" for k in range(300)]
    cols = [f"patch p{k}" for k in range(100)]
    show(hv, m, rows, cols)
    st = hv.state()
    assert np.shape(st["matrix"]) == (MOST_SHOWN, MOST_SHOWN) == np.asarray(hv.grid.color).shape
    assert len(st["row_units"]) == len(st["col_units"]) == MOST_SHOWN
    assert st["row_units"] == sorted(st["row_units"]) and set(strong_r) <= set(st["row_units"])
    assert set(strong_c) <= set(st["col_units"])
    # the strongest rows are those of largest |value|: every other row drawn is weaker
    left_out = sorted(set(range(300)) - set(st["row_units"]))
    assert np.abs(m[left_out]).max() <= min(np.abs(m[u]).max() for u in st["row_units"])
    r = st["row_units"].index(150)
    c = st["col_units"].index(60)
    assert st["rows"][r] == "w150" and st["matrix"][r][c] == 3.0
    assert hv.cell_text(r, c) == "question 'w150' x image 'patch p60': 3"
    assert "the 64 of the 300 question words and the 64 of the 100 image patches with the " \
           "strongest interactions" in st["note"]
    hv.click(r)
    assert ex.selection.unit_ref == ("question", 150)
    assert hv.state()["selected_row"] == r
    ex.select(unit=("question", left_out[0]))        # not drawn: nothing outlined
    assert hv.state()["selected_row"] == -1 and not hv.outline.visible
    show(hv, m, rows, cols)                           # drawn again: the selected unit kept
    st = hv.state()
    assert left_out[0] in st["row_units"] and st["selected_row"] >= 0
    show(hv, m[:5, :64], rows[:5], cols[:64])         # small enough: drawn whole, no note
    st = hv.state()
    assert st["row_units"] is None and st["col_units"] is None and "Drawn:" not in st["note"]


def test_a_click_on_the_previous_matrixs_row_selects_nothing(vqa):
    """A click on row r arriving just after a new matrix of the same instance and pair (another
    target) was drawn mapped to the new matrix's row r: another unit, when a side is cut to its
    strongest units. bqplot sends the row's tick with the click; a tick that is not the row's
    now is a click on the previous matrix, and selects nothing. The same click on the matrix
    it was made on selects the unit drawn there."""
    ex, _ = vqa
    hv = ex.heatmap_view
    rows = [f"w{k}" for k in range(300)]
    cols = [f"p{k}" for k in range(80)]
    first = np.zeros((300, 80))
    first[:64] = 1.0                                          # rows 0-63 drawn
    second = np.zeros((300, 80))
    second[200:264] = 1.0                                     # rows 200-263 drawn
    show(hv, first, rows, cols)
    tick = str(hv.grid.row[5])
    assert tick == "w5" and hv.row_units[5] == 5
    show(hv, second, rows, cols)
    assert str(hv.grid.row[5]) == "w205"
    ex.select(unit=("question", 0))
    hv.grid._handle_custom_msg({"event": "element_click",      # drawn before: nothing
                                "data": {"rowNum": 5, "columnNum": 0, "row": tick}}, [])
    assert ex.selection.unit_ref == ("question", 0)
    hv.grid._handle_custom_msg({"event": "element_click",      # the row drawn now
                                "data": {"rowNum": 5, "columnNum": 0, "row": "w205"}}, [])
    assert ex.selection.unit_ref == ("question", 205)
    # words that read the same ("the" at row 5 of both): the cell's value tells them apart
    same = ["the"] * 300
    show(hv, first, same, cols)
    tick = str(hv.grid.row[5])
    show(hv, 2.0 * second, same, cols)
    assert str(hv.grid.row[5]) == tick
    ex.select(unit=("question", 0))
    hv.grid._handle_custom_msg({"event": "element_click", "data": {
        "rowNum": 5, "columnNum": 0, "row": tick, "color": 1.0}}, [])      # drawn before
    assert ex.selection.unit_ref == ("question", 0)
    hv.grid._handle_custom_msg({"event": "element_click", "data": {
        "rowNum": 5, "columnNum": 0, "row": tick, "color": 2.0}}, [])      # drawn now
    assert ex.selection.unit_ref == ("question", 205)


def test_cells_pairwise_ablation_did_not_compute_are_grey_too(vqa):
    """units= left cells out: they were drawn white (a measured "no interaction"); now grey,
    with a note of the units computed, and their tooltip says not computed."""
    ex, _ = vqa
    hv = ex.heatmap_view
    m = np.zeros((5, 4))
    m[np.ix_([1, 3], [0, 2])] = [[1.0, -2.0], [0.5, 0.0]]
    show(hv, m, WORDS, PATCHES[:4], method="pairwise_ablation",
         units={"question": [1, 3], "image": [0, 2]})
    st = hv.state()
    assert st["computed"][1][0] and st["computed"][3][2] and not st["computed"][0][0]
    assert "Pairwise ablation is computed only between the 2 of the 5 question words chosen " \
           "(units=) and the 2 of the 4 image patches chosen (units=). The grey cells" in st["note"]
    assert hv.cell_text(0, 1).endswith("not computed (not both among the units computed)")
    assert hv.cell_text(3, 2).endswith(": 0")                # computed: a measured 0


def test_a_large_matrix_of_few_computed_units_draws_those_units_only(vqa):
    """units= computed 24 of 300 rows: the cut to 64 drew 40 rows that were all grey."""
    ex, _ = vqa
    hv = ex.heatmap_view
    rows = list(range(0, 240, 10))                        # 24 rows computed
    m = np.zeros((300, 100))
    m[np.ix_(rows, range(100))] = np.random.default_rng(1).normal(size=(24, 100))
    show(hv, m, [f"w{k}" for k in range(300)], [f"p{k}" for k in range(100)],
         method="pairwise_ablation", units={"question": rows, "image": list(range(100))})
    st = hv.state()
    assert st["row_units"] == rows and len(st["col_units"]) == 64
    assert all(any(r) for r in st["computed"])
    assert ("the 24 of the 300 question words with cells computed, and the 64 of the 100 "
            "image patches with the strongest interactions (the largest |value| in their "
            "column") in st["note"]


def test_a_selected_unit_with_no_cell_computed_is_drawn_beside_the_players(vqa):
    """6 Shapley players of 300 words: the selected word, no player, took the place of a
    player (its cells all grey, a computed row gone), and the note called the 6 drawn the
    strongest of a matrix too large to draw. It is now drawn beside them, and said."""
    ex, _ = vqa
    hv = ex.heatmap_view
    players = [3, 40, 41, 100, 250, 299]
    m = np.zeros((300, 10))
    m[players[:3]] = np.random.default_rng(2).normal(size=(3, 10))
    # 3 players of no interaction at all (exactly 0, as padding words): still drawn, before
    # the units with no cell computed that their 0 tied with
    args = ([f"w{k}" for k in range(300)], [f"p{k}" for k in range(10)])
    ex.select(unit=("question", 2))             # (the instance's own words are 0..4)
    show(hv, m, *args, method="shapley",
         players={"question": players, "image": list(range(10))})
    st = hv.state()
    assert st["row_units"] == sorted(players + [2]) and st["selected_row"] == 0
    assert ("Drawn: the 6 of the 300 question words with cells computed and the unit "
            "selected; the others have no cell computed.") in st["note"], st["note"]
    assert "minutes" not in st["note"]
    # a matrix too large to draw: the selected unit in place of the weakest, counted apart
    big = np.random.default_rng(3).normal(size=(300, 100))
    show(hv, big, [f"w{k}" for k in range(300)], [f"p{k}" for k in range(100)])
    ex.select(unit=("question", int(np.argmin(np.abs(big).max(1)[:5]))))
    show(hv, big, [f"w{k}" for k in range(300)], [f"p{k}" for k in range(100)])
    st = hv.state()
    assert len(st["row_units"]) == 64
    assert "Drawn: the 63 of the 300 question words and the 64 of the 100 image patches with " \
           "the strongest interactions and the unit selected" in st["note"], st["note"]
