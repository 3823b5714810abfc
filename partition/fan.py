"""The Filter Activation Network (FAN): which final-layer filters fire strongly together.

Given an (images x filters) matrix of spatially averaged activations, every image contributes,
for each pair (i, j) of its top-k filters, ``a_i * a_j * |a_i - a_j|`` to ``W[i, j]`` and
``W[j, i]``, where ``a`` is the image's activation vector after ReLU and division by its
maximum (NONN.md section 1). The result is a C x C float64 matrix, symmetric, zero diagonal.

`build_fan` is the vectorised implementation; `build_fan_reference` is the straightforward
per-image loop it is tested against (same maths, same tie rule, O(images * k^2) interpreter
steps).

Tie rule for the top-k: filters are ranked by normalised activation, larger first, and equal
activations by lower filter index first (a stable descending sort). Both implementations use
it, so their outputs agree whatever the data.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "build_fan",
    "build_fan_reference",
    "normalize_activations",
    "top_k_mask",
    "validate_activations",
    "validate_fan",
]

# Pair weights formed per chunk in `build_fan` (at least; see `_chunk_images`). Small enough
# for the buffers to stay in cache (2 MB of float64), which is faster than big chunks.
PAIRS_PER_CHUNK = 1 << 18


def validate_activations(activations: np.ndarray) -> np.ndarray:
    """Check an (images x filters) activation matrix; return it as float64.

    Raises ValueError for a wrong rank, no images, no filters, or non-finite values.
    """
    a = np.asarray(activations)
    if a.ndim != 2:
        raise ValueError(
            f"activations must be a 2-D (images x filters) array, got shape {tuple(a.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError("activations hold no images (shape has 0 rows); the data set is empty")
    if a.shape[1] == 0:
        raise ValueError("activations hold no filters (shape has 0 columns)")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"activations must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"activations contain {bad} non-finite values (NaN or inf)")
    return a


def _check_top_k(top_k: int, num_filters: int) -> int:
    """The effective k: at least 1, and at most the number of filters."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return int(min(top_k, num_filters))


def normalize_activations(activations: np.ndarray) -> np.ndarray:
    """ReLU, then divide each image's row by its maximum; all-zero rows stay zero."""
    a = np.maximum(validate_activations(activations), 0.0)
    row_max = a.max(axis=1, keepdims=True)
    return np.divide(a, row_max, out=np.zeros_like(a), where=row_max > 0)


def top_k_mask(values: np.ndarray, top_k: int) -> np.ndarray:
    """Boolean mask of each row's k largest entries (ties: lower column index wins).

    Exactly k entries per row are selected. Vectorised: the k-th largest value comes from
    np.partition; entries above it are in, and among entries equal to it the lowest-indexed
    ones fill the remaining places.
    """
    n, c = values.shape
    k = _check_top_k(top_k, c)
    if k == c:
        return np.ones((n, c), dtype=bool)
    kth = np.partition(values, c - k, axis=1)[:, c - k : c - k + 1]
    above = values > kth
    equal = values == kth
    places_left = k - above.sum(axis=1, keepdims=True)
    return above | (equal & (np.cumsum(equal, axis=1) <= places_left))


