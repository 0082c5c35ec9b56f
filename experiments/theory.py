"""The objects of the two theorems as the notebook states them (sections 3 and 4): union-of-subspaces data with
Theorem 1's weights W^Q* = W^K* = sqrt(beta) F, single-head softmax attention, and Theorem 2's class diameters.
The notebook and the tests build on these."""

import torch
import torch.nn.functional as F


def union_of_subspaces(sizes, dim, sub_dim, gamma=0.5, seed=0):
    """Theorem 1 data: class k lies in a random sub_dim-dimensional subspace U_k = span(B_k)
    of R^dim, on the positive side of f_k(B_k a) = c_k . a >= gamma (assumption b).
    Returns X (n, dim), labels (n,) and F (dim, K), whose column k extends f_k by 0 on the other
    subspaces, so F^T x has only its own class's coordinate nonzero. float64 throughout."""
    g = torch.Generator().manual_seed(seed)
    K, f64 = len(sizes), torch.float64
    B = torch.randn(dim, K * sub_dim, generator=g, dtype=f64)  # [B_1 ... B_K], independent a.s.
    c = F.normalize(torch.randn(K, sub_dim, generator=g, dtype=f64), dim=1)  # (K, sub_dim)
    P = torch.linalg.pinv(B)  # (K sub_dim, dim): coordinates a = B^+ x
    X, labels = [], []
    for k, n in enumerate(sizes):
        a = torch.randn(n, sub_dim, generator=g, dtype=f64)
        a = a * torch.sign(a @ c[k])[:, None] + gamma * c[k]  # flip to c.a >= 0, then add the margin
        X.append(a @ B[:, k * sub_dim : (k + 1) * sub_dim].T)
        labels += [k] * n
    Fm = torch.stack([P[k * sub_dim : (k + 1) * sub_dim].T @ c[k] for k in range(K)], dim=1)  # (dim, K)
    return torch.cat(X), torch.tensor(labels), Fm


def softmax_attention(X, WQ, WK):
    """A = softmax((X W^Q)(X W^K)^T), row-wise; the 1/sqrt(m) scale is folded into W^Q."""
    return torch.softmax((X @ WQ) @ (X @ WK).T, dim=1)


def class_diameters(X, labels):
    """D_k = the largest distance between two samples of class k, for every class (Theorem 2)."""
    return torch.stack([torch.cdist(X[labels == k], X[labels == k]).max() for k in labels.unique()])
