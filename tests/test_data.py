"""MultimodalDataset: column checks, positional access, labels, and a fingerprint that tells
different contents apart (it keys the on-disk feature cache)."""
import numpy as np
import pandas as pd
import pytest
import torch

from multiviz_widgets import MultimodalDataset


def fp(columns, **kw):
    return MultimodalDataset(columns, **kw).fingerprint()


def test_the_fingerprint_tells_apart_contents_with_the_same_bytes():
    assert fp({"q": ["is it red", "what color"]}) != fp({"q": ["is it", " redwhat color"]})
    z = np.zeros(12, dtype=np.float32)
    assert fp({"x": [z.reshape(3, 4)]}) != fp({"x": [z.reshape(4, 3)]})
    assert fp({"x": [np.zeros(4, np.float32)]}) != fp({"x": [np.zeros(2, np.float64)]})
    assert fp({"x": [[1, 2], [3]]}) != fp({"x": [[1], [2, 3]]})
    assert fp({"q": ["a", "b"]}) != fp({"q": ["a", "b"]}, labels=[0, 1])
    assert fp({"q": ["a", "b"]}) == fp({"q": ["a", "b"]})                   # and is stable


def test_the_fingerprint_follows_image_pixels_and_edits_in_place():
    """PIL images are hashed by their pixels (their repr holds only an address), and an edit of
    a column in place changes the fingerprint (it used to be computed once and remembered,
    so extract_features served the old features)."""
    from PIL import Image as PILImage
    a = PILImage.fromarray(np.zeros((4, 4, 3), np.uint8))
    b = PILImage.fromarray(np.full((4, 4, 3), 9, np.uint8))
    assert fp({"image": [a]}) == fp({"image": [PILImage.fromarray(np.zeros((4, 4, 3), np.uint8))]})
    assert fp({"image": [a]}) != fp({"image": [b]})
    questions = ["what color", "is it red"]
    ds = MultimodalDataset({"q": questions})
    before = ds.fingerprint()
    questions[1] = "is it blue"
    assert ds.fingerprint() != before
    images = [np.zeros((2, 2, 3), np.uint8)]
    ds = MultimodalDataset({"image": images})
    before = ds.fingerprint()
    images[0][0, 0, 0] = 1
    assert ds.fingerprint() != before


def test_pandas_columns_are_read_by_position():
    df = pd.DataFrame({"q": [f"question {i}" for i in range(6)], "y": [0, 1, 0, 1, 0, 1]})
    shuffled = df.sample(frac=1, random_state=0)
    ds = MultimodalDataset({"q": shuffled["q"]}, labels=shuffled["y"], descriptions=shuffled["q"])
    for i in range(6):
        assert ds[i]["q"] == shuffled["q"].iloc[i] == ds.describe(i)
        assert ds.labels[i] == shuffled["y"].iloc[i]
    filtered = df[df.y == 1]                       # index labels 1, 3, 5: ds[0] is the first row
    assert MultimodalDataset({"q": filtered["q"]})[0]["q"] == "question 1"


@pytest.mark.parametrize("make, error, match", [
    (lambda: MultimodalDataset([{"q": "a"}]), TypeError, "column-wise"),
    (lambda: MultimodalDataset({"q": "what color"}), TypeError, "single string"),
    (lambda: MultimodalDataset({1: ["a"]}), TypeError, "names"),
    (lambda: MultimodalDataset({"q": 5}), TypeError, "sequence"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, labels=[[0], [1]]), ValueError, "ravel"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, labels=["yes", "no"]), TypeError, "class_names.index"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, labels=[0.5, 1.7]), ValueError, "whole numbers"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, labels=[0, None]), ValueError,
     r"no value \(None, NaN, pandas' NA or masked\) for 1 instance \(instance 1\).*at least "
     r"the number of classes"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, labels=[0, -1]), ValueError,
     r">= 0, got -1 for 1 instance \(instance 1\).*labels=None"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, labels=[0]), ValueError, "1 entries for 2"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, descriptions=["x"]), ValueError, "1 entries"),
    (lambda: MultimodalDataset({"q": ["a", "b"]}, descriptions="xy"), TypeError, "single string"),
    (lambda: MultimodalDataset({"q": ["a", "b"]})[1.5], TypeError, "integer"),
    (lambda: MultimodalDataset({"q": ["a", "b"]})[True], TypeError, "integer"),
    (lambda: MultimodalDataset({"q": ["a", "b"]})[2], IndexError, "out of range"),
    (lambda: list(MultimodalDataset({"q": ["a", "b"]}).batches(0)), ValueError, "batch_size"),
])
def test_bad_datasets_say_what_to_fix(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_missing_labels_are_named_and_told_how_to_mark_them():
    """None or NaN labels (a pandas column with gaps) were told to map names to indices, and -1
    to drop every label: the error names the instances and the README's way to mark a label
    unknown (C or more), which then opens: emap_gap, which cannot count them, says to pass the
    labelled instances."""
    pd = pytest.importorskip("pandas")
    qs = ["a", "b", "c", "d", "e", "f", "g"]
    gaps = pd.Series([0, 1, None, 1, None, None, 0], dtype="float64")
    with pytest.raises(ValueError, match=r"for 3 instances \(instances 2, 4 and 5\)"):
        MultimodalDataset({"q": qs}, labels=gaps)
    with pytest.raises(ValueError, match=r"for 7 instances \(instances 0, 1, 2, 3, 4, \.\.\.\)"):
        MultimodalDataset({"q": qs}, labels=[None] * 7)
    # pandas' nullable integers (NA), a float32 NaN among objects, a masked array's masked
    for labels, said in ((pd.Series([0, None, 1, 1, 0, 1, 0], dtype="Int64"), "instance 1"),
                         (list(pd.Series([0, None, 1, 1, 0, 1, 0], dtype="Int64")), "instance 1"),
                         ([0, 1, np.float32("nan"), 1, 0, 1, 0], "instance 2"),
                         (np.ma.masked_array([0, 1, 2, 1, 0, 1, 0], mask=[0, 0, 0, 1, 0, 0, 0]),
                          "instance 3")):
        with pytest.raises(ValueError, match=rf"no value .* for 1 instance \({said}\)"):
            MultimodalDataset({"q": qs}, labels=labels)
    ds = MultimodalDataset({"q": qs}, labels=gaps.fillna(2).astype(int))   # the advice, C = 2
    assert ds.labels.tolist() == [0, 1, 2, 1, 2, 2, 0]


def test_good_labels_and_indices_of_every_integer_kind():
    ds = MultimodalDataset({"q": ["a", "b", "c"]}, labels=np.array([0.0, 2.0, 1.0]))
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 2, 1]
    assert MultimodalDataset({"q": ["a", "b"]}, labels=torch.tensor([1, 0])).labels.tolist() == [1, 0]
    assert ds[np.int64(2)] == {"q": "c"} and ds[-1] == {"q": "c"}
    assert [list(i) for i, _ in ds.batches(2)] == [[0, 1], [2]]
