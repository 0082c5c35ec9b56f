"""A named results table: arms x seeds, one run after the other (two runs at once on a small CPU
slow each other many times over), then the Markdown table (mean ± sample std over seeds) and a
JSON of every run. A rerun skips the runs that finished, so an interrupted table resumes.

  python experiments/table.py heads --seeds 0 1 2 --out-dir tables -- \\
      --dataset imagefolder --data-dir data/cifar-subset --image-size 32 --arch tiny --epochs 10 \\
      --batch-size 256 --eval-every 2

Everything after `--` goes to every run (deep_fusion.py's flags; none: the synthetic default). Each arm adds its
own flags; an arm marked "ablation" runs through experiments/ablations.py. Every run trains with
experiments/fusion.py's monitor (the backbone control per monitor epoch) and is also evaluated with the
authors' protocol (experiments/authors_eval.py). Writes <out-dir>/<table>/table.md,
runs.json, epochs.md (every run's monitor epochs) and one run folder per arm and seed.

A run identical to a finished run of another table in <out-dir> (the same runner, resolved configuration and
ablation flags) is not trained again: its folder is copied, and its provenance says from where. A finished run
made before the token control existed gets it from its checkpoint, on the same labelled batch. A run the program
stopped (collapse or NaN: exit 1) leaves stopped.json and is not tried again.
"""

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import ablations, authors_eval, df, fusion, own_flags  # noqa: E402


def slug(arm):
    """A run folder's name for an arm."""
    return "".join(c if c.isalnum() else "-" for c in arm.lower()).strip("-")[:60]


# name -> [(arm, flags, runner)]; runner "core" is deep_fusion.py, "ablation" experiments/ablations.py
AUTHORS, TIED = "--head transformer", "--head transformer --qk-tied --attn-scale 4 --mask-partner"
MLP = ("SimCLR MLP head (reference)", "--head ffn", "core")
FIRST = "--head transformer --head-heads 4 --block first-commit"  # the authors' first commit: 4 heads
LONG = "--epochs 100 --eval-every 10"  # later flags win over the common ones
ADAMW = "--head-opt adamw --head-lr 1e-3"  # the head's own optimizer (experiments/ablations.py)
RANDOM_F = "--freeze-backbone random"  # f stays its initialisation; the head trains alone
MLP_F = f"--freeze-backbone {{folder}}/{slug(MLP[0])}-seed{{seed}}/checkpoint.pt"  # the same seed's MLP run
MINIMAL = f"{AUTHORS} --head-dim 64 --head-heads 4 --head-depth 4 --head-out 64 --mask-partner --tau 0.5 {LONG}"
MINIMAL += " --head-opt adamw --head-lr 1e-3 --head-wd 1e-4"  # experiments/learned.py's head and AdamW, 1,500 steps
MLP_LONG = ("SimCLR MLP head, 100 epochs", f"--head ffn {LONG}", "core")
TABLES = {
    "heads": [
        ("SimCLR MLP head", "--head ffn", "core"),
        ("Transformer head, defaults (the authors')", AUTHORS, "core"),
        ("tied W^Q = W^K, learnable scale from 4, partner masked", TIED, "core"),
        ("uniform attention (the batch mean)", "--attn uniform", "ablation"),
        ("identity attention (no mixing: a per-token head)", "--attn identity", "ablation"),
        (
            "10-layer MLP of the head's width (the authors' baseline)",
            "--head ffn --head-depth 10 --head-dim 256",
            "core",
        ),
    ],
    "head_wd": [MLP]
    + [
        (f"{name}, head weight decay {wd}", f"{flags} --head-wd {wd}", "ablation")
        for name, flags in (("authors' head", AUTHORS), ("tied head", TIED))
        for wd in ("5e-4", "5e-5", "0")
    ],
    "tau": [MLP]
    + [
        (f"{name}, tau {t}", f"{flags} --tau {t}", "core")
        for name, flags in (("authors' head", AUTHORS), ("tied head", TIED))
        for t in (0.1, 0.2, 0.5)
    ]
    + [("authors' head, the authors' tau 0.02 and lr 8e-5", f"{AUTHORS} --tau 0.02 --lr 4e-5", "core")],
    "batch": [  # the MLP at every N too: a smaller N also takes more steps in the same epochs
        (f"{name}, N = {n}", f"{flags} --batch-size {n}", "core")
        for name, flags in (("SimCLR MLP head", "--head ffn"), ("authors' head", AUTHORS), ("tied head", TIED))
        for n in (64, 128, 256, 512)
    ],
    "first_commit": [MLP]
    + [
        (f"first-commit head (no residuals, BatchNorm), {arm}", f"{FIRST} {flags}", "ablation")
        for arm, flags in (
            ("2 blocks", "--head-depth 2"),
            ("2 blocks, tau 0.2", "--head-depth 2 --tau 0.2"),
            ("2 blocks, gradient norm clipped at 1", "--head-depth 2 --clip 1"),
            ("4 blocks, gradient norm clipped at 1", "--head-depth 4 --clip 1"),
            ("10 blocks, gradient norm clipped at 1", "--head-depth 10 --clip 1"),
        )
    ],
    "length": [
        MLP_LONG,
        ("tied head, tau 0.2, 100 epochs", f"{TIED} --tau 0.2 {LONG}", "core"),
        ("authors' head, 100 epochs", f"{AUTHORS} {LONG}", "core"),
    ],
    "learned": [  # regimes where the head might have to fuse on its own; the MLP runs first: its f is reused
        MLP,
        ("authors' head, its own AdamW", f"{AUTHORS} {ADAMW}", "ablation"),
        ("authors' head, its own AdamW, random backbone frozen", f"{AUTHORS} {ADAMW} {RANDOM_F}", "ablation"),
        ("authors' head, its own AdamW, the MLP run's backbone frozen", f"{AUTHORS} {ADAMW} {MLP_F}", "ablation"),
        ("learned.py's head and AdamW, 1,500 steps, the MLP run's backbone frozen", f"{MINIMAL} {MLP_F}", "ablation"),
    ],
    "learned_long": [MLP_LONG, ("authors' head, its own AdamW, 100 epochs", f"{AUTHORS} {ADAMW} {LONG}", "ablation")],
    "depth": [MLP]
    + [
        (f"{name}, {L} block{'s' * (L > 1)}", f"{flags} --head-depth {L}", "core")
        for name, flags in (("authors' head", AUTHORS), ("tied head", TIED))
        for L in (1, 2, 4, 10)
    ],
}