def _chunk_images(num_filters: int, top_k: int) -> int:
    """Images per chunk: about PAIRS_PER_CHUNK pairs, or C*C when the matrix is larger (so the
    per-chunk np.bincount of length C*C stays a small share of the work)."""
    pairs_per_image = max(1, top_k * (top_k - 1) // 2)
    return max(1, max(PAIRS_PER_CHUNK, num_filters * num_filters) // pairs_per_image)


def build_fan(
    activations: np.ndarray, top_k: int = 50, chunk_images: int | None = None
) -> np.ndarray:
    """The FAN of NONN.md section 1, vectorised over images and pairs.

    activations: (images, filters) spatial means of the final conv layer (any real dtype).
    top_k: filters kept per image (clamped to the number of filters).
    chunk_images: images per chunk (default: sized so the pair buffers stay small).
    Returns a (filters, filters) float64 matrix, symmetric with a zero diagonal.

    Per chunk of images: select each image's top-k filters (see `top_k_mask`), form all
    k(k-1)/2 pair weights at once, and accumulate them into W with one np.bincount on the
    flattened (i, j) indices. Memory is bounded by the chunk, not the data set.
    """
    a = validate_activations(activations)
    n, c = a.shape
    k = _check_top_k(top_k, c)
    if chunk_images is None:
        chunk_images = _chunk_images(c, k)
    if chunk_images < 1:
        raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
    fan_flat = np.zeros(c * c, dtype=np.float64)
    if k < 2:
        return fan_flat.reshape(c, c)
    pair_r, pair_s = np.triu_indices(k, 1)
    index_dtype = np.int32 if c * c < 2**31 else np.int64
    for start in range(0, n, chunk_images):
        norm = normalize_activations(a[start : start + chunk_images])
        mask = top_k_mask(norm, k)
        # Exactly k selected per row; nonzero() walks rows in order, columns ascending.
        cols = np.nonzero(mask)[1].reshape(-1, k).astype(index_dtype)
        vals = np.take_along_axis(norm, cols, axis=1)
        v_r, v_s = vals[:, pair_r], vals[:, pair_s]
        weights = np.subtract(v_r, v_s)  # a_i * a_j * |a_i - a_j|, in place
        np.abs(weights, out=weights)
        weights *= v_r
        weights *= v_s
        flat_index = (cols * c)[:, pair_r]
        flat_index += cols[:, pair_s]
        fan_flat += np.bincount(flat_index.ravel(), weights=weights.ravel(), minlength=c * c)
    fan = fan_flat.reshape(c, c)
    # Each pair was counted once with i < j (cols ascending); mirror it.
    return fan + fan.T


def build_fan_reference(activations: np.ndarray, top_k: int = 50) -> np.ndarray:
    """The FAN by a plain per-image, per-pair Python loop: the definition `build_fan` must match.

    For each image: ReLU; divide by the maximum (skip an all-zero image, it adds nothing);
    rank filters by value, larger first, ties by lower index; for every pair (j, l) among the
    first k, add a_j * a_l * |a_j - a_l| to W[j, l] and W[l, j]. This is the authors' algorithm
    (NONN.md section 1) with a deterministic tie rule.
    """
    a = validate_activations(activations)
    n, c = a.shape
    k = _check_top_k(top_k, c)
    fan = np.zeros((c, c), dtype=np.float64)
    for image in range(n):
        act = np.maximum(a[image], 0.0)
        peak = act.max()
        if peak <= 0:
            continue
        act = act / peak
        order = np.argsort(-act, kind="stable")[:k]
        top_vals = act[order]
        for j in range(k):
            for l in range(j + 1, k):
                weight = top_vals[j] * top_vals[l] * abs(top_vals[j] - top_vals[l])
                fan[order[j], order[l]] += weight
                fan[order[l], order[j]] += weight
    return fan


def validate_fan(fan: np.ndarray, *, rtol: float = 1e-6, atol: float = 1e-12) -> np.ndarray:
    """Check a FAN matrix and return it as float64 with a zero diagonal.

    A FAN must be a square 2-D array of finite, non-negative numbers, symmetric up to rtol
    (relative to its largest entry). The diagonal carries no information (a filter is never
    paired with itself) and is set to zero.
    """
    w = np.asarray(fan)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"FAN must be a square 2-D (filters x filters) matrix, got shape {tuple(w.shape)}")
    if w.shape[0] < 2:
        raise ValueError(f"FAN must have at least 2 filters, got shape {tuple(w.shape)}")
    if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
        raise ValueError(f"FAN must be a real numeric matrix, got dtype {w.dtype}")
    w = w.astype(np.float64, copy=True)
    if not np.isfinite(w).all():
        raise ValueError(f"FAN contains {int((~np.isfinite(w)).sum())} non-finite values (NaN or inf)")
    if (w < 0).any():
        raise ValueError(f"FAN weights must be non-negative; found minimum {w.min():g}")
    scale = float(np.abs(w).max())
    asym = float(np.abs(w - w.T).max())
    if asym > atol + rtol * scale:
        raise ValueError(
            f"FAN must be symmetric: max |W - W^T| = {asym:g} (largest weight {scale:g})"
        )
    np.fill_diagonal(w, 0.0)
    return (w + w.T) / 2.0
