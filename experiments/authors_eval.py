"""The authors' evaluation of finished deep_fusion.py runs (their public code, HuanranLi/DeepFusion: src/KNN.py,
src/LinearProbing.py), as a labelled second column beside the backbone's kNN and linear probe:

  python experiments/authors_eval.py runs/RUN [runs/RUN ...]

Test images go in batches of N through f AND g, so the Transformer head attends across each
test batch (transductive); each test image takes the label of its nearest other test image
(cosine, leave-one-out). Writes authors_1nn.json into each run folder and prints one line per run.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import df  # noqa: E402
from experiments.ablations import ablated_build, flags_of  # noqa: E402


@torch.no_grad()
def transductive_1nn(cfg, g, h, y):
    """The authors' 1-NN on head outputs z = g(h) of test batches of N, and on backbone features
    h (n, D) for comparison. The batches follow a seeded random order: on a test set stored class
    by class, single-class batches would let the head leak labels. Returns (on z, on h)."""
    g.eval()
    order = torch.randperm(len(h), generator=torch.Generator().manual_seed(cfg.seed)).to(h.device)
    h, y = h[order], y.to(h.device)[order]
    z = torch.cat([g(hb, paired=False) if cfg.head == "transformer" else g(hb) for hb in h.split(cfg.batch_size)])
    accs = []
    for e in (z.float(), h):
        e = F.normalize(e, dim=1)
        sim = (e @ e.T).fill_diagonal_(float("-inf"))  # (n, n), no sample is its own neighbour
        accs.append((y[sim.argmax(1)] == y).float().mean().item())
    return accs


def evaluate_run(run_dir, device="cpu"):
    """Rebuild a run's f and g from its checkpoint (an ablation's from its ablation.json), evaluate."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():  # else the error would name a --resume flag never given
        raise df.DeepFusionError(f"{run_dir}: no checkpoint.pt; give the folder of a finished deep_fusion.py run")
    cfg, ckpt = df.config_for_resume({"resume": str(run_dir / "checkpoint.pt"), "device": device, "compile": False})
    build = ablated_build(flags_of(run_dir)) if (run_dir / "ablation.json").exists() else df.build
    data, device = df.load_dataset(cfg), torch.device(device)
    f, g = build(cfg, data[0].shape[-1], device)[:2]
    f.load_state_dict(ckpt["f"])
    g.load_state_dict(ckpt["g"])
    h_test = df.features(f, data[2], device, *df.MEAN_STD[cfg.dataset])
    head, backbone = transductive_1nn(cfg, g, h_test, data[3])
    result = {"head_1nn_acc": head, "backbone_1nn_acc": backbone, "epoch": ckpt["epoch"]}
    (run_dir / "authors_1nn.json").write_text(json.dumps(result, indent=2))
    print(f"{run_dir}: 1-NN on head outputs z (transductive) {head:.2%} | on backbone features h {backbone:.2%}")
    return result


def main(argv=None):
    runs = sys.argv[1:] if argv is None else argv
    if not runs or runs[0].startswith("-"):
        print("usage: python experiments/authors_eval.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        raise SystemExit(2)
    try:
        return [evaluate_run(run) for run in runs]
    except df.DeepFusionError as e:
        print(f"authors_eval.py: error: {e.args[0]}", file=sys.stderr)
        raise SystemExit(e.args[1] if len(e.args) > 1 else 2) from None


if __name__ == "__main__":
    main()