def provenance():
    """What a run ran on: the commit (with "+changes" when the tree differed from it), torch, the thread count."""
    git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True).stdout  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return {
        "commit": commit + ("+changes" if dirty else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def run_folder(folder, arm, seed):
    """Where a table keeps the run of one arm and seed."""
    return folder / f"{slug(arm)}-seed{seed}"


def identity(runner, config, ablation):
    """What makes two runs the same run: the runner, the resolved configuration but for where it writes, and the
    ablation flags (those of ablations.py; none for a core run)."""
    config = {k: v for k, v in config.items() if k not in ("out_dir", "run_name", "resume")}
    return json.dumps([runner, config, ablation if runner == "ablation" else {}], sort_keys=True)


def identity_of_argv(argv, runner):
    """A run's identity before it runs, from its argv."""
    own, rest = own_flags(argv, *ablations.FLAGS) if runner == "ablation" else (None, argv)
    cfg = df.resolve(df.Config(**df.parse_flags(rest)))
    return identity(runner, dataclasses.asdict(cfg), vars(own) if own else {})


def identity_of_folder(run_dir):
    """A finished run's identity, from the config.json and ablation.json it wrote."""
    ablation = run_dir / "ablation.json"
    runner, flags = ("ablation", json.loads(ablation.read_text())) if ablation.exists() else ("core", {})
    return identity(runner, json.loads((run_dir / "config.json").read_text()), flags)


def same_run(folder, argv, runner):
    """A finished run of another table under folder's parent that is this run, or None."""
    want = identity_of_argv(argv, runner)
    for other in sorted(folder.parent.glob("*/*/results.json")):
        if other.parent.parent != folder and identity_of_folder(other.parent) == want:
            return other.parent
    return None


def token_control(run_dir, results):
    """The token control of a finished run that has none: its checkpoint's f and g, the same labelled batch (the
    entropies must come out as recorded, or the maps are not the run's), fusion.attention_report."""
    cfg = df.Config(**json.loads((run_dir / "config.json").read_text()))
    ablation = run_dir / "ablation.json"
    build = (
        ablations.ablated_build(argparse.Namespace(**json.loads(ablation.read_text())))
        if ablation.exists()
        else df.build
    )
    data, device = df.load_dataset(cfg), torch.device("cpu")
    f, g = build(cfg, data[0].shape[-1], device)[:2]
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)
    f.load_state_dict(ckpt["f"])
    g.load_state_dict(ckpt["g"])
    with torch.no_grad():
        report = fusion.attention_report(cfg, f, g, data, device)
    drift = max(abs(a - b) for a, b in zip(report["entropy"], results["entropy"]))
    assert drift < 1e-3, f"{run_dir}: the checkpoint's maps are not the recorded ones (entropy off by {drift:.2g})"
    results = results | {"token_control_norm": report["token_control_norm"]}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def run_arm(folder, arm, flags, runner, seed, common):
    """One run of the table, or its results if it finished before; None if the program stopped it."""
    run_dir = run_folder(folder, arm, seed)
    argv = [*common, *flags.format(folder=folder, seed=seed).split(), "--seed", str(seed)]
    if not (run_dir / "results.json").exists() and (twin := same_run(folder, argv, runner)):
        print(f"== {arm}, seed {seed}: the same run as {twin}; copied", flush=True)
        shutil.copytree(twin, run_dir)
        meta = json.loads((twin / "provenance.json").read_text()) if (twin / "provenance.json").exists() else {}
        (run_dir / "provenance.json").write_text(json.dumps(meta | {"copied_from": str(twin)}))
    if (run_dir / "stopped.json").exists():  # the program stopped it before: so it would again
        return None
    if (run_dir / "results.json").exists():
        meta = run_dir / "provenance.json"  # runs made before table.py recorded it have none
        meta = {"provenance": json.loads(meta.read_text())} if meta.exists() else {}
        results = json.loads((run_dir / "results.json").read_text())
        if "entropy" in results and "token_control_norm" not in results and (run_dir / "checkpoint.pt").exists():
            results = token_control(run_dir, results)
        return results | json.loads((run_dir / "authors_1nn.json").read_text()) | meta
    argv += ["--out-dir", str(folder), "--run-name", run_dir.name]  # flags may name another run's folder
    print(f"== {arm}, seed {seed}: {' '.join(argv)}", flush=True)
    meta = provenance()
    try:
        if runner == "ablation":
            ablations.main(argv)
        else:
            df.main(argv, job=lambda cfg, ckpt: df.run(cfg, ckpt, monitor=fusion.evaluate))
    except SystemExit as e:  # a collapse or NaN stop: recorded, the table goes on
        print(f"== stopped (exit {e.code}); recorded as such", flush=True)
        if e.code == 1 and run_dir.is_dir():  # a training stop (collapse, NaN), not a flag error: it would repeat
            (run_dir / "stopped.json").write_text(json.dumps(meta | {"exit": e.code}))
        return None
    (run_dir / "provenance.json").write_text(json.dumps(meta))
    return (
        json.loads((run_dir / "results.json").read_text()) | authors_eval.evaluate_run(run_dir) | {"provenance": meta}
    )


def shown(results):
    """A run's results as the tables read them: where the head's rows put no mass outside self and partner
    (identity attention: entropy 0 there), F~, its controls and the entropy are undefined and left out."""
    if not results or max(results.get("entropy", [1.0])) > 0:
        return results
    undefined = "fusion fusion_norm control_norm control_beta token_control_norm entropy fusion_norm_per_head".split()
    return {k: v for k, v in results.items() if k not in undefined}


def mean_std(values, scale=1.0, digits=1):
    """'mean ± std' over seeds (sample std), or the one value; '—' when there is none."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


COLUMNS = [  # header, how to read one run, scale, digits
    ("kNN %", lambda r: r["knn_acc"], 100, 1),
    ("linear %", lambda r: r["linear_acc"], 100, 1),
    ("1-NN on h %", lambda r: r["backbone_1nn_acc"], 100, 1),
    ("1-NN on z, authors' (transductive) %", lambda r: r["head_1nn_acc"], 100, 1),
    ("normalised fusion F~, max layer", lambda r: max(r["fusion_norm"]) if "fusion_norm" in r else None, 1, 3),
    ("F~, last layer", lambda r: r["fusion_norm"][-1] if "fusion_norm" in r else None, 1, 3),
    ("backbone control, last layer", lambda r: r["control_norm"][-1] if "control_norm" in r else None, 1, 3),
    ("token control, last layer", lambda r: r.get("token_control_norm", [None])[-1], 1, 3),
    (
        "largest head's F~, any layer",
        lambda r: max(map(max, r["fusion_norm_per_head"])) if "entropy" in r else None,
        1,
        3,
    ),
    ("self mass, max layer", lambda r: max(r["self_mass"]) if "self_mass" in r else None, 1, 3),
    ("partner mass, max layer", lambda r: max(r["partner_mass"]) if "partner_mass" in r else None, 1, 3),
    ("entropy, last layer (nats)", lambda r: r["entropy"][-1] if "entropy" in r else None, 1, 2),
]


EPOCH_COLUMNS = [  # header, how to read one monitor row of metrics.jsonl
    ("kNN %", lambda r: f"{100 * r['knn_acc']:.1f}"),
    ("F~, max layer", lambda r: f"{max(r['fusion_norm']):.3f}" if "fusion_norm" in r else "—"),
    ("F~, last layer", lambda r: f"{r['fusion_norm'][-1]:.3f}" if "fusion_norm" in r else "—"),
    ("backbone control, last layer", lambda r: f"{r['control_norm'][-1]:.3f}" if "control_norm" in r else "—"),
    ("entropy, last layer", lambda r: f"{r['entropy'][-1]:.2f}" if "entropy" in r else "—"),
]


def epochs_table(folder, runs):
    """Markdown: every run's monitor rows (epoch 0 = random init) from its metrics.jsonl."""
    lines = ["| arm | seed | epoch | " + " | ".join(c[0] for c in EPOCH_COLUMNS) + " |"]
    lines.append("|" + " --- |" * (len(EPOCH_COLUMNS) + 3))
    for run in runs:
        metrics = run_folder(folder, run["arm"], run["seed"]) / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        for r in (r for r in rows if "knn_acc" in r):
            cells = " | ".join(read(r) for _, read in EPOCH_COLUMNS)
            lines.append(f"| {run['arm']} | {run['seed']} | {r['epoch']} | {cells} |")
    return "\n".join(lines) + "\n"


def layer_gap(p):
    """One layer's head-minus-control cell: mean (signs), starred where the 95% CI excludes 0."""
    return f"{p['mean']} ({p['signs']}){'*' * p['detected']}"


def by_layer(runs):
    """Markdown: per arm with attention, F~, its backbone and token controls and the entropy at every layer, mean
    over seeds; then, layer by layer, F~ minus each control read as pairs (the mean, the seeds above and below, and
    whether the 95% CI excludes 0)."""
    lines = ["| arm | F~ by layer | backbone control by layer | token control by layer | entropy by layer (nats) |"]
    lines.append("|" + " --- |" * 5)
    gaps = []  # F~ minus each control, a row per arm and control
    for arm in dict.fromkeys(r["arm"] for r in runs if "fusion_norm" in (shown(r["results"]) or {})):
        done = [shown(r["results"]) for r in runs if r["arm"] == arm and r["results"]]
        keys = (("fusion_norm", 3), ("control_norm", 3), ("token_control_norm", 3), ("entropy", 2))
        cells = [" ".join(f"{statistics.mean(v):.{d}f}" for v in zip(*(r[key] for r in done)))
                 if all(key in r for r in done) else "—" for key, d in keys]  # fmt: skip
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        for key, name in (("control_norm", "backbone control"), ("token_control_norm", "token control")):
            if len(done) > 1 and all(key in r for r in done):
                layers = zip(*([f - c for f, c in zip(r["fusion_norm"], r[key])] for r in done))  # per layer, seeds
                gaps.append(f"| {arm} | {name} | " + " · ".join(layer_gap(pairs(gap, 4)) for gap in layers) + " |")
    if len(lines) == 2:
        return []
    out = ["Every layer, first to last, mean over the seeds that finished:", "", *lines, ""]
    if gaps:
        out += ["F~ minus its controls, layer by layer, read as pairs (a head and its controls share the batch):", ""]
        out += ["| arm | F~ minus | layer by layer: mean (seeds above, below; * where the 95% CI excludes 0) |"]
        out += ["|" + " --- |" * 3, *gaps, ""]
    return out


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student's t, 97.5%


def pairs(diffs, digits):
    """Per-seed differences read as pairs, as text to `digits`: the seeds above and below 0 ("2+ 1-"), and with two
    or more their mean, sd, effect size d = mean / sd and the half-width of the mean's 95% confidence interval (t
    with n - 1 degrees of freedom): the smallest mean difference these seeds detect; `detected` when the interval
    excludes 0."""
    out = {"signs": f"{sum(d > 0 for d in diffs)}+ {sum(d < 0 for d in diffs)}-"}
    if len(diffs) < 2:
        return out
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    ci = T975[len(diffs) - 1] * sd / len(diffs) ** 0.5
    return out | {
        "detected": abs(mean) > ci,
        "mean": f"{mean:+.{digits}f}",
        "sd": f"{sd:.{digits}f}",
        "d": f"{mean / sd:+.1f}" if sd > 0.5 * 10**-digits else "—",  # a spread below the rounding: no effect size
        "ci": f"{ci:.{digits}f}",
    }


def paired(runs, references):
    """Markdown: the paired reading. Arms at one seed share the backbone's initialisation, the data order and the
    augmentations, and a head and its control share the batch: per seed, each arm minus its reference arm (kNN,
    linear) and each head's F~ minus its backbone control (last layer, and the layer where the difference is
    largest); then mean ± sd, the signs, the effect size d = mean / sd of the differences, and the half-width of
    their 95% confidence interval (t with n - 1 degrees of freedom): the smallest mean difference these seeds detect."""
    by = {(r["arm"], r["seed"]): shown(r["results"]) for r in runs}

    def row(label, diffs, scale, digits):
        diffs = [d * scale for d in diffs]
        if not diffs:
            return None
        each, p = " ".join(f"{d:+.{digits}f}" for d in diffs), pairs(diffs, digits)
        if len(diffs) < 2:
            return f"| {label} | {each} | — | {p['signs']} | — | — |"
        return f"| {label} | {each} | {p['mean']} ± {p['sd']} | {p['signs']} | {p['d']} | {p['ci']} |"

    lines = ["| pair | per seed | mean ± sd | signs | d | 95% CI half-width |", "|" + " --- |" * 6]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        ref = references.get(arm)
        seeds = [s for (a, s), res in by.items() if a == arm and res and by.get((ref, s))]  # both finished
        for key, name in (("knn_acc", "kNN %"), ("linear_acc", "linear %")):
            if ref:
                diffs = [by[arm, s][key] - by[ref, s][key] for s in seeds]
                lines.append(row(f"{arm} minus {ref}: {name}", diffs, 100, 1))
        done = [by[arm, s] for (a, s), res in by.items() if a == arm and res and "control_norm" in res]
        for key, name in (("control_norm", "backbone control"), ("token_control_norm", "token control")):
            if done and all(key in r for r in done):
                last = [r["fusion_norm"][-1] - r[key][-1] for r in done]
                gaps = [max(f - c for f, c in zip(r["fusion_norm"], r[key])) for r in done]
                lines.append(row(f"{arm}: F~ minus its {name}, last layer", last, 1, 3))
                lines.append(row(f"{arm}: F~ minus its {name}, largest layer", gaps, 1, 3))
    lines = [line for line in lines if line]
    return [] if len(lines) == 2 else ["Paired differences (signs: seeds above and below 0):", "", *lines, ""]


def summary(runs, references):
    """Markdown, a row per arm: kNN and linear (mean ± sd), kNN minus its reference arm per seed (mean ± sd, seeds
    above and below, the 95% CI half-width), and for a head the last layer's F~, F~ minus its backbone and its token
    control (mean ± sd, signs), the entropy and the largest single head's F~. Reads runs.json's records alone."""
    by = {(r["arm"], r["seed"]): shown(r["results"]) for r in runs}

    def diff(values, digits):
        if not values:
            return "—"
        p = pairs(values, digits)
        if len(values) == 1:
            return f"{values[0]:+.{digits}f} ({p['signs']})"
        return f"{p['mean']} ± {p['sd']} ({p['signs']}; CI ±{p['ci']})"

    head = "| arm | kNN % | linear % | kNN minus the MLP, paired | F~, last layer | F~ minus backbone control, last"
    lines = [head + " | F~ minus token control, last | entropy, last | largest head's F~ |", "|" + " --- |" * 9]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        done = {s: res for (a, s), res in by.items() if a == arm and res}
        cells = [
            mean_std([r["knn_acc"] for r in done.values()], 100),
            mean_std([r["linear_acc"] for r in done.values()], 100),
        ]
        ref = references.get(arm)
        cells.append(diff([100 * (done[s]["knn_acc"] - by[ref, s]["knn_acc"]) for s in done if by.get((ref, s))], 1))
        heads = [r for r in done.values() if "entropy" in r]
        cells.append(mean_std([r["fusion_norm"][-1] for r in heads], 1, 3))
        for key in ("control_norm", "token_control_norm"):
            cells.append(diff([r["fusion_norm"][-1] - r[key][-1] for r in heads if key in r], 3))
        cells.append(mean_std([r["entropy"][-1] for r in heads], 1, 2))
        cells.append(mean_std([max(map(max, r["fusion_norm_per_head"])) for r in heads], 1, 3))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def reference(name):
    """{arm: the MLP arm it is paired with, or None}: the table's one `--head ffn` arm; with several, the one of
    exactly `--head ffn` (heads also has the 10-layer MLP), else the one whose name ends as the arm's does (batch:
    "N = 64", the MLP at the arm's own batch size). An MLP arm is paired only with the plain MLP, never with itself."""
    mlps = {arm: flags for arm, flags, _ in TABLES[name] if flags.split()[:2] == ["--head", "ffn"]}
    plain = [arm for arm, flags in mlps.items() if flags == "--head ffn"] if len(mlps) > 1 else list(mlps)
    ends = lambda arm: arm.rsplit(", ", 1)[-1]  # noqa: E731
    refs = {}
    for arm, _, _ in TABLES[name]:
        same = [mlp for mlp in mlps if ends(mlp) == ends(arm)]
        ref = plain[0] if plain else same[0] if len(same) == 1 else None
        refs[arm] = ref if ref != arm else None
    return refs


def make_table(name, seeds, out_dir, common):
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    runs, lines = [], []
    for arm, flags, runner in TABLES[name]:
        results = [run_arm(folder, arm, flags, runner, seed, common) for seed in seeds]
        runs += [
            {"arm": arm, "flags": flags, "runner": runner, "seed": s, "results": r} for s, r in zip(seeds, results)
        ]
        done = [shown(r) for r in results if r is not None]
        cells = [mean_std([read(r) for r in done], scale, digits) for _, read, scale, digits in COLUMNS]
        stopped = f" ({len(results) - len(done)} of {len(results)} stopped)" if len(done) < len(results) else ""
        lines.append(f"| {arm}{stopped} | `{flags}` | " + " | ".join(cells) + " |")
    chance = next(
        (r["results"]["fusion_norm_chance"] for r in runs if r["results"] and "fusion_norm_chance" in r["results"]),
        None,
    )
    seed_list = " ".join(map(str, seeds))
    command = f"python experiments/table.py {name} --seeds {seed_list} --out-dir {out_dir}"
    command += f" -- {' '.join(common)}" if common else ""  # no flags after --: the synthetic default
    header = "| arm | flags | " + " | ".join(c[0] for c in COLUMNS) + " |"
    table = [header, "|" + " --- |" * (len(COLUMNS) + 2), *lines, ""]
    spread = f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}"
    spread = spread if len(seeds) > 1 else f"One seed ({seeds[0]}): single runs, no spread"
    table.append(f"{spread}; chance of F~: {chance:.3f}." if chance else f"{spread}.")
    table += ["", "```bash", command, "```", ""]
    pairing = "each arm against the same seed's MLP run" + (" at the arm's N" if name == "batch" else "")
    table += [f"Summary, read as pairs ({pairing}; a head against its controls):", ""]
    table += [*summary(runs, reference(name)), ""]
    table += by_layer(runs)
    table += paired(runs, reference(name))
    metas = {json.dumps(r["results"]["provenance"]) for r in runs if r["results"] and "provenance" in r["results"]}
    table += [f"Ran at: {'; '.join(sorted(metas))}.", ""] if metas else []
    (folder / "table.md").write_text("\n".join(table))
    (folder / "runs.json").write_text(json.dumps(runs, indent=1))
    (folder / "epochs.md").write_text(epochs_table(folder, runs))
    print("\n".join(table))
    return runs


FLAGS = (  # table.py's own; deep_fusion.py's for every run come after `--`
    ("table", dict(help=f"the table's name: {', '.join(sorted(TABLES))}")),
    ("--seeds", dict(type=int, nargs="+", default=[0, 1, 2], help="one run per arm and seed")),
    ("--out-dir", dict(default="tables", help="parent folder of <table>/")),
    ("--summary", dict(action="store_true", help="print the paired summary from <out-dir>/<table>/runs.json; no run")),
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, common = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = own_flags(ours, *FLAGS, rest=False)[0]
    if args.table not in TABLES:
        print(f"table.py: error: no table {args.table!r}; choose from {', '.join(sorted(TABLES))}", file=sys.stderr)
        raise SystemExit(2)
    if args.summary:
        runs = json.loads((Path(args.out_dir) / args.table / "runs.json").read_text())
        print("\n".join(summary(runs, reference(args.table))))
        return runs
    return make_table(args.table, args.seeds, args.out_dir, common)


if __name__ == "__main__":
    main()
