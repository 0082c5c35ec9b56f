"""The attention figure of a run, labelled for a reader: per layer, the class-sorted token map
(mean over heads) with class boundaries and names, and beneath it the class-to-class matrix
(df.class_matrix: mean attention from class a to class b over its uniform value).

  python experiments/figure.py runs/RUN attention.png [--classes airplane automobile ...]

Class names default to the sorted class folders of an imagefolder run, else "0", "1", ...
The notebook draws its figures with plot_attention.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import df  # noqa: E402


def plot_attention(attn, labels, pair, names, title, cols=5):
    """attn (L, heads, n, n) sorted by class, labels (n,), pair (n,): a matplotlib figure with,
    per layer, the token map (white = at or above its 99th percentile) over its class matrix."""
    A = attn.float().mean(1)  # (L, n, n)
    L, n = len(A), A.shape[-1]
    cols = min(L, cols)
    rows = -(-L // cols)  # rows of layers, rounded up
    fig, ax = plt.subplots(2 * rows, cols, figsize=(2.4 * cols + 1, 5 * rows), squeeze=False, layout="constrained")
    edges = (torch.nonzero(labels.diff()).flatten() + 1).tolist()  # first token of each new class
    centres = [(a + b) / 2 for a, b in zip([0, *edges], [*edges, n])]
    present = [names[k] for k in labels.unique().tolist()]
    for l in range(rows * cols):
        top, bottom = ax[2 * (l // cols), l % cols], ax[2 * (l // cols) + 1, l % cols]
        if l >= L:
            top.axis("off")
            bottom.axis("off")
            continue
        top.imshow(A[l], cmap="magma", vmin=0, vmax=float(A[l].quantile(0.99)))
        for e in edges:
            top.axhline(e - 0.5, color="white", lw=0.4)
            top.axvline(e - 0.5, color="white", lw=0.4)
        top.set_xticks(centres, present, rotation=90, fontsize=6)
        top.set_yticks(centres, present if l % cols == 0 else [], fontsize=6)  # names on the first column
        top.set_title(f"layer {l + 1}: tokens", fontsize=8)
        M = df.class_matrix(A[l], labels, pair)  # (K, K), 1 = uniform
        im = bottom.imshow(M, cmap="RdBu_r", vmin=0, vmax=2)
        bottom.set_xticks(range(len(present)), present, rotation=90, fontsize=6)
        bottom.set_yticks(range(len(present)), present if l % cols == 0 else [], fontsize=6)
        bottom.set_title(f"layer {l + 1}: class to class", fontsize=8)
    fig.colorbar(im, ax=ax.ravel().tolist(), shrink=0.4, label="class to class: attention over its uniform value")
    fig.suptitle(title)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--classes", nargs="+")
    args = p.parse_args(argv)
    plt.switch_backend("Agg")  # a file, no window (the notebook keeps its own backend)
    run_dir = Path(args.run_dir)
    maps = torch.load(run_dir / "attention.pt", weights_only=True)
    cfg = json.loads((run_dir / "config.json").read_text())
    names = args.classes
    if names is None and cfg["dataset"] == "imagefolder":
        names = sorted(d.name for d in (Path(cfg["data_dir"]) / "val").iterdir() if d.is_dir())
    names = names or [str(k) for k in range(int(maps["labels"].max()) + 1)]
    head = "tied W^Q = W^K" if cfg["qk_tied"] else "separate W^Q, W^K"
    title = f"{run_dir.name}\n{cfg['head']} head ({head}), mean over heads, tokens sorted by class"
    fig = plot_attention(maps["attn"], maps["labels"], maps["pair"], names, title)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
