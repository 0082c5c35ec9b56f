"""Ablations of the Transformer head, trained by deep_fusion.py's own loop with another build:

  --attn identity   each token attends only to itself: the head mixes nothing across the batch
  --attn uniform    each token attends equally to every token it may see: the batch mean
  --head-opt adamw  AdamW for the head g (--head-lr, and --head-wd on its matrices), SGD for f
  --head-wd W       the head's own weight decay (with SGD: the backbone keeps --weight-decay)
  --block first-commit   the authors' first commit: no residuals, BatchNorm over the 2N tokens, ReLU
  --bn-eps E        that BatchNorm's eps (torch: 1e-5); --clip C: clip the gradient norm of f and g at C
  --freeze-backbone random|RUN/checkpoint.pt   f fixed (its random init, or a run's trained f), in eval mode:
                    the head g is trained alone on f's features (one process: not under torchrun)

  python experiments/ablations.py --attn uniform [deep_fusion.py flags]

The run folder is deep_fusion.py's, plus ablation.json with these flags (authors_eval.py reads it); the monitor
is experiments/fusion.py's (the backbone control, row entropy and per-head scores in metrics.jsonl too).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import df, fusion, own_flags  # noqa: E402

FLAGS = (
    ("--attn", dict(default="softmax", choices=("softmax", "identity", "uniform"), help="fixed attention A")),
    ("--head-opt", dict(default="sgd", choices=("sgd", "adamw"), help="the head's optimizer")),
    ("--head-lr", dict(type=float, default=1e-3, help="peak AdamW lr of g (not scaled by N)")),
    ("--head-wd", dict(type=float, help="weight decay of the head g alone (AdamW: its matrices, default 0.05)")),
    ("--block", dict(default="post-norm", choices=("post-norm", "first-commit"), help="the head's blocks")),
    ("--bn-eps", dict(type=float, default=1e-5, help="eps of the first-commit blocks' BatchNorm")),
    ("--clip", dict(type=float, help="clip the gradient norm of f and g at this (default: no clipping)")),
    ("--freeze-backbone", dict(help="'random' or a run's checkpoint.pt: f fixed, the head trained alone")),
)


def defaults():
    """The ablation flags' defaults, as a dict."""
    return vars(own_flags([], *FLAGS)[0])


def flags_of(run_dir):
    """The ablation flags a run folder was trained with (defaults for flags newer than the run)."""
    return argparse.Namespace(**defaults() | json.loads((Path(run_dir) / "ablation.json").read_text()))


class FixedAttention(nn.Module):
    """Attention whose map is fixed instead of softmax(QK^T / sqrt(m)): "identity" (A = I) or
    "uniform" (A = 1/n over the keys the mask allows). Only values and the output projection
    are learnt, so the layer holds no W^Q, W^K. Same interface as df.Attention."""

    def __init__(self, dim, heads, mode):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, return_attention=False):  # x (n, d)
        n, d = x.shape
        v = self.value(x).view(n, self.heads, d // self.heads).transpose(0, 1)  # (H, n, m)
        s = torch.zeros(n, n, device=x.device)  # uniform: equal logits
        if self.mode == "identity":
            s = s.fill_(float("-inf")).fill_diagonal_(0)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        A = torch.softmax(s, dim=-1).to(v.dtype).expand(self.heads, n, n)  # (H, n, n)
        return self.proj((A @ v).transpose(0, 1).reshape(n, d)), A if return_attention else None


class FirstCommitBlock(nn.Module):
    """The block of the authors' first commit: x = BN(MSA(x)); x = BN(FFN(x)), FFN with ReLU and
    no residual path, so attention is the only way from one layer to the next. The BatchNorms
    normalise each feature over the 2N tokens of the batch, which spreads tokens that attention
    has averaged together apart again. Same attention, parameter names and interface as df.Block."""

    def __init__(self, dim, heads, eps=1e-5, ff_mult=4, **attn):
        super().__init__()
        self.attn = df.Attention(dim, heads, **attn)
        self.norm1 = nn.BatchNorm1d(dim, eps=eps)
        self.norm2 = nn.BatchNorm1d(dim, eps=eps)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.ReLU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, x, mask=None, return_attention=False):  # x (n, d): BatchNorm over the n tokens
        y, A = self.attn(x, mask, return_attention)
        x = self.norm1(y)
        return self.norm2(self.ff(x)), A


