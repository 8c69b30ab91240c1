"""Colour encodings shared by the views (no analysis: values in, pixels out)."""
from __future__ import annotations

import io

import numpy as np


def diverging(values: np.ndarray, limit: float | None = None) -> np.ndarray:
    """RGB uint8 [..., 3] for values: blue (negative), white (0), red (positive)."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, 0.0)
    lim = float(np.abs(v).max()) if limit is None else float(limit)
    t = np.clip(v / lim, -1.0, 1.0) if lim > 0 else np.zeros_like(v)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    r = np.where(t >= 0, 1.0 - 0.15 * pos, 1.0 - 0.85 * neg)
    g = np.where(t >= 0, 1.0 - 0.85 * pos, 1.0 - 0.55 * neg)
    b = np.where(t >= 0, 1.0 - 0.85 * pos, 1.0 - 0.05 * neg)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def png(rgb: np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of an RGB uint8 array [H, W, 3], scaled (nearest) so its long side is ``size``."""
    h, w = rgb.shape[:2]
    if not size:
        return _png_of(rgb, None)
    s = size / max(h, w)
    return _png_of(rgb, (max(1, round(w * s)), max(1, round(h * s))))


def _png_of(rgb: np.ndarray, to: tuple[int, int] | None) -> bytes:
    """PNG bytes of an RGB uint8 array, resized (nearest) to ``to`` = (width, height) if given."""
    from PIL import Image as PILImage

    img = PILImage.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if to is not None:
        img = img.resize(to, PILImage.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _cells(grid: np.ndarray) -> np.ndarray:
    """RGB [rows, cols, 3] of values [rows, cols]: diverging colours, light grey where NaN."""
    rgb = diverging(np.nan_to_num(grid))
    rgb[np.isnan(grid)] = 230
    return rgb


def image_overlay(chw: np.ndarray, heat: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """An image [C, H, W] (values in [0, 1] or any range) under a diverging heatmap [H, W]."""
    x = np.asarray(chw, dtype=np.float64)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, 0)
    x = x[:3]
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    base = x.transpose(1, 2, 0)
    h = np.asarray(heat, dtype=np.float64)
    lim = float(np.abs(h).max()) if h.size else 0.0
    col = diverging(h, lim).astype(np.float64) / 255.0
    a = alpha * (np.abs(h) / lim if lim > 0 else np.zeros_like(h))[..., None]
    out = base * (1 - a) + col * a
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def strip(values: np.ndarray, rows: int = 1) -> np.ndarray:
    """Per-unit values as a grid of coloured cells [rows, n/rows, 3] (row-major)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    cols = int(np.ceil(len(v) / max(1, rows))) if len(v) else 1
    pad = np.full(rows * cols, np.nan)
    pad[:len(v)] = v
    return _cells(pad.reshape(rows, cols))


#: A strip thumbnail's rows are at least this many pixels tall (a series of 2,000 windows drawn
#: with square cells in 96 px was 1 px tall)
MIN_STRIP_ROW_PX = 6


def pooled_columns(grid: np.ndarray, most: int) -> np.ndarray:
    """``grid`` [rows, n] with its columns pooled into at most ``most`` bins of neighbours,
    each bin the value of largest magnitude in it (its sign kept): one strong unit among
    thousands still shows (every k-th column, as a nearest-neighbour resize takes, missed a
    single strong window). NaN (no value) only where a whole bin is."""
    g = np.asarray(grid, dtype=np.float64)
    rows, n = g.shape
    if n <= most:
        return g
    edges = np.linspace(0, n, most + 1).round().astype(int)
    out = np.full((rows, most), np.nan)
    for b in range(most):
        part = g[:, edges[b]:edges[b + 1]]
        mag = np.where(np.isfinite(part), np.abs(part), -1.0)
        k = mag.argmax(1)
        pick = part[np.arange(rows), k]
        out[:, b] = np.where(mag.max(1) >= 0, pick, np.nan)
    return out


def strip_png(grid: np.ndarray, size: int) -> bytes:
    """PNG bytes of per-unit values [rows, n] as coloured cells: at most ``size`` columns
    (``pooled_columns``), ``size`` px wide at most, square cells where they fit and rows at
    least MIN_STRIP_ROW_PX tall (at most ``size`` px in all)."""
    most = max(1, int(size))
    g = pooled_columns(np.atleast_2d(np.asarray(grid, dtype=np.float64)), most)
    if g.shape[0] > most // MIN_STRIP_ROW_PX:        # more rows than fit: pooled the same way
        g = pooled_columns(g.T, max(1, most // MIN_STRIP_ROW_PX)).T
    rows, cols = g.shape
    cell = max(1, most // max(rows, cols))           # square cells, the long side in size
    row_px = max(cell, MIN_STRIP_ROW_PX)
    return _png_of(_cells(g), (cols * cell, max(1, min(most, rows * row_px))))
