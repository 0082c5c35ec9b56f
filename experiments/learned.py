"""Deep Fusion learned, not constructed: the smallest setting where NT-Xent trains a Transformer head whose
attention becomes class-aligned layer by layer, beyond what the inputs' own neighbourhoods give.

  python experiments/learned.py --opt adamw --head tied --depth 4 --nuisance 3 --seed 0
  python experiments/learned.py --table --seeds 0 1 2   # resumes experiments/results/minimal/runs.json
  python experiments/learned.py --table --data overlap  # experiments/results/overlap: classes that overlap per token
  python experiments/learned.py --table --sweep         # experiments/results/sgd_lr: the SGD learning rate x5, x20

The data are Theorem 1's (notebook section 3): K classes, each in its own sub_dim-dimensional subspace of R^dim
(orthonormal, so independent), coordinates c_k + N(0, I) with |c_k| = 2 (the margin, on average). Each view adds
its own nuisance, `--nuisance` x N(0, I) in a shared subspace orthogonal to the classes, plus 0.01 of noise
variance. There is no image and, unless --backbone, no backbone: h = x. deep_fusion.py's TransformerHead (partner
masked) and nt_xent train on fresh batches of N images; each run prints per layer the normalised fusion score F~
(deep_fusion.fusion_report), its control at the same row entropy (experiments/fusion.py) on the inputs x and,
with --backbone, on the backbone's output h, the oracle control (the same at the same entropy on x with the nuisance
subspace projected out, known here), the token control (the same on the tokens each layer attends over), and
the rows' entropy. With --data overlap the classes share one K-dimensional
span (means SEP u_k, unit noise in every dimension outside the nuisance), so no per-token metric separates them
cleanly; the oracle is then cosine attention on x's coordinates in that span, the best per-token view the data allow.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import constructed, df, fusion, own_flags  # noqa: E402

FLAGS = (
    ("--head", dict(default="authors", choices=("authors", "tied"), help="separate W^Q, W^K, or tied with scale 4")),
    ("--opt", dict(default="adamw", choices=("adamw", "sgd"), help="AdamW (lr 1e-3, wd 1e-4) or the recipe's SGD")),
    ("--depth", dict(type=int, default=4, help="attention blocks L")),
    ("--nuisance", dict(type=float, default=3.0, help="scale of each view's own nuisance (0: none)")),
    ("--steps", dict(type=int, default=1500, help="training steps, one fresh batch each")),
    ("--batch-size", dict(type=int, default=128, help="N images per step (2N tokens)")),
    ("--backbone", dict(action="store_true", help="train a small MLP backbone f with the head")),
    ("--seed", dict(type=int, default=0)),
    ("--lr-scale", dict(type=float, default=1.0, help="the optimizer's learning rate times this")),
    ("--table", dict(action="store_true", help="the grid (nuisance x opt x head x depth, + 2 backbone rows) x seeds")),
    ("--seeds", dict(type=int, nargs="+", default=[0, 1, 2], help="with --table")),
    ("--data", dict(default="subspaces", choices=("subspaces", "overlap"), help="classes in their own subspaces, or"
                    " overlapping token by token (means SEP u_k, unit noise in every dimension outside the nuisance)")),
    ("--sweep", dict(action="store_true", help="with --table: the authors' head at nuisance 3, SGD's lr x5 and x20,"
                     " AdamW beside (experiments/results/sgd_lr)")),
    ("--out-dir", dict(help="with --table: where runs.json and table.md go (experiments/results/minimal etc.)")),
)  # fmt: skip
K, SUB, DIM, NUIS = 4, 3, 32, 12  # classes, their subspaces' dimension, the ambient one, the nuisance's
SEP = 3.0  # overlap data: the class means' norm (experiments/constructed.py: the strong form shows from 2 on)


def setting(seed):
    """Orthonormal bases: the classes' (K, DIM, SUB) and the nuisance's (DIM, NUIS), and the class centres (K, SUB)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(DIM, K * SUB + NUIS, generator=g))[0]  # orthonormal columns
    centres = 2 * nn.functional.normalize(torch.randn(K, SUB, generator=g), dim=1)  # |c_k| = 2
    return Q[:, : K * SUB].T.reshape(K, SUB, DIM).transpose(1, 2), Q[:, K * SUB :], centres


