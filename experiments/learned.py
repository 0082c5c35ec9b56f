"""Deep Fusion learned, not constructed: the smallest setting where NT-Xent trains a Transformer head whose
attention becomes class-aligned layer by layer, beyond what the inputs' own neighbourhoods give.

  python experiments/learned.py --opt adamw --head tied --depth 4 --nuisance 3 --seed 0
  python experiments/learned.py --table --seeds 0 1 2   # resumes experiments/results/learned/runs.json

The data are Theorem 1's (notebook section 3): K classes, each in its own sub_dim-dimensional subspace of R^dim
(orthonormal, so independent), coordinates c_k + N(0, I) with |c_k| = 2 (the margin, on average). Each view adds
its own nuisance, `--nuisance` x N(0, I) in a shared subspace orthogonal to the classes, plus 0.01 of noise
variance. There is no image and, unless --backbone, no backbone: h = x. deep_fusion.py's TransformerHead (partner
masked) and nt_xent train on fresh batches of N images; each run prints per layer the normalised fusion score F~
(deep_fusion.fusion_report), its control at the same row entropy (experiments/fusion.py) on the inputs x and,
with --backbone, on the backbone's output h, the oracle control (the same at the same entropy on x with the nuisance
subspace projected out, known here), and the rows' entropy.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import df, fusion, own_flags  # noqa: E402

FLAGS = (
    ("--head", dict(default="authors", choices=("authors", "tied"), help="separate W^Q, W^K, or tied with scale 4")),
    ("--opt", dict(default="adamw", choices=("adamw", "sgd"), help="AdamW (lr 1e-3, wd 1e-4) or the recipe's SGD")),
    ("--depth", dict(type=int, default=4, help="attention blocks L")),
    ("--nuisance", dict(type=float, default=3.0, help="scale of each view's own nuisance (0: none)")),
    ("--steps", dict(type=int, default=1500, help="training steps, one fresh batch each")),
    ("--batch-size", dict(type=int, default=128, help="N images per step (2N tokens)")),
    ("--backbone", dict(action="store_true", help="train a small MLP backbone f with the head")),
    ("--seed", dict(type=int, default=0)),
    ("--table", dict(action="store_true", help="the grid (nuisance x opt x head x depth, + 2 backbone rows) x seeds")),
    ("--seeds", dict(type=int, nargs="+", default=[0, 1, 2], help="with --table")),
    ("--out-dir", dict(default="experiments/results/learned", help="with --table: where runs.json and table.md go")),
)
K, SUB, DIM, NUIS = 4, 3, 32, 12  # classes, their subspaces' dimension, the ambient one, the nuisance's


def setting(seed):
    """Orthonormal bases: the classes' (K, DIM, SUB) and the nuisance's (DIM, NUIS), and the class centres (K, SUB)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(DIM, K * SUB + NUIS, generator=g))[0]  # orthonormal columns
    centres = 2 * nn.functional.normalize(torch.randn(K, SUB, generator=g), dim=1)  # |c_k| = 2
    return Q[:, : K * SUB].T.reshape(K, SUB, DIM).transpose(1, 2), Q[:, K * SUB :], centres


def views(bases, nuisance_basis, centres, N, nuisance, g):
    """Two views (2N, DIM) of N fresh images, their labels (N,): x_i + each view's nuisance and noise."""
    y = torch.randint(0, K, (N,), generator=g)
    a = centres[y] + torch.randn(N, SUB, generator=g)  # coordinates in the class's subspace
    x = torch.einsum("nds,ns->nd", bases[y], a)  # (N, DIM)
    own = lambda: nuisance * torch.randn(N, NUIS, generator=g) @ nuisance_basis.T  # noqa: E731  a view's nuisance
    noise = lambda: 0.1 * torch.randn(N, DIM, generator=g)  # noqa: E731
    return torch.cat([x + own() + noise(), x + own() + noise()]), y


def eval_batch(seed, nuisance):
    """The fixed labelled batch every run of a seed is measured on: x (256, DIM), labels (256,), pair (256,)."""
    bases, nuisance_basis, centres = setting(seed)
    x, y = views(bases, nuisance_basis, centres, 128, nuisance, torch.Generator().manual_seed(10_000 + seed))
    return x, torch.cat([y, y]), torch.arange(256).roll(128)


def oracle(x, nuisance_basis, labels, pair, entropies):
    """The oracle control by layer: F~ of the cosine attention on x with the nuisance subspace projected out
    (x - x N N^T, a nuisance-blind per-token metric) at each layer's row entropy."""
    blind = x - x @ nuisance_basis @ nuisance_basis.T  # (n, DIM)
    return [fusion.cosine_control(blind, labels, pair, e)[0] for e in entropies]


