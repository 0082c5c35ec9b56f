"""The attention figure of a run, labelled for a reader: per layer, the class-sorted token map (mean over heads)
with class boundaries and names, and beneath it the class-to-class matrix (experiments/fusion.py's class_matrix).
Every panel shares one scale: n * A for the token maps and the class matrices' ratio over uniform attention, so 1
(white) is uniform attention, red is more, blue is less; a near-uniform head looks white, not structured.

  python experiments/figure.py runs/RUN attention.png [--classes airplane automobile ...]

Class names default to the sorted class folders of an imagefolder run, else "0", "1", ...
The notebook draws its figures with plot_attention.
"""

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import fusion, own_flags  # noqa: E402

SCALE = dict(cmap="RdBu_r", vmin=0.0, vmax=2.0)  # 1 = uniform attention, white


def plot_attention(attn, labels, pair, names, title, note="", cols=5):
    """attn (L, heads, n, n) sorted by class, labels (n,), pair (n,): a matplotlib figure with, per layer, the
    token map n * A over its class-to-class matrix, all on SCALE, one colour bar; `note` is a line under the title."""
    A = attn.float().mean(1)  # (L, n, n)
    L, n = len(A), A.shape[-1]
    cols = min(L, cols)
    rows = -(-L // cols)  # rows of layers, rounded up
    fig, ax = plt.subplots(2 * rows, cols, figsize=(2.6 * cols + 1.5, 5.4 * rows), squeeze=False, layout="constrained")
    edges = (torch.nonzero(labels.diff()).flatten() + 1).tolist()  # first token of each new class
    centres = [(a + b) / 2 for a, b in zip([0, *edges], [*edges, n])]
    present = [names[k] for k in labels.unique().tolist()]
    for l in range(rows * cols):
        top, bottom = ax[2 * (l // cols), l % cols], ax[2 * (l // cols) + 1, l % cols]
        if l >= L:
            top.axis("off")
            bottom.axis("off")
            continue
        im = top.imshow(n * A[l], **SCALE)
        for e in edges:
            top.axhline(e - 0.5, color="grey", lw=0.4)
            top.axvline(e - 0.5, color="grey", lw=0.4)
        top.set_xticks(centres, present, rotation=90, fontsize=10)
        top.set_yticks(centres, present if l % cols == 0 else [], fontsize=10)  # names on the first column
        top.set_title(f"layer {l + 1}: tokens", fontsize=12)
        bottom.imshow(fusion.class_matrix(A[l], labels, pair), **SCALE)
        bottom.set_xticks(range(len(present)), present, rotation=90, fontsize=10)
        bottom.set_yticks(range(len(present)), present if l % cols == 0 else [], fontsize=10)
        bottom.set_title(f"layer {l + 1}: class to class", fontsize=12)
    fig.colorbar(im, ax=ax.ravel().tolist(), shrink=0.5, label="attention over uniform (n A; 1 = uniform)")
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize=13)
    return fig


def describe(cfg, n):
    """A plain-language title and a how-to-read line for a run's config (a dict) and its n tokens."""
    data = {"imagefolder": f"image folder {Path(cfg['data_dir']).name}"}.get(cfg["dataset"], cfg["dataset"])
    head = f"Transformer head, {cfg['head_depth']} layers x {cfg['head_heads']} heads"
    head += ", tied W^Q = W^K" if cfg["qk_tied"] else ", separate W^Q, W^K (the authors')"
    title = f"{data}, {cfg['arch']} backbone, {cfg['epochs']} epochs, {head}, seed {cfg['seed']}: {n} tokens"
    partner = "its partner view is masked (blue dots)" if cfg["mask_partner"] else "its partner view is visible"
    note = f"Rows: a token's attention, mean over heads, by class. Diagonal: the token itself; {partner}."
    return title, note


FLAGS = (
    ("run_dir", dict(help="a finished Transformer run of deep_fusion.py")),
    ("out", dict(help="the PNG to write")),
    ("--classes", dict(nargs="+", help="class names in label order")),
)


def main(argv=None):
    args = own_flags(argv, *FLAGS, rest=False)[0]
    plt.switch_backend("Agg")  # a file, no window (the notebook keeps its own backend)
    run_dir = Path(args.run_dir)
    try:
        maps = torch.load(run_dir / "attention.pt", weights_only=True)
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, RuntimeError) as e:
        print(f"figure.py: error: {run_dir}: not a finished Transformer run ({e})", file=sys.stderr)
        raise SystemExit(2) from None
    names = args.classes
    if names is None and cfg["dataset"] == "imagefolder":
        names = sorted(d.name for d in (Path(cfg["data_dir"]) / "train").iterdir() if d.is_dir())
    names = names or [str(k) for k in range(int(maps["labels"].max()) + 1)]
    fig = plot_attention(maps["attn"], maps["labels"], maps["pair"], names, *describe(cfg, len(maps["labels"])))
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
