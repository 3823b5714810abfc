"""From FAN communities to K disjoint filter groups, one per student.

Two strategies:

``paper`` -- the prototype's rule (NONN.md section 2), kept faithful:
  1. pool every singleton community (an isolated filter) into one cluster;
  2. merge all communities of identical size into one cluster (one cluster per distinct size);
  3. sort the clusters by size, largest first (equal sizes: the one from smaller communities
     first, as the prototype's stable sort leaves them);
  4. DROP the largest cluster; its filters belong to no student;
  5. give the next K clusters one each to students 0..K-1;
  6. add every remaining cluster, in order, to the student with the fewest filters so far
     (lowest index on a tie).
  The prototype only ran K = 2; the same steps apply unchanged for any K, so with K > 2 the
  K largest clusters after the dropped one seed the students and the rest fill the smallest.
  Fewer than K + 1 clusters is an error (the prototype silently lowered K instead). Coverage
  is usually well below 1.

``balanced`` (default) -- every filter in exactly one of K groups. Communities are placed
  largest first, each into the group with the most room under the size cap; a community is
  split only where it does not fit whole (its filters ordered so that strongly connected
  filters stay together), and groups left under the lower bound then take filters from the
  largest groups, whole small pieces first. Group sizes end within `tolerance` (25%) of C/K,
  or at floor/ceil(C/K) where 25% is less than one filter.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = [
    "STRATEGIES",
    "balanced_bounds",
    "connectivity_order",
    "group_balanced",
    "group_paper",
    "make_groups",
]


def _check_num_students(num_students: int, num_filters: int) -> None:
    if isinstance(num_students, bool) or not isinstance(num_students, (int, np.integer)):
        raise ValueError(f"number of students must be an integer, got {num_students!r}")
    if num_students < 2:
        raise ValueError(f"number of students must be at least 2, got {num_students}")
    if num_students > num_filters:
        raise ValueError(
            f"number of students K={num_students} is larger than the {num_filters} filters "
            f"available; choose K between 2 and {num_filters}"
        )


def group_paper(communities: list[list[int]], num_students: int, **_: object) -> list[list[int]]:
    """The prototype's grouping rule (module docstring); some filters are left out."""
    num_filters = sum(len(c) for c in communities)
    _check_num_students(num_students, num_filters)
    by_size: dict[int, list[int]] = {}
    for community in communities:
        key = 1 if len(community) <= 1 else len(community)
        by_size.setdefault(key, []).extend(community)
    # One cluster per distinct community size, in ascending size order (np.unique in the
    # prototype), then a stable sort by cluster size, largest first.
    clusters = [by_size[size] for size in sorted(by_size)]
    clusters.sort(key=len, reverse=True)
    if len(clusters) - 1 < num_students:
        raise ValueError(
            f"the paper strategy found {len(clusters)} clusters (community sizes "
            f"{sorted({len(c) for c in communities}, reverse=True)}); after dropping the largest "
            f"it can feed at most {len(clusters) - 1} students, not K={num_students}. "
            "Use --strategy balanced, or lower --percentile / change --resolution"
        )
    groups = [list(clusters[1 + k]) for k in range(num_students)]
    for cluster in clusters[1 + num_students :]:
        smallest = min(range(num_students), key=lambda k: (len(groups[k]), k))
        groups[smallest].extend(cluster)
    return [sorted(g) for g in groups]


def balanced_bounds(num_filters: int, num_students: int, tolerance: float = 0.25) -> tuple[int, int]:
    """(min, max) group size: within `tolerance` of C/K, widened to floor/ceil(C/K) if needed."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"balance tolerance must be within [0, 1), got {tolerance}")
    ideal = num_filters / num_students
    lower = min(num_filters // num_students, math.ceil((1.0 - tolerance) * ideal - 1e-9))
    upper = max(-(-num_filters // num_students), math.floor((1.0 + tolerance) * ideal + 1e-9))
    return lower, upper


def connectivity_order(members: list[int], weights: np.ndarray | None) -> list[int]:
    """Order a community's filters so that each next one is the most strongly tied to those
    before it (maximum-adjacency order), starting from the filter with the largest total
    weight inside the community. A prefix of this order is a well-connected piece, so a split
    keeps strongly linked filters together. Without weights: ascending index."""
    if weights is None or len(members) <= 2:
        return sorted(members)
    idx = np.asarray(sorted(members))
    sub = weights[np.ix_(idx, idx)]
    strength = sub.sum(axis=1)
    first = int(np.argmax(strength))  # argmax: lowest index among ties
    order = [first]
    placed = np.zeros(len(idx), dtype=bool)
    placed[first] = True
    tie_to_placed = sub[first].copy()
    for _ in range(len(idx) - 1):
        candidates = np.where(placed, -np.inf, tie_to_placed)
        nxt = int(np.argmax(candidates))
        order.append(nxt)
        placed[nxt] = True
        tie_to_placed += sub[nxt]
    return [int(idx[i]) for i in order]


def group_balanced(
    communities: list[list[int]],
    num_students: int,
    weights: np.ndarray | None = None,
    tolerance: float = 0.25,
    **_: object,
) -> list[list[int]]:
    """Every filter in exactly one of K groups, sizes within `tolerance` of C/K (module docstring).

    weights: the (normalised) FAN, used only to decide which filters stay together when a
    community has to be split.
    """
    num_filters = sum(len(c) for c in communities)
    _check_num_students(num_students, num_filters)
    lower, upper = balanced_bounds(num_filters, num_students, tolerance)
    # pieces[k]: the community pieces in group k, each in connectivity order.
    pieces: list[list[list[int]]] = [[] for _ in range(num_students)]
    sizes = [0] * num_students
    ordered = sorted(communities, key=lambda c: (-len(c), min(c) if c else -1))
    for community in ordered:
        rest = connectivity_order(list(community), weights)
        while rest:
            target = max(range(num_students), key=lambda k: (upper - sizes[k], -k))
            room = upper - sizes[target]
            piece, rest = rest[:room], rest[room:]
            pieces[target].append(piece)
            sizes[target] += len(piece)
    # Raise groups under the lower bound with filters from the largest groups.
    while min(sizes) < lower:
        needy = min(range(num_students), key=lambda k: (sizes[k], k))
        donor = max(range(num_students), key=lambda k: (sizes[k], -k))
        count = min(lower - sizes[needy], sizes[donor] - lower)
        donor_pieces = pieces[donor]
        whole = [p for p in donor_pieces if len(p) <= count]
        if whole:  # move the largest whole piece that fits
            piece = max(whole, key=len)
            donor_pieces.remove(piece)
        else:  # cut the least connected tail off the smallest piece
            source = min(donor_pieces, key=len)
            piece = source[len(source) - count :]
            del source[len(source) - count :]
        pieces[needy].append(piece)
        sizes[needy] += len(piece)
        sizes[donor] -= len(piece)
    return [sorted(f for piece in group for f in piece) for group in pieces]


Strategy = Callable[..., list[list[int]]]
STRATEGIES: dict[str, Strategy] = {"balanced": group_balanced, "paper": group_paper}


def make_groups(
    strategy: str,
    communities: list[list[int]],
    num_students: int,
    weights: np.ndarray | None = None,
    tolerance: float = 0.25,
) -> list[list[int]]:
    """Apply a named grouping strategy ("balanced" or "paper")."""
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown grouping strategy {strategy!r}; expected one of {sorted(STRATEGIES)}"
        ) from None
    return fn(communities, num_students, weights=weights, tolerance=tolerance)
