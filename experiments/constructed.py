"""Deep Fusion's strong form, tested where it can be built: is a deeper attention layer, whose inputs an earlier layer
mixed, more class-aligned than per-token metrics can be at the same sharpness?

  python experiments/constructed.py                 # the sweep, 10 draws per setting (about a minute on 2 cores)
  python experiments/constructed.py --draws 3 --out-dir /tmp/c

The data: K Gaussian classes in R^dim whose means (norm `sep`) span K dimensions, unit noise in every dimension, so
classes overlap token by token; each image has two views (view noise 0.1). The best per-token view the data allow
is x0 = the coordinates of x in the span of the class means (known here): noise outside it carries no class.
Layer l: A_l = softmax(beta_l cos(x_i, x_j)) over all 2N tokens, then x_{l+1} = A_l x_l (identity values, no
residual, no parameters). At every layer: F~ (deep_fusion.fusion_score), the rows' entropy outside self and
partner, and two per-token references at that same entropy: the ORACLE, cosine attention on x0
(experiments/fusion.cosine_control), and the BAYES oracle, softmax(kappa q_ij) with q_ij = p_i . p_j the posterior
probability that tokens i and j share a class (p_i: the class posterior of x0_i, known here). Why it bounds every
layer: were images drawn independently (classes too), P(c_i = c_j | the batch) would be the same-class posterior of
the two images, and any attention's expected F~ its rows' weight on it, which at a given mean entropy softmax(kappa
q) maximises (Gibbs; one kappa for all rows). Here q is a close stand-in, slightly below that bound: it uses one
view of each image (both would cut the noise variance from 1.01 to 1.005) and ignores that the batch holds exactly
N/K images a class. So a layer beats it on one batch only by chance or by those small margins.
Also: NT-Xent of the fused tokens against the per-token ones, each view's tokens as z (does the loss pay for it?).
"""

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import df, fusion, own_flags  # noqa: E402

FLAGS = (
    ("--draws", dict(type=int, default=10, help="random draws of the data per setting")),
    ("--out-dir", dict(default="experiments/results/constructed", help="where runs.json and table.md go")),
)
SEPS, BETAS = (1.0, 2.0, 3.0), ((2.0, 5.0), (5.0, 5.0), (5.0, 10.0), (10.0, 10.0), (10.0, 20.0))  # (beta_1, beta_2)
K, DIM, N, TAU = 4, 32, 128, 0.5  # classes, ambient dimension, images (2N tokens), NT-Xent temperature


def draw(sep, seed):
    """x0 (2N, K): both views of N images in the span of the class means; labels (2N,); pair (2N,); q (2N, 2N): the
    posterior probability that two tokens share a class, from x0 alone (Gaussian classes, noise variance 1.01)."""
    g = torch.Generator().manual_seed(seed)
    means = sep * F.normalize(torch.randn(K, DIM, generator=g, dtype=torch.float64), dim=1)  # (K, DIM)
    y = torch.arange(N) % K
    x = means[y] + torch.randn(N, DIM, generator=g, dtype=torch.float64)  # overlapping classes
    views = torch.cat([x + 0.1 * torch.randn(N, DIM, generator=g, dtype=torch.float64) for _ in range(2)])
    span = torch.linalg.qr(means.T)[0]  # (DIM, K), orthonormal
    x0 = views @ span  # (2N, K)
    p = torch.softmax(-torch.cdist(x0, means @ span).pow(2) / (2 * 1.01), dim=1)  # (2N, K): p(k | x0_i), equal priors
    return x0, torch.cat([y, y]), torch.arange(2 * N).roll(N), p @ p.T


def cosine_attention(x, beta):
    """softmax(beta cos(x_i, x_j)) over every key, self and partner included (as a Transformer's attention)."""
    c = F.normalize(x, dim=1)
    return torch.softmax(beta * c @ c.T, dim=1)


