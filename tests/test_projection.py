"""project_3d (kernels/projection.py): the exact PCA, its contract, and the bounded-memory
chunked and approximate (many features) paths."""
import numpy as np
import pytest

from multiviz_widgets.kernels import projection
from multiviz_widgets.kernels.projection import project_3d


def features(n=5000, d=16, seed=0, dtype=np.float64):
    """Rows with a clear spectrum (distinct leading axes) and an offset."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    return (rng.normal(size=(n, d)) @ a + 5).astype(dtype)


def reference(h, dims=3):
    """sklearn's exact PCA with project_3d's sign rule and one shared scale."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    pca = decomposition.PCA(dims, svd_solver="full").fit(np.asarray(h, dtype=np.float64))
    axes = pca.components_
    signs = np.sign(axes[np.arange(dims), np.abs(axes).argmax(1)])
    ref = pca.transform(np.asarray(h, dtype=np.float64)) * signs
    return ref / np.abs(ref).max()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_project_3d_is_the_exact_pca_above_the_old_subsample_size(dtype):
    h = features(5000, 16, dtype=dtype)          # more rows than the old 4,096-row subsample
    p = project_3d(h)
    assert p.dtype == np.float32 and p.shape == (5000, 3)
    assert np.abs(p).max() == pytest.approx(1.0)
    np.testing.assert_allclose(p, reference(h), atol=1e-6)      # signs included
    for dims in (1, 2):
        np.testing.assert_allclose(project_3d(h, dims=dims), reference(h, dims), atol=1e-6)


def test_project_3d_is_deterministic_and_leaves_its_input_alone():
    h = features(5000, 16, seed=1)
    kept = h.copy()
    p = project_3d(h)
    np.testing.assert_array_equal(p, project_3d(h))
    np.testing.assert_array_equal(p, project_3d(h.copy()))
    np.testing.assert_array_equal(h, kept)
    # every axis' largest loading is positive, whatever the order or sign of the rows
    np.testing.assert_allclose(project_3d(-h[::-1])[::-1], -p, atol=1e-6)
    np.testing.assert_allclose(project_3d(h[::-1])[::-1], p, atol=1e-6)


def test_project_3d_accumulates_in_chunks_with_the_same_result(monkeypatch):
    h = features(3000, 16, seed=2, dtype=np.float32)
    whole = project_3d(h)
    monkeypatch.setattr(projection, "_CHUNK_VALUES", 16 * 700)   # 5 chunks of rows
    chunked = project_3d(h)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(chunked, reference(h), atol=1e-6)
    bad = h.copy()
    bad[[5, 2500], 3] = np.nan                           # rows in two different chunks
    with pytest.raises(ValueError, match=r"2 row\(s\), e.g. rows \[5, 2500\]"):
        project_3d(bad)
    huge = project_3d([[1e308, 0], [1e308, 1], [-1e308, 2]])
    assert np.isfinite(huge).all() and np.abs(huge).max() == pytest.approx(1.0)


def test_project_3d_pads_axes_the_data_do_not_span_with_zeros():
    rng = np.random.default_rng(3)
    two = project_3d(rng.normal(size=(2, 5)))            # two points span one axis
    assert np.abs(two[:, 0]).max() == pytest.approx(1.0) and (two[:, 1:] == 0).all()
    flat = project_3d(rng.normal(size=(40, 2)))          # two features: a zero third axis
    assert (flat[:, 2] == 0).all() and (flat[:, :2] != 0).any(0).all()
    line = np.outer(rng.normal(size=30), rng.normal(size=4)) + 7    # rank one
    p = project_3d(line)
    assert np.abs(p[:, 0]).max() == pytest.approx(1.0) and (p[:, 1:] == 0).all()
    assert (project_3d(np.full((10, 4), 3.0)) == 0).all()
    assert project_3d(np.zeros((0, 4))).shape == (0, 3)
    assert (project_3d(np.zeros((5, 0))) == 0).all() and project_3d(np.ones((1, 2))).shape == (1, 3)
    # tiny spreads do not underflow: the rows are scaled before the covariance
    tiny = np.column_stack([np.ones(50), rng.normal(size=(50, 2)) * 1e-200])
    # (the first feature is constant: scaling the others alike scales the centred rows)
    same = reference(tiny * np.array([1.0, 1e200, 1e200]))[:, :2]
    np.testing.assert_allclose(project_3d(tiny)[:, :2], same, atol=1e-6)


def test_project_3d_fits_a_sample_only_above_the_exact_feature_limit(monkeypatch):
    h = features(5000, 16, seed=4)
    exact = project_3d(h)
    monkeypatch.setattr(projection, "EXACT_MAX_FEATURES", 8)    # 16 features: approximate
    approx = project_3d(h)
    np.testing.assert_array_equal(approx, project_3d(h.copy()))   # seeded sample
    assert approx.dtype == np.float32 and np.abs(approx).max() == pytest.approx(1.0)
    for k in range(3):                                   # a clear spectrum: close to exact
        assert abs(np.corrcoef(approx[:, k], exact[:, k])[0, 1]) > 0.99
    # with no more rows than the sample, the thin SVD of all rows is exact again
    small = h[:4000]
    np.testing.assert_allclose(project_3d(small), reference(small), atol=1e-6)