def views(bases, nuisance_basis, centres, N, nuisance, g, overlap=False):
    """Two views (2N, DIM) of N fresh images, their labels (N,): x_i + each view's nuisance and noise. overlap: x_i =
    SEP u_y + unit noise outside the nuisance subspace, u_k = bases[k][:, 0] (orthonormal): classes overlap per token.
    """
    y = torch.randint(0, K, (N,), generator=g)
    if overlap:
        outside = torch.eye(DIM) - nuisance_basis @ nuisance_basis.T  # (DIM, DIM): projects the nuisance out
        x = SEP * bases[y, :, 0] + torch.randn(N, DIM, generator=g) @ outside  # (N, DIM)
    else:
        a = centres[y] + torch.randn(N, SUB, generator=g)  # coordinates in the class's subspace
        x = torch.einsum("nds,ns->nd", bases[y], a)  # (N, DIM)
    own = lambda: nuisance * torch.randn(N, NUIS, generator=g) @ nuisance_basis.T  # noqa: E731  a view's nuisance
    noise = lambda: 0.1 * torch.randn(N, DIM, generator=g)  # noqa: E731
    return torch.cat([x + own() + noise(), x + own() + noise()]), y


def eval_batch(seed, nuisance, overlap=False):
    """The fixed labelled batch every run of a seed is measured on: x (256, DIM), labels (256,), pair (256,)."""
    bases, nuisance_basis, centres = setting(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    x, y = views(bases, nuisance_basis, centres, 128, nuisance, gen, overlap)
    return x, torch.cat([y, y]), torch.arange(256).roll(128)


def oracle(x, nuisance_basis, labels, pair, entropies, span=None):
    """The oracle control by layer: F~ of the cosine attention on the best per-token view at each layer's row
    entropy: x with the nuisance subspace projected out (x - x N N^T), or with `span` (DIM, K), x's coordinates in
    the span of the class means (overlap data: the rest is noise)."""
    best = x - x @ nuisance_basis @ nuisance_basis.T if span is None else x @ span  # (n, DIM) or (n, K)
    return [fusion.cosine_control(best, labels, pair, e)[0] for e in entropies]


def same_class_probability(x, seed):
    """Overlap data: q (n, n), the posterior probability that tokens i and j share a class, from x alone: with x's
    coordinates x0 in the span (means SEP e_k, noise variance 1.01 there), p(k | x0) = softmax(SEP x0 / 1.01)."""
    p = torch.softmax(SEP * (x @ setting(seed)[0][:, :, 0].T) / 1.01, dim=1)  # (n, K), equal class priors
    return p @ p.T


def bayes_oracle(r):
    """By layer: F~ of softmax(kappa q) at the run's entropies, the Bayes oracle (experiments/constructed.py). The
    classes are drawn independently here, so in expectation no attention of the same mean entropy attends more to
    its class, up to q using one view of each image (both would cut the noise variance from 1.01 to 1.005)."""
    x, labels, pair = eval_batch(r["seed"], r["nuisance"], overlap=True)
    q = same_class_probability(x, r["seed"])
    return [constructed.similarity_control(q, labels, pair, e) for e in r["entropy"]]


def train_one(
    head="authors",
    opt="adamw",
    depth=4,
    nuisance=3.0,
    steps=1500,
    batch_size=128,
    backbone=False,
    seed=0,
    overlap=False,
    lr_scale=1.0,
):
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
    base, warmup = lr_scale * optimizer.param_groups[0]["lr"], steps // 10  # warmup, then cosine, as deep_fusion.py
    gen, t0 = torch.Generator().manual_seed(seed + 1), time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = df.lr_at(step, steps, warmup, base)
        x, _ = views(bases, nuisance_basis, centres, batch_size, nuisance, gen, overlap)
        loss = df.nt_xent(*g(f(x)).chunk(2), 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    f.eval()
    g.eval()
    x, labels, pair = eval_batch(seed, nuisance, overlap)
    with torch.no_grad():
        h = f(x)
        (_, maps), (_, *tokens) = fusion.block_inputs(g, lambda: g(h, return_attention=True))
    maps = torch.stack(maps)  # (L, heads, n, n)
    r = df.fusion_report(maps, labels, pair)
    on_x = fusion.report(maps, labels, pair, x, tokens)  # the controls on the inputs and on each layer's tokens
    out = {"head": head, "opt": opt, "depth": depth, "nuisance": nuisance, "steps": steps, "backbone": backbone}
    out |= {"seed": seed, "loss": loss.item(), "fusion_norm": r["fusion_norm"], "chance": r["fusion_norm_chance"]}
    out |= {"control_x": on_x["control_norm"], "entropy": on_x["entropy"], "time_s": round(time.time() - t0, 1)}
    out |= {"control_tokens": on_x["token_control_norm"]} | ({"lr_scale": lr_scale} if lr_scale != 1 else {})
    out["oracle_x"] = oracle(x, nuisance_basis, labels, pair, on_x["entropy"], bases[:, :, 0].T if overlap else None)
    if overlap:  # runs of the subspace data carry no "data" key: their run keys stay as committed
        out["data"] = "overlap"
    if backbone:
        out["control_h"] = fusion.report(maps, labels, pair, h)["control_norm"]
    return out


def show(r):
    """One run's report as lines of text."""
    row = lambda values: " ".join(f"{v:.3f}" for v in values)  # noqa: E731
    lr = f" x{r['lr_scale']:g} lr" if "lr_scale" in r else ""
    lines = [
        f"{r['head']} head, {r['opt']}{lr}, {r['depth']} blocks, nuisance {r['nuisance']:g}, seed {r['seed']}"
        f"{', with a backbone' if r['backbone'] else ''}{', overlapping classes' if 'data' in r else ''}:"
        f" loss {r['loss']:.3f} ({r['time_s']} s)"
    ]
    lines.append(f"  F~ by layer          {row(r['fusion_norm'])} (chance {r['chance']:.3f})")
    lines.append(f"  control on inputs x  {row(r['control_x'])}")
    if "oracle_x" in r:
        lines.append(f"  oracle ({'best view' if 'data' in r else 'no nuisance'}) {row(r['oracle_x'])}")
    if "control_tokens" in r:
        lines.append(f"  control on tokens    {row(r['control_tokens'])}")
    if "control_h" in r:
        lines.append(f"  control on h = f(x)  {row(r['control_h'])}")
    lines.append(f"  entropy (nats)       {' '.join(f'{v:.2f}' for v in r['entropy'])}")
    return "\n".join(lines)


# (nuisance, optimizer, head, blocks, backbone, lr scale)
GRID = [(nu, opt, head, depth, False, 1.0) for nu in (0.0, 1.0, 3.0) for opt in ("sgd", "adamw")
        for head in ("authors", "tied") for depth in (1, 2, 4, 8)]  # fmt: skip
GRID += [(3.0, "adamw", head, 4, True, 1.0) for head in ("authors", "tied")]  # a backbone co-trained: control on h
OVERLAP_GRID = [(nu, opt, head, depth, False, 1.0) for nu in (0.0, 3.0) for opt in ("sgd", "adamw")
                for head in ("authors", "tied") for depth in (2, 4, 8)]  # fmt: skip
# SGD at 5 and 20 times the recipe's lr (0.06), where GRID's SGD runs stay at chance and AdamW's fuse; AdamW again,
# now with the token control (GRID's runs predate it)
SWEEP_GRID = [(3.0, opt, "authors", depth, False, scale) for opt, scale in (("sgd", 5.0), ("sgd", 20.0), ("adamw", 1.0))
              for depth in (2, 4, 8)]  # fmt: skip


def table(seeds, out_dir, overlap=False, sweep=False):
    """The grid, every seed; a finished run is read back, and a run without the oracle control gets it (it needs only
    the run's seed, nuisance and entropies). Markdown: mean +- std over seeds of F~, its controls and the final loss;
    then by layer, F~ minus the oracle control."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    done = json.loads((folder / "runs.json").read_text()) if (folder / "runs.json").exists() else []
    key = lambda r: (r["nuisance"], r["opt"], r["head"], r["depth"], r["backbone"], r.get("lr_scale", 1.0), r["seed"])  # noqa: E731
    grid, data = (OVERLAP_GRID, "overlap") if overlap else (SWEEP_GRID if sweep else GRID, None)
    if any(r.get("data") != data for r in done):  # one kind of data per folder
        print(
            f"learned.py: error: {folder} holds runs of other data; give --out-dir a folder of its own", file=sys.stderr
        )
        raise SystemExit(2)
    have = {key(r) for r in done}
    for nu, opt, head, depth, backbone, scale in grid:
        for seed in seeds:
            if (nu, opt, head, depth, backbone, scale, seed) not in have:
                done.append(
                    train_one(head, opt, depth, nu, backbone=backbone, seed=seed, overlap=overlap, lr_scale=scale)
                )
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
    if overlap:  # the per-token reference no attention beats in expectation (experiments/constructed.py)
        by_layer[0] += " Bayes oracle by layer | F~ minus the Bayes oracle by layer (seeds above it) |"
        by_layer[1] += " --- | --- |"
    if any(r["backbone"] for r in done):  # a backbone's rows: against the control on its output h
        by_layer[0] += " F~ minus the control on h by layer (seeds above it) |"
        by_layer[1] += " --- |"
    tokens = any("control_tokens" in r for r in done)  # runs made since the token control existed
    if tokens:
        by_layer[0] += " token control by layer | F~ minus the token control by layer (seeds above it) |"
        by_layer[1] += " --- | --- |"
    for nu, opt, head, depth, backbone, scale in grid:
        runs = [r for r in done if key(r)[:6] == (nu, opt, head, depth, backbone, scale) and r["seed"] in seeds]
        last, ctrl = [r["fusion_norm"][-1] for r in runs], [r["control_x"][-1] for r in runs]
        on_h = ms([r["control_h"][-1] for r in runs]) if backbone else "— (h = x)"
        peak = [max(r["fusion_norm"]) for r in runs]
        lr = f" x{scale:g} lr" if scale != 1 else ""
        cells = f"{nu:g} | {opt}{lr} | {head} | {depth} | {'MLP' if backbone else 'none'}"
        oracle_last, loss = [r["oracle_x"][-1] for r in runs], [r["loss"] for r in runs]
        lines.append(f"| {cells} | {ms(last)} | {ms(ctrl)} | {ms(oracle_last)} | {on_h} | {ms(peak)} | {ms(loss)} |")
        mean = lambda k, runs=runs: [statistics.mean(v) for v in zip(*(r[k] for r in runs))]  # noqa: E731  by layer
        row = lambda v: " ".join(f"{u:.3f}" for u in v)  # noqa: E731
        by_layer.append(
            f"| {cells} | {row(mean('fusion_norm'))} | {row(mean('oracle_x'))} | {above(runs, 'oracle_x')} |"
        )
        if overlap:
            bayes = [bayes_oracle(r) for r in runs]
            gap = above([r | {"bayes": o} for r, o in zip(runs, bayes)], "bayes")
            by_layer[-1] += f" {row([statistics.mean(v) for v in zip(*bayes)])} | {gap} |"
        if any(r["backbone"] for r in done):
            by_layer[-1] += f" {above(runs, 'control_h') if backbone else '—'} |"
        if tokens:
            have = [r for r in runs if "control_tokens" in r]
            cell = f"{row(mean('control_tokens', have))} | {above(have, 'control_tokens')}" if have else "— | —"
            by_layer[-1] += f" {cell} |"
    chance = {r["seed"]: r["chance"] for r in done}  # the same labelled batch in every run of a seed
    chance = " ".join(f"{chance[seed]:.3f}" for seed in seeds)
    spread = f"Mean ± sample std over seeds {' '.join(map(str, seeds))}" if len(seeds) > 1 else f"One seed ({seeds[0]})"
    best = "their coordinates in the span of the class means" if overlap else "the nuisance subspace projected out"
    lines.append(
        f"\n{spread}; chance of F~ {chance} (each seed has its own labelled batch). The oracle control is the"
        f" inputs' cosine attention at the head's row entropy, on {best}."
    )
    lines += ["\nEvery layer, mean over the seeds; in brackets, the seeds whose F~ is above the oracle's.\n", *by_layer]
    if overlap:
        lines += ["", *built_by_hand(seeds)]
    which = "--data overlap " if overlap else "--sweep " if sweep else ""
    lines.append(
        f"\n```bash\npython experiments/learned.py --table {which}--seeds"
        f" {' '.join(map(str, seeds))} --out-dir {out_dir}\n```"
    )
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return done


def above(runs, reference):
    """By layer: the mean over runs of F~ minus runs' `reference` list, and (in brackets) the runs above it."""
    gaps = [[a - b for a, b in zip(r["fusion_norm"], r[reference])] for r in runs]  # (runs, layers)
    return " ".join(f"{statistics.mean(g):+.3f} ({sum(v > 0 for v in g)}/{len(g)})" for g in zip(*gaps))


def built_by_hand(seeds, kappas=(5.0, 10.0)):
    """On each seed's evaluation batch of the overlap data: two layers of parameter-free cosine attention on the
    best per-token view (experiments/constructed.py), layer 2's F~ against its oracle and its Bayes oracle, and
    NT-Xent of the fused against the per-token tokens. Lines of Markdown. The view holds no nuisance: a row a seed."""
    head = f"Built by hand on the same batches: cosine attention on the span, kappa {kappas[0]:g} then {kappas[1]:g}."
    lines = [head, "", "| seed | layer 2 F~ | its oracle | its Bayes oracle | NT-Xent per-token | NT-Xent fused |"]
    lines += ["|" + " --- |" * 6]
    for seed in seeds:
        x, labels, pair = eval_batch(seed, 0.0, overlap=True)
        x0 = (x @ setting(seed)[0][:, :, 0].T).double()  # (256, K): the coordinates in the span
        (_, two), loss = constructed.measure(x0, labels, pair, same_class_probability(x, seed), kappas)
        cells = " | ".join(f"{v:.3f}" for v in (two["fusion_norm"], two["oracle"], two["bayes"], *loss.values()))
        lines.append(f"| {seed} | {cells} |")
    return lines


def main(argv=None):
    args = own_flags(argv, *FLAGS, rest=False)[0]
    for name in ("depth", "steps", "batch_size", "lr_scale"):
        if getattr(args, name) <= 0:
            print(
                f"learned.py: error: --{name.replace('_', '-')} {getattr(args, name)}: must be positive",
                file=sys.stderr,
            )
            raise SystemExit(2)
    overlap = args.data == "overlap"
    if args.table:
        name = "overlap" if overlap else "sgd_lr" if args.sweep else "minimal"
        return table(args.seeds, args.out_dir or f"experiments/results/{name}", overlap, args.sweep)
    flags = (args.head, args.opt, args.depth, args.nuisance, args.steps, args.batch_size, args.backbone, args.seed)
    r = train_one(*flags, overlap=overlap, lr_scale=args.lr_scale)
    print(show(r))
    return r


if __name__ == "__main__":
    main()