def similarity_control(s, labels, pair, entropy):
    """F~ of softmax(kappa s_ij) over the keys j != i, pair(i), for a similarity s (n, n) of any per-token metric,
    kappa set by bisection so that the mean row entropy is `entropy` (fusion.cosine_control, for any s)."""
    s = s.float().masked_fill(~df.others(labels, pair)[1], float("-inf"))
    s = s / s[torch.isfinite(s)].abs().max()  # kappa then spans the same range for every metric
    lo, hi = 0.0, 1e4
    for _ in range(60):
        kappa = (lo + hi) / 2
        lo, hi = (kappa, hi) if fusion.row_entropy(torch.softmax(kappa * s, 1)) > entropy else (lo, kappa)
    return df.fusion_score(torch.softmax(kappa * s, 1), labels, pair)[1]


def measure(x0, labels, pair, q, betas):
    """Per layer: F~, entropy, the cosine and the Bayes oracles at that entropy; NT-Xent of x0 and of the last
    layer's tokens."""
    x, rows = x0, []
    for beta in betas:
        A = cosine_attention(x, beta)
        entropy = fusion.rest_entropy(A, labels, pair)
        oracle = fusion.cosine_control(x0.float(), labels, pair, entropy)[0]
        bayes = similarity_control(q, labels, pair, entropy)
        rows.append({"fusion_norm": df.fusion_score(A, labels, pair)[1], "entropy": entropy, "oracle": oracle})
        rows[-1]["bayes"] = bayes
        x = A @ x  # (2N, K): each token moves toward the tokens it attends to
    loss = {name: df.nt_xent(*z.chunk(2), TAU).item() for name, z in (("per_token", x0), ("fused", x))}
    return rows, loss


def sweep(draws):
    """Every (sep, beta_1, beta_2) x draws; a list of runs."""
    runs = []
    for sep in SEPS:
        for betas in BETAS:
            for seed in range(draws):
                layers, loss = measure(*draw(sep, seed), betas)
                runs.append({"sep": sep, "betas": list(betas), "seed": seed, "layers": layers, "loss": loss})
    return runs


def table(runs):
    """Markdown: per setting, layer 2's F~ minus each oracle (mean ± sd over draws, draws above), and the losses."""
    ms = lambda v: f"{statistics.mean(v):+.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:+.3f}"  # noqa: E731
    mean = lambda v: f"{statistics.mean(v):.3f}"  # noqa: E731
    lines = ["| sep | beta_1, beta_2 | F~ layer 1 | F~ layer 2 | entropy layer 2 | oracle at it | layer 2 - oracle |"
             " draws above | Bayes oracle at it | layer 2 - Bayes | draws above | NT-Xent per-token | NT-Xent fused |",
             "|" + " --- |" * 13]  # fmt: skip
    for sep in SEPS:
        for betas in BETAS:
            rs = [r for r in runs if r["sep"] == sep and r["betas"] == list(betas)]
            l1, l2 = [r["layers"][0] for r in rs], [r["layers"][1] for r in rs]
            cells = [mean([a["fusion_norm"] for a in l1]), mean([b["fusion_norm"] for b in l2])]
            cells += [f"{statistics.mean(b['entropy'] for b in l2):.2f}"]
            for key in ("oracle", "bayes"):
                diff = [b["fusion_norm"] - b[key] for b in l2]
                cells += [mean([b[key] for b in l2]), ms(diff), f"{sum(d > 0 for d in diff)}/{len(diff)}"]
            cells += [mean([r["loss"][k] for r in rs]) for k in ("per_token", "fused")]
            lines.append(f"| {sep:g} | {betas[0]:g}, {betas[1]:g} | " + " | ".join(cells) + " |")
    chance = df.fusion_score(torch.ones(2 * N, 2 * N), *draw(1.0, 0)[1:3])[3]  # uniform attention
    lines.append(f"\nChance of F~ {chance:.3f}. Layer 1 is cosine attention on x0 itself, so it equals its oracle.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = own_flags(argv, *FLAGS, rest=False)[0]
    if args.draws < 2:
        print(f"constructed.py: error: --draws {args.draws}: use 2 or more (a spread needs two)", file=sys.stderr)
        raise SystemExit(2)
    runs = sweep(args.draws)
    folder = Path(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.json").write_text(json.dumps(runs, indent=1))
    text = table(runs) + f"\n```bash\npython experiments/constructed.py --draws {args.draws}\n```\n"
    (folder / "table.md").write_text(text)
    print(text)
    return runs


if __name__ == "__main__":
    main()
