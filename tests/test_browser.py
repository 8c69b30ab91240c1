"""Browser tests: real Chromium against JupyterLab and Voila (marker ``browser``).

One JupyterLab and one Voila server per module, over a temporary copy of notebooks/ plus
notebooks written by these tests (the XSS probe), so nothing in the repository is touched.
"""
from __future__ import annotations

import json
import pathlib

import pytest

from . import browser_support as bs

pytestmark = [pytest.mark.browser]

_why_not = bs.missing_requirements()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=_why_not))

XSS = "<img src=x onerror=alert(1)>"

# A tiny model whose class names and vocabulary carry an HTML payload: it must show as text.
XSS_SETUP = r'''
import numpy as np, torch
from torch import nn
from multiviz_widgets import Image, ModelAdapter, MultimodalDataset, Text
XSS = "<img src=x onerror=alert(1)>"
vocab = ["[PAD]", "[UNK]", "what", "is", XSS]
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(len(vocab), 4)
        self.body = nn.Linear(3 + 4, 6)
        self.head = nn.Linear(6, 2)
    def forward(self, image, question):
        h = torch.relu(self.body(torch.cat([image.mean((2, 3)), self.emb(question).mean(1)], 1)))
        return self.head(h)
torch.manual_seed(0)
tok = lambda s: s.split("|")
adapter = ModelAdapter(Tiny().eval(), [Image("image", patch=8), Text("question", vocab=vocab, tokenize=tok)],
                       class_names=[XSS, "ok"])
rng = np.random.default_rng(0)
dataset = MultimodalDataset({"image": [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)],
                             "question": [f"what|is|{XSS}"] * 12},
                            labels=[i % 2 for i in range(12)], descriptions=[f"{XSS} #{i}" for i in range(12)])
'''

INPUT_VIEW_CELL = r'''
from multiviz_widgets.views.input_view import InputView
view = InputView()
view.show(adapter, dataset[0], caption=XSS)
import numpy as np
view.scores = {"image": np.linspace(-1, 1, 4), "question": [0.25, -0.5, 1.0]}
view
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = bs.copy_notebooks(tmp_path_factory.mktemp("mvz-browser"))
    bs.write_notebook(root / "probe" / "input_view.ipynb", [XSS_SETUP, INPUT_VIEW_CELL])
    return root


@pytest.fixture(scope="module")
def lab(root):
    server = bs.start_lab(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chromium():
    with bs.browser() as b:
        yield b


@pytest.fixture
def page(chromium):
    ctx = chromium.new_context(viewport={"width": 1400, "height": 1000})
    p = ctx.new_page()
    yield p
    ctx.close()


def test_input_view_renders_scores_and_clicks_reach_python(lab, page):
    nb = bs.Notebook(page, lab, "probe/input_view.ipynb").open()
    nb.run_all()
    page.wait_for_selector(".mvz-input[data-render-count] .mvz-patch", timeout=90_000)
    patches = page.eval_on_selector_all(
        ".mvz-input [data-modality='image']", "els => els.map(e => e.dataset.score)")
    expected = nb.kernel_json("import json; print(json.dumps(view.scores['image']))")
    assert [float(s) for s in patches] == expected
    tokens = page.locator(".mvz-input .mvz-token[data-modality='question']")
    assert tokens.count() == 3
    assert tokens.nth(2).text_content() == XSS
    assert page.locator(".mvz-input .mvz-caption").text_content() == XSS
    count = page.get_attribute(".mvz-input", "data-render-count")
    tokens.nth(1).click()
    page.wait_for_function(f"() => document.querySelector('.mvz-input').dataset.renderCount !== '{count}'")
    sel = nb.kernel_json("import json; print(json.dumps(view.selected))")
    assert sel == {"modality": "question", "unit": 1}
    # Python highlights a unit
    nb.kernel_exec("view.selected = {'modality': 'image', 'unit': 3}")
    page.wait_for_selector(".mvz-input [data-modality='image'][data-unit='3'].mvz-selected")
    assert not nb.dialogs, nb.dialogs