def train_one(head="authors", opt="adamw", depth=4, nuisance=3.0, steps=1500, batch_size=128, backbone=False, seed=0):
    """Train, then measure on a fixed labelled batch; returns the per-layer report (and the run's settings)."""
    torch.manual_seed(seed)
    bases, nuisance_basis, centres = setting(seed)
    attn = dict(tied=True, scale=4.0) if head == "tied" else {}
    g = df.TransformerHead(DIM, 64, depth, 4, 64, mask_partner=True, **attn)
    f = nn.Identity()  # no backbone: h = x
    if backbone:
        f = nn.Sequential(nn.Linear(DIM, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, DIM))
    if opt == "sgd":  # deep_fusion.py's own: the recipe's lr 0.06 x N/128, momentum 0.9, weight decay 5e-4
        optimizer = df.make_optimizer(df.Config(batch_size=batch_size), f, g, torch.device("cpu"))
    else:  # AdamW; the learnable scales are temperatures, without weight decay (as in make_optimizer)
        named = [*f.named_parameters(), *g.named_parameters()]
        groups = [{"params": [p for n, p in named if not n.endswith("log_scale")]}]
        groups += [{"params": [p for n, p in named if n.endswith("log_scale")], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=1e-4)
    base, warmup = optimizer.param_groups[0]["lr"], steps // 10  # warmup, then cosine, as deep_fusion.py
    gen, t0 = torch.Generator().manual_seed(seed + 1), time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = df.lr_at(step, steps, warmup, base)
        x, _ = views(bases, nuisance_basis, centres, batch_size, nuisance, gen)
        loss = df.nt_xent(*g(f(x)).chunk(2), 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    f.eval()
    g.eval()
    x, labels, pair = eval_batch(seed, nuisance)
    with torch.no_grad():
        h = f(x)
        maps = torch.stack(g(h, return_attention=True)[1])  # (L, heads, n, n)
    r = df.fusion_report(maps, labels, pair)
    on_x = fusion.report(maps, labels, pair, x)  # the control on the inputs, at each layer's entropy
    out = {"head": head, "opt": opt, "depth": depth, "nuisance": nuisance, "steps": steps, "backbone": backbone}
    out |= {"seed": seed, "loss": loss.item(), "fusion_norm": r["fusion_norm"], "chance": r["fusion_norm_chance"]}
    out |= {"control_x": on_x["control_norm"], "entropy": on_x["entropy"], "time_s": round(time.time() - t0, 1)}
    out["oracle_x"] = oracle(x, nuisance_basis, labels, pair, on_x["entropy"])
    if backbone:
        out["control_h"] = fusion.report(maps, labels, pair, h)["control_norm"]
    return out


def show(r):
    """One run's report as lines of text."""
    row = lambda values: " ".join(f"{v:.3f}" for v in values)  # noqa: E731
    lines = [
        f"{r['head']} head, {r['opt']}, {r['depth']} blocks, nuisance {r['nuisance']:g}, seed {r['seed']}"
        f"{', with a backbone' if r['backbone'] else ''}: loss {r['loss']:.3f} ({r['time_s']} s)"
    ]
    lines.append(f"  F~ by layer          {row(r['fusion_norm'])} (chance {r['chance']:.3f})")
    lines.append(f"  control on inputs x  {row(r['control_x'])}")
    if "oracle_x" in r:
        lines.append(f"  oracle (no nuisance) {row(r['oracle_x'])}")
    if "control_h" in r:
        lines.append(f"  control on h = f(x)  {row(r['control_h'])}")
    lines.append(f"  entropy (nats)       {' '.join(f'{v:.2f}' for v in r['entropy'])}")
    return "\n".join(lines)


GRID = [(nu, opt, head, depth, False) for nu in (0.0, 1.0, 3.0) for opt in ("sgd", "adamw")
        for head in ("authors", "tied") for depth in (1, 2, 4, 8)]  # fmt: skip
GRID += [(3.0, "adamw", head, 4, True) for head in ("authors", "tied")]  # a backbone co-trained: the control on h


def table(seeds, out_dir):
    """The grid, every seed; a finished run is read back, and a run without the oracle control gets it (it needs only
    the run's seed, nuisance and entropies). Markdown: mean +- std over seeds of F~, its controls and the final loss;
    then by layer, F~ minus the oracle control."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    done = json.loads((folder / "runs.json").read_text()) if (folder / "runs.json").exists() else []
    key = lambda r: (r["nuisance"], r["opt"], r["head"], r["depth"], r["backbone"], r["seed"])  # noqa: E731
    have = {key(r) for r in done}
    for nu, opt, head, depth, backbone in GRID:
        for seed in seeds:
            if (nu, opt, head, depth, backbone, seed) not in have:
                done.append(train_one(head, opt, depth, nu, backbone=backbone, seed=seed))
                print(show(done[-1]), flush=True)
                (folder / "runs.json").write_text(json.dumps(done, indent=1))
    missing = [r for r in done if "oracle_x" not in r]
    for r in missing:  # runs made before the oracle control existed: the same batch, regenerated from the seed
        x, labels, pair = eval_batch(r["seed"], r["nuisance"])
        r["oracle_x"] = oracle(x, setting(r["seed"])[1], labels, pair, r["entropy"])
    if missing:
        (folder / "runs.json").write_text(json.dumps(done, indent=1))
    ms = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"  # noqa: E731
    lines = ["| nuisance | optimizer | head | blocks | backbone | F~, last layer | control on x, last layer |"
             " oracle control, last layer | control on h, last layer | F~, max layer | final loss |",
             "|" + " --- |" * 11]  # fmt: skip
    by_layer = ["| nuisance | optimizer | head | blocks | backbone | F~ by layer | oracle control by layer |"
                " F~ minus oracle by layer (seeds above it) |", "|" + " --- |" * 8]  # fmt: skip
    for nu, opt, head, depth, backbone in GRID:
        runs = [r for r in done if key(r)[:5] == (nu, opt, head, depth, backbone) and r["seed"] in seeds]
        last, ctrl = [r["fusion_norm"][-1] for r in runs], [r["control_x"][-1] for r in runs]
        on_h = ms([r["control_h"][-1] for r in runs]) if backbone else "— (h = x)"
        peak = [max(r["fusion_norm"]) for r in runs]
        cells = f"{nu:g} | {opt} | {head} | {depth} | {'MLP' if backbone else 'none'}"
        oracle_last, loss = [r["oracle_x"][-1] for r in runs], [r["loss"] for r in runs]
        lines.append(f"| {cells} | {ms(last)} | {ms(ctrl)} | {ms(oracle_last)} | {on_h} | {ms(peak)} | {ms(loss)} |")
        mean = lambda k, runs=runs: [statistics.mean(v) for v in zip(*(r[k] for r in runs))]  # noqa: E731  by layer
        gaps = [[a - b for a, b in zip(r["fusion_norm"], r["oracle_x"])] for r in runs]  # (seeds, layers)
        gap = " ".join(f"{statistics.mean(g):+.3f} ({sum(v > 0 for v in g)}/{len(g)})" for g in zip(*gaps))
        row = lambda v: " ".join(f"{u:.3f}" for u in v)  # noqa: E731
        by_layer.append(f"| {cells} | {row(mean('fusion_norm'))} | {row(mean('oracle_x'))} | {gap} |")
    chance = {r["seed"]: r["chance"] for r in done}  # the same labelled batch in every run of a seed
    chance = " ".join(f"{chance[seed]:.3f}" for seed in seeds)
    spread = f"Mean ± sample std over seeds {' '.join(map(str, seeds))}" if len(seeds) > 1 else f"One seed ({seeds[0]})"
    lines.append(
        f"\n{spread}; chance of F~ {chance} (each seed has its own labelled batch). The oracle control is the"
        " inputs' cosine attention at the head's row entropy with the nuisance subspace projected out."
    )
    lines += ["\nEvery layer, mean over the seeds; in brackets, the seeds whose F~ is above the oracle's.\n", *by_layer]
    lines.append(
        f"\n```bash\npython experiments/learned.py --table --seeds {' '.join(map(str, seeds))} --out-dir {out_dir}\n```"
    )
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return done


def main(argv=None):
    args = own_flags(argv, *FLAGS, rest=False)[0]
    for name in ("depth", "steps", "batch_size"):
        if getattr(args, name) < 1:
            print(
                f"learned.py: error: --{name.replace('_', '-')} {getattr(args, name)}: must be positive",
                file=sys.stderr,
            )
            raise SystemExit(2)
    if args.table:
        return table(args.seeds, args.out_dir)
    r = train_one(args.head, args.opt, args.depth, args.nuisance, args.steps, args.batch_size, args.backbone, args.seed)
    print(show(r))
    return r


if __name__ == "__main__":
    main()
