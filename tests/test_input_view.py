"""InputView: payloads for every modality kind, trait validation, the built bundle (no kernel)."""
import base64
import io
import json

import numpy as np
import pytest
import torch
import traitlets
from torch import nn

from multiviz_widgets import Image, ModelAdapter, Tabular, Text, TimeSeries
from multiviz_widgets.views import input_view as iv
from multiviz_widgets.views.input_view import InputView, input_items


class FourModalities(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 4)
        self.head = nn.Linear(3 + 4 + 3 + 2, 2)

    def forward(self, image, question, vitals, series):
        return self.head(torch.cat([image.mean((2, 3)), self.emb(question).mean(1), vitals,
                                    series.mean(1)], 1))


VOCAB = ["[PAD]", "[UNK]", "what", "color", "is", "the", "shape", "<img src=x onerror=alert(1)>"]


@pytest.fixture(scope="module")
def adapter():
    mods = [Image("image", patch=8), Text("question", vocab=VOCAB),
            Tabular("vitals", columns=["hr", "bp", "spo2"], groups={"heart": [0, 1], "lung": [2]}),
            TimeSeries("series", window=4, channels=["ecg", "ppg"])]
    return ModelAdapter(FourModalities(len(VOCAB)).eval(), mods, class_names=["no", "yes"])


@pytest.fixture(scope="module")
def instance():
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
            "question": "What colour is the Shape?",
            "vitals": np.array([72.0, 120.5, 0.97], dtype=np.float32),
            "series": rng.normal(size=(10, 2)).astype(np.float32)}


def by_name(items):
    return {it["name"]: it for it in items}


def test_items_follow_the_adapter_order_and_units(adapter, instance):
    items = input_items(adapter, instance)
    assert [it["name"] for it in items] == adapter.names
    prep = adapter.prepare(instance)
    for it in items:
        assert it["n_units"] == prep.n_units[it["name"]]
        assert len(it["labels"]) == it["n_units"]
        assert it["kind"] == adapter.modalities[it["name"]].kind
    json.dumps(items)  # the whole payload is plain JSON


def test_image_payload_is_a_png_with_its_patch_grid(adapter, instance):
    img = by_name(input_items(adapter, instance))["image"]
    assert (img["height"], img["width"]) == (20, 24)
    assert (img["rows"], img["cols"]) == adapter.modalities["image"].grid(
        adapter.prepare(instance).raw["image"][0]) == (3, 3)
    assert img["rows"] * img["cols"] == img["n_units"]
    assert img["src"].startswith("data:image/png;base64,")
    from PIL import Image as PILImage
    png = PILImage.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
    assert png.size == (24, 20)
    assert np.array_equal(np.asarray(png.convert("RGB")), instance["image"])
    assert max(img["display_width"], img["display_height"]) == iv.DISPLAY_SIZE


