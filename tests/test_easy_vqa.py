"""The embedded easy-VQA demo: shipped weights, dataset, helpers, CLI and error paths."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import easy_vqa as ev
from multiviz_widgets import Image, ModelAdapter, Text
from multiviz_widgets.demos import easy_vqa as demo


@pytest.fixture(scope="module")
def loaded():
    return demo.load("test")


@pytest.fixture(scope="module")
def adapter(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def dataset(loaded):
    return loaded[1]


# -- the shipped model -----------------------------------------------------------------------
def test_shipped_weights_reach_accuracy_on_fixed_subset(adapter, dataset):
    subset = np.arange(0, len(dataset), 9)[:1000]       # 1000 questions spread over the split
    pred = demo.predict(adapter.model, dataset, subset)
    assert len(subset) == 1000
    assert (pred == dataset.labels[subset]).mean() >= 0.98


def test_adapter_path_agrees_with_fast_path(adapter, dataset):
    idx = np.arange(40)
    raw = adapter.collate([dataset[int(i)] for i in idx])
    logits = adapter.predict(raw)
    assert logits.shape == (40, 13)
    np.testing.assert_array_equal(logits.argmax(1).numpy(), demo.predict(adapter.model, dataset, idx))


def test_adapter_structure(adapter, dataset):
    model = adapter.model
    assert isinstance(model, demo.EasyVQAModel) and not model.training
    assert adapter.names == ["image", "question"]
    assert adapter.class_names == ev.get_answers()
    assert adapter.decision_layer is model.classifier
    assert isinstance(model.classifier, nn.Linear)
    assert 32 <= model.classifier.in_features <= 256
    assert adapter.embedding_layers["question"] is model.embedding
    image, question = adapter.modalities["image"], adapter.modalities["question"]
    assert isinstance(image, Image) and image.patch == 8 and image.baseline == "white"
    assert isinstance(question, Text) and question.vocab == demo.VOCAB
    assert question.vocab[:2] == ["[PAD]", "[UNK]"] and question.vocab[2:] == sorted(question.vocab[2:])
    p = adapter.prepare(dataset[0])
    assert p.n_units["image"] == 64
    assert p.labels["question"] == dataset.questions[0].rstrip("?").split()
    logits, h = adapter.features(p.raw)
    assert h.shape == (1, model.classifier.in_features)
    w, b = adapter.decision_weights()
    np.testing.assert_allclose(h.numpy() @ w.T + b, logits.numpy(), rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_modalities(adapter, dataset):
    p = adapter.prepare(dataset[1])
    cont = {k: v.unsqueeze(0).clone().requires_grad_(True) for k, v in p.continuous.items()}
    target = adapter.target(int(dataset.labels[1]))
    adapter.scalar(p, cont, target).sum().backward()
    assert cont["image"].grad.abs().sum() > 0
    assert cont["question"].grad.abs().sum() > 0


def test_vocabulary_covers_every_question():
    words = {w for qs in (ev.get_train_questions()[0], ev.get_test_questions()[0])
             for q in qs for w in q.replace("?", "").split()}
    assert sorted(words) == demo.WORDS


@settings(max_examples=15, deadline=None)
@given(words=st.lists(st.sampled_from(demo.WORDS), min_size=1, max_size=10),
       extra=st.integers(1, 6), image=st.integers(0, 999))
def test_padding_does_not_change_logits(adapter, dataset, words, extra, image):
    ids = torch.tensor([[demo.VOCAB.index(w) for w in words]])
    padded = torch.cat([ids, torch.zeros(1, extra, dtype=torch.long)], dim=1)
    img = demo.image_batch(dataset.images[image:image + 1])
    with torch.no_grad():
        a, b = adapter.model(img, ids), adapter.model(img, padded)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_batched_questions_of_different_lengths_match_single(adapter, dataset):
    idx = [0, 1, 2, 3, 4, 5]
    lengths = {len(dataset.questions[i].split()) for i in idx}
    assert len(lengths) > 1                               # the batch really pads something
    batched = adapter.predict(adapter.collate([dataset[i] for i in idx]))
    single = torch.cat([adapter.predict(adapter.collate([dataset[i]])) for i in idx])
    # Only float rounding differs (convolutions pick other kernels for other batch sizes).
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


# -- the dataset -----------------------------------------------------------------------------
def test_dataset_items_labels_descriptions(dataset):
    texts, answers, image_ids = ev.get_test_questions()
    assert len(dataset) == demo.N_TEST_QUESTIONS == len(texts)
    assert dataset.images.shape == (1000, 64, 64, 3) and dataset.images.dtype == np.uint8
    assert dataset.image_index.shape == (len(texts),)
    names = ev.get_answers()
    assert [names[i] for i in dataset.labels] == list(answers)
    for i in (0, 1, 4321, len(dataset) - 1):
        item = dataset[i]
        assert set(item) == {"image", "question"}
        assert item["question"] == texts[i] == dataset.describe(i)
        assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
        assert dataset.answer(i) == answers[i]
    # The picture of a question is the PNG of its image id.
    from PIL import Image as PILImage
    paths = ev.get_test_image_paths()
    for i in (0, 777, 9000):
        png = np.asarray(PILImage.open(paths[image_ids[i]]).convert("RGB"))
        np.testing.assert_array_equal(dataset[i]["image"], png)


def test_images_are_stored_once_and_items_are_copies(dataset):
    assert dataset.columns["image"].images is dataset.images
    item = dataset[0]
    item["image"][:] = 0                                   # mutating an item leaves the data alone
    assert dataset[0]["image"].max() > 0
    assert not dataset.images.flags.writeable


def test_fingerprint_is_stable_and_content_sensitive(dataset):
    again = demo.load_dataset("test")
    assert again.fingerprint() == dataset.fingerprint()
    changed = demo.EasyVQADataset(dataset.images, dataset.image_index, dataset.questions,
                                  (dataset.labels + 1) % 13, dataset.answers)
    assert changed.fingerprint() != dataset.fingerprint()


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        demo.load_dataset("validation")


# -- helpers ---------------------------------------------------------------------------------
def test_shape_mask_is_plausible_on_every_test_picture(dataset):
    fractions = np.array([demo.shape_mask(im).mean() for im in dataset.images])
    assert fractions.min() > 0.004                         # never empty (smallest shape ~35 px)
    assert fractions.max() < 0.35                          # never the background
    assert 0.03 < np.median(fractions) < 0.15


def test_shape_mask_accepts_model_inputs(dataset):
    im = dataset.images[3]
    as_uint8 = demo.shape_mask(im)
    assert as_uint8.shape == (64, 64) and as_uint8.dtype == bool
    np.testing.assert_array_equal(demo.shape_mask(demo.image_batch(im[None])[0]), as_uint8)
    np.testing.assert_array_equal(demo.shape_mask(im.astype(np.float32) / 255.0), as_uint8)
    with pytest.raises(ValueError, match="one RGB image"):
        demo.shape_mask(im[..., 0])
    # floats on the 0..255 scale were read as 255 times brighter: faint antialiased edge pixels
    # became shape (28% more pixels on test image 19), with no error
    with pytest.raises(ValueError, match="divide it by 255"):
        demo.shape_mask(im.astype(np.float32))


def test_shape_mask_finds_a_planted_square():
    img = np.full((64, 64, 3), [240, 250, 245], dtype=np.uint8)
    img[10:20, 30:45] = [200, 0, 0]
    mask = demo.shape_mask(img)
    assert mask.sum() == 150 and mask[10:20, 30:45].all()


@pytest.mark.parametrize("question, kind", [
    ("what shape is in the image?", "shape"),
    ("what is the blue shape?", "shape"),
    ("what shape does the image contain?", "shape"),
    ("what color is the shape?", "color"),
    ("what is the color of the circle?", "color"),
    ("What color is the triangle?", "color"),
    ("is there a red shape?", "yes_no"),
    ("does the image not contain a gray shape?", "yes_no"),
    ("is no triangle present?", "yes_no"),
])
def test_question_kind_known_questions(question, kind):
    assert demo.question_kind(question) == kind


def test_question_kind_agrees_with_every_answer():
    expected = {a: "shape" for a in demo.SHAPES} | {a: "color" for a in demo.COLORS} \
        | {"yes": "yes_no", "no": "yes_no"}
    for texts, answers, _ in (ev.get_train_questions(), ev.get_test_questions()):
        assert [demo.question_kind(q) for q in texts] == [expected[a] for a in answers]
    with pytest.raises(ValueError):
        demo.question_kind("  ")


# -- loading errors --------------------------------------------------------------------------
def test_copied_weights_load(weights_copy, adapter):
    w, _ = weights_copy
    other = demo.load_adapter(w)
    assert other.fingerprint() == adapter.fingerprint()


def test_missing_weights_is_a_clear_error(weights_copy):
    """A path the user gave is named as theirs; a mistyped one was reported as a missing JSON
    description, with the advice to reinstall the package."""
    w, _ = weights_copy
    w.unlink()
    with pytest.raises(demo.WeightsError, match=f"no easy-VQA weights at {re.escape(str(w))}"
                                               r": check the path") as e:
        demo.load_adapter(w)
    assert "Reinstall" not in str(e.value) and ".json" not in str(e.value).split(":")[0]
    with pytest.raises(demo.WeightsError, match="no easy-VQA weights at .*typo"):
        demo.load_adapter(w.parent / "typo.safetensors")


def test_missing_shipped_weights_say_how_to_get_them_back(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "WEIGHTS_FILE", tmp_path / "easy_vqa.safetensors")
    with pytest.raises(demo.WeightsError, match="missing.*easy_vqa train"):
        demo.load_model()


def test_missing_description_is_a_clear_error(weights_copy):
    w, m = weights_copy
    m.unlink()
    with pytest.raises(demo.WeightsError, match="description.*missing"):
        demo.load_adapter(w)


def test_corrupt_weights_are_detected_by_checksum(weights_copy):
    w, _ = weights_copy
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF                                    # flip bits inside a tensor
    w.write_bytes(bytes(data))
    with pytest.raises(demo.WeightsError, match="corrupt"):
        demo.load_adapter(w)


def test_truncated_weights_without_checksum_are_a_clear_error(weights_copy):
    w, m = weights_copy
    meta = json.loads(m.read_text())
    del meta["weights_sha256"]
    m.write_text(json.dumps(meta))
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(demo.WeightsError, match="cannot be read as safetensors"):
        demo.load_adapter(w)


def test_weights_that_do_not_fit_the_config_are_a_clear_error(weights_copy):
    w, m = weights_copy
    meta = json.loads(m.read_text())
    meta["config"]["width"] = 96
    m.write_text(json.dumps(meta))
    with pytest.raises(demo.WeightsError, match="do not fit"):
        demo.load_adapter(w)


def test_invalid_json_description_is_a_clear_error(weights_copy):
    w, m = weights_copy
    m.write_text("{not json")
    with pytest.raises(demo.WeightsError, match="not valid JSON"):
        demo.load_adapter(w)


# -- command line and training ---------------------------------------------------------------
def test_evaluate_cli_prints_json(capsys):
    assert demo.main(["evaluate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 9673
    assert out["test_accuracy"] >= 0.98
    assert {"seconds", "load_seconds", "per_kind"} <= set(out)


def test_shipped_description_records_training():
    meta = demo.read_meta()
    assert meta["vocab"] == demo.VOCAB and meta["answers"] == ev.get_answers()
    assert meta["test_accuracy"] >= 0.98 and meta["n_test"] == 9673
    assert meta["training"]["seed"] == 0


def test_training_is_seeded_and_saves_loadable_weights(tmp_path):
    from safetensors.torch import load_file
    metas = []
    for run in ("a", "b"):
        metas.append(demo.train(epochs=1, max_steps_per_epoch=2, out_dir=tmp_path / run,
                                log=lambda m: None, evaluate_test=False, val_every=1000))
    a = load_file(str(tmp_path / "a" / "easy_vqa.safetensors"))
    b = load_file(str(tmp_path / "b" / "easy_vqa.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    loaded = demo.load_adapter(tmp_path / "a" / "easy_vqa.safetensors")
    assert isinstance(loaded, ModelAdapter)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.model.modules())
    assert loaded.model.embedding.weight[1].abs().max() == 0          # [UNK] is neutral
    assert metas[0]["config"]["norm"] is False and metas[0]["training"]["batch_norm_folded"]


def test_fold_batch_norm_keeps_the_function():
    torch.manual_seed(0)
    model = demo.EasyVQAModel(norm=True)
    for i in range(1, 5):                                 # non-trivial eval-mode statistics
        bn = getattr(model, f"bn{i}")
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = demo.fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.config == dict(model.config, norm=False)
    img, q = torch.rand(4, 3, 64, 64), torch.randint(1, len(demo.VOCAB), (4, 7))
    with torch.no_grad():
        torch.testing.assert_close(folded(img, q), model(img, q), rtol=1e-4, atol=1e-4)


def test_unknown_words_change_nothing(adapter, dataset):
    # A typo ("colour") becomes [UNK], whose embedding is zero: the answer is that of the rest.
    i = next(k for k, q in enumerate(dataset.questions) if q.startswith("what is the color of"))
    typed = dataset.questions[i].replace("color", "colour")
    without = dataset.questions[i].replace("color ", "")
    image = dataset[i]["image"]
    a = adapter.predict(adapter.collate([{"image": image, "question": typed}]))
    b = adapter.predict(adapter.collate([{"image": image, "question": without}]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert adapter.model.embedding.weight[demo.VOCAB.index("[UNK]")].abs().max() == 0


def test_training_into_a_folder_it_cannot_write_fails_before_training(tmp_path, capsys,
                                                                      monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def no_training(*_a, **_k):
        raise AssertionError("the data was loaded for training before the folder was checked")
    monkeypatch.setattr(demo, "load_dataset", no_training)
    with pytest.raises(OSError, match="out_dir="):
        demo.train(out_dir=blocker / "weights", epochs=1, max_steps_per_epoch=1,
                   evaluate_test=False)
    assert demo.main(["train", "--out-dir", str(blocker / "weights")]) == 1
    assert "--out-dir" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_shape_mask_reads_integers_of_any_type_and_pil_images_on_the_0_255_scale(dataset):
    from PIL import Image as PILImage
    img = dataset[0]["image"]
    want = demo.shape_mask(img)
    assert want.any()
    for other in (img.astype(np.int64), PILImage.fromarray(img), img.tolist(),
                  img.astype(np.float32) / 255.0):
        np.testing.assert_array_equal(demo.shape_mask(other), want)


def test_the_easy_vqa_questions_cannot_change_and_new_labels_change_the_fingerprint(dataset):
    import copy
    ds = copy.copy(dataset)                     # a shallow copy: the same contents
    with pytest.raises(TypeError):
        ds.questions[0] = "is there a red shape?"    # a tuple: the fingerprint stays true
    before = ds.fingerprint()
    ds.labels = (np.asarray(dataset.labels) + 1) % len(dataset.answers)
    assert ds.fingerprint() != before
    assert dataset.fingerprint() == before


# -- the shipped stage-4 sparse linear model ---------------------------------------------------
def test_the_shipped_sparse_model_is_sparse_and_faithful_to_the_model(adapter, dataset):
    """Fitted by `python -m multiviz_widgets.demos.easy_vqa fit-sparse` for these weights: a
    few neurons per class, and the model's own answer on held-out questions."""
    from multiviz_widgets.kernels.representations import extract_features
    sparse = demo.load_sparse_model(adapter=adapter)
    assert sparse.class_names == adapter.class_names and sparse.d == 64
    assert sparse.fraction_nonzero <= 0.10 and sparse.test_fidelity >= 0.95
    assert 1 <= sparse.nonzeros_per_class.min()
    feats = extract_features(adapter, dataset, indices=range(500), cache=False)
    assert sparse.fidelity(feats.h, feats.logits) >= 0.95


