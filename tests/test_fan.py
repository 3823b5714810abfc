"""The Filter Activation Network: vectorised build_fan against the per-image loop."""

import numpy as np
import pytest

from nonn.cli import main
from nonn.partition.fan import (
    build_fan,
    build_fan_reference,
    normalize_activations,
    top_k_mask,
    validate_fan,
)


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def test_hand_computed_single_image():
    # ReLU -> [2, 1, 0, 0.5]; / max -> [1, .5, 0, .25]; top-2 = filters 0 and 1.
    fan = build_fan(np.array([[2.0, 1.0, -3.0, 0.5]]), top_k=2)
    want = np.zeros((4, 4))
    want[0, 1] = want[1, 0] = 1.0 * 0.5 * 0.5
    np.testing.assert_allclose(fan, want, rtol=0, atol=1e-15)
    # top-3 adds the pairs with filter 3: (0,3): 1*.25*.75, (1,3): .5*.25*.25
    fan3 = build_fan(np.array([[2.0, 1.0, -3.0, 0.5]]), top_k=3)
    assert fan3[0, 3] == pytest.approx(0.1875) and fan3[3, 1] == pytest.approx(0.03125)
    assert fan3[2].sum() == 0


@pytest.mark.parametrize(
    "images,filters,top_k,chunk",
    [(400, 64, 10, None), (257, 32, 32, 16), (50, 40, 100, 7), (300, 48, 1, None), (128, 16, 2, 1)],
)
def test_matches_reference_loop(images, filters, top_k, chunk):
    rng = np.random.default_rng(images + filters)
    acts = rng.normal(size=(images, filters))
    acts[::17] = 0.0  # all-zero images: guarded, contribute nothing
    acts[5] = -1.0  # all negative: zero after ReLU
    fan = build_fan(acts, top_k=top_k, chunk_images=chunk)
    ref = build_fan_reference(acts, top_k=top_k)
    if top_k < 2:
        assert not fan.any() and not ref.any()
    else:
        assert max_rel_error(fan, ref) <= 1e-9
    np.testing.assert_array_equal(fan, fan.T)
    assert not np.diag(fan).any() and (fan >= 0).all()


def test_ties_follow_the_documented_rule():
    # Quantised activations: many exact ties at the k-th place, decided by lower index.
    rng = np.random.default_rng(3)
    acts = rng.integers(0, 4, size=(300, 24)).astype(np.float32)
    fan = build_fan(acts, top_k=7)
    assert max_rel_error(fan, build_fan_reference(acts, top_k=7)) <= 1e-9
    mask = top_k_mask(np.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), 2)
    assert mask.tolist() == [[False, True, True, False, False]]
    assert top_k_mask(np.array([[0.0, 0.0, 0.0]]), 2).tolist() == [[True, True, False]]


def test_normalisation_guards_zero_rows():
    norm = normalize_activations(np.array([[0.0, 0.0], [-1.0, 4.0], [2.0, 1.0]]))
    np.testing.assert_array_equal(norm, [[0.0, 0.0], [0.0, 1.0], [1.0, 0.5]])


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.ones(5), "2-D"),
        (np.ones((0, 5)), "no images"),
        (np.array([[1.0, np.nan]]), "non-finite"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_activations(bad, match):
    with pytest.raises(ValueError, match=match):
        build_fan(bad)


def test_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        build_fan(np.ones((3, 4)), top_k=0)


def test_validate_fan_errors():
    good = build_fan(np.random.default_rng(0).random((50, 8)), top_k=4)
    np.testing.assert_array_equal(validate_fan(good), good)
    with pytest.raises(ValueError, match="square"):
        validate_fan(np.ones((3, 4)))
    asym = good.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        validate_fan(asym)
    nan = good.copy()
    nan[2, 3] = nan[3, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        validate_fan(nan)
    neg = good.copy()
    neg[2, 3] = neg[3, 2] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        validate_fan(neg)


def test_cli_fan(tmp_path, capsys):
    acts = np.maximum(np.random.default_rng(1).normal(size=(120, 20)), 0).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    out = tmp_path / "fan.npy"
    assert main(["fan", "--activations", str(tmp_path / "acts.npy"), "--top-k", "6", "--out", str(out)]) == 0
    fan = np.load(out)
    assert fan.dtype == np.float64 and fan.shape == (20, 20)
    assert max_rel_error(fan, build_fan_reference(acts, 6)) <= 1e-9
    # A bad input is a clear error, exit status 2, and no file written.
    np.save(tmp_path / "flat.npy", np.ones(7))
    bad_out = tmp_path / "bad_fan.npy"
    assert main(["fan", "--activations", str(tmp_path / "flat.npy"), "--out", str(bad_out)]) == 2
    assert "2-D" in capsys.readouterr().err and not bad_out.exists()
    assert main(["fan", "--activations", str(tmp_path / "missing.npy"), "--out", str(bad_out)]) == 2
    assert "missing.npy" in capsys.readouterr().err
