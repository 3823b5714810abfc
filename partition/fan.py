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

# Pair weights formed per block in `build_fan` (at least; see `_block_images`): small enough
# for the buffers to stay in cache, large enough that per-block overheads do not matter.
PAIRS_PER_BLOCK = 1 << 19


def _check_activation_array(activations: np.ndarray) -> np.ndarray:
    """Shape and dtype checks for an (images x filters) array, without copying it."""
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
    return a


def _as_finite_float64(block: np.ndarray) -> np.ndarray:
    a = block.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"activations contain {bad} non-finite values (NaN or inf)")
    return a


def validate_activations(activations: np.ndarray) -> np.ndarray:
    """Check an (images x filters) activation matrix; return it as float64.

    Raises ValueError for a wrong rank, no images, no filters, or non-finite values.
    """
    return _as_finite_float64(_check_activation_array(activations))


def _check_top_k(top_k: int, num_filters: int) -> int:
    """The effective k: at least 1, and at most the number of filters."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return int(min(top_k, num_filters))


def _relu_max_normalise(a: np.ndarray) -> np.ndarray:
    a = np.maximum(a, 0.0)
    row_max = a.max(axis=1, keepdims=True)
    return np.divide(a, row_max, out=np.zeros_like(a), where=row_max > 0)


def normalize_activations(activations: np.ndarray) -> np.ndarray:
    """ReLU, then divide each image's row by its maximum; all-zero rows stay zero."""
    return _relu_max_normalise(validate_activations(activations))


def top_k_mask(values: np.ndarray, top_k: int) -> np.ndarray:
    """Boolean mask of each row's k largest entries (ties: lower column index wins).

    Exactly k entries per row are selected. Vectorised: the k-th largest value comes from
    np.partition and entries at or above it are in; only rows where that picks more than k
    (ties at the k-th value) go through the exact tie rule: among entries equal to the k-th
    value, the lowest-indexed ones fill the remaining places.
    """
    n, c = values.shape
    k = _check_top_k(top_k, c)
    if k == c:
        return np.ones((n, c), dtype=bool)
    kth = np.partition(values, c - k, axis=1)[:, c - k : c - k + 1]
    mask = values >= kth
    tied = np.flatnonzero(mask.sum(axis=1) != k)
    if tied.size:
        vals, kth_tied = values[tied], kth[tied]
        equal = vals == kth_tied
        places_left = k - (vals > kth_tied).sum(axis=1, keepdims=True)
        mask[tied] = (vals > kth_tied) | (equal & (np.cumsum(equal, axis=1) <= places_left))
    return mask


def _block_images(num_filters: int, top_k: int) -> int:
    """Images per block: about PAIRS_PER_BLOCK pairs, or C*C when the matrix is larger (so the
    per-block np.bincount of length C*C stays a small share of the work)."""
    pairs_per_image = max(1, top_k * (top_k - 1) // 2)
    return max(1, max(PAIRS_PER_BLOCK, num_filters * num_filters) // pairs_per_image)


def build_fan(
    activations: np.ndarray, top_k: int = 50, chunk_images: int | None = None
) -> np.ndarray:
    """The FAN of NONN.md section 1, vectorised over images and pairs.

    activations: (images, filters) spatial means of the final conv layer (any real dtype).
    top_k: filters kept per image (clamped to the number of filters).
    chunk_images: images per block (default: sized so the pair buffers stay small).
    Returns a (filters, filters) float64 matrix, symmetric with a zero diagonal.

    Per block of images: normalise, select each image's top-k filters (see `top_k_mask`;
    their indices ascending), then for each rank r form the weights of the pairs (r, s > r)
    for all images of the block at once, into one flat buffer, and accumulate the whole block
    into W with a single np.bincount on the flattened (i, j) indices. The only Python loop is
    over blocks and the k - 1 ranks; memory is bounded by the block, not the data set.
    """
    a = _check_activation_array(activations)
    n, c = a.shape
    k = _check_top_k(top_k, c)
    if chunk_images is None:
        chunk_images = _block_images(c, k)
    if chunk_images < 1:
        raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
    fan_flat = np.zeros(c * c, dtype=np.float64)
    pairs_per_image = k * (k - 1) // 2
    block = min(chunk_images, n)
    weight_buf = np.empty(block * pairs_per_image, dtype=np.float64)
    index_buf = np.empty(block * pairs_per_image, dtype=np.intp)  # np.bincount's own index type
    for start in range(0, n, block):
        norm = _relu_max_normalise(_as_finite_float64(a[start : start + block]))
        if k < 2:
            continue
        rows = norm.shape[0]
        # Exactly k selected per row; flatnonzero walks rows in order, columns ascending, so
        # every pair (rank r < rank s) below has filter i < j: it lands in the upper triangle.
        flat = np.flatnonzero(top_k_mask(norm, k)).reshape(rows, k)
        vals = np.ascontiguousarray(norm.ravel()[flat].T)  # (k, rows): one rank per row
        cols = np.ascontiguousarray((flat - np.arange(rows)[:, None] * c).T)
        row_offsets = cols * c
        pos = 0
        for r in range(k - 1):
            size = (k - 1 - r) * rows
            first, later = vals[r], vals[r + 1 :]
            weights = weight_buf[pos : pos + size].reshape(k - 1 - r, rows)
            np.subtract(first, later, out=weights)  # a_i * a_j * |a_i - a_j|
            np.abs(weights, out=weights)
            weights *= first
            weights *= later
            np.add(row_offsets[r], cols[r + 1 :], out=index_buf[pos : pos + size].reshape(k - 1 - r, rows))
            pos += size
        fan_flat += np.bincount(index_buf[:pos], weights=weight_buf[:pos], minlength=c * c)
    fan = fan_flat.reshape(c, c)
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