def test_a_sparse_model_missing_unreadable_or_for_other_weights_says_how_to_refit(tmp_path,
                                                                                 adapter):
    with pytest.raises(demo.WeightsError, match="missing.*easy_vqa fit-sparse"):
        demo.load_sparse_model(tmp_path / "none.json", adapter=adapter)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(demo.WeightsError, match="not readable.*fit-sparse"):
        demo.load_sparse_model(bad, adapter=adapter)
    data = json.loads(demo.SPARSE_FILE.read_text(encoding="utf-8"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(data, weights_sha256="0" * 64)), encoding="utf-8")
    with pytest.raises(demo.WeightsError, match="fitted for other weights.*fit-sparse"):
        demo.load_sparse_model(other, adapter=adapter)
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(dict(data, class_names=data["class_names"][:-1],
                                     weight=data["weight"][:-1], bias=data["bias"][:-1])),
                     encoding="utf-8")
    with pytest.raises(demo.WeightsError, match="12 classes over 64 neurons, the model 13"):
        demo.load_sparse_model(fewer, adapter=adapter)


def test_the_sparse_model_is_checked_against_the_adapters_own_weights(weights_copy):
    """An adapter of other weights (retrained, kept elsewhere) does not get the shipped sparse
    model; one of the shipped weights, copied, does."""
    from safetensors.torch import load_file
    w, m = weights_copy
    same = demo.load_adapter(w, m)
    assert demo.load_sparse_model(adapter=same).d == 64
    state = {k: v + 0.01 for k, v in load_file(str(w)).items()}
    demo.save_weights(state, w)
    meta = json.loads(m.read_text())
    m.write_text(json.dumps(dict(meta, weights_sha256=demo._file_sha256(w))))
    other = demo.load_adapter(w, m)
    with pytest.raises(demo.WeightsError, match="fitted for other weights.*fit_sparse_model"):
        demo.load_sparse_model(adapter=other)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_predict_feeds_the_model_in_its_own_precision(adapter, dataset, dtype):
    model = copy.deepcopy(adapter.model).to(dtype).train()
    got = demo.predict(model, dataset, range(8))
    assert model.training                              # its mode is given back
    assert (got == demo.predict(adapter, dataset, range(8))).mean() >= 0.75


