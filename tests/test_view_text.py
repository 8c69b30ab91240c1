"""Data in the views' sentences (views/_common.py ``quoted`` and ``embed``): a class name or a
token is quoted as it is written (a backslash once showed doubled, as repr writes it, while the
input chip showed one), and data joined with the app's words cannot reorder them (a
RIGHT-TO-LEFT OVERRIDE in a description once reversed the gallery tooltip's "(h = ...)").
Kernel-free: FakeKernels (tests/explorer_support.py)."""
import re

import numpy as np
import pytest

from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Text
from multiviz_widgets.explorer import Explorer
from multiviz_widgets.display_text import FSI, PDI, embed, quoted
from multiviz_widgets.views.neuron_view import contribution_title

from .explorer_support import VOCAB, FakeKernels, TinyVQA

RLO = "\u202e"
HEBREW = "\u05e9\u05dc\u05d5\u05dd"
TOKEN = "\\frac"                             # one backslash, as in LaTeX
RTL_TOKEN = f"abc{RLO}def"
CLASSES = ["C:\\data", "tab\there", HEBREW, "it's"]


def outside_isolates(text: str) -> str:
    """``text`` without its isolates: the app's own words, in the order they are drawn."""
    return re.sub(f"{FSI}[^{PDI}]*{PDI}", "", text)


def test_quoted_shows_data_as_written_escaping_only_what_a_line_cannot_show():
    assert quoted("C:\\data") == "'C:\\data'" and quoted(TOKEN) == "'\\frac'"
    assert quoted("it's") == "'it's'" and quoted("<b>x</b>") == "'<b>x</b>'"
    assert quoted("") == "''" and quoted(None) == "''" and quoted(3) == "'3'"
    # a newline, a tab or another control character would break the line or show as nothing
    assert quoted("a\nb\tc\x1bd\u2028") == "'a\\nb\\tc\\x1bd\\u2028'"
    # right-to-left text and bidi controls: isolated (the controls escaped), inside the quotes
    assert quoted(HEBREW) == f"'{FSI}{HEBREW}{PDI}'"
    assert quoted(f"x{RLO}y") == f"'{FSI}x\\u202ey{PDI}'"
    # embed: left-to-right text as it is; text that could reorder the words around it isolated
    assert embed("a red circle") == "a red circle" and embed("") == "" and embed(None) == ""
    assert embed(HEBREW) == f"{FSI}{HEBREW}{PDI}"
    assert embed(f"x{RLO}y") == f"{FSI}x\\u202ey{PDI}"
    assert embed("\u0661\u0662") == f"{FSI}\u0661\u0662{PDI}"        # Arabic-Indic digits
    assert contribution_title("C:\\data") == "what each neuron adds to 'C:\\data'"


@pytest.fixture
def odd_text():
    """An Explorer whose class names, tokens and descriptions hold a backslash, a tab, Hebrew,
    a quote and a RIGHT-TO-LEFT OVERRIDE (FakeKernels); closed afterwards."""
    vocab = list(VOCAB[:-2]) + [TOKEN, RTL_TOKEN]          # as many rows as TinyVQA embeds
    adapter = ModelAdapter(TinyVQA().eval(),
                           [Image("image", patch=4), Text("question", vocab, tokenize=str.split)],
                           CLASSES)
    rng = np.random.default_rng(0)
    n = 8
    ds = MultimodalDataset({"image": [rng.random((8, 8, 3)).astype(np.float32) for _ in range(n)],
                            "question": [f"what {TOKEN} is {RTL_TOKEN}"] * n},
                           labels=[i % len(CLASSES) for i in range(n)],
                           descriptions=[f"photo {RLO}olleh {i}" for i in range(n)], name="odd")
    ex = Explorer(adapter, ds, kernels=FakeKernels(), delay=0.05)
    assert ex.wait(60)
    yield ex
    ex.close()


def test_captions_and_tooltips_quote_class_and_unit_names_as_the_input_chip_shows_them(odd_text):
    ex = odd_text
    ex.select(target=0, unit=("question", 1))                       # class C:\data, "\frac"
    assert ex.wait(60)
    assert ex.input_view.items[1]["tokens"][1] == TOKEN             # the chip's text
    nv, pv, hv = ex.neuron_view, ex.path_view, ex.heatmap_view
    assert nv.caption.value.startswith("top ") and " to class 'C:\\data'" in nv.caption.value
    assert nv.contrib_figure.title == "what each neuron adds to 'C:\\data'"
    assert pv.caption.value.startswith("prediction path to class 'C:\\data' (red box)")
    assert "with question unit 1 ('\\frac'" in ex.input_view.score_caption
    # the engine's target text (what the input view's caption explains) quotes it so too
    assert "class 'C:\\data'" in ex.input_view.score_caption, ex.input_view.score_caption
    row = hv.row_labels.index(TOKEN) if TOKEN in hv.row_labels else None
    assert row is not None, hv.row_labels
    assert hv.cell_text(row, 0).startswith("question '\\frac' x image '")
    # a neuron outside the top bars: its values in words, to the class as written
    nv.n_bars = 2
    nv.refresh()
    assert ex.wait(60)
    j = next(k for k in range(12) if k not in nv.shown)
    ex.select(neuron=j)
    assert ex.wait(60)
    assert nv.selected_caption.value.endswith(" to 'C:\\data'"), nv.selected_caption.value
    # a tab is escaped (a caption is one line); right-to-left text is isolated in the quotes
    ex.select(target=1)
    assert ex.wait(60)
    assert " to class 'tab\\there'" in nv.caption.value and "\t" not in nv.caption.value
    ex.select(target=2)
    assert ex.wait(60)
    assert f"class '{FSI}{HEBREW}{PDI}' (red box)" in pv.caption.value
    assert nv.contrib_figure.title == f"what each neuron adds to '{FSI}{HEBREW}{PDI}'"


def test_the_gallery_and_the_concept_row_keep_data_from_reordering_the_words_around_it(odd_text):
    ex = odd_text
    ex.select(neuron=0, unit=("question", 3))                       # the token abc<RLO>def
    assert ex.wait(60)
    buttons = [w for row in (ex.neuron_view.top_row, ex.neuron_view.bottom_row)
               for item in row.children for w in item.children if type(w).__name__ == "Button"]
    assert buttons
    for b in buttons:
        for text in (b.tooltip, b.description):
            assert RLO not in text and text.count(FSI) == text.count(PDI) == 1, ascii(text)
        assert re.fullmatch(r"\(h = \S+\)", outside_isolates(b.tooltip).strip()), b.tooltip
        assert f"{FSI}photo \\u202eolleh " in b.tooltip
        assert re.fullmatch(r"#\d+ ", outside_isolates(b.description)), b.description
    label = ex.concepts_view.unit_label.value
    assert RLO not in label and outside_isolates(label) == f"#{ex.selection.instance} question " \
                                                           "unit 3 ():", ascii(label)
    assert f"{FSI}abc\\u202edef{PDI}" in label