def test_superpixel_image_sends_the_segment_of_every_pixel():
    m = Image("image", superpixels=4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    ad = ModelAdapter(model, [m], class_names=["a", "b"])
    x = np.zeros((16, 16, 3), dtype=np.uint8)
    x[:, 8:] = 255
    img = input_items(ad, {"image": x})[0]
    assert len(img["segments"]) == 16 * 16
    assert set(img["segments"]) == set(range(img["n_units"]))
    assert "rows" not in img


def test_text_payload_shows_the_original_words(adapter, instance):
    txt = by_name(input_items(adapter, instance))["question"]
    assert txt["tokens"] == ["what", "colour", "is", "the", "shape"]
    assert txt["model_tokens"] == ["what", "[UNK]", "is", "the", "shape"]
    assert len(txt["tokens"]) == txt["n_units"]


def test_text_given_as_ids_shows_vocabulary_tokens(adapter, instance):
    inst = dict(instance, question=torch.tensor([2, 7, 1]))
    txt = by_name(input_items(adapter, inst))["question"]
    assert txt["tokens"] == ["what", "<img src=x onerror=alert(1)>", "[UNK]"]


def test_tabular_payload_maps_columns_to_groups(adapter, instance):
    tab = by_name(input_items(adapter, instance))["vitals"]
    assert tab["columns"] == ["hr", "bp", "spo2"]
    assert tab["values"] == pytest.approx([72.0, 120.5, 0.97])
    assert tab["units"] == [0, 0, 1]
    assert tab["unit_labels"] == ["heart", "lung"] and tab["n_units"] == 2


def test_series_payload_has_windows_groups_and_values(adapter, instance):
    ts = by_name(input_items(adapter, instance))["series"]
    assert ts["channels"] == ["ecg", "ppg"] and ts["group_names"] == ["ecg", "ppg"]
    assert ts["n_windows"] == 3 and ts["window"] == 4
    assert ts["n_windows"] * len(ts["groups"]) == ts["n_units"]
    assert np.allclose(np.array(ts["values"]), instance["series"])
    # unit of (window w, group g) is w * G + g, as the modality numbers them
    idx = adapter.modalities["series"].unit_index(torch.as_tensor(instance["series"]))
    assert int(idx[5, 1]) == 1 * 2 + 1


def test_traits_round_trip_and_validation(adapter, instance):
    v = InputView()
    v.show(adapter, instance, caption="instance 0")
    assert v.caption == "instance 0" and v.scores == {} and v.selected == {}
    v.scores = {"image": np.arange(9, dtype=np.float32) - 4.0, "vitals": [0.5, float("nan")]}
    assert v.scores["image"] == [float(i) - 4.0 for i in range(9)]
    assert v.scores["vitals"] == [0.5, None]
    v.selected = {"modality": "question", "unit": np.int64(2)}
    assert v.selected == {"modality": "question", "unit": 2}
    state = v.get_state()
    assert state["selected"] == {"modality": "question", "unit": 2}
    assert [it["name"] for it in state["items"]] == adapter.names
    # a click in the browser arrives as a state update from the front end
    v.set_state({"selected": {"modality": "image", "unit": 4}})
    assert v.selected == {"modality": "image", "unit": 4}
    with pytest.raises(traitlets.TraitError, match=r"selected must be \{'modality'"):
        v.selected = {"unit": 3}
    v.selected = {}
    assert v.selected == {}
    # scales: the |score| at full colour; none (or 0, NaN) means the modality's own largest
    v.scales = {"image": np.float32(2.5), "vitals": 0.0, "question": float("nan")}
    assert v.scales == {"image": 2.5}
    with pytest.raises(Exception, match="scales: 'image' must be a number"):
        v.scales = {"image": "big"}
    v.show(adapter, instance)
    assert v.scales == {} and v.scores == {}


def test_the_bundle_is_built_and_loaded():
    assert iv._ESM_PATH.is_file(), "run `make js` to build multiviz_widgets/static/input_view.js"
    src = iv._ESM_PATH.read_text()
    assert "data-render-count" in src or "renderCount" in src
    assert "innerHTML" not in src  # data strings only ever go through textContent
    assert InputView()._esm == src


def test_the_bundles_units_and_tags_are_keyboard_buttons_with_names():
    """What the browser tests check in Chromium, present in the shipped bundles: units are
    focusable named buttons whose Enter and Space JupyterLab skips, chips and tags cut long text,
    a tag's remove button names its concept."""
    from multiviz_widgets.views import concept_tags as ct
    src = iv._ESM_PATH.read_text()
    for needle in ('"role","button"', '"aria-label"', '"aria-current"', "keydown",
                   "preventDefault", "focus-visible", "max-width: 40ch",
                   "text-overflow: ellipsis"):
        assert needle in src, needle
    # every other key still reaches JupyterLab's shortcuts (Ctrl+S saves the notebook)
    assert "data-lm-suppress-shortcuts" not in src
    tags = ct._ESM_PATH.read_text()
    for needle in ("remove concept ", '"aria-label","add a concept"', "text-overflow: ellipsis",
                   "activeElement", ".focus()"):
        assert needle in tags, needle
    for bundle in (src, tags):
        assert not any(w in bundle for w in ("innerHTML", "outerHTML", "insertAdjacentHTML"))


def test_missing_bundle_says_to_run_make_js(monkeypatch, tmp_path):
    monkeypatch.setattr(iv, "_ESM_PATH", tmp_path / "missing.js")
    with pytest.raises(iv.BundleMissingError, match="make js"):
        InputView()