def test_fit_sparse_writes_a_model_that_loads(tmp_path):
    """The command's code on the first 1,500 training questions (the shipped file: all of
    them)."""
    out = tmp_path / "sparse.json"
    lines, threads = [], torch.get_num_threads()
    model = demo.fit_sparse(out, max_train=1500, n_lambdas=6, threads=1, cache=False,
                            log=lines.append)
    assert torch.get_num_threads() == threads                     # the caller's, restored
    assert model.n_train + model.n_val == 1500 and model.n_test == demo.N_TEST_QUESTIONS
    again = demo.load_sparse_model(out)
    np.testing.assert_array_equal(again.weight, model.weight)
    assert lines[-1].startswith(f"wrote {out}: test fidelity")


def test_the_easy_vqa_demo_explains_with_the_sparse_model(tmp_path, monkeypatch):
    from multiviz_widgets.explorer import demo as open_demo
    ex = open_demo()
    try:
        assert ex.wait(120) and ex.analyses.sparse_model is not None
        assert "the sparse linear model's weight" in ex.neuron_view.caption.value
        assert "standardised over the data the sparse model was fit on" in ex.neuron_view.caption.value
    finally:
        ex.close()
    ex = open_demo(sparse_model=None)                  # the decision layer's own weights
    try:
        assert ex.wait(120) and ex.analyses.sparse_model is None
    finally:
        ex.close()
    monkeypatch.setattr(demo, "SPARSE_FILE", tmp_path / "gone.json")
    with pytest.warns(RuntimeWarning, match="missing.*decision layer's weights meanwhile"):
        ex = open_demo()
    try:
        assert ex.wait(120) and ex.analyses.sparse_model is None
    finally:
        ex.close()


