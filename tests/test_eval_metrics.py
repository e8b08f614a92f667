"""Vendi score and Frechet distance against their definitions."""

import numpy as np
import pytest

from dollar_jax.eval.diversity import frechet_distance, mean_vendi, vendi_score


def reference_vendi(x):
    """exp(entropy) of the eigenvalues of K/n, computed from the singular values of the normalised features."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.linalg.svd(x / np.sqrt(len(x)), compute_uv=False) ** 2
    s = s[s > 1e-12]
    return float(np.exp(-(s * np.log(s)).sum()))


def test_vendi_limits_and_reference():
    assert vendi_score(np.ones((5, 3))) == pytest.approx(1.0)
    assert vendi_score(np.eye(6)) == pytest.approx(6.0)
    two_clusters = np.concatenate([np.tile([1.0, 0, 0], (4, 1)), np.tile([0, 2.0, 0], (4, 1))])
    assert vendi_score(two_clusters) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((12, 7))
        assert vendi_score(x) == pytest.approx(reference_vendi(x), rel=1e-9)


def test_mean_vendi_groups():
    x = np.concatenate([np.ones((3, 2)), np.eye(3, 2) + 0.0])
    x[3:] = [[1, 0], [0, 1], [1, 0]]
    groups = np.asarray([0, 0, 0, 1, 1, 1])
    assert mean_vendi(x, groups) == pytest.approx((1.0 + vendi_score(x[3:])) / 2)


def test_frechet_distance():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.asarray([2.0, 0.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-3)
    scaled = rng.standard_normal((4000, 3)) * 2.0
    # Var 1 vs var 4 per dim: trace term 3 * (1 + 4 - 2 * 2) = 3 (up to sampling error).
    assert frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.1)
