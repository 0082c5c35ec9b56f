"""Tests for deep_fusion.py and experiments/: the loss, the heads, the fusion measurements, the
theorems, training, resume and faults, the benchmark, the ablations and the authors' evaluation.

Run: python -m pytest -q   (CPU only; CUDA tests skip without a GPU)
"""

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deep_fusion as df
from experiments import ablations, authors_eval, benchmark, constructed, figure, fusion, learned, table
from experiments import theory as th

ROOT = Path(__file__).parent
# A tiny synthetic run: seconds on a 2-core CPU.
TINY = (
    "--synthetic-train 512 --synthetic-test 256 --batch-size 64 --epochs 3 --head-dim 32 --head-depth 2 --head-heads 2"
    " --head-out 32 --linear-epochs 5 --knn-k 20 --attn-batch 32 --eval-every 0 --device cpu"
).split()


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def parse_args(argv):
    """The resolved Config of a command line, as main builds it."""
    return df.resolve(df.Config(**df.parse_flags(argv)))


def build_fg(cfg, device="cpu"):
    """f and g of a config, drawn from its seed as train() draws them."""
    return df.build(cfg, 32, torch.device(device))[:2]


def run_main(tmp_path, *extra, name="run"):
    return df.main([*TINY, "--out-dir", str(tmp_path), "--run-name", name, *extra])


def expect_error(capsys, argv, *fragments, code=2):
    """main(argv) exits with `code` and one stderr line holding every fragment."""
    with pytest.raises(SystemExit) as e:
        df.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---- NT-Xent ---------------------------------------------------------------------------


def nt_xent_naive(z1, z2, tau):
    """Reference: an explicit double loop over anchors and candidates."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n, N, total = len(z), len(z1), 0.0
    for i in range(n):
        pos = (i + N) % n
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denom)
    return total / n


@pytest.mark.parametrize("N,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (16, 4, 1.0), (7, 32, 0.02)])
def test_nt_xent_matches_naive_loop(N, d, tau):
    g = torch.Generator().manual_seed(N * d)
    z1, z2 = torch.randn(N, d, generator=g, dtype=torch.float64), torch.randn(N, d, generator=g, dtype=torch.float64)
    assert df.nt_xent(z1, z2, tau).item() == pytest.approx(nt_xent_naive(z1, z2, tau), rel=1e-9)


def test_nt_xent_symmetric_and_scale_invariant():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.allclose(df.nt_xent(z1, z2, 0.3), df.nt_xent(z2, z1, 0.3))
    assert torch.allclose(df.nt_xent(3 * z1, 0.5 * z2, 0.3), df.nt_xent(z1, z2, 0.3), atol=1e-6)


@pytest.mark.parametrize("N", [2, 9])
def test_nt_xent_all_equal_closed_form(N):
    z = torch.ones(N, 4)
    assert df.nt_xent(z, z, 0.7).item() == pytest.approx(math.log(2 * N - 1), rel=1e-6)


def test_nt_xent_low_precision_is_computed_in_fp32():
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    low = df.nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(df.nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.1).item(), rel=1e-5)


def test_nt_xent_inside_a_callers_autocast_is_fp32():
    """Most SimCLR loops compute the loss inside their autocast: the logits must stay fp32 there."""
    z1, z2 = torch.randn(32, 64, requires_grad=True), torch.randn(32, 64)
    ref = df.nt_xent(z1, z2, 0.1)
    (grad_ref,) = torch.autograd.grad(ref, z1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = df.nt_xent(z1, z2, 0.1)
    (grad,) = torch.autograd.grad(loss, z1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)  # bf16 logits miss by about 1e-3
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_nt_xent_gradcheck():
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: df.nt_xent(a, b, 0.5), (z1, z2))


# ---- Backbones and heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch,D", [("tiny", 256), ("resnet18", 512), ("resnet50", 2048)])
def test_backbones_cifar_stem_and_feature_size(arch, D):
    f, dim = df.make_backbone(arch, 32)
    assert dim == D and f.eval()(torch.randn(2, 3, 32, 32)).shape == (2, D)
    if arch != "tiny":  # CIFAR stem: 3x3 stride-1 conv, no max-pool, so 32 px keeps 4x4 maps at the end
        assert f.conv1.kernel_size == (3, 3) and f.conv1.stride == (1, 1) and isinstance(f.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("dataset", ["synthetic", "cifar10", "cifar100", "imagefolder"])
def test_default_ffn_head_is_simclrs_two_layer_mlp(dataset):
    cfg = parse_args(["--dataset", dataset, "--head", "ffn"])
    D = df.make_backbone(cfg.arch)[1]
    g = build_fg(cfg)[1]
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(D, D), (D, 128)]
    deep = build_fg(parse_args(["--dataset", dataset, "--head", "ffn", "--head-depth", "10"]))[1]
    assert sum(isinstance(m, torch.nn.Linear) for m in deep.modules()) == 10  # the authors' depth-matched MLP
    tf = parse_args(["--dataset", dataset])
    assert tf.head == "transformer" and tf.head_depth == (4 if dataset == "synthetic" else 10)


@pytest.mark.parametrize("depth", [2, 4])
def test_ffn_head_shape_and_depth(depth):
    g = df.FFNHead(12, 20, 7, depth)
    assert g(torch.randn(10, 12)).shape == (10, 7)
    assert sum(isinstance(m, torch.nn.Linear) for m in g.modules()) == depth


def test_transformer_head_shapes_and_attention_rows():
    g = df.TransformerHead(12, dim=16, depth=3, heads=4, out_dim=7)
    z, attns = g(torch.randn(10, 12), return_attention=True)
    assert z.shape == (10, 7) and len(attns) == 3
    for A in attns:
        assert A.shape == (4, 10, 10)
        assert torch.allclose(A.sum(-1), torch.ones(4, 10), atol=1e-5)


@pytest.mark.parametrize("train_mode", [True, False])
def test_transformer_head_is_permutation_equivariant(train_mode):
    torch.manual_seed(0)
    g = df.TransformerHead(12, dim=16, depth=3, heads=4, out_dim=7).double().train(train_mode)
    h, perm = torch.randn(10, 12, dtype=torch.float64), torch.randperm(10)
    assert torch.allclose(g(h)[perm], g(h[perm]), atol=1e-10)


def test_transformer_head_mixes_the_batch_and_ffn_does_not():
    """The point of Deep Fusion: a sample's projection depends on the rest of the batch."""
    torch.manual_seed(0)
    h = torch.randn(8, 12)
    h2 = h.clone()
    h2[1:] = torch.randn(7, 12)  # same first sample, different companions
    ffn, tf = df.FFNHead(12, 16, 7).eval(), df.TransformerHead(12, 16, 2, 4, 7).eval()
    assert torch.allclose(ffn(h)[0], ffn(h2)[0])
    assert not torch.allclose(tf(h)[0], tf(h2)[0], atol=1e-4)


def test_transformer_head_says_what_is_wrong_with_its_input():
    with pytest.raises(AssertionError, match="width 30 does not split into 4 heads"):
        df.TransformerHead(8, dim=30, depth=1, heads=4)
    g = df.TransformerHead(8, dim=16, depth=1, heads=2, out_dim=4)
    with pytest.raises(AssertionError, match=r"h is \(2, 6, 8\): give one sequence \(2N, D\)"):
        g(torch.randn(2, 6, 8))  # a batch of sequences: the head's sequence is the batch itself


def test_fast_attention_path_equals_explicit():
    torch.manual_seed(0)
    g = df.TransformerHead(12, dim=16, depth=3, heads=4, out_dim=7).double().eval()
    h = torch.randn(10, 12, dtype=torch.float64)
    fast = g(h)
    explicit, _ = g(h, return_attention=True)
    assert torch.allclose(fast, explicit, atol=1e-10)


def test_mask_partner_hides_exactly_the_other_view():
    torch.manual_seed(0)
    g = df.TransformerHead(12, dim=16, depth=2, heads=4, out_dim=7, mask_partner=True).double().eval()
    h = torch.randn(10, 12, dtype=torch.float64)  # N = 5 images: token i and i + 5 are one image
    z, attns = g(h, return_attention=True)
    partner = torch.arange(10).roll(5)
    for A in attns:
        assert (A[:, torch.arange(10), partner] == 0).all() and (A[:, torch.arange(10), torch.arange(10)] > 0).all()
    assert torch.allclose(z, g(h), atol=1e-10)  # the fused path applies the same mask
    h2 = h.clone()
    h2[5] = torch.randn(12, dtype=torch.float64)  # change image 0's second view
    mask = ~torch.eye(10, dtype=torch.bool).roll(5, 1)
    first = [g.blocks[0](g.embed(x), mask)[0] for x in (h, h2)]  # one layer: token 0 sees all but token 5
    assert torch.allclose(first[0][0], first[1][0], atol=1e-10)
    pairs = torch.randperm(5)  # permuting images (both views alike) permutes the output
    perm = torch.cat([pairs, pairs + 5])
    assert torch.allclose(g(h)[perm], g(h[perm]), atol=1e-10)


@pytest.mark.parametrize("mode", ["identity", "uniform"])
def test_fixed_attention_ablations(mode):
    torch.manual_seed(0)
    g = df.TransformerHead(12, dim=16, depth=2, heads=4, out_dim=7)
    for block in g.blocks:
        block.attn = ablations.FixedAttention(16, 4, mode)
    g = g.double().eval()
    h = torch.randn(8, 12, dtype=torch.float64)
    _, attns = g(h, return_attention=True)
    expected = (
        torch.eye(8, dtype=torch.float64) if mode == "identity" else torch.full((8, 8), 1 / 8, dtype=torch.float64)
    )
    assert all(torch.allclose(A, expected.expand(4, 8, 8)) for A in attns)
    h2 = h.clone()
    h2[1:] = torch.randn(7, 12, dtype=torch.float64)
    mixes = not torch.allclose(g(h)[0], g(h2)[0], atol=1e-8)  # BN in eval mode: rows are independent...
    assert mixes == (mode == "uniform")  # ...unless attention mixes them


def cycle_residual(A):
    """D_ij + D_jk + D_ki with D = log A - log A^T: zero for every (i, j, k) exactly when the
    logits are symmetric up to row constants (then D_ij = lse_j - lse_i)."""
    D = A.log() - A.log().transpose(-2, -1)  # (H, n, n)
    return (D[:, :, :, None] + D[:, None, :, :] + D.transpose(-2, -1)[:, :, None, :]).abs().max()


def test_tied_qk_gives_symmetric_logits_and_scale_is_learnable():
    torch.manual_seed(0)
    x = torch.randn(6, 16, dtype=torch.float64)
    tied = df.Attention(16, 4, tied=True, scale=4.0).double()
    assert cycle_residual(tied(x, return_attention=True)[1]) < 1e-9  # s_ij = <q_i, q_j> = s_ji
    assert cycle_residual(df.Attention(16, 4).double()(x, return_attention=True)[1]) > 1e-3
    assert tied.log_scale.requires_grad and tied.log_scale.exp().flatten().tolist() == pytest.approx([4.0] * 4)
    assert df.Attention(16, 4).log_scale is None  # the authors' fixed 1/sqrt(m) by default
    assert tied.qkv.out_features == 2 * 16 and df.Attention(16, 4).qkv.out_features == 3 * 16  # no unused W^K


def test_the_attention_scale_is_a_temperature_without_weight_decay():
    cfg = parse_args(["--qk-tied", "--attn-scale", "4", "--weight-decay", "0.1"])
    f, g, opt = df.build(cfg, 32, torch.device("cpu"))[:3]
    decayed, free = opt.param_groups
    scales = [b.attn.log_scale for b in g.blocks]
    assert free["weight_decay"] == 0 and len(free["params"]) == len(scales) == cfg.head_depth
    assert all(any(p is s for p in free["params"]) for s in scales)
    assert decayed["weight_decay"] == 0.1 and not any(p is s for p in decayed["params"] for s in scales)
    n_params = sum(p.numel() for p in [*f.parameters(), *g.parameters()])
    assert sum(p.numel() for group in opt.param_groups for p in group["params"]) == n_params
    before = [s.detach().clone() for s in scales]
    opt.zero_grad()
    opt.step()  # no gradient: weight decay alone would shrink a decayed parameter
    assert all(torch.equal(s, b) for s, b in zip(scales, before))


# ---- Fusion score and kNN --------------------------------------------------------------


def paired_batch(counts):
    """labels and partner index of 2N tokens: both views of N images, classes of given sizes."""
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    N = len(y)
    return torch.cat([y, y]), torch.arange(2 * N).roll(N)