class Optimizers:
    """Several optimizers behind the one optimizer that df.train uses (GradScaler included);
    clip: the gradient norm of all their parameters is clipped to it before each step."""

    def __init__(self, *opts, clip=None):
        self.opts, self.clip = opts, clip
        self.param_groups = [group for opt in opts for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.opts:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        if self.clip is not None:
            nn.utils.clip_grad_norm_([p for group in self.param_groups for p in group["params"]], self.clip)
        for opt in self.opts:
            opt.step()

    def state_dict(self):
        return {"opts": [opt.state_dict() for opt in self.opts]}

    def load_state_dict(self, state):
        for opt, saved in zip(self.opts, state["opts"]):
            opt.load_state_dict(saved)


def ablated_build(flags):
    """A build(cfg, image_size, device) for df.train: df.build, then the ablation of `flags`."""

    def build(cfg, image_size, device):
        f, g, opt, amp, scaler = df.build(cfg, image_size, device)
        if flags.freeze_backbone:  # no gradient, and BatchNorm keeps its statistics: f.train() is a no-op
            if flags.freeze_backbone != "random":
                f.load_state_dict(torch.load(flags.freeze_backbone, map_location=device, weights_only=True)["f"])
            f.requires_grad_(False).eval()
            f.train = lambda mode=True: f  # df.train calls f.train() every epoch
        if flags.block == "first-commit":  # new blocks, drawn after df.build's: not the same weights
            attn = dict(tied=cfg.qk_tied, scale=cfg.attn_scale)
            blocks = (FirstCommitBlock(cfg.head_dim, cfg.head_heads, flags.bn_eps, **attn) for _ in g.blocks)
            g.blocks = nn.ModuleList(blocks).to(device)
        if flags.attn != "softmax":
            for block in g.blocks:
                block.attn = FixedAttention(cfg.head_dim, cfg.head_heads, flags.attn).to(device)
        if flags.attn != "softmax" or flags.block != "post-norm":
            opt = df.make_optimizer(cfg, f, g, device)  # over the new parameters
        if flags.head_opt == "sgd" and flags.head_wd is not None:  # one SGD each, g's with its own decay
            g_opt = df.make_optimizer(dataclasses.replace(cfg, weight_decay=flags.head_wd), nn.Module(), g, device)
            opt = Optimizers(df.make_optimizer(cfg, f, nn.Module(), device), g_opt)
        if flags.head_opt == "adamw":
            mats = [p for p in g.parameters() if p.dim() == 2]  # norms, biases and scales: no decay
            rest = [p for p in g.parameters() if p.dim() != 2]
            wd = 0.05 if flags.head_wd is None else flags.head_wd
            groups = [{"params": mats, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
            adamw = torch.optim.AdamW(groups, lr=flags.head_lr)
            for group in adamw.param_groups:
                group["base_lr"] = group["lr"]
            opt = Optimizers(df.make_optimizer(cfg, f, nn.Module(), device), adamw)  # SGD for f alone
        if flags.clip is not None:
            opt = Optimizers(*getattr(opt, "opts", [opt]), clip=flags.clip)
        return f, g, opt, amp, scaler

    return build


def job(flags):
    """df.main's job: check the flags, name the run after its ablation, record the flags, run it."""

    def run(cfg, ckpt):
        for name in ("head_lr", "bn_eps", "clip"):  # None: not given
            if (value := getattr(flags, name)) is not None and value <= 0:
                raise df.DeepFusionError(f"--{name.replace('_', '-')} {value}: must be positive")
        frozen = flags.freeze_backbone
        if frozen not in (None, "random") and not Path(frozen).is_file():
            fix = "give 'random' or a run's checkpoint.pt"
            raise df.DeepFusionError(f"--freeze-backbone {frozen}: no such file; {fix}")
        if frozen and df.ranks()[1] > 1:  # DistributedDataParallel refuses a module with nothing to train
            raise df.DeepFusionError(f"--freeze-backbone {frozen}: not under torchrun; run it in one process")
        if flags.head_wd is not None and flags.head_wd < 0:
            raise df.DeepFusionError(f"--head-wd {flags.head_wd}: must be 0 or more")
        if cfg.head != "transformer" and (flags.attn, flags.head_opt, flags.block) != ("softmax", "sgd", "post-norm"):
            fix = "use --head transformer"
            raise df.DeepFusionError(f"--attn, --head-opt and --block ablate the Transformer head; {fix}")
        if not cfg.run_name and not ckpt:  # named after every flag that differs from its default
            default = defaults()
            # a checkpoint path is named by its run folder
            changed = [f"{k.replace('_', '-')}-{Path(str(v)).parent.name or v}" for k, v in vars(flags).items()
                       if v != default[k]]  # fmt: skip
            cfg.run_name = "-".join([cfg.dataset, cfg.head, *changed, time.strftime("%Y%m%d-%H%M%S")])
        run_dir = Path(cfg.resume).parent if ckpt else Path(cfg.out_dir) / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ablation.json").write_text(json.dumps(vars(flags), indent=2))
        return df.run(cfg, ckpt, build=ablated_build(flags), monitor=fusion.evaluate)

    return run


def main(argv=None):
    flags, rest = own_flags(argv, *FLAGS)
    return df.main(rest, job=job(flags))


if __name__ == "__main__":
    main()
