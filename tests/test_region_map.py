"""The plane map's geometry against a brute-force oracle: the cells of an arrangement of
random lines in the unit square, each known by its sign vector (which side of every line)."""

from __future__ import annotations

import numpy as np

from frontend.figures import region_map
from frontend.figures.images import as_image


def _clip(poly: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """The part of a convex polygon where ``w . p + c >= 0`` (Sutherland-Hodgman)."""
    out = []
    for p, q in zip(poly, np.roll(poly, -1, 0), strict=True):
        fp, fq = w @ p + c, w @ q + c
        if fp >= 0:
            out.append(p)
        if fp * fq < 0:
            out.append(p + fp / (fp - fq) * (q - p))
    return np.asarray(out)


def _arrangement(n_lines: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lines = rng.normal(size=(n_lines, 2))
    offsets = -(lines @ rng.uniform(0.2, 0.8, size=(2, n_lines))).diagonal()
    cells = [(np.array([[0.0, 0], [1, 0], [1, 1], [0, 1]]), ())]
    for w, c in zip(lines, offsets, strict=True):
        nxt = []
        for poly, signs in cells:
            for s in (1, -1):
                part = _clip(poly, s * w, s * c)
                if len(part) >= 3 and region_map_area(part) > 1e-12:
                    nxt.append((part, signs + (s,)))
        cells = nxt
    return [p for p, _ in cells], np.array([s for _, s in cells]), np.c_[lines, offsets]


def region_map_area(p: np.ndarray) -> float:
    return 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1)))


def test_locate_matches_sign_vectors() -> None:
    polygons, signs, lines = _arrangement(12, seed=0)
    assert abs(sum(map(region_map_area, polygons)) - 1.0) < 1e-9
    pts = np.random.default_rng(1).uniform(size=(5000, 2))
    values = pts @ lines[:, :2].T + lines[:, 2]
    clear = (np.abs(values) > 1e-9).all(1)
    owner = region_map.locate(polygons, pts[clear])
    assert (owner >= 0).all()
    assert np.array_equal(signs[owner], np.sign(values[clear]).astype(int))
    assert (region_map.locate(polygons, np.array([[1.5, 0.5], [-0.1, 0.2]])) == -1).all()


def test_neighbours_cross_one_line_and_colours_differ() -> None:
    polygons, signs, _ = _arrangement(10, seed=2)
    starts, ends, owner, across = region_map.neighbours(polygons)
    inner = across >= 0
    assert inner.any() and (~inner).any()  # inner edges and the square's outline
    assert ((signs[owner[inner]] != signs[across[inner]]).sum(1) == 1).all()
    outline = 0.5 * (starts + ends)[~inner]
    assert (np.minimum(outline, 1 - outline).min(1) < 1e-9).all()
    ids = np.arange(len(polygons))
    colour = region_map.colour_regions(ids, owner, across, colours=12)
    assert (colour[owner[inner]] != colour[across[inner]]).all()


def test_raster_pixels_take_their_polygon() -> None:
    polygons, _, _ = _arrangement(6, seed=3)
    grid = region_map.raster(polygons, size=40)
    a, b = np.meshgrid(grid.a, grid.b)
    assert np.array_equal(grid.owner.ravel(),
                          region_map.locate(polygons, np.c_[a.ravel(), b.ravel()]))
    assert (grid.owner >= 0).all()


def test_as_image_reduces_channels_one_way() -> None:
    x = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3)
    assert np.array_equal(as_image(x), x.mean(0))
    assert np.array_equal(as_image(x, how="sum"), x.sum(0))
    assert as_image(np.ones(784), (784, 1)).shape == (28, 28)
    assert as_image(np.ones(5)).shape == (1, 5)