def test_fusion_score_on_hand_made_attention():
    labels, pair = paired_batch([3, 5, 2])
    n = len(labels)
    same = (labels[:, None] == labels[None, :]).float()
    nu = same.sum(1)
    block = same / nu[:, None]  # D^{-1} S: uniform over the own class
    score, norm, chance, norm_chance = df.fusion_score(block, labels, pair)
    assert score == pytest.approx(((nu - 2) / nu).mean().item())
    assert norm == pytest.approx(1.0)  # every row's mass outside self and partner stays in-class
    assert chance == pytest.approx(((nu - 2) / n).mean().item())
    assert norm_chance == pytest.approx(((nu - 2) / (n - 2)).mean().item())
    uniform = df.fusion_score(torch.full((n, n), 1 / n), labels, pair)
    assert uniform[0] == pytest.approx(chance) and uniform[1] == pytest.approx(norm_chance)
    assert df.fusion_score(torch.eye(n), labels, pair)[0] == 0  # self excluded
    assert df.fusion_score(torch.eye(n)[pair], labels, pair)[0] == 0  # partner excluded
    per_head = torch.stack([block, torch.full((n, n), 1 / n)])  # heads are averaged
    assert df.fusion_score(per_head, labels, pair)[0] == pytest.approx((score + chance) / 2)


def test_self_attention_cannot_fool_the_normalised_score():
    """90% of each row on the token itself, the rest class-blind: the raw score falls far below
    chance, the normalised one sits at chance; the same self mass over in-class keys scores 1."""
    labels, pair = paired_batch([20] * 5)
    n = len(labels)
    blind = 0.9 * torch.eye(n) + 0.1 / n
    raw, norm, chance, norm_chance = df.fusion_score(blind, labels, pair)
    assert raw < 0.15 * chance and norm == pytest.approx(norm_chance, abs=1e-6)
    same, other = df.others(labels, pair)
    in_class = 0.9 * torch.eye(n) + 0.1 * same / same.sum(1, keepdim=True)
    assert df.fusion_score(in_class, labels, pair)[1] == pytest.approx(1.0)
    report = df.fusion_report(torch.stack([blind, in_class])[:, None], labels, pair)
    assert report["self_mass"] == pytest.approx([0.9 + 0.1 / n, 0.9])
    assert report["fusion_norm"] == pytest.approx([norm_chance, 1.0], abs=1e-6)
    assert report["partner_mass"] == pytest.approx([0.1 / n, 0.0])


def test_cosine_control_is_computed_from_h_alone():
    """The control depends on the backbone features, not on the head's attention: clustered h
    scores high, random h at chance; a sharper target entropy means a larger beta."""
    labels, pair = paired_batch([16] * 4)
    n, g = len(labels), torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g)
    clustered = centres[labels] + 0.3 * torch.randn(n, 32, generator=g)
    noise = torch.randn(n, 32, generator=g)
    chance = df.fusion_score(torch.full((n, n), 1 / n), labels, pair)[3]
    for entropy in (math.log(n - 2) - 0.5, 2.0):
        high, beta = fusion.cosine_control(clustered, labels, pair, entropy)
        low, _ = fusion.cosine_control(noise, labels, pair, entropy)
        assert high > 0.6 and abs(low - chance) < 0.1
        sharp = torch.softmax(beta * F.normalize(clustered) @ F.normalize(clustered).T
                              + torch.where(df.others(labels, pair)[1], 0, float("-inf")), 1)  # fmt: skip
        assert fusion.row_entropy(sharp) == pytest.approx(entropy, abs=1e-3)  # beta matches the entropy
    assert fusion.cosine_control(clustered, labels, pair, math.log(n - 2))[1] < 1e-6  # uniform: beta = 0
    attn = torch.softmax(torch.randn(2, 3, n, n, generator=g), -1)  # (L, heads, n, n)
    a, b = (fusion.report(attn, labels, pair, h)["control_norm"] for h in (clustered, noise))
    assert min(a) > max(b) + 0.2  # near-uniform attention: a soft control, still led by h


def test_the_token_control_reads_each_layers_own_input_in_the_maps_order():
    """attention_report puts the blocks' inputs in the class-sorted order of attention_maps: layer 1 attends over
    embed(h), so its tokens are g.embed of the h it returns, row for row; the token control is the cosine control on
    each layer's tokens at that layer's entropy."""
    cfg = parse_args([*TINY, "--head", "transformer"])
    data = df.load_dataset(cfg)
    f, g = build_fg(cfg)
    with torch.no_grad():
        (attn, labels, pair, h), (h_seen, *tokens) = fusion.block_inputs(
            g, lambda: df.attention_maps(cfg, f, g, *data[2:], torch.device("cpu"))
        )
        assert len(tokens) == cfg.head_depth and not torch.equal(h, h_seen)  # the maps' order is not the pass's
        r = fusion.attention_report(cfg, f, g, data, torch.device("cpu"))
        order = torch.cdist(h, h_seen).argmin(1)
        assert torch.allclose(tokens[0][order], g.embed(h), atol=1e-5)
    expect = [fusion.cosine_control(x[order], labels, pair, e)[0] for x, e in zip(tokens, r["entropy"])]
    assert r["token_control_norm"] == expect and len(r["control_norm"]) == cfg.head_depth
    assert not any(m._forward_pre_hooks for m in g.modules())  # the hooks are gone


def test_class_matrix_is_flat_for_uniform_and_diagonal_for_fusion():
    labels, pair = paired_batch([5, 9, 6])
    n = len(labels)
    assert torch.allclose(fusion.class_matrix(torch.full((n, n), 1 / n), labels, pair), torch.ones(3, 3))
    same = df.others(labels, pair)[0].float()
    M = fusion.class_matrix(same / same.sum(1, keepdim=True), labels, pair)
    assert (M.diagonal() > 1).all() and (M - torch.diag(M.diagonal())).abs().max() == 0


def test_knn_accuracy_separable_and_against_naive():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    ytr, yte = torch.arange(60) % 3, torch.arange(30) % 3
    htr, hte = centres[ytr] + torch.randn(60, 8, generator=g), centres[yte] + torch.randn(30, 8, generator=g)
    assert df.knn_accuracy(htr, ytr, hte, yte, k=5) == 1.0
    hte_noisy = torch.randn(30, 8, generator=g)
    sims = F.normalize(hte_noisy, dim=1) @ F.normalize(htr, dim=1).T
    naive = []
    for row in sims:
        top = row.topk(7).indices
        votes = [sum(math.exp(row[j] / 0.1) for j in top if ytr[j] == c) for c in range(3)]
        naive.append(max(range(3), key=lambda c: votes[c]))
    expected = (torch.tensor(naive) == yte).float().mean().item()
    assert df.knn_accuracy(htr, ytr, hte_noisy, yte, k=7, t=0.1) == pytest.approx(expected)


# ---- Theorems (the notebook, sections 3 and 4) ----------------------------------------------------

SIZES = [5, 9, 14, 3]  # unequal classes: nu_i varies


@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0, 50.0])
def test_theorem1_bounds(beta):
    gamma = 0.5
    X, labels, Fm = th.union_of_subspaces(SIZES, dim=20, sub_dim=3, gamma=gamma)
    W = math.sqrt(beta) * Fm
    S = (X @ W) @ (X @ W).T  # logits
    same = labels[:, None] == labels[None, :]
    assert S[~same].abs().max() < 1e-8  # claim 1: cross-class logits vanish
    rho = beta * gamma**2
    assert S[same].min() >= rho - 1e-8  # claim 2
    A, n = th.softmax_attention(X, W, W), len(labels)
    nu = same.sum(1).double()
    m = (A * same).sum(1)
    assert (m >= nu * math.exp(rho) / (nu * math.exp(rho) + n - nu) - 1e-12).all()  # claim 3
    assert (A[~same] <= (1 / (nu[:, None] * math.exp(rho) + n - nu[:, None])).expand(n, n)[~same] + 1e-12).all()


