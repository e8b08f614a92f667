"""Diversity and distribution distance: the Vendi score and a Frechet distance on features.

Vendi score (Friedman & Dieng, 2023): for n samples with a similarity kernel K (K_ii = 1), the exponential of
the Shannon entropy of the eigenvalues of K / n. It is 1 when all samples are identical and n when they
are mutually orthogonal: "the effective number of distinct samples". Here K is the cosine similarity of
feature vectors (pixels, or a trained encoder's features, the paper's two columns).

Frechet distance: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) between Gaussians fitted to two
feature sets (FID/FVD's formula on this world's encoder features).
"""

from __future__ import annotations

import numpy as np


def vendi_score(features: np.ndarray) -> float:
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    k = x @ x.T
    eig = np.linalg.eigvalsh(k / len(x))
    eig = eig[eig > 1e-12]
    return float(np.exp(-np.sum(eig * np.log(eig))))


def mean_vendi(features: np.ndarray, groups: np.ndarray) -> float:
    """The Vendi score within each group (samples of one prompt), averaged over groups."""
    groups = np.asarray(groups)
    return float(np.mean([vendi_score(features[groups == g]) for g in np.unique(groups)]))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2.0 * covmean))