def test_fit_sparse_to_a_missing_folder_is_refused_before_the_work(tmp_path, capsys):
    code = demo.main(["fit-sparse", "--out", str(tmp_path / "no" / "such" / "sparse.json")])
    err = capsys.readouterr().err
    assert code == 1 and "does not exist: give a file in an existing folder" in err


def test_fit_sparse_refuses_a_bad_argument_before_the_work(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the features were extracted before the arguments were checked")
    monkeypatch.setattr(demo, "load_adapter", no_work)
    code = demo.main(["fit-sparse", "--n-lambdas", "1", "--out", str(tmp_path / "s.json")])
    assert code == 1 and "n_lambdas must be an integer of at least 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="solver must be one of"):
        demo.fit_sparse(tmp_path / "s.json", solver="lasso")


def test_evaluate_with_zero_threads_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["evaluate", "--threads", "0"])
    assert e.value.code == 2
    assert "--threads must be an integer of at least 1" in capsys.readouterr().err


# -- frozen datasets, live weights, atomic sparse-model files -----------------------------------
def test_a_dataset_keeps_read_only_copies_of_writable_arrays(adapter, dataset, tmp_path):
    """Before: built from a writable images array, the dataset kept that array, so an edit in
    place (imgs[:] = 255 - imgs) changed its pictures but not its remembered fingerprint, and
    the feature cache served the old pictures' features."""
    from multiviz_widgets.kernels.representations import extract_features
    imgs, index = np.array(dataset.images[:5]), dataset.image_index[:20] % 5
    ds = demo.EasyVQADataset(imgs, index, dataset.questions[:20], dataset.labels[:20],
                             dataset.answers)
    assert not ds.images.flags.writeable and not ds.image_index.flags.writeable
    first = extract_features(adapter, ds, cache_dir=tmp_path)
    before = ds[0]["image"].copy()
    imgs[:] = 255 - imgs                                   # the caller's arrays edited
    index[:] = 0
    np.testing.assert_array_equal(ds[0]["image"], before)
    np.testing.assert_array_equal(ds.image_index, dataset.image_index[:20] % 5)
    again = extract_features(adapter, ds, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.h, first.h)
    edited = demo.EasyVQADataset(imgs, dataset.image_index[:20] % 5, dataset.questions[:20],
                                 dataset.labels[:20], dataset.answers)
    assert edited.fingerprint() != ds.fingerprint()
    # a split's read-only pictures are shared, not copied
    assert demo.load_dataset("test").images is dataset.images