def test_theorem1_exact_fusion_form_and_limit():
    X, labels, Fm = th.union_of_subspaces(SIZES, dim=20, sub_dim=3)
    X = X / (X @ Fm).sum(1, keepdim=True)  # scale so that f_k(x_i) = 1 on every class
    same = (labels[:, None] == labels[None, :]).double()
    target = same / same.sum(1, keepdim=True)  # D^{-1} S
    errors = [(th.softmax_attention(X, math.sqrt(b) * Fm, math.sqrt(b) * Fm) - target).abs().max() for b in (5, 20, 40)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-12


def test_theorem1_margin_is_needed():
    """x and -x in one class: s(x, x) = -s(x, -x) for every bilinear logit, so no weights can
    make both same-class logits large."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, generator=g, dtype=torch.float64)
    for _ in range(20):
        WQ, WK = (
            torch.randn(6, 6, generator=g, dtype=torch.float64),
            torch.randn(6, 6, generator=g, dtype=torch.float64),
        )
        s_same, s_neg = float((x @ WQ) @ (x @ WK).T), float((x @ WQ) @ (-x @ WK).T)
        assert s_same == pytest.approx(-s_neg)
        assert min(s_same, s_neg) <= 0


def test_theorem2_contraction_per_layer():
    X, labels, Fm = th.union_of_subspaces(SIZES, dim=20, sub_dim=3, gamma=1.0)
    W = math.sqrt(3.0) * Fm
    same = labels[:, None] == labels[None, :]
    nu = same.sum(1, keepdim=True).double()
    D0 = bound = th.class_diameters(X, labels)
    for _ in range(6):
        A = th.softmax_attention(X, W, W)
        eps = (1 - (A * same).sum(1)).max()
        alpha = (A * nu)[same].min().clamp(max=1)
        R = X.norm(dim=1).max()
        Y = A @ X  # identity values, no residual
        assert (th.class_diameters(Y, labels) <= (1 - alpha) * th.class_diameters(X, labels) + 3 * eps * R + 1e-9).all()
        bound = (1 - alpha) * bound + 3 * eps * R  # the bound unrolled over layers
        X = Y
    assert (th.class_diameters(X, labels) <= bound + 1e-9).all()
    assert (th.class_diameters(X, labels) < 0.05 * D0).all()  # each class fused...
    means = torch.stack([X[labels == k].mean(0) for k in range(len(SIZES))])
    assert torch.pdist(means).min() > 0.1  # ...without merging classes


# ---- Augmentation ----------------------------------------------------------------------

MS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def views(x, seed=0):
    """Augment and undo the normalisation: values back in [0, 1]."""
    v = df.augment(x, torch.Generator().manual_seed(seed), *MS)
    return v * 0.25 + 0.5


def test_augment_shapes_dtype_range_and_seed():
    x, _ = df.synthetic_dataset(64, 0)
    v = views(x)
    assert v.shape == (64, 3, 32, 32) and v.dtype == torch.float32
    assert v.min() >= -1e-5 and v.max() <= 1 + 1e-5
    assert torch.equal(views(x, 3), views(x, 3))
    assert not torch.allclose(views(x, 3), views(x, 4))
    assert df.augment(x, torch.Generator().manual_seed(0), *MS, size=16).shape == (64, 3, 16, 16)


def test_crop_boxes_respect_scale_and_ratio(monkeypatch):
    seen = []  # augment's crop boxes, read off the affine map it samples with

    def spy(theta, *args, **kwargs):
        seen.append(theta.clone())
        return real(theta, *args, **kwargs)

    real = F.affine_grid
    monkeypatch.setattr(df.F, "affine_grid", spy)
    df.augment(torch.zeros(20000, 3, 4, 4, dtype=torch.uint8), torch.Generator().manual_seed(0), *MS)
    theta = seen[0]
    w, h, cx, cy = theta[:, 0, 0].abs(), theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]  # |w| undoes the flip
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6  # flipped half the time
    area = w * h
    assert area.min() >= df.CROP_SCALE[0] - 1e-6 and area.max() <= df.CROP_SCALE[1] + 1e-6
    ratio = w / h
    assert ratio.min() >= df.CROP_RATIO[0] - 1e-5 and ratio.max() <= df.CROP_RATIO[1] + 1e-5
    assert ((cx - w).min() >= -1 - 1e-6) and ((cx + w).max() <= 1 + 1e-6)  # box inside the image
    assert ((cy - h).min() >= -1 - 1e-6) and ((cy + h).max() <= 1 + 1e-6)
    # Same distribution as torchvision's sampler (rejection makes it lean to small crops).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(1, 500, 500), list(df.CROP_SCALE), list(df.CROP_RATIO))
            for _ in range(4000)
        ],
        dtype=torch.float64,
    )
    tv_area = tv[:, 2] * tv[:, 3] / 500**2
    assert area.mean().item() == pytest.approx(tv_area.mean().item(), abs=0.015)
    assert area.std().item() == pytest.approx(tv_area.std().item(), abs=0.015)


def test_augment_probabilities():
    n = 4000
    # Flip: a grey left-to-right ramp stays a ramp; its direction says whether it was flipped.
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(n, 3, 32, 32).contiguous()
    v = views(ramp)
    flipped = (v[..., :8].mean((1, 2, 3)) > v[..., -8:].mean((1, 2, 3))).float().mean().item()
    assert flipped == pytest.approx(0.5, abs=0.03)
    # Jitter: a flat mid-grey image changes value only under brightness, i.e. when jitter is on.
    grey = torch.full((n, 3, 32, 32), 128, dtype=torch.uint8)
    jittered = ((views(grey) - 128 / 255).abs().amax((1, 2, 3)) > 1e-3).float().mean().item()
    assert jittered == pytest.approx(df.P_JITTER, abs=0.03)
    # Grayscale: a saturated red image keeps unequal channels unless it is made grey.
    red = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 200
    gray = (views(red).std(1).amax((1, 2)) < 1e-4).float().mean().item()
    assert gray == pytest.approx(df.P_GRAY, abs=0.03)


def test_per_image_pipeline_matches_batched_shapes():
    x, _ = df.synthetic_dataset(4, 0)
    t = benchmark.per_image_transform(*MS, 32)
    v = t(x[0])
    assert v.shape == (3, 32, 32) and v.dtype == torch.float32


# ---- Training end to end ---------------------------------------------------------------


def test_main_learns_on_synthetic(tmp_path, capsys):
    argv = "--synthetic-train 1024 --synthetic-test 512 --batch-size 128 --epochs 8 --linear-epochs 20 --device cpu"
    r = df.main([*argv.split(), "--out-dir", str(tmp_path), "--run-name", "learn"])
    out = capsys.readouterr().out
    assert "img/s" in out and "eta" in out
    run = tmp_path / "learn"
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoint.pt", "attention.pt"):
        assert (run / name).exists(), name
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in history[1:]]
    assert losses[-1] < losses[0] - 0.3  # the loss falls
    assert r["knn_acc"] > r["knn_acc_init"] + 0.05  # beats random-initialised features (by 0.104 with 2 threads,
    # 0.098 with 1: float sums differ with the thread count, so the margin is half of that)
    assert r["knn_acc"] > 0.3  # chance is 0.1
    assert len(r["fusion"]) == 4 and 0 < r["fusion_chance"] < r["fusion_norm_chance"] < 0.2
    for key in ("fusion_norm", "self_mass", "partner_mass"):
        assert len(r[key]) == 4 and all(math.isfinite(v) for v in r[key]), key
    assert "control_norm" not in r  # the backbone control is experiments/fusion.py's
    assert json.loads((run / "results.json").read_text()) == r
    maps = torch.load(run / "attention.pt", weights_only=True)
    assert maps["attn"].shape == (4, 4, 256, 256) and maps["h"].shape == (256, 256)
    assert (maps["labels"].diff() >= 0).all()  # sorted by class
    monitors = [row for row in history if "fusion" in row]  # fusion tracked at init and every kNN monitor epoch
    assert [row["epoch"] for row in monitors] == [0, 5, 8]
    assert all(len(row["fusion_norm"]) == len(row["self_mass"]) == len(row["partner_mass"]) == 4 for row in monitors)
    from PIL import Image

    with Image.open(run / "attention.png") as png:  # 4 layers side by side, the colour bar beneath
        assert png.mode == "RGB" and png.size == (4 * (256 + 4) + 4, 256 + 8 + 16 + 4)


def test_attention_png_has_one_fixed_scale(tmp_path):
    """Uniform attention is white in every panel, whatever n; more than uniform red, less blue; a bar beneath."""
    from PIL import Image

    labels = torch.tensor([0] * 8 + [1] * 8)
    peaked = torch.eye(16)[None].expand(2, 16, 16)  # all mass on the token itself
    attn = torch.stack([torch.full((2, 16, 16), 1 / 16), peaked])  # (L, heads, n, n)
    df.save_attention_png(attn, labels, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as png:
        px = torch.tensor(__import__("numpy").asarray(png.convert("RGB")))  # (height, width, 3)
    uniform, sharp = px[4 : 4 + 16, 4 : 4 + 16], px[4 : 4 + 16, 24 : 24 + 16]
    off_lines = [i for i in range(16) if i != 8]  # row and column 8 are the class boundary, grey
    assert (uniform[off_lines][:, off_lines] == 255).all()  # n A = 1: white
    assert sharp[0, 0].tolist() == [255, 0, 0] and sharp[0, 1].tolist() == [0, 0, 255]  # n A = 16: red; 0: blue
    bar = px[-10]  # a row of the colour bar: blue at 0, white at 1 (the middle), red at 2
    assert bar[4].tolist() == [0, 0, 255] and bar[-5].tolist() == [255, 0, 0] and (bar[px.shape[1] // 2] > 245).all()


def test_ffn_head_runs(tmp_path):
    r = run_main(tmp_path, "--head", "ffn")
    assert "fusion" not in r and 0 <= r["knn_acc"] <= 1


def test_head_options_train_together(tmp_path):
    r = run_main(tmp_path, "--qk-tied", "--attn-scale", "4", "--mask-partner", "--epochs", "1")
    assert all(p == 0 for p in r["partner_mass"]) and 0 <= r["knn_acc"] <= 1


FEW_IMAGES = ["--synthetic-train", "64", "--batch-size", "32"]  # fp16 convolutions are slow on CPUs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_runs_on_cpu(tmp_path, precision):
    """The GPU user's code path as far as a CPU goes: autocast in bf16, or fp16 with the GradScaler."""
    r = run_main(tmp_path, "--precision", precision, "--epochs", "1", *FEW_IMAGES)
    assert math.isfinite(r["loss"]) and 0 <= r["knn_acc"] <= 1
    scaler = load_ckpt(tmp_path / "run" / "checkpoint.pt")["scaler"]
    assert bool(scaler) == (precision == "fp16")  # the scaler's state: only fp16 uses one


def ablation_flags(**given):
    """experiments/ablations.py's flags: its defaults, then `given`."""
    return argparse.Namespace(**ablations.defaults() | given)


def test_ablations_train_with_the_core_loop_and_the_authors_eval_reads_them(tmp_path):
    base = [*TINY, "--epochs", "1", "--out-dir", str(tmp_path)]
    flags = ["--attn", "uniform", "--head-opt", "adamw", "--mask-partner", "--clip", "5"]
    ablations.main([*base, "--run-name", "ab", *flags])
    ckpt = load_ckpt(tmp_path / "ab" / "checkpoint.pt")
    assert len(ckpt["opt"]["opts"]) == 2  # SGD for f, AdamW for g
    assert not any("qkv" in name for name in ckpt["g"])  # fixed attention: values only
    r = json.loads((tmp_path / "ab" / "results.json").read_text())
    assert r["fusion_norm"] == pytest.approx([r["fusion_norm_chance"]] * 2, abs=1e-6)  # uniform attention
    cfg = parse_args(TINY)
    flags = ablation_flags(attn="identity", head_opt="adamw", head_wd=0.05)
    f, g, opt, *_ = ablations.ablated_build(flags)(cfg, 32, torch.device("cpu"))
    sgd, adamw = opt.opts
    assert sum(p.numel() for g_ in sgd.param_groups for p in g_["params"]) == sum(p.numel() for p in f.parameters())
    decayed, free = adamw.param_groups
    assert decayed["weight_decay"] == 0.05 and all(p.dim() == 2 for p in decayed["params"])
    assert free["weight_decay"] == 0 and all(p.dim() != 2 for p in free["params"])  # norms, biases
    flags = ablation_flags(head_wd=0.0)
    f, g, opt, *_ = ablations.ablated_build(flags)(cfg, 32, torch.device("cpu"))
    sgd_f, sgd_g = opt.opts  # the head's own weight decay, the backbone's unchanged
    assert sgd_f.param_groups[0]["weight_decay"] == cfg.weight_decay and sgd_g.param_groups[0]["weight_decay"] == 0
    assert {id(p) for group in sgd_g.param_groups for p in group["params"]} == {id(p) for p in g.parameters()}
    run_main(tmp_path, "--epochs", "1", name="plain")
    for run in ("ab", "plain"):
        authors_eval.main([str(tmp_path / run)])
        scores = json.loads((tmp_path / run / "authors_1nn.json").read_text())
        assert 0 <= scores["head_1nn_acc"] <= 1 and 0 <= scores["backbone_1nn_acc"] <= 1


def test_first_commit_blocks_have_no_residual_and_batchnorm_over_the_tokens(tmp_path):
    ablations.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--block", "first-commit", "--bn-eps", "0.01"])
    (run,) = tmp_path.iterdir()  # no --run-name: named after the flags that differ from their defaults
    assert run.name.startswith("synthetic-transformer-block-first-commit-bn-eps-0.01-")
    rebuilt = authors_eval.evaluate_run(run)  # the first-commit head, rebuilt from its folder
    assert rebuilt["epoch"] == 1 and 0 <= rebuilt["head_1nn_acc"] <= 1
    cfg = parse_args([*TINY, "--head-depth", "3"])
    build = ablations.ablated_build(ablation_flags(block="first-commit", bn_eps=0.1))
    f, g, opt, *_ = build(cfg, 32, torch.device("cpu"))
    assert all(isinstance(b, ablations.FirstCommitBlock) for b in g.blocks) and len(g.blocks) == 3
    assert {id(p) for group in opt.param_groups for p in group["params"]} == {
        id(p) for p in [*f.parameters(), *g.parameters()]
    }  # the optimizer holds the new blocks' parameters, not the replaced ones
    block = g.blocks[0].double().train()
    x = torch.randn(10, cfg.head_dim, dtype=torch.float64)
    y, _ = block(x)
    assert torch.allclose(y.mean(0), block.norm2.bias, atol=1e-9)  # BatchNorm over the 10 tokens
    attn_out = block.attn(x)[0]
    expected = block.norm2(block.ff(block.norm1(attn_out)))  # no x + ... anywhere
    assert torch.allclose(y, expected, atol=1e-12) and block.norm1.eps == 0.1
    assert isinstance(block.ff[1], torch.nn.ReLU)
    perm = torch.randperm(10)
    assert torch.allclose(block(x[perm])[0], y[perm], atol=1e-10)  # still equivariant over the batch


def test_gradient_clipping_and_old_ablation_folders(tmp_path):
    w = torch.nn.Parameter(torch.zeros(4))
    opts = ablations.Optimizers(torch.optim.SGD([w], lr=0.0), clip=1.0)
    w.grad = torch.full((4,), 3.0)  # norm 6
    opts.step()
    assert w.grad.norm().item() == pytest.approx(1.0)
    (tmp_path / "ablation.json").write_text(json.dumps({"attn": "uniform", "head_opt": "sgd", "head_lr": 1e-3}))
    flags = ablations.flags_of(tmp_path)  # written before --block existed: the defaults fill in
    assert (flags.attn, flags.block, flags.bn_eps, flags.clip) == ("uniform", "post-norm", 1e-5, None)


class BatchMean(torch.nn.Module):
    """A 'head' that replaces every sample by (almost) its batch's mean."""

    def forward(self, h, paired=True):
        return h.mean(0, keepdim=True) + 1e-3 * h


def test_transductive_protocol_batches_a_random_order():
    """Why the authors' head-output accuracy is only a second column, and why its batches are
    drawn at random: a 'head' that outputs each batch's mean carries no class information, yet
    on single-class batches (a test set stored class by class) it would score 100%."""
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(400, 8, generator=g), torch.arange(4).repeat_interleave(100)  # random features, sorted
    cfg = parse_args(["--batch-size", "100"])
    z = F.normalize(torch.cat([BatchMean()(hb) for hb in h.split(100)]), dim=1)  # single-class batches
    assert (y[(z @ z.T).fill_diagonal_(-2).argmax(1)] == y).all()  # the leak that the random order prevents
    head_acc, backbone_acc = authors_eval.transductive_1nn(cfg, BatchMean(), h, y)
    assert head_acc < 0.4 and backbone_acc < 0.4  # chance is 0.25


def test_linear_probe_is_seeded():
    g = torch.Generator().manual_seed(0)
    htr, hte = torch.randn(200, 16, generator=g), torch.randn(100, 16, generator=g)
    ytr, yte = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (100,), generator=g)
    runs = [df.linear_probe(htr, ytr, hte, yte, epochs=3, batch=32, seed=s) for s in (0, 0, 1)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("final_knn,warns", [(0.2, True), (0.6, False)])
def test_a_backbone_below_its_initialisation_is_reported(tmp_path, capsys, monkeypatch, final_knn, warns):
    """A backbone that ends below its random initialisation is reported, never stopped (early dips recover)."""
    accs = iter([0.5, final_knn])  # the random-init monitor, then the final one
    monkeypatch.setattr(df, "knn_accuracy", lambda *args, **kwargs: next(accs))
    run_main(tmp_path, "--epochs", "1")
    err = capsys.readouterr().err
    assert ("warning: the backbone's kNN ended below its random init's (50.00%)" in err) == warns


def final_weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {**{"f." + k: v for k, v in ckpt["f"].items()}, **{"g." + k: v for k, v in ckpt["g"].items()}}


def assert_same_run(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("train_time_s", "time_s"):
        ra.pop(key), rb.pop(key)
    assert ra == rb
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    for row in rows[0] + rows[1]:
        row.pop("time_s", None)
    assert rows[0] == rows[1]


def test_ctrl_c_keeps_the_last_epoch_and_resume_reproduces_the_run(tmp_path, capsys, monkeypatch):
    run_main(tmp_path, name="whole")
    capsys.readouterr()  # the run's own output
    real_step, calls = df.train_step, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 13:  # mid-epoch 2 (8 steps per epoch): that epoch is lost, epoch 1 kept
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(df, "train_step", interrupted)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    expect_error(
        capsys,
        [*TINY, "--out-dir", str(tmp_path), "--run-name", "cut"],
        "interrupted",
        f"--resume {ckpt}",
        code=130,
    )
    assert load_ckpt(ckpt)["epoch"] == 1
    monkeypatch.setattr(df, "train_step", real_step)
    df.main(["--resume", str(ckpt)])
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_sigkill_leaves_a_readable_checkpoint_and_resume_matches(tmp_path):
    args = [*TINY, "--epochs", "6", "--out-dir", str(tmp_path), "--run-name", "killed"]
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import deep_fusion; deep_fusion.main({args!r})"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # land somewhere in a later epoch, often inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    assert torch.load(ckpt, weights_only=True)["format"] == df.CKPT_FORMAT
    df.main(["--resume", str(ckpt)])
    run_main(tmp_path, "--epochs", "6", name="whole")
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def stopped_after_epoch_1(run_dir):
    """Rewrite a finished 2-epoch run's checkpoint as if the run had stopped after epoch 1; returns its path."""
    path = run_dir / "checkpoint.pt"
    ckpt = load_ckpt(path)
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:2]
    torch.save(ckpt, path)
    return path


def test_resume_across_precisions(tmp_path):
    """A CPU (or bf16) run saves no GradScaler state; resumed where fp16 turns the scaler on, it starts a fresh one
    (before: GradScaler refused the empty state, or --precision was refused as another config)."""
    run_main(tmp_path, "--epochs", "2", *FEW_IMAGES)
    path = stopped_after_epoch_1(tmp_path / "run")
    assert load_ckpt(path)["scaler"] == {}
    r = df.main(["--resume", str(path), "--precision", "fp16"])
    assert math.isfinite(r["loss"]) and load_ckpt(path)["epoch"] == 2 and load_ckpt(path)["scaler"]["scale"] > 0


def test_compiled_run_keeps_the_plain_keys_and_resumes(tmp_path):
    """--compile trains (on a CPU too); its checkpoint has the plain modules' keys, so either kind resumes it."""
    small = ["--synthetic-train", "256", "--head-depth", "1", "--epochs", "2"]
    run_main(tmp_path, *small, name="plain")
    run_main(tmp_path, *small, "--compile", name="compiled")
    plain, compiled = (load_ckpt(tmp_path / name / "checkpoint.pt") for name in ("plain", "compiled"))
    for part in ("f", "g"):
        assert list(compiled[part]) == list(plain[part])
    r = df.main(["--resume", str(stopped_after_epoch_1(tmp_path / "compiled")), "--compile"])
    assert math.isfinite(r["loss"]) and load_ckpt(tmp_path / "compiled" / "checkpoint.pt")["epoch"] == 2


def test_the_first_progress_line_comes_after_the_first_step(tmp_path, capsys):
    """On a slow machine the first ETA must not wait LOG_EVERY steps (8 minutes on full CIFAR on a CPU)."""
    run_main(tmp_path, "--epochs", "1")
    lines = [line for line in capsys.readouterr().out.splitlines() if "img/s" in line]
    assert lines[0].startswith("epoch 1/1 step 1/8 | loss ") and " | eta " in lines[0]
    assert lines[1].startswith("epoch 1/1 step 8/8 | ")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    df.save_checkpoint(path, {"format": df.CKPT_FORMAT, "w": torch.ones(3)})
    real_save = torch.save

    def dies_halfway(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        df.save_checkpoint(path, {"format": df.CKPT_FORMAT, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_ckpt(path)["w"], torch.ones(3))  # the old one, intact


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = df.nt_xent, []

    def poisoned(z1, z2, tau):
        calls.append(1)
        loss = real(z1, z2, tau)
        return loss * float("nan") if len(calls) == 11 else loss  # step 10, epoch 2

    monkeypatch.setattr(df, "nt_xent", poisoned)
    expect_error(
        capsys,
        [*TINY, "--out-dir", str(tmp_path), "--run-name", "nan"],
        "NaN/inf at step 10",
        "epoch 2",
        "--lr",
        code=1,
    )
    ckpt = load_ckpt(tmp_path / "nan" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["f"].values() if v.is_floating_point())


def test_warmup_is_capped_so_short_runs_peak_and_decay(tmp_path):
    """--warmup-epochs 5 in a 10-epoch run is capped at 10% of the steps (1 epoch): epoch 1 ends at the peak lr."""
    run_main(tmp_path, "--epochs", "10", "--synthetic-train", "256", "--warmup-epochs", "5")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    peak = 0.06 * 64 / 128  # --lr per 128 images, scaled to N = 64
    assert rows[1]["lr"] == pytest.approx(peak)  # uncapped, epoch 1 would end at 1/5 of the peak
    assert rows[-1]["lr"] < 0.01 * peak  # the cosine ends at 0
    assert [df.lr_at(s, 100, 10, 1.0) for s in (0, 9, 10)] == pytest.approx([0.1, 1.0, 1.0])


def test_collapse_stops_the_run_keeps_the_checkpoint_and_flushes_denormals(tmp_path, capsys, monkeypatch):
    """From epoch 2 every projection is the same, as in a collapsed head: the loss is exactly
    log(2N-1), and the run must stop there, keeping epoch 1's checkpoint. (Forced, because a
    real low-tau collapse, e.g. --tau 0.02, may first show as NaN depending on thread count.)"""
    real, calls = df.nt_xent, []

    def collapsed_from_epoch_2(z1, z2, tau):
        calls.append(1)
        return real(z1 * 0 + 1, z2 * 0 + 1, tau) if len(calls) > 8 else real(z1, z2, tau)

    monkeypatch.setattr(df, "nt_xent", collapsed_from_epoch_2)
    torch.set_flush_denormal(False)
    err = expect_error(capsys, [*TINY, "--out-dir", str(tmp_path), "--run-name", "c"], "collapsed at epoch 2", code=1)
    assert "log(2N-1) = 4.8442" in err and "last good checkpoint" in err and "--tau" in err
    assert load_ckpt(tmp_path / "c" / "checkpoint.pt")["epoch"] == 1
    assert torch.tensor([1e-323], dtype=torch.float64).item() == 0  # the CPU run flushed denormals


@pytest.mark.parametrize(
    "loss,steps,stops",
    [
        (5.5413, 8, True),  # loss at log(2N-1) past the warmup (6 steps)
        (5.5413, 4, False),  # ... but still in the warmup
        (5.5300, 8, False),  # 0.011 below the floor: a run that still separates its pairs
        (18.0, 8, False),  # a low-tau run starts far above log(2N-1): not collapse
    ],
)
def test_collapse_rule(tmp_path, loss, steps, stops):
    """The loss floor is the only stop: every rank computes the same loss, so every rank stops. A backbone
    below its random initialisation is reported at the end (test_a_backbone_below_...), never a stop."""
    cfg = parse_args(["--batch-size", "128"])
    check = lambda: df.check_collapse({"epoch": 1, "loss": loss}, cfg, steps, 6, tmp_path / "checkpoint.pt")  # noqa: E731
    if stops:
        with pytest.raises(df.DeepFusionError, match="collapsed"):
            check()
    else:
        check()


# ---- torchrun: G processes take one step exactly as one process -----------------------

DIST_ARGS = "--batch-size 8 --head-dim 16 --head-depth 2 --head-heads 2 --head-out 8 --lr 2.0 --device cpu".split()


def one_step_setup(head):
    """Identical on every rank: config, f and g from one seed, optimizers, 8 images' two views."""
    cfg = parse_args([*DIST_ARGS, "--head", head])
    f, g, opt = df.build(cfg, 16, torch.device("cpu"))[:3]
    x = df.synthetic_dataset(8, 0)[0][:, :, :16, :16]
    gen = torch.Generator().manual_seed(0)
    v1, v2 = (df.augment(x, gen, *df.MEAN_STD["synthetic"]) for _ in range(2))
    return cfg, f, g, opt, v1, v2


def named_parameters(f, g):
    """(name, parameter) of f and g, prefixed: both may be an nn.Sequential with a '0.weight'."""
    return [*f.named_parameters(prefix="f"), *g.named_parameters(prefix="g")]


def dist_worker(head, out):
    """One rank (run by test_torchrun_step_equals_one_process in a subprocess)."""
    cfg, f, g, opt, v1, v2 = one_step_setup(head)
    df.setup_distributed(cfg)
    rank, G = df.ranks()
    shard = slice(rank * 8 // G, (rank + 1) * 8 // G)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    f_, g_ = (torch.nn.parallel.DistributedDataParallel(m) for m in (f, g))  # as train() wraps them
    loss = df.train_step(f_, g_, opt, scaler, v1[shard], v2[shard], cfg.tau, torch.autocast("cpu", enabled=False))
    torch.save({"loss": loss, **dict(named_parameters(f, g))}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("head", ["transformer", "ffn"])
def test_torchrun_step_equals_one_process(tmp_path, head):
    """2 processes (gloo) against 1 process on the same global batch of N = 8: the same loss and
    the same parameters after one SGD step. On CPUs (no SyncBatchNorm) each rank's backbone BatchNorm
    sees its own 4 images, so the one-process reference runs f on each shard in turn (its
    statistics per shard too); the head and the loss see all 2N tokens in both."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    code = f"import test_deep_fusion as t; t.dist_worker({head!r}, {str(tmp_path)!r})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cfg, f, g, opt, v1, v2 = one_step_setup(head)
    init = {n: p.detach().clone() for n, p in named_parameters(f, g)}
    h = [f(torch.cat([v1[s], v2[s]])) for s in (slice(0, 4), slice(4, 8))]  # per shard: (2B, D) = [v1_s; v2_s]
    h = torch.cat([h[0][:4], h[1][:4], h[0][4:], h[1][4:]])  # (2N, D) = [v1; v2], in image order
    loss = df.nt_xent(*g(h).chunk(2), cfg.tau)
    loss.backward()
    opt.step()
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r.pop("loss").item() == pytest.approx(loss.item(), rel=1e-6)
    moved = 0
    for name, p in named_parameters(f, g):
        for r in ranks:
            torch.testing.assert_close(r[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.allclose(p, init[name])
    assert moved > len(init) // 2  # the step changed the weights: the comparison is not vacuous


def test_torchrun_end_to_end(tmp_path):
    """torchrun with 2 CPU processes: one run folder, written by rank 0, and its results."""
    argv = [*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "ddp"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run([*launch, "deep_fusion.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("run folder") == 1  # only rank 0 prints
    r = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert 0 <= r["knn_acc"] <= 1 and len(r["fusion"]) == 2
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2


def launch_two(code, timeout=120):
    """`code` in 2 processes as torchrun starts them (gloo on this machine): [(exit status, stderr)] per rank."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()


class FakeCIFAR:
    """torchvision's CIFAR10 as load_dataset uses it: a download is slow, logs the rank and writes the archive;
    reading without a download needs the archive, as torchvision's does."""

    def __init__(self, root, train=True, download=False):
        if download:
            time.sleep(0.5)  # long enough for a second downloader to start alongside
            with open(Path(root, "downloads.log"), "a") as log:
                log.write(f"rank {os.environ['RANK']}: {'train' if train else 'test'}\n")
            Path(root, "archive").touch()
        elif not Path(root, "archive").exists():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data = np.zeros((64 if train else 32, 32, 32, 3), np.uint8)
        self.targets = [i % 2 for i in range(len(self.data))]


def download_worker(root):
    """One rank: load_dataset under a process group, with FakeCIFAR for torchvision's CIFAR10."""
    import torchvision

    torchvision.datasets.CIFAR10 = FakeCIFAR
    cfg = parse_args(
        ["--dataset", "cifar10", "--data-dir", root, "--batch-size", "8", "--knn-k", "8", "--device", "cpu"]
    )
    df.setup_distributed(cfg)
    assert df.load_dataset(cfg)[0].shape == (64, 3, 32, 32)
    torch.distributed.destroy_process_group()


def test_torchrun_downloads_on_one_rank(tmp_path):
    """Ranks downloading into one folder at once corrupt the archive: rank 0 downloads, rank 1 waits, then reads."""
    results = launch_two(f"import test_deep_fusion as t; t.download_worker({str(tmp_path)!r})")
    assert [code for code, _ in results] == [0, 0], results
    assert (tmp_path / "downloads.log").read_text() == "rank 0: train\nrank 0: test\n"


def stop_worker(out):
    """One rank of a run whose projections coincide from epoch 6 on, while rank 0's monitor sees the backbone's
    kNN below its random initialisation's from epoch 4 (a warning at the end, never a stop)."""
    real, calls = df.nt_xent, []

    def collapsed_from_epoch_6(z1, z2, tau):  # 16 steps an epoch
        calls.append(1)
        return real(z1 * 0 + 1, z2 * 0 + 1, tau) if len(calls) > 5 * 16 else real(z1, z2, tau)

    df.nt_xent = collapsed_from_epoch_6
    knn = iter([0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])  # epochs 0 (init) to 7
    monitor = lambda *args, **kwargs: {"knn_acc": next(knn)}  # noqa: E731
    args = "--synthetic-train 128 --synthetic-test 64 --batch-size 8 --epochs 7 --warmup-epochs 0 --eval-every 1"
    args += " --head-dim 16 --head-depth 1 --head-heads 2 --head-out 8 --knn-k 8 --device cpu --run-name stop"
    df.main([*args.split(), "--out-dir", out], job=lambda cfg, ckpt: df.run(cfg, ckpt, monitor=monitor))


def test_a_stop_ends_every_torchrun_rank_with_one_line(tmp_path):
    """Before, a kNN rule stopped rank 0 alone (here at epoch 5: two monitors past 50 steps below the initial
    kNN) and left rank 1 in its next collective; now the loss floor, which every rank computes, stops both."""
    t0 = time.time()
    results = launch_two(f"import test_deep_fusion as t; t.stop_worker({str(tmp_path)!r})", timeout=90)
    assert time.time() - t0 < 90
    for code, err in results:
        last = err.strip().splitlines()[-1]
        assert code == 1 and "training collapsed at epoch 6: loss 2.7081 sits at log(2N-1) = 2.7081" in last, err
    assert load_ckpt(tmp_path / "stop" / "checkpoint.pt")["epoch"] == 5  # the last good one


def spawned(rank, world, store, out):
    """A rank started by torch.multiprocessing.spawn, with its own process group and no torchrun variables."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    h = torch.full((4, 3), float(rank))  # this rank's [v1_r; v2_r]: B = 2 images
    cfg = parse_args(["--synthetic-train", "32", "--batch-size", "8", "--knn-k", "8", "--device", "cpu"])
    x = df.synthetic_dataset(32, 0)[0]
    v1 = next(df.batches(cfg, x, 0, torch.Generator(), *df.MEAN_STD["synthetic"]))[1]
    torch.save({"z": df.gather_tokens(h), "v1": v1}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_process_group_started_by_the_caller(tmp_path, monkeypatch):
    """Rank and G come from the process group, not only from torchrun's variables: the tokens of both ranks are
    gathered, and each rank takes its own N/G images."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    torch.multiprocessing.spawn(spawned, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in range(2)]
    for x in r:  # [v1_0; v1_1; v2_0; v2_1]: each row's rank
        assert x["z"][:, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert r[0]["v1"].shape[0] == r[1]["v1"].shape[0] == 4 and not torch.equal(r[0]["v1"], r[1]["v1"])


def test_one_process_creates_no_process_group(tmp_path):
    run_main(tmp_path, "--epochs", "1")
    assert not torch.distributed.is_initialized()


# ---- Bad input: one line, exit 2, nothing written --------------------------------------


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--dataset", "cifar"], ["--dataset", "invalid choice", "cifar10", "see --help"]),
        (["--head", "mlp"], ["--head", "invalid choice"]),
        (["--arch", "resnet19"], ["--arch", "resnet18"]),
        (["--device", "tpu"], ["--device"]),
        (["--datset", "cifar10"], ["unrecognized arguments: --datset", "see --help"]),
        (["--epochs", "0"], ["--epochs 0", "positive"]),
        (["--epochs", "ten"], ["--epochs", "invalid int"]),
        (["--batch-size", "1"], ["--batch-size 1", "2 or more"]),
        (["--batch-size", "-4"], ["--batch-size -4", "positive"]),
        (["--tau", "0"], ["--tau 0", "positive"]),
        (["--tau", "-0.5"], ["--tau -0.5", "positive"]),
        (["--lr", "0"], ["--lr 0", "positive"]),
        (["--knn-k", "5000"], ["--knn-k 5000", "--knn-k 2048 or less"]),
        (["--batch-size", "4096"], ["--batch-size 4096", "2048 training images"]),
        (["--head-dim", "30", "--head-heads", "4"], ["--head-dim 30", "--head-heads 4"]),
        (["--batch-size", "9", "WORLD=2"], ["--batch-size 9", "2 processes"]),
    ],
)
def test_bad_arguments(tmp_path, capsys, monkeypatch, argv, fragments):
    for env in [a for a in argv if "=" in a]:  # torchrun's WORLD_SIZE, read before the process group exists
        monkeypatch.setenv("WORLD_SIZE", env.split("=")[1])
        argv = [a for a in argv if a != env]
    expect_error(capsys, [*argv, "--out-dir", str(tmp_path / "out")], *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys):
    expect_error(capsys, ["--device", "cuda"], "--device cuda", "--device cpu")


def make_imagefolder(root, classes=("a", "b"), val_classes=None, per_class=6):
    from PIL import Image

    for split, names in (("train", classes), ("val", val_classes or classes)):
        for k, c in enumerate(names):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 20), (40 * k, 10 * i, 100)).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_trains_with_a_class_balanced_attention_batch(tmp_path):
    """An image folder is read class by class; the attention batch must still mix classes."""
    root = make_imagefolder(tmp_path / "data")
    argv = "--dataset imagefolder --image-size 16 --arch tiny --batch-size 4 --epochs 1 --head-dim 16 --head-depth 1"
    argv += " --head-heads 2 --head-out 8 --knn-k 3 --attn-batch 4 --linear-epochs 2 --device cpu --run-name folder"
    r = df.main([*argv.split(), "--data-dir", str(root), "--out-dir", str(tmp_path / "runs")])
    assert 0 <= r["knn_acc"] <= 1 and len(r["fusion"]) == 1
    # 2 + 2 images -> 8 tokens, nu = 4: chance (4 - 2) / 8. The first 4 images (one class) would give 0.75.
    assert r["fusion_chance"] == pytest.approx(0.25)


def test_balanced_sample_on_class_sorted_labels():
    y = torch.arange(10).repeat_interleave(100)  # sorted by class, as an image folder lists it
    idx = df.balanced_sample(y, 128, seed=0)
    counts = torch.bincount(y[idx], minlength=10)
    assert len(idx.unique()) == 128 and counts.min() == 12 and counts.max() == 13
    assert torch.equal(idx, df.balanced_sample(y, 128, seed=0))  # the same on every run of a seed
    assert not torch.equal(idx, df.balanced_sample(y, 128, seed=1))
    labels, pair = paired_batch(counts.tolist())
    chance = df.fusion_score(torch.full((256, 256), 1 / 256), labels, pair)[1]
    assert chance == pytest.approx(0.1 - 2 / 256, abs=2e-3)  # (nu - 2) / n, not ~1
    uneven = torch.cat([torch.zeros(90), torch.ones(10)]).long()  # a small class gives all it has
    assert torch.bincount(uneven[df.balanced_sample(uneven, 30, seed=0)]).tolist() == [20, 10]


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("missing", "expected image files"),
        ("no_classes", "expected image files"),
        ("differ", "classes differ"),
        ("one_class", "at least 2 classes"),
        ("corrupt", "cannot read image"),
    ],
)
def test_imagefolder_errors(tmp_path, capsys, case, fragment):
    root = tmp_path / "data"
    if case == "no_classes":
        (root / "train").mkdir(parents=True), (root / "val").mkdir()
    elif case == "differ":
        make_imagefolder(root, val_classes=("a", "c"))
    elif case == "one_class":
        make_imagefolder(root, classes=("a",))
    elif case == "corrupt":
        make_imagefolder(root)
        (root / "train" / "b" / "3.png").write_bytes(b"not a png")
    argv = ["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "2", "--knn-k", "2"]
    err = expect_error(capsys, [*argv, "--out-dir", str(tmp_path / "out")], fragment)
    if case == "corrupt":
        assert str(root / "train" / "b" / "3.png") in err
    else:
        assert "--data-dir" in err and not (tmp_path / "out").exists()


def test_tiny_imagenet_archive_layout(tmp_path):
    """Tiny-ImageNet-200 as extracted: train/<wnid>/images/*.JPEG (and a boxes file), val/images/*.JPEG with the
    classes in val/val_annotations.txt. Read as it comes; the val labels follow the annotations."""
    from PIL import Image

    root, wnids = tmp_path / "tiny-imagenet-200", ["n01443537", "n01629819", "n01641577"]
    for k, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(4):
            Image.new("RGB", (64, 64), (100 * k, 50, 50)).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    val_classes = [2, 0, 1, 1, 0, 2]
    for i, k in enumerate(val_classes):
        Image.new("RGB", (64, 64), (100 * k, 50, 50)).save(root / "val" / "images" / f"val_{i}.JPEG")
    lines = [f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63" for i, k in enumerate(val_classes)]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    argv = ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16", "--batch-size", "4"]
    x_train, y_train, x_test, y_test = df.load_dataset(parse_args([*argv, "--knn-k", "3"]))
    assert x_train.shape == (12, 3, 16, 16) and x_test.shape == (6, 3, 16, 16)
    assert y_test.tolist() == val_classes and (x_test[:, 0, 8, 8].float() / 100).round().long().tolist() == val_classes
    assert (x_train[:, 0, 8, 8].float() / 100).round().long().tolist() == y_train.tolist()  # same class indices
    tiny = "--arch tiny --epochs 1 --head-dim 16 --head-depth 1 --head-heads 2 --head-out 8 --knn-k 3 --attn-batch 4"
    r = df.main([*argv, *tiny.split(), "--linear-epochs", "2", "--device", "cpu", "--out-dir", str(tmp_path / "runs")])
    assert 0 <= r["knn_acc"] <= 1


def fake_cifar(root, name):
    """A few images in torchvision's own CIFAR format (pickled batches), as a download would leave them."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    cifar10 = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if cifar10 else "cifar-100-python")
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if cifar10 else ["train", "test"]
    for file in files:
        y = rng.integers(0, 10 if cifar10 else 100, 16).tolist()
        entry = {"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8), "labels" if cifar10 else "fine_labels": y}
        (folder / file).write_bytes(pickle.dumps(entry))
    names = {"label_names" if cifar10 else "fine_label_names": [str(k) for k in range(10 if cifar10 else 100)]}
    (folder / ("batches.meta" if cifar10 else "meta")).write_bytes(pickle.dumps(names))


@pytest.mark.parametrize("name,n_train", [("cifar10", 80), ("cifar100", 16)])
def test_cifar_path_offline(tmp_path, monkeypatch, name, n_train):
    """The main command's data path without a network: torchvision's CIFAR reader on files in its own format."""
    import torchvision

    fake_cifar(tmp_path / "data", name)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)  # no real checksums
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    argv = f"--dataset {name} --data-dir {tmp_path / 'data'} --arch tiny --batch-size 8 --knn-k 4".split()
    x_train, y_train, x_test, y_test = df.load_dataset(parse_args(argv))
    assert x_train.shape == (n_train, 3, 32, 32) and x_train.dtype == torch.uint8 and len(y_test) == 16
    tiny = "--epochs 1 --head-dim 16 --head-depth 1 --head-heads 2 --head-out 8 --attn-batch 4 --linear-epochs 2"
    r = df.main([*argv, *tiny.split(), "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--run-name", "c"])
    assert 0 <= r["knn_acc"] <= 1 and len(r["fusion"]) == 1


def test_cifar_download_failure_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")]
    expect_error(capsys, argv, "--dataset cifar10", "download to", "Network is unreachable", "--dataset synthetic")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script,argv,fragment",
    [
        (ablations, ["--clip", "-1"], "--clip -1.0: must be positive"),
        (ablations, ["--head-lr", "0"], "--head-lr 0.0: must be positive"),
        (ablations, ["--head-wd", "-0.1"], "--head-wd -0.1: must be 0 or more"),
        (ablations, ["--attn", "soft"], "invalid choice"),
        (ablations, ["--freeze-backbone", "no-such-run/checkpoint.pt"], "no such file; give 'random' or a run's"),
        (figure, ["no-such-run", "out.png"], "not a finished Transformer run"),
        (figure, ["only-one-argument"], "required"),
        (table, ["no-such-table"], "no table 'no-such-table'; choose from batch"),
        (authors_eval, ["no-such-run"], "no-such-run: no checkpoint.pt; give the folder of a finished"),
    ],
)
def test_experiments_bad_input_is_one_line(tmp_path, capsys, script, argv, fragment):
    with pytest.raises(SystemExit) as e:
        script.main([*argv, "--out-dir", str(tmp_path / "out")] if script is ablations else argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_a_frozen_backbone_is_refused_under_torchrun(tmp_path, capsys, monkeypatch):
    """DistributedDataParallel cannot wrap an f with nothing to train: one line before any run starts."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(SystemExit) as e:
        ablations.main(["--freeze-backbone", "random", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith("--freeze-backbone random: not under torchrun; run it in one process")
    assert not (tmp_path / "out").exists()


# ---- Bad checkpoints -------------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_checkpoint_is_refused(tmp_path, capsys):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": df.CKPT_FORMAT, "x": Payload(str(target))}, path)
    expect_error(capsys, ["--resume", str(path)], "--resume", "refused")
    assert not target.exists()
    torch.load(path, weights_only=False)  # what weights_only=True prevents
    assert target.exists()


def test_bad_checkpoints(tmp_path, capsys):
    run_main(tmp_path, "--epochs", "1", name="ok")
    capsys.readouterr()  # the run's own output
    good = tmp_path / "ok" / "checkpoint.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expect_error(capsys, ["--resume", str(truncated)], f"--resume {truncated}", "not a readable")
    expect_error(capsys, ["--resume", str(tmp_path / "nope.pt")], "--resume", "FileNotFoundError")
    notes = tmp_path / "notes.pt"
    notes.write_text("hello")
    expect_error(capsys, ["--resume", str(notes)], "--resume", "not a readable deep_fusion.py checkpoint")
    other = tmp_path / "other.pt"
    for foreign in ({"weights": torch.ones(2)}, {"format": "deep-fusion/4"}):  # another program's, an older one's
        torch.save(foreign, other)
        expect_error(capsys, ["--resume", str(other)], f"not a {df.CKPT_FORMAT} checkpoint", "start a new run")
    expect_error(capsys, ["--resume", str(good), "--tau", "0.3"], "another config", "--tau 0.3")


# ---- Benchmark and CUDA ----------------------------------------------------------------


def test_benchmark_cpu(tmp_path, capsys):
    r = benchmark.main(["--device", "cpu", "--batch-size", "64", "--bench-steps", "2", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "augmentation speed-up:" in out
    assert r["aug_speedup"] == pytest.approx(r["aug_batched_img_s"] / r["aug_per_image_img_s"])
    assert 0 < r["transformer_head_share"] < 1.5 and r["step_img_s_ffn"] > 0 and r["peak_memory_mb"] > 0
    assert json.loads((tmp_path / "benchmark-cpu.json").read_text()) == r
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--bench-steps", "0", "--device", "cpu"])
    assert e.value.code == 2 and "--bench-steps 0: must be positive" in capsys.readouterr().err


def test_augment_copies_nothing_from_the_host_per_call(monkeypatch):
    """CPU stand-in for the CUDA test below: after the first call (which builds the device's
    constants), augment neither builds a tensor from host data nor inverts a matrix, the two
    things that would make the host wait for a GPU on every view."""
    x, _ = df.synthetic_dataset(8, 0)
    views(x)  # builds the constants once

    def forbidden(*args, **kwargs):
        raise AssertionError("host-to-device copy or sync in augment")

    monkeypatch.setattr(torch, "tensor", forbidden)
    monkeypatch.setattr(torch.linalg, "inv", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    views(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", ["transformer", "ffn"])
def test_cuda_training_steps_have_no_host_sync(head):
    """The loop body of train(): batches (on-device augmentation), the lr schedule, train_step
    and the NaN bookkeeping, under set_sync_debug_mode("error"): any host sync raises."""
    cfg = parse_args([*TINY, "--head", head, "--device", "cuda", "--precision", "bf16"])
    dev = torch.device("cuda")
    f, g, opt, amp, scaler = df.build(cfg, 32, dev)
    x = df.synthetic_dataset(6 * cfg.batch_size, 0)[0].to(dev)
    gen, mean_std = torch.Generator(device=dev), df.MEAN_STD["synthetic"]
    it = df.batches(cfg, x, 0, gen, *mean_std)
    _, v1, v2 = next(it)  # warm-up outside: the epoch's order is copied once, kernels load
    df.train_step(f, g, opt, scaler, v1, v2, cfg.tau, amp)
    first_bad = torch.tensor(-1, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, v1, v2 in it:
            for group in opt.param_groups:
                group["lr"] = df.lr_at(step, 6, 1, group["base_lr"])
            loss = df.train_step(f, g, opt, scaler, v1, v2, cfg.tau, amp)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step == 5 and int(first_bad) == -1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training(tmp_path):
    r = df.main([*TINY, "--device", "cuda", "--out-dir", str(tmp_path), "--run-name", "cuda"])
    assert r["device"].startswith("cuda") and math.isfinite(r["loss"])


# ---- The notebook ----------------------------------------------------------------------


def numbers_not_shown(nb):
    """The decimal numbers (two or more digits after the point) that a markdown cell quotes and no code cell or
    output of the notebook shows: prose that says more than the notebook printed."""
    shown = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            shown.append(cell.source)
            for out in cell.get("outputs", []):
                shown.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    shown = "\n".join(shown)
    quoted = {
        m
        for c in nb.cells
        if c.cell_type == "markdown"
        for m in re.findall(r"(?<![\w.$\\^_{/])(\d+\.\d{2,})(?!\w)", c.source)
    }
    return sorted(q for q in quoted if q not in shown and q != "2403.18681")


@pytest.mark.skipif(os.environ.get("SKIP_NOTEBOOK") == "1", reason="SKIP_NOTEBOOK=1")
def test_notebook_runs_top_to_bottom_and_its_prose_quotes_its_outputs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
    assert not numbers_not_shown(nb)  # on this run's outputs, not the committed ones
    heads = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    listed = re.findall(r"(\d)\. ", nb.cells[0].source.split("Sections:")[1])
    assert [h.split(".")[0].removeprefix("## ") for h in heads] == listed  # the contents cell matches the headings


def test_the_prose_check_can_fail():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("kNN rose to 74.80%, F~ to 0.153.")])
    nb.cells.append(nbformat.v4.new_code_cell("print(0.153)"))
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="0.153\n")]
    assert numbers_not_shown(nb) == ["74.80"]


# ---- Deep Fusion learned: the minimal setting ------------------------------------------


def test_learned_setting_data_and_report(tmp_path, monkeypatch, capsys):
    bases, nuisance_basis, centres = learned.setting(0)
    span = torch.cat([*bases, nuisance_basis], dim=1)  # (DIM, K SUB + NUIS): orthonormal columns
    assert torch.allclose(span.T @ span, torch.eye(span.shape[1]), atol=1e-5)
    assert torch.allclose(centres.norm(dim=1), torch.full((learned.K,), 2.0))
    for nuisance in (0.0, 3.0):
        x, y = learned.views(bases, nuisance_basis, centres, 64, nuisance, torch.Generator().manual_seed(0))
        parts = torch.einsum("kds,nd->nks", bases, x).norm(dim=2)  # each token's part in every class's subspace
        assert x.shape == (128, learned.DIM) and (parts.argmax(1) == y.repeat(2)).all()  # its own class's is largest
        off = (x @ nuisance_basis).norm(dim=1).mean()  # the part in the nuisance subspace
        assert off < 0.5 if nuisance == 0 else off > 5
    r = learned.train_one("tied", "sgd", depth=2, nuisance=1.0, steps=5, backbone=True)
    assert len(r["fusion_norm"]) == len(r["control_x"]) == len(r["control_h"]) == len(r["entropy"]) == 2
    assert len(r["oracle_x"]) == 2 and all(0 <= v <= 1 for v in r["oracle_x"])
    assert 0.2 < r["chance"] < 0.3 and all(0 <= v <= 1 for v in r["fusion_norm"] + r["control_x"])
    monkeypatch.setattr(
        learned, "GRID", [(1.0, "adamw", "authors", 1, False, 1.0), (1.0, "adamw", "authors", 1, True, 1.0)]
    )
    monkeypatch.setattr(learned, "train_one", lambda *a, **k: {**r, "nuisance": a[3], "opt": a[1], "head": a[0],
                                                               "depth": a[2], **k})  # fmt: skip
    runs = learned.table([0, 1], tmp_path)
    md = (tmp_path / "table.md").read_text()
    assert len(runs) == 4 and "--table --seeds 0 1" in md  # the same row with and without a backbone: 2 runs each
    assert md.count(" ± ") == 5 + 6 + 1 and md.count("— (h = x)") == 1  # the control on h where there is an h
    assert md.count("| 1 | adamw | authors | 1 |") == 4  # each row in the table and in the by-layer table
    monkeypatch.setattr(learned, "train_one", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert learned.table([0, 1], tmp_path) == runs
    with pytest.raises(SystemExit) as e:
        learned.main(["--depth", "0"])
    assert e.value.code == 2 and "--depth 0: must be positive" in capsys.readouterr().err


def test_the_sgd_sweep_scales_the_learning_rate_and_measures_the_token_control(tmp_path, monkeypatch):
    bases = []
    lr_at = df.lr_at
    monkeypatch.setattr(
        df, "lr_at", lambda step, total, warmup, base: bases.append(base) or lr_at(step, total, warmup, base)
    )
    runs = [learned.train_one("authors", "sgd", depth=2, steps=2, batch_size=16, lr_scale=s) for s in (1.0, 5.0)]
    assert bases[-1] == pytest.approx(5 * bases[0]) and bases[0] == pytest.approx(0.06 * 16 / 128)  # the recipe's
    assert "lr_scale" not in runs[0] and runs[1]["lr_scale"] == 5.0 and runs[0]["fusion_norm"] != runs[1]["fusion_norm"]
    assert len(runs[1]["control_tokens"]) == 2 and all(0 < v < 1 for v in runs[1]["control_tokens"])
    monkeypatch.setattr(learned, "SWEEP_GRID", [(3.0, "sgd", "authors", 2, False, 5.0)])
    monkeypatch.setattr(learned, "train_one", lambda *a, **k: runs[1] | {"seed": k["seed"]})
    learned.table([0, 1], tmp_path, sweep=True)
    md = (tmp_path / "table.md").read_text()
    assert "| 3 | sgd x5 lr | authors | 2 | none |" in md and "token control by layer" in md


# ---- The results-table script ----------------------------------------------------------


def test_every_table_names_its_arms_distinctly():  # a run folder is named after its arm
    for arms in table.TABLES.values():
        assert len({table.slug(arm) for arm, _, _ in arms}) == len(arms)
        assert all(runner in ("core", "ablation") for *_, runner in arms)


def test_each_arm_is_paired_with_the_mlp_of_its_own_setting():
    refs = table.reference("batch")  # an MLP per batch size: a head at N = 64 against the MLP at N = 64
    assert refs["authors' head, N = 64"] == "SimCLR MLP head, N = 64" and refs["tied head, N = 512"].endswith("512")
    assert refs["SimCLR MLP head, N = 64"] is None  # the MLPs are the references, not arms against one
    heads = table.reference("heads")  # two MLP arms: the 10-layer one is an arm against SimCLR's
    mlp = next(arm for arm, flags, _ in table.TABLES["heads"] if flags == "--head ffn")
    assert heads[mlp] is None and {ref for arm, ref in heads.items() if arm != mlp} == {mlp}
    runs = [  # two seeds of two N: the pairs are N-wise, so the per-seed differences are the N-wise ones
        {"arm": arm, "seed": s, "results": {"knn_acc": acc, "linear_acc": acc}}
        for arm, accs in (
            ("SimCLR MLP head, N = 64", (0.50, 0.40)),
            ("SimCLR MLP head, N = 512", (0.30, 0.20)),
            ("authors' head, N = 64", (0.52, 0.41)),
            ("authors' head, N = 512", (0.29, 0.20)),
        )
        for s, acc in enumerate(accs)
    ]
    rows = "\n".join(table.paired(runs, refs))
    assert "| authors' head, N = 64 minus SimCLR MLP head, N = 64: kNN % | +2.0 +1.0 | +1.5 ± 0.7 | 2+ 0- |" in rows
    assert "| authors' head, N = 512 minus SimCLR MLP head, N = 512: kNN % | -1.0 +0.0 | -0.5 ± 0.7 | 0+ 1- |" in rows
    assert "| SimCLR MLP head, N = 64 minus" not in rows
    summary = "\n".join(table.summary(runs, refs))  # what --summary prints: the same N-wise pairs
    assert "| authors' head, N = 512 | 24.5 ± 6.4 | 24.5 ± 6.4 | -0.5 ± 0.7 (0+ 1-; CI ±" in summary
    assert "| SimCLR MLP head, N = 64 | 45.0 ± 7.1 | 45.0 ± 7.1 | — |" in summary
    assert table.reference("learned_long")["authors' head, its own AdamW, 100 epochs"] == "SimCLR MLP head, 100 epochs"
    assert table.pairs([1.0], 1) == {"signs": "1+ 0-"} and table.pairs([0.1, 0.1], 1)["d"] == "—"  # no spread
    head = [  # F~ minus its control layer by layer, as pairs: layer 1 above in every seed, layer 2 not
        {"arm": "h", "seed": s, "results": {"fusion_norm": [f, 0.1], "control_norm": [0.1, c], "entropy": [5.0, 5.0]}}
        for s, (f, c) in enumerate(((0.20, 0.11), (0.21, 0.09), (0.19, 0.10)))
    ]
    for run in head:
        run["results"]["token_control_norm"] = run["results"]["control_norm"]
    layers = "\n".join(table.by_layer(head))
    assert "| h | backbone control | +0.1000 (3+ 0-)* · +0.0000 (1+ 1-) |" in layers
    assert "| h | token control | +0.1000 (3+ 0-)* · +0.0000 (1+ 1-) |" in layers


def test_table_runs_arms_by_seeds_writes_markdown_and_json_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        table.TABLES,
        "tiny",
        [
            ("MLP", "--head ffn", "core"),
            ("uniform", "--attn uniform " + table.MLP_F.replace("simclr-mlp-head--reference", "mlp"), "ablation"),
        ],
    )  # the second arm trains its head on the same seed's MLP backbone, frozen
    argv = ["tiny", "--seeds", "0", "1", "--out-dir", str(tmp_path), "--", *TINY, "--epochs", "1"]
    runs = table.main(argv)
    assert [(r["arm"], r["seed"]) for r in runs] == [("MLP", 0), ("MLP", 1), ("uniform", 0), ("uniform", 1)]
    assert runs[0]["results"]["knn_acc"] != runs[1]["results"]["knn_acc"]  # two seeds, two runs
    md = (tmp_path / "tiny" / "table.md").read_text()
    table_md, layers_md = md.split("Summary, read as pairs")[0], md.split("Every layer")[1]
    rows = [line for line in table_md.splitlines() if line.startswith("| MLP") or line.startswith("| uniform")]
    assert len(rows) == 2 and " ± " in rows[0] and "python experiments/table.py tiny --seeds 0 1" in md
    assert "| uniform | 0.073 0.073 | " in layers_md and "| MLP" not in layers_md  # 2 layers; the MLP has none
    for seed in (0, 1):  # the frozen backbone is the MLP run's, to the last BatchNorm statistic
        f_mlp, f_frozen = (
            torch.load(tmp_path / "tiny" / f"{arm}-seed{seed}" / "checkpoint.pt")["f"] for arm in ("mlp", "uniform")
        )
        assert all(torch.equal(f_mlp[k], v) for k, v in f_frozen.items())
    assert "—" in rows[0] and "—" not in rows[1].split("|")[7]  # the MLP has no attention; uniform has F~
    assert json.loads((tmp_path / "tiny" / "runs.json").read_text()) == runs
    meta = runs[0]["results"]["provenance"]
    assert meta["torch"] == torch.__version__ and meta["threads"] == torch.get_num_threads() and meta["commit"]
    paired = md.split("Paired differences")[1]
    knn_gap = [runs[2 + s]["results"]["knn_acc"] - runs[s]["results"]["knn_acc"] for s in (0, 1)]  # uniform - MLP
    assert f"| uniform minus MLP: kNN % | {100 * knn_gap[0]:+.1f} {100 * knn_gap[1]:+.1f} | " in paired
    assert "| uniform: F~ minus its backbone control, last layer |" in paired and "| MLP: F~" not in paired
    assert "| uniform: F~ minus its token control, last layer |" in paired
    assert f"Ran at: {json.dumps(meta)}" in md
    capsys.readouterr()
    table.main(["tiny", "--summary", "--out-dir", str(tmp_path)])  # from runs.json alone, as a reader checks it
    printed = capsys.readouterr().out
    assert (
        printed.strip() in md
        and f"| uniform | {100 * statistics.mean(r['results']['knn_acc'] for r in runs[2:]):.1f} ± " in printed
    )
    ci = table.T975[1] * statistics.stdev(100 * d for d in knn_gap) / 2**0.5
    assert (
        f"{100 * statistics.mean(knn_gap):+.1f} ± {100 * statistics.stdev(knn_gap):.1f} (" in printed
        and f"CI ±{ci:.1f})" in printed
    )
    epochs = [row.strip("| ").split(" | ") for row in (tmp_path / "tiny" / "epochs.md").read_text().splitlines()[2:]]
    assert [(seed, epoch) for _, seed, epoch, *_ in epochs] == [(s, e) for s in "0101" for e in "01"]  # init, end
    assert epochs[-1][3] == f"{100 * runs[-1]['results']['knn_acc']:.1f}" and epochs[-1][5] != "—"
    monkeypatch.setattr(df, "main", lambda *a, **k: pytest.fail("a finished run ran again"))
    monkeypatch.setattr(ablations, "main", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert table.main(argv) == runs
    # a run made before the token control: filled in from its checkpoint, as training measured it
    done = tmp_path / "tiny" / "uniform-seed1" / "results.json"
    recorded = json.loads(done.read_text())
    done.write_text(json.dumps({k: v for k, v in recorded.items() if k != "token_control_norm"}))
    assert table.main(argv)[3]["results"]["token_control_norm"] == pytest.approx(
        recorded["token_control_norm"], abs=1e-6
    )
    # the same run in another table is copied, not trained; another seed is not the same run
    monkeypatch.setitem(table.TABLES, "tiny2", [("MLP again", "--head ffn", "core")])
    again = table.main(["tiny2", "--seeds", "1", "--out-dir", str(tmp_path), "--", *TINY, "--epochs", "1"])[0]
    assert again["results"]["knn_acc"] == runs[1]["results"]["knn_acc"]
    assert again["results"]["provenance"]["copied_from"] == str(tmp_path / "tiny" / "mlp-seed1")
    assert table.same_run(tmp_path / "tiny2", [*TINY, "--epochs", "1", "--head", "ffn", "--seed", "2"], "core") is None

    # a run the program stops (collapse, NaN: exit 1) is recorded and not trained again
    def stops(argv, job=None):
        Path(argv[argv.index("--out-dir") + 1], argv[argv.index("--run-name") + 1]).mkdir(parents=True)
        raise SystemExit(1)

    monkeypatch.setitem(table.TABLES, "tiny3", [("stops", "--head ffn --lr 9", "core")])
    monkeypatch.setattr(df, "main", stops)
    argv3 = ["tiny3", "--seeds", "0", "--out-dir", str(tmp_path), "--", *TINY]
    assert table.main(argv3)[0]["results"] is None and (tmp_path / "tiny3" / "stops-seed0" / "stopped.json").exists()
    monkeypatch.setattr(df, "main", lambda *a, **k: pytest.fail("a stopped run ran again"))
    assert (
        table.main(argv3)[0]["results"] is None and "(1 of 1 stopped)" in (tmp_path / "tiny3" / "table.md").read_text()
    )


# ---- The documentation: every command it shows runs, every name it gives exists --------

DOCS = ["README.md", "experiments/README.md", "tutorial.ipynb"]
RUN_FILES = set("config.json metrics.jsonl results.json checkpoint.pt attention.pt attention.png ablation.json".split())
RUN_FILES |= set("authors_1nn.json table.md runs.json epochs.md benchmark-cpu.json val_annotations.txt".split())
RUN_FILES |= {"provenance.json", "stopped.json"}  # table.py's, in each run folder
RUN_KEYS = set("epoch loss lr time_s knn_acc linear_acc fusion fusion_norm fusion_chance fusion_norm_chance".split())
RUN_KEYS |= set("self_mass partner_mass entropy control_norm control_beta fusion_norm_per_head knn_acc_init".split())
RUN_KEYS |= set("device train_time_s attn labels pair h head_1nn_acc backbone_1nn_acc".split())
RUN_KEYS |= set("token_control_norm control_tokens lr_scale copied_from".split())


def doc_texts():
    """(file, prose, code) of each document; a notebook's markdown is prose, its code cells code."""
    for name in DOCS:
        text = (ROOT / name).read_text()
        if name.endswith(".ipynb"):
            cells = json.loads(text)["cells"]
            prose, code = (
                "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == k) for k in ("markdown", "code")
            )
            yield name, prose, code
        else:
            yield name, text, ""


def accepted_flags(script):
    core = {"--" + f.name.replace("_", "-") for f in df.dataclasses.fields(df.Config)} | {"--help"}
    own = {"experiments/ablations.py": ablations.FLAGS, "experiments/benchmark.py": benchmark.FLAGS}
    own |= {"experiments/table.py": table.FLAGS, "experiments/figure.py": figure.FLAGS}
    own |= {"experiments/learned.py": learned.FLAGS, "experiments/constructed.py": constructed.FLAGS}
    names = {name for name, _ in own.get(script, ()) if name.startswith("--")}
    takes_core = script in ("deep_fusion.py", "experiments/ablations.py", "experiments/benchmark.py")
    return names | (core if takes_core else set())


def test_every_command_in_the_docs_takes_the_flags_it_shows():
    pattern = re.compile(r"(?:python|torchrun)\b[^`#\n]*?\b((?:experiments/)?\w+\.py)([^`#\n]*)")
    seen = 0
    for name, prose, code in doc_texts():
        for script, args in pattern.findall(prose.replace("\\\n", " ")):
            assert (ROOT / script).exists(), (name, script)
            words = args.split()
            if script == "experiments/table.py" and "--" in words:  # table.py's own, then deep_fusion.py's
                cut = words.index("--")
                words, core = words[:cut], words[cut + 1 :]
                bad = {w for w in core if w.startswith("--")} - accepted_flags("deep_fusion.py")
                assert not bad, (name, script, bad)
            bad = {w.rstrip(",.;:") for w in words if w.startswith("--")} - accepted_flags(script)
            assert not bad, (name, script, args, bad)
            seen += 1
        for flag in re.findall(r"\"(--[a-z][a-z0-9-]*)\"", code):  # main([...]) calls in the notebook
            assert flag in accepted_flags("experiments/ablations.py") | accepted_flags("experiments/table.py"), flag
    assert seen > 20  # the check read the commands


def test_every_file_and_name_in_the_docs_exists():
    modules = [df, fusion, th, ablations, authors_eval, benchmark, table, figure]
    known = {f.name for f in df.dataclasses.fields(df.Config)} | RUN_KEYS | set(table.TABLES) | {"deep_fusion"}
    missing = []
    for name, prose, _ in doc_texts():
        for span in re.findall(r"`([^`\n]+)`", prose):
            word = span.split("(")[0].strip()
            if re.fullmatch(r"[\w./-]+\.(py|md|ipynb|png|txt|json|jsonl|pt)", word) and "<" not in word:
                found = (ROOT / word).exists() or (ROOT / "experiments" / word).exists() or word in RUN_FILES
                found = found or word.startswith(("runs/", "tables/", "data/", "train/", "val/"))  # a run's, a layout
                found = found or word.startswith("src/")  # the authors' repository, cited by name
            elif word.startswith("test_"):
                found = any(t.startswith(word.rstrip("_…*")) for t in globals())
            elif re.fullmatch(r"(df\.)?[A-Za-z_]\w*(\.\w+)?", word) and ("_" in word or word[0].isupper()):
                word = word.removeprefix("df.")
                owner, _, attr = word.partition(".")
                found = (
                    word in known
                    or word.isupper()
                    or any(hasattr(m, owner) and (not attr or hasattr(getattr(m, owner), attr)) for m in modules)
                )
            else:
                continue
            if not found:
                missing.append((name, word))
    assert not missing, missing


def test_the_readmes_own_loop_trains_the_head():
    """The README's lines that put TransformerHead and nt_xent into someone else's loop, run as they are printed."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## The head in your own SimCLR\n.*?```python\n(.*?)```", text, re.S).group(1)
    N, gen = 4, torch.Generator().manual_seed(0)
    loader = [torch.rand(2, N, 3, 32, 32, generator=gen).unbind() for _ in range(2)]  # the user's (x1, x2) batches
    scope = {"N": N, "loader": loader}
    exec(code, scope)
    assert math.isfinite(scope["loss"].item()) and scope["loss"].item() > 0
    g, opt = scope["g"], scope["opt"]
    assert len(opt.state) == len([*scope["f"].parameters(), *g.parameters()])  # every parameter took its steps
    assert all(opt.state[p]["momentum_buffer"].abs().sum() > 0 for p in g.parameters() if p.requires_grad)


def test_the_readmes_reading_path_points_at_the_code():
    """Each row of the README's reading path gives a line range of deep_fusion.py: every name in the row is
    defined inside it, and the ranges cover every top-level function and class of the file."""
    import ast

    tree = ast.parse((ROOT / "deep_fusion.py").read_text())
    defs = {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    rows = re.findall(r"^\|[^|]+\| L(\d+)-(\d+) \|(.+)\|$", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 8
    covered = set()
    for start, end, text in rows:
        for name in re.findall(r"`(\w+)`", text):
            assert int(start) <= defs[name] <= int(end), (name, start, end)
        covered |= {name for name, line in defs.items() if int(start) <= line <= int(end)}
    assert covered == set(defs), set(defs) - covered


# ---- Notebook exercises and the oracle control (issue 30) ----


def notebook_exercises():
    """Section 8 of the notebook, one text per exercise: its question, code or commands, and expected outcome."""
    cells = json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]
    text = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("## 8."))
    return re.split(r"\*\*Exercise \d+", text)[1:]


def test_the_notebook_exercises_run_at_a_reduced_size(tmp_path, capsys):
    exercises = notebook_exercises()
    assert 5 <= len(exercises) <= 6 and all("*Expected" in e for e in exercises)
    commands = 0
    for exercise in exercises:
        expected = exercise.split("*Expected")[1]
        for block in re.findall(r"```python\n(.*?)```", exercise, re.S):  # as written: each takes well under a second
            exec(block, {"math": math, "torch": torch, "df": df, "th": th})
            out = capsys.readouterr().out
            for number in re.findall(r"(?<![\w.])(\d+\.\d{4})(?!\d)", expected):  # the outcome it promises
                assert number in out, (number, out)
        finals = []
        for line in re.findall(r"```bash\n(.*?)```", exercise, re.S)[0].splitlines() if "```bash" in exercise else []:
            script, *args = line.split()[1:]
            if script == "experiments/learned.py":  # a few steps of a small batch
                r = learned.main([*args, "--steps", "3", "--batch-size", "16"])
                assert len(r["fusion_norm"]) == len(r["oracle_x"]) == int(args[args.index("--depth") + 1])
            else:  # deep_fusion.py on the tiny synthetic run; the run name is the command's own
                assert script == "deep_fusion.py"
                finals.append(df.main([*TINY, *args, "--out-dir", str(tmp_path)])["knn_acc"])
            commands += 1
        if finals:  # exercise 6: the monitor, and fusion.py's monitor, leave training alone
            monitored = lambda cfg, ckpt: df.run(cfg, ckpt, monitor=fusion.evaluate)  # noqa: E731
            argv = [*TINY, "--eval-every", "1", "--out-dir", str(tmp_path), "--run-name", "fusion-monitor"]
            finals.append(df.main(argv, job=monitored)["knn_acc"])
            assert len(finals) == 3 and finals[0] == finals[1] == finals[2], finals
    assert commands >= 5


def test_the_oracle_control_projects_the_nuisance_out_and_fills_old_runs_exactly(tmp_path, monkeypatch):
    _, nuisance_basis, _ = learned.setting(0)
    x, labels, pair = learned.eval_batch(0, 3.0)
    blind = x - x @ nuisance_basis @ nuisance_basis.T
    assert (blind @ nuisance_basis).abs().max() < 1e-4  # nothing of the nuisance is left
    entropies = [5.0, 4.0]
    oracle = learned.oracle(x, nuisance_basis, labels, pair, entropies)
    assert oracle == learned.oracle(blind, nuisance_basis, labels, pair, entropies)  # it cannot see the nuisance
    raw = [fusion.cosine_control(x, labels, pair, e)[0] for e in entropies]
    assert oracle[1] > raw[1] + 0.1  # at nuisance 3 the raw cosine has lost most of the classes; the oracle has not
    r = learned.train_one("authors", "adamw", depth=1, nuisance=3.0, steps=3, batch_size=16, seed=1)
    (tmp_path / "runs.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "oracle_x"}]))
    monkeypatch.setattr(learned, "GRID", [(3.0, "adamw", "authors", 1, False, 1.0)])
    monkeypatch.setattr(learned, "train_one", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert learned.table([1], tmp_path)[0]["oracle_x"] == r["oracle_x"]  # filled in, as training computes it
    assert "oracle control" in (tmp_path / "table.md").read_text()


def test_the_committed_grid_is_measured_on_batches_its_seeds_regenerate():
    """The oracle values of the committed runs were filled in from each seed's regenerated evaluation batch: that
    batch reproduces every run's recorded control on x (to float rounding), and every run has its oracle."""
    runs = json.loads((ROOT / "experiments/results/minimal/runs.json").read_text())
    assert len(runs) == 150 and all(len(r["oracle_x"]) == len(r["fusion_norm"]) for r in runs)
    for r in [r for r in runs if r["depth"] == 1 and r["opt"] == "sgd" and r["head"] == "authors"]:  # 9 runs, 3 seeds
        x, labels, pair = learned.eval_batch(r["seed"], r["nuisance"])
        assert abs(fusion.cosine_control(x, labels, pair, r["entropy"][0])[0] - r["control_x"][0]) < 1e-4
        assert learned.oracle(x, learned.setting(r["seed"])[1], labels, pair, r["entropy"]) == pytest.approx(
            r["oracle_x"], abs=1e-4
        )


# ---- Deep Fusion's strong form: constructed, then sought in training (issue 33) ----


def test_a_second_layer_beats_the_cosine_oracle_but_not_the_bayes_oracle():
    """Cosine attention on the best per-token view x0 is its own oracle (layer 1 equals it to the bisection's
    precision); a second layer on the mixed tokens beats that metric at the same entropy by a margin well above
    layer 1's agreement, but not the Bayes oracle; NT-Xent charges the fused tokens."""
    x0, labels, pair, q = constructed.draw(3.0, 0)
    (one, two), loss = constructed.measure(x0, labels, pair, q, (5.0, 10.0))
    assert abs(one["fusion_norm"] - one["oracle"]) < 1e-3
    assert two["fusion_norm"] > two["oracle"] + 0.03 and two["entropy"] < one["entropy"]
    assert two["fusion_norm"] < two["bayes"] - 0.01 and one["fusion_norm"] < one["bayes"] - 0.01
    assert loss["fused"] > loss["per_token"] + 0.1
    (alone,), _ = constructed.measure(x0, labels, pair, q, (10.0,))  # the same sharpness without the mixing layer
    assert abs(alone["fusion_norm"] - alone["oracle"]) < 1e-3


def test_at_one_mean_entropy_softmax_of_q_maximises_the_rows_weight_on_q():
    """The Bayes oracle's bound (Gibbs): any attention whose rows have the same mean entropy puts no more weight
    on q than softmax(kappa q). Checked against random attentions, sharpened to that entropy by bisection."""
    gen = torch.Generator().manual_seed(0)
    labels, pair = torch.arange(32) % 4, torch.arange(32).roll(16)
    q = torch.rand(32, 32, generator=gen)
    q = (q + q.T) / 2
    other = df.others(labels, pair)[1]
    weight = lambda A: ((A * other / (A * other).sum(1, keepdim=True)) * q).sum(1).mean()  # noqa: E731
    for _ in range(5):
        logits = 3 * torch.randn(32, 32, generator=gen)
        A = torch.softmax(logits, 1)
        entropy = fusion.rest_entropy(A, labels, pair)
        s = q.masked_fill(~other, float("-inf")) / q.max()
        lo, hi = 0.0, 1e4
        for _ in range(60):  # as similarity_control sets kappa
            kappa = (lo + hi) / 2
            rest = torch.softmax(kappa * s, 1)
            lo, hi = (kappa, hi) if fusion.row_entropy(rest) > entropy else (lo, kappa)
        assert weight(A) <= weight(torch.softmax(kappa * s, 1)) + 1e-6


def test_constructed_sweep_writes_its_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constructed, "SEPS", (2.0,))
    monkeypatch.setattr(constructed, "BETAS", ((5.0, 10.0),))
    runs = constructed.main(["--draws", "2", "--out-dir", str(tmp_path)])
    assert len(runs) == 2 and json.loads((tmp_path / "runs.json").read_text()) == runs
    table_md = (tmp_path / "table.md").read_text()
    assert (
        "| 2 | 5, 10 |" in table_md and "2/2" in table_md and "python experiments/constructed.py --draws 2" in table_md
    )
    with pytest.raises(SystemExit) as e:
        constructed.main(["--draws", "1"])
    assert e.value.code == 2 and "--draws 1" in capsys.readouterr().err


def test_overlap_data_keep_the_committed_subspace_runs_and_their_oracle_sees_only_the_span(tmp_path):
    """--data overlap: the classes share one span, noise everywhere else; the subspace data's stream is unchanged
    (the committed grid regenerates, test above), and a folder holds one kind of data."""
    x, labels, pair = learned.eval_batch(0, 0.0, overlap=True)
    q = learned.same_class_probability(x, 0)
    assert abs(((q > 0.5) == (labels[:, None] == labels[None, :])).float().mean() - 0.85) < 0.15  # informative
    bases = learned.setting(0)[0]
    span = bases[:, :, 0].T  # (DIM, K)
    means = torch.stack([(x[labels == k] @ span).mean(0) for k in range(learned.K)])
    assert torch.allclose(means, learned.SEP * torch.eye(learned.K), atol=0.7)  # SEP u_k (about 32 images a class)
    rest = x - x @ span @ span.T  # unit noise in the DIM - NUIS - K dimensions outside span and nuisance: no class
    assert abs(rest.pow(2).sum(1).mean() - (learned.DIM - learned.NUIS - learned.K)) < 1.5
    r = learned.train_one("tied", "sgd", depth=1, nuisance=0.0, steps=3, batch_size=16, seed=0, overlap=True)
    assert r["data"] == "overlap" and r["oracle_x"] == learned.oracle(x, None, labels, pair, r["entropy"], span)
    (tmp_path / "runs.json").write_text(json.dumps([r]))
    with pytest.raises(SystemExit):  # subspace runs asked of a folder of overlap runs
        learned.table([0], tmp_path)
    row = learned.built_by_hand([0])[-1]  # the strong form exists in these data: built by hand, on the same batch
    fused_f, oracle_f, bayes_f, per_token, fused = (float(v) for v in row.strip("| ").split(" | ")[1:])
    assert oracle_f + 0.03 < fused_f < bayes_f and fused > per_token
    c = F.normalize(x @ span, dim=1)  # the generic metric control on the cosine is the oracle itself
    oracle_c = fusion.cosine_control(x @ span, labels, pair, 5.0)[0]
    assert constructed.similarity_control(c @ c.T, labels, pair, 5.0) == pytest.approx(oracle_c, abs=1e-3)