def test_the_sparse_model_is_refused_for_live_weights_other_than_those_it_was_fitted_on():
    """Before: only the SHA-256 of the weights file read at load time was compared, so a model
    whose weights were changed in place after load_adapter(), or a randomly initialised one
    wrapped with make_adapter, got the shipped sparse model."""
    changed = demo.load_adapter()
    assert demo.load_sparse_model(adapter=changed).d == 64
    with torch.no_grad():
        changed.model.classifier.weight.mul_(-1)
    with pytest.raises(demo.WeightsError, match="not those of the file it was fitted for"):
        demo.load_sparse_model(adapter=changed)
    torch.manual_seed(0)
    random_model = demo.EasyVQAModel(**demo.read_meta()["config"]).eval()
    with pytest.raises(demo.WeightsError, match="not those of the file.*fit_sparse_model"):
        demo.load_sparse_model(adapter=demo.make_adapter(random_model))
    # the shipped weights wrapped with make_adapter (no file recorded), or moved to float64
    model, _ = demo.load_model()
    assert demo.load_sparse_model(adapter=demo.make_adapter(model)).d == 64
    wide = demo.load_adapter()
    wide.model.double()
    assert demo.load_sparse_model(adapter=wide).d == 64
    for cast in ("half", "bfloat16"):           # cast only: its weights, rounded (was refused)
        low = demo.load_adapter()
        getattr(low.model, cast)()
        assert demo.load_sparse_model(adapter=low).d == 64
        with torch.no_grad():
            low.model.classifier.bias.add_(1)
        with pytest.raises(demo.WeightsError, match="not those of the file"):
            demo.load_sparse_model(adapter=low)


def test_fit_sparse_writes_its_json_atomically(tmp_path, monkeypatch):
    """Before: the JSON went to a fixed NAME.tmp with write_text, so an interrupt left a partial
    file beside the target (two runs shared the name). Now an interrupted write leaves the old
    file and nothing else."""
    import os
    import types
    import multiviz_widgets.kernels.prediction as prediction
    import multiviz_widgets.kernels.representations as rep
    monkeypatch.setattr(demo, "load_adapter", lambda: types.SimpleNamespace(class_names=["a"]))
    monkeypatch.setattr(demo, "load_dataset", lambda split: None)
    monkeypatch.setattr(rep, "extract_features", lambda *a, **k: None)
    fitted = types.SimpleNamespace(to_dict=lambda: {"weight": [[0.0] * 100] * 20},
                                   test_fidelity=1.0, fraction_nonzero=0.0, seconds=0.0)
    monkeypatch.setattr(prediction, "fit_sparse_model", lambda *a, **k: fitted)
    out = tmp_path / "sparse.json"
    out.write_text("old\n", encoding="utf-8")

    def interrupted(fd):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", interrupted)       # interrupted before the file is complete
        with pytest.raises(KeyboardInterrupt):
            demo.fit_sparse(out, log=lambda _: None)
    assert os.listdir(tmp_path) == ["sparse.json"]
    assert out.read_text(encoding="utf-8") == "old\n"
    demo.fit_sparse(out, log=lambda _: None)
    assert os.listdir(tmp_path) == ["sparse.json"]
    assert json.loads(out.read_text(encoding="utf-8"))["weight"] == [[0.0] * 100] * 20


def test_after_training_and_recompute_the_views_say_the_sparse_model_no_longer_fits(
        tmp_path, monkeypatch):
    """"recompute" keeps the sparse model: after the model was trained (here its classifier's
    rows rolled, in place), the path and the bars showed the old model's weights as current,
    with no word, though the sparse model then agreed with the model on 0.1% of the data."""
    from multiviz_widgets.explorer import demo as open_demo
    monkeypatch.setenv("MULTIVIZ_CACHE", str(tmp_path))
    ex = open_demo()
    try:
        assert ex.wait(120) and ex.analyses.sparse_model is not None
        assert "agrees with the model" not in ex.path_view.caption.value
        with torch.no_grad():
            head = ex.adapter.model.classifier
            head.weight.copy_(head.weight.roll(1, 0))
            head.bias.copy_(head.bias.roll(1, 0))
        ex.refresh()
        assert ex.wait(120)
        ex.select(instance=1)
        assert ex.wait(120)
        for caption in (ex.path_view.caption.value, ex.neuron_view.caption.value):
            assert "the sparse linear model agrees with the model on" in caption, caption
            assert "fit it again" in caption
    finally:
        ex.close()
