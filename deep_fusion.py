"""Deep Fusion: SimCLR whose projection head is a Transformer attending across the batch.

Paper: Li & Pimentel-Alarcon, "Deep Fusion: Capturing Dependencies in Contrastive Learning
via Transformer Projection Heads", arXiv 2403.18681. One file: torch, torchvision, numpy.

  python deep_fusion.py                                        # CPU smoke run: synthetic data, tiny CNN
  python deep_fusion.py --dataset cifar10 --head transformer   # GPU: ResNet-18, the authors' head
  torchrun --nproc-per-node 4 deep_fusion.py --dataset cifar10 --batch-size 1024   # one global sequence
Measured (the first command, 2-core CPU, about 1 minute): kNN 74.8% (random-init backbone 29.3%).
Results on real images, with their commands: README.md. Benchmark, ablations, the authors'
evaluation, results tables and the theorems' helpers: experiments/.

Index (paper / THEORY.md -> code)
  views x -> f -> h -> g -> z (SimCLR)              augment, make_backbone, FFNHead, TransformerHead
  NT-Xent loss (SimCLR Eq. 1)                       nt_xent
  attention A = softmax(Q K^T / sqrt(m))            Attention.forward (explicit and fused paths)
  post-norm block, authors' code                    Block
  Theorem 1's W^Q = W^K, made trainable             Attention(tied=True, scale=...)
  one sequence of 2N tokens across torchrun ranks   gather_tokens, average_gradients
  fusion scores F_l, F~_l, self and partner mass    fusion_score, fusion_report, balanced_sample
  the backbone control softmax(beta cos(h_i, h_j))  cosine_control
  class-to-class attention, over uniform            class_matrix, save_attention_png
  weighted kNN monitor (Wu et al. 2018)             knn_accuracy
  linear probe on frozen h                          linear_probe
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pickle
import resource
import sys
import time
import typing
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

# ---- 1. Config -------------------------------------------------------------------------

DATASETS, ARCHS = ("synthetic", "cifar10", "cifar100", "imagefolder"), ("tiny", "resnet18", "resnet34", "resnet50")


def arg(default, help, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """Single source of defaults; the command line is built from it. None = from the presets."""

    dataset: str = arg("synthetic", "synthetic is built in and offline; CIFAR is downloaded", DATASETS)
    data_dir: str = arg("./data", "CIFAR download folder, or an imagefolder root holding train/ and val/")
    image_size: int = arg(64, "imagefolder images are resized to this (Tiny-ImageNet-200: 64)")
    arch: str | None = arg(None, "backbone f; tiny is a 4-layer CNN for CPUs", ARCHS)
    head: str = arg("transformer", "projection head g", ("transformer", "ffn"))
    head_dim: int | None = arg(None, "Transformer width d (authors: 256), or FFN hidden width")
    head_depth: int | None = arg(None, "Transformer blocks L (authors: 10), or FFN linear layers (SimCLR: 2)")
    head_heads: int | None = arg(None, "attention heads (authors: 16)")
    head_out: int | None = arg(None, "projection size (authors: 512)")
    qk_tied: bool = arg(False, "W^Q = W^K: attention logits are a similarity (THEORY.md, Theorem 1)")
    attn_scale: float = arg(0.0, "a learnable per-head attention logit scale starting here (0: fixed, as the authors)")
    mask_partner: bool = arg(False, "the Transformer head may not attend to a token's other view")
    sync_bn: bool = arg(False, "under torchrun: backbone BatchNorm statistics over all ranks (else per rank)")
    epochs: int | None = arg(None, "training epochs (paper: 1000)")
    batch_size: int | None = arg(None, "N images per step; the head sees 2N tokens (paper: 1024)")
    lr: float = arg(0.06, "SGD learning rate per 128 images, scaled by N/128 (SimCLR CIFAR recipe)")
    weight_decay: float = arg(5e-4, "SGD weight decay (authors' code, SimCLR CIFAR recipe)")
    momentum: float = arg(0.9, "SGD momentum (authors' code)")
    tau: float = arg(0.5, "NT-Xent temperature (SimCLR CIFAR recipe; authors' code: 0.02)")
    warmup_epochs: int | None = arg(None, "linear warmup epochs before the cosine decay, at most 10%% of the run")
    precision: str = arg("auto", "auto: bf16 on CUDA (fp16 without bf16), else fp32", ("auto", "bf16", "fp16", "fp32"))
    device: str = arg("auto", "auto: cuda, then mps, then cpu", ("auto", "cuda", "mps", "cpu"))
    compile: bool = arg(False, "torch.compile the backbone and the head")
    knn_k: int = arg(200, "kNN neighbours")
    knn_t: float = arg(0.1, "kNN temperature")
    linear_epochs: int = arg(100, "linear-probe epochs on frozen backbone features")
    eval_every: int | None = arg(None, "kNN and fusion monitor every this many epochs (0: at the end only)")
    attn_batch: int = arg(128, "labeled images (2x tokens) for the attention maps and fusion score")
    synthetic_train: int = arg(2048, "synthetic training images")
    synthetic_test: int = arg(512, "synthetic test images")
    seed: int = arg(0, "seed of initialisation, data order and augmentation")
    log_every: int = arg(20, "steps between progress lines")
    out_dir: str = arg("runs", "parent folder of run folders")
    run_name: str = arg("", "run folder name (default: dataset-head-time)")
    resume: str = arg("", "checkpoint.pt of a run to continue; its config is reused")


# Defaults per run size: CPU-sized on the synthetic data; elsewhere the CIFAR SimCLR recipe
# (ResNet-18, batch 512, 10 warmup epochs, 200 epochs) and the authors' Transformer head.
PRESETS = {
    "small": dict(arch="tiny", epochs=15, batch_size=128, warmup_epochs=1, eval_every=5),
    "full": dict(arch="resnet18", epochs=200, batch_size=512, warmup_epochs=10, eval_every=10),
}
TRANSFORMER_HEAD = {
    "small": dict(head_dim=128, head_depth=4, head_heads=4, head_out=128),  # narrower on CPUs
    "full": dict(head_dim=256, head_depth=10, head_heads=16, head_out=512),  # the authors' code
}
# --head ffn: SimCLR's head, Linear(D, D)-BN-ReLU-Linear(D, 128), on every dataset (Chen et al.
# 2020, Sec. 2 and B.9; lightly's CIFAR benchmark); --head-depth 10 is the authors' deep MLP.
SIMCLR_HEAD = dict(head_dim=None, head_depth=2, head_heads=1, head_out=128)  # head_dim None: D
FEATURE_DIM = {"tiny": 256, "resnet18": 512, "resnet34": 512, "resnet50": 2048}  # D of each backbone f
CKPT_FORMAT = "deep-fusion/4"  # 4: one optimizer, epoch boundaries only, tied layers without W^K
RUNTIME_ONLY = set("resume device compile log_every out_dir run_name".split())  # a resumed run may change these
POSITIVE = "epochs batch_size lr tau knn_k knn_t head_dim head_depth head_heads head_out image_size".split()
POSITIVE += "synthetic_train synthetic_test attn_batch log_every".split()
NON_NEGATIVE = "attn_scale weight_decay momentum warmup_epochs eval_every linear_epochs".split()


class DeepFusionError(Exception):
    """A problem the user can fix: main prints args[0] as one line and exits with args[1] (else 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise DeepFusionError(f"{message}; see --help")


def parse_flags(argv=None) -> dict:
    """The flags given, as {field: value}: every Config field is a flag (batch_size: --batch-size)."""
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for fld in dataclasses.fields(Config):
        flag, text = "--" + fld.name.replace("_", "-"), fld.metadata["help"]
        if fld.type is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue
        kind = typing.get_args(fld.type)[0] if fld.default is None else type(fld.default)  # int | None -> int
        default = "per dataset" if fld.default is None else fld.default
        p.add_argument(flag, type=kind, choices=fld.metadata["choices"], help=f"{text} (default: {default})")
    return vars(p.parse_args(argv))


def resolve(cfg: Config) -> Config:
    """Fill the None fields from the presets of the run's size and head."""
    size = "small" if cfg.dataset == "synthetic" else "full"
    preset = PRESETS[size] | (SIMCLR_HEAD if cfg.head == "ffn" else TRANSFORMER_HEAD[size])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None})
    return dataclasses.replace(cfg, head_dim=cfg.head_dim or FEATURE_DIM[cfg.arch])  # FFN hidden width = D


def check_config(cfg: Config):
    """Every flag mistake, caught before any download or write (the data's sizes: load_dataset)."""
    for name in POSITIVE + NON_NEGATIVE:
        if (value := getattr(cfg, name)) < 0 or (value == 0 and name in POSITIVE):
            need = "positive" if name in POSITIVE else "0 or more"
            raise DeepFusionError(f"--{name.replace('_', '-')} {value}: must be {need}")
    if cfg.batch_size % (G := int(os.environ.get("WORLD_SIZE", 1))):  # G: torchrun's processes
        raise DeepFusionError(f"--batch-size {cfg.batch_size} is the global N and must split evenly over {G} processes")
    if cfg.batch_size < 2:
        raise DeepFusionError("--batch-size 1: each image needs other images as negatives; use 2 or more")
    if cfg.head == "transformer" and cfg.head_dim % cfg.head_heads:
        raise DeepFusionError(f"--head-dim {cfg.head_dim} is not divisible by --head-heads {cfg.head_heads}")
    if cfg.device in ("cuda", "mps") and not getattr(torch, cfg.device).is_available():
        raise DeepFusionError(f"--device {cfg.device}: not available on this machine; use --device cpu or auto")


# ---- 2. Data and augmentation ----------------------------------------------------------
# Every dataset becomes uint8 images x (n, 3, H, W) and int64 labels y (n,); training keeps
# the whole set on the device, so an epoch needs no DataLoader workers.

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def synthetic_dataset(n, seed, size=32, n_classes=10, glyph=11, copies=(3, 7)):
    """Offline, deterministic, learnable: class k = a glyph (disk, ring, square, cross, ...), 3-6
    mirror-symmetric copies on a flat background, so the class survives crops, flips and jitter."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-3, 3, glyph), np.linspace(-3, 3, glyph), indexing="ij")
    r, box = np.hypot(xx, yy), np.maximum(abs(xx), abs(yy))
    shapes = [r <= 3, (r >= 2) & (r <= 3.2), box <= 2, box == 3, (xx == 0) | (yy == 0), abs(xx) == abs(yy)]
    shapes += [abs(yy) <= 1, abs(xx) <= 1, abs(xx) + abs(yy) <= 3, np.hypot(abs(xx) - 2, yy) <= 1.2]
    glyphs = np.stack(shapes)[:n_classes].astype(np.float32)  # (K, glyph, glyph)
    y = g.integers(0, n_classes, n)
    x = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        bg = g.uniform(0, 1) + g.normal(0, 0.05, 3)  # dim tints and noise: colour says little
        fg = (bg + g.uniform(0.35, 0.65)) % 1 + g.normal(0, 0.05, 3)  # always contrasts with bg
        img = np.tile(bg[:, None, None], (1, size, size))
        for _ in range(g.integers(*copies)):
            top, left = g.integers(0, size - glyph, 2)
            patch = img[:, top : top + glyph, left : left + glyph]  # a view: painted in place
            patch += (fg[:, None, None] - patch) * glyphs[y[i]]
        x[i] = ((img + g.normal(0, 0.05, img.shape)).clip(0, 1) * 255).round()
    return torch.from_numpy(x), torch.from_numpy(y)


def read_image_folders(root, size):
    """root/train and root/val through torchvision's ImageFolder, decoded as RGB and resized to
    (size, size): [x_train, y_train, x_test, y_test]. A broken file is reported by its path."""
    root, sets, out = Path(root), [], []
    if not root.is_dir():
        raise DeepFusionError(f"--data-dir {root}: no such folder; give a folder holding train/ and val/")
    for d in (root / "train", root / "val"):
        try:  # a missing folder, no class folders, or class folders without images
            sets.append(torchvision.datasets.ImageFolder(d, v2.Compose([v2.Resize((size, size)), v2.PILToTensor()])))
        except FileNotFoundError as e:
            fix = f"expected {d}/<class>/<image>"
            raise DeepFusionError(f"--data-dir {root}: {d} has no class folders with images ({e}); {fix}") from None
    if sets[0].classes != sets[1].classes:
        diff = sorted(set(sets[0].classes) ^ set(sets[1].classes))[:3]
        raise DeepFusionError(f"--data-dir {root}: train/ and val/ class folders differ (e.g. {diff}); match them")
    for folder in sets:
        print(f"reading {len(folder)} images from {folder.root}", flush=True)
        x = []
        for i, (path, _) in enumerate(folder.samples):
            try:
                x.append(folder[i][0])  # (3, size, size) uint8
            except Exception as e:
                raise DeepFusionError(f"cannot read image {path}: {e}; remove or replace the file") from None
        out += [torch.stack(x), torch.tensor(folder.targets)]
    return out


def load_dataset(cfg):
    """(x_train, y_train, x_test, y_test): uint8 (n, 3, H, W) and int64 (n,) CPU tensors, checked
    against the flags that depend on them before anything is written."""
    if cfg.dataset == "synthetic":
        data = (*synthetic_dataset(cfg.synthetic_train, cfg.seed), *synthetic_dataset(cfg.synthetic_test, cfg.seed + 1))
    elif cfg.dataset == "imagefolder":
        data = read_image_folders(cfg.data_dir, cfg.image_size)
    else:
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            sets = [cls(cfg.data_dir, train=t, download=True) for t in (True, False)]
        except Exception as e:  # no network, disk full, corrupt archive
            fix = "check the network or use --dataset synthetic"
            raise DeepFusionError(f"--dataset {cfg.dataset}: download to {cfg.data_dir} failed ({e}); {fix}") from None
        data = [t for s in sets for t in (torch.from_numpy(s.data).permute(0, 3, 1, 2), torch.tensor(s.targets))]
    if cfg.batch_size > (n := len(data[0])):
        raise DeepFusionError(f"--batch-size {cfg.batch_size} exceeds the {n} training images; lower it")
    if cfg.knn_k > n:
        raise DeepFusionError(f"--knn-k {cfg.knn_k} exceeds the {n}-image bank; use --knn-k {n} or less")
    if len(data[1].unique()) < 2:
        raise DeepFusionError(f"--data-dir {cfg.data_dir}: kNN and linear probe need at least 2 classes")
    return tuple(data)


# SimCLR's CIFAR augmentation (Chen et al. 2020, App. B.9; lightly's SimCLRTransform): crop
# of 8-100% of the area with aspect 3/4-4/3, flip p=0.5, colour jitter (0.4, 0.4, 0.4, 0.1)
# with p=0.8, grayscale p=0.2, no blur at 32 px. experiments/benchmark.py uses the same numbers.
CROP_SCALE, CROP_RATIO, JITTER, P_JITTER, P_GRAY = (0.08, 1.0), (3 / 4, 4 / 3), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as torchvision's rgb_to_grayscale
YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@functools.cache
def constants_on(device, mean, std):
    """mean, std (3, 1, 1), LUMA (3, 1, 1), YIQ and its inverse (3, 3), moved to `device` once: a
    host copy (or linalg.inv on CUDA) per call would make the host wait for the GPU every step."""
    consts = (torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None], LUMA[:, None, None], YIQ)
    return *(c.to(device) for c in consts), torch.linalg.inv(YIQ.double()).float().to(device)


def crop_boxes(B, gen, device):
    """Random resized crop boxes (w, h, cx, cy), each (B,), in [-1, 1] image coordinates,
    w and h as fractions of the side. 10 tries per image as torchvision, else the whole image."""
    u = lambda *shape: torch.rand(*shape, generator=gen, device=device)  # noqa: E731
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u(B, 10)
    ratio = torch.exp(math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * u(B, 10))
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()  # (B, 10)
    ok = (w <= 1) & (h <= 1)
    first = ok.int().argmax(1, keepdim=True)  # the first valid try
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], 1.0)  # (B,)
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], 1.0)
    return w, h, (1 - w) * (2 * u(B) - 1), (1 - h) * (2 * u(B) - 1)


def augment(x, gen, mean, std, size=None):
    """One SimCLR view of a whole uint8 batch (B, 3, H, W) on its device: float (B, 3, size, size),
    normalised. Every random draw comes from `gen`, so a seeded generator repeats the views."""
    B, dev = x.shape[0], x.device
    size = size or x.shape[-1]
    u = lambda *shape: torch.rand(*shape, generator=gen, device=dev)  # noqa: E731
    w, h, cx, cy = crop_boxes(B, gen, dev)
    flip = torch.where(u(B) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)  # per image: output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    v = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter with p=0.8, in a fixed order: brightness, contrast, saturation, hue.
    on = (u(B) < P_JITTER).float()[:, None, None, None]  # (B, 1, 1, 1)
    b, c, s = (1 + on * j * (2 * u(B, 1, 1, 1) - 1) for j in JITTER[:3])
    mu, sd, luma, yiq, yiq_inv = constants_on(dev, tuple(mean), tuple(std))
    gray = lambda t: (t * luma).sum(1, keepdim=True)  # noqa: E731  (B, 1, H, W)
    v = (v * b).clamp(0, 1)
    m = gray(v).mean((2, 3), keepdim=True)
    v = ((v - m) * c + m).clamp(0, 1)
    gv = gray(v)
    v = ((v - gv) * s + gv).clamp(0, 1)
    # Hue: rotate the chroma plane of YIQ by up to +-0.1 turn (close to torchvision's HSV shift).
    a = 2 * math.pi * JITTER[3] * (2 * u(B) - 1) * on.view(B)
    rot = torch.zeros(B, 3, 3, device=dev)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2], rot[:, 1, 2], rot[:, 2, 1] = 1, a.cos(), a.cos(), -a.sin(), a.sin()
    v = torch.einsum("bij,bjhw->bihw", yiq_inv @ rot @ yiq, v).clamp(0, 1)
    v = torch.where(u(B, 1, 1, 1) < P_GRAY, gray(v).expand_as(v), v)  # random grayscale
    return (v - mu) / sd


# ---- 3. Backbone f ---------------------------------------------------------------------


def make_backbone(arch, image_size=32):
    """f: images (B, 3, H, W) -> h (B, D), channels_last (NHWC convolutions are faster). Returns (f, D)."""
    if arch == "tiny":  # four conv layers with a stride-2 stem: a laptop CPU trains it in a minute
        cbr = lambda i, o, s=1: [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]  # noqa: E731
        layers = [*cbr(3, 32, 2), *cbr(32, 64), nn.MaxPool2d(2), *cbr(64, 128), nn.MaxPool2d(2), *cbr(128, 256)]
        f, D = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256
    else:  # torchvision's ResNet with the CIFAR stem (SimCLR App. B.9): 3x3 stride-1 conv, no max-pool
        f = getattr(torchvision.models, arch)(weights=None)
        if image_size <= 64:
            f.conv1, f.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        D, f.fc = f.fc.in_features, nn.Identity()
    return f.to(memory_format=torch.channels_last), D


# ---- 4. Projection heads g -------------------------------------------------------------


class FFNHead(nn.Sequential):
    """SimCLR's MLP: (depth - 1) x [Linear, BN, ReLU], then Linear; depth 2 is SimCLR's head.
    (2N, D) -> (2N, out): each row on its own, BatchNorm statistics aside."""

    def __init__(self, in_dim, hidden_dim, out_dim, depth=2):
        dims, layers = [in_dim] + [hidden_dim] * (depth - 1), []
        for i, o in zip(dims, dims[1:]):
            layers += [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(dims[-1], out_dim))


class Attention(nn.Module):
    """Multi-head self-attention over the n = 2N tokens of one batch, with no positions.
    tied: W^Q = W^K, so a logit is a similarity <q_i, q_j> (Theorem 1's construction) and the
    layer holds no W^K at all. scale > 0: a learnable per-head logit scale starting there."""

    def __init__(self, dim, heads, tied=False, scale=0.0):
        super().__init__()
        self.heads, self.tied = heads, tied
        self.qkv = nn.Linear(dim, (2 if tied else 3) * dim)  # [W^Q; W^K; W^V], or [W^Q; W^V] when tied
        self.proj = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(scale))) if scale else None

    def forward(self, x, mask=None, return_attention=False):  # x (n, d); mask (n, n), True = may attend
        n, d = x.shape
        qkv = self.qkv(x).view(n, -1, self.heads, d // self.heads).permute(1, 2, 0, 3)[:, None]  # (2|3, 1, H, n, m)
        q, k, v = (qkv[0], qkv[0], qkv[1]) if self.tied else qkv
        if self.log_scale is not None:  # learnable temperature: logits e^log_scale Q K^T / sqrt(m)
            q = q * self.log_scale.exp()
        if not return_attention:  # fused kernel (flash / memory-efficient on CUDA): A is never stored
            y, A = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        else:  # explicit: A = softmax(Q K^T / sqrt(m)), rows sum to 1
            s = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # (1, H, n, n)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            A = torch.softmax(s, dim=-1)
            y, A = A @ v, A[0]  # (1, H, n, m), (H, n, n)
        return self.proj(y[0].transpose(0, 1).reshape(n, d)), A  # heads side by side: (n, d)


class Block(nn.Module):
    """Post-norm Transformer block, as in the authors' code: x = LN(x + MSA(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim, heads, ff_mult=4, **attn):
        super().__init__()
        self.attn = Attention(dim, heads, **attn)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, x, mask=None, return_attention=False):
        y, A = self.attn(x, mask, return_attention)
        x = self.norm1(x + y)
        return self.norm2(x + self.ff(x)), A


class TransformerHead(nn.Module):
    """g: Linear(D -> d), L blocks, Linear(d -> out), BN (authors' code). The 2N embeddings are ONE
    sequence: g is permutation-equivariant over the batch, and every token, its partner view
    included, attends to every other, unless mask_partner hides tokens i and i + N from each other."""

    def __init__(self, in_dim, dim=256, depth=10, heads=16, out_dim=512, mask_partner=False, **attn):
        super().__init__()
        self.mask_partner = mask_partner
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, **attn) for _ in range(depth))
        self.out = nn.Linear(dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, h, return_attention=False, paired=True):  # h (2N, D); paired: rows i, i + N are one image
        n, mask = h.shape[0], None
        if self.mask_partner and paired:  # False at (i, i + N mod 2N)
            mask = ~torch.eye(n, dtype=torch.bool, device=h.device).roll(n // 2, 1)  # (2N, 2N)
        x, attns = self.embed(h), []  # (2N, d)
        for block in self.blocks:
            x, A = block(x, mask, return_attention)
            attns.append(A)  # (heads, 2N, 2N) per layer
        z = self.bn(self.out(x))  # (2N, out)
        return (z, attns) if return_attention else z


def make_head(cfg, D):
    """The projection head g of the config, on backbone features of size D."""
    if cfg.head == "ffn":
        return FFNHead(D, cfg.head_dim, cfg.head_out, cfg.head_depth)
    attn = dict(tied=cfg.qk_tied, scale=cfg.attn_scale)
    return TransformerHead(D, cfg.head_dim, cfg.head_depth, cfg.head_heads, cfg.head_out, cfg.mask_partner, **attn)


# ---- 5. Loss ---------------------------------------------------------------------------


def nt_xent(z1, z2, tau):
    """NT-Xent (SimCLR Eq. 1), mean over the 2N anchors: the positive is the other view of the
    same image, the other 2N-2 projections are negatives. Computed in fp32 at least."""
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).to(torch.promote_types(z1.dtype, torch.float32)), dim=1)  # (2N, d)
    s = z @ z.T / tau  # (2N, 2N) cosine similarity / tau
    s = s.masked_fill(torch.eye(2 * N, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
    target = torch.arange(2 * N, device=z.device).roll(N)  # i <-> i + N
    return F.cross_entropy(s, target)


# ---- 6. Training -----------------------------------------------------------------------


def setup_distributed(cfg):
    """The device; under torchrun (WORLD_SIZE > 1) also join the process group, nccl on CUDA and
    gloo on CPU, with a timeout so that a lost rank ends the run instead of hanging it."""
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # one process: no process group
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return device


def world():
    """(rank, number of processes); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def make_optimizer(cfg, f, g, device):
    """SGD with momentum for f and g, lr scaled by N/128 (SimCLR CIFAR recipe); the learnable
    attention scales are temperatures, without weight decay. base_lr: each group's peak lr."""
    named = [*f.named_parameters(), *g.named_parameters()]
    groups = [{"params": [p for name, p in named if not name.endswith("log_scale")]}]
    groups += [{"params": [p for name, p in named if name.endswith("log_scale")], "weight_decay": 0.0}]
    lr, fused = cfg.lr * cfg.batch_size / 128, device.type == "cuda"
    opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


def build(cfg, image_size, device):
    """f and g from the seed, on the device (compiled in place with --compile), the optimizer, the
    autocast context (bf16 on CUDA, fp16 + GradScaler without bf16) and the GradScaler."""
    torch.manual_seed(cfg.seed)
    f, D = make_backbone(cfg.arch, image_size)
    if cfg.sync_bn and world()[1] > 1:  # BN statistics over the global batch, as in one process
        f = nn.SyncBatchNorm.convert_sync_batchnorm(f)
    f, g = f.to(device), make_head(cfg, D).to(device)
    if cfg.compile:  # in place: the state_dict keys stay those of the plain modules
        f.compile()
        g.compile()
    precision = cfg.precision
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # fp32: None, autocast off
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return f, g, make_optimizer(cfg, f, g, device), amp, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def warmup_steps(cfg, steps):
    """Warmup steps: --warmup-epochs, capped at 10% of the run, so a short run also decays."""
    return min(cfg.warmup_epochs * steps, cfg.epochs * steps // 10)


def lr_at(step, total, warmup, base):
    """Linear warmup, then cosine decay to 0 (SimCLR), per step."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def gather_tokens(h):
    """Rank r holds h = [v1_r; v2_r] (2B, D) of its B images. Returns the global sequence (2N, D)
    [v1_0 ... v1_{G-1}; v2_0 ... v2_{G-1}], so token i's partner is i + N as in one process.
    The gather is autograd-aware: its backward sums each token's gradient over the G ranks'
    (identical) losses, so rank r receives G x the one-process gradient of its tokens."""
    if (G := world()[1]) == 1:
        return h
    hs = torch.stack(dist_nn.all_gather(h))  # (G, 2B, D)
    return hs.view(G, 2, -1, hs.shape[-1]).transpose(0, 1).reshape(-1, hs.shape[-1])  # (2, G, B, D) -> (2N, D)


def average_gradients(opt):
    """Mean of the gradients over ranks (DDP's rule), in one all-reduce. For f it turns the
    G-fold gather gradients into the one-process gradient; g's are already equal on all ranks."""
    if (G := world()[1]) == 1:
        return
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([gr.flatten() for gr in grads])  # (all parameters,)
    dist.all_reduce(flat)
    for gr, mean in zip(grads, flat.div_(G).split([gr.numel() for gr in grads])):
        gr.copy_(mean.view_as(gr))


def train_step(f, g, opt, scaler, v1, v2, tau, amp):
    """One SimCLR step on two views (B, 3, H, W) of this rank's B = N/G images (B = N in one
    process); returns the loss on the device (no sync)."""
    with amp:  # one forward of both views, so BN statistics and attention span both
        h = f(torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last))  # (2B, D), this rank's
        z = g(gather_tokens(h))  # (2N, out): the head attends over the global batch
    loss = nt_xent(*z.float().chunk(2), tau)  # logits in fp32
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients(opt)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def batches(cfg, x, epoch, gen, mean, std):
    """Yield (step, v1, v2) for one epoch. The order depends on (seed, epoch) and the
    augmentation is reseeded every step, so a resumed run sees the very same views."""
    rank, G = world()
    steps, B = len(x) // cfg.batch_size, cfg.batch_size // G  # B: this rank's share of the N images
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    perm = perm[: steps * cfg.batch_size].view(steps, cfg.batch_size)[:, rank * B : (rank + 1) * B]  # (steps, B)
    perm = perm.to(x.device)
    for step in range(steps):
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * steps + step + (rank << 40))  # each rank its own stream
        xb = x[perm[step]]  # (B, 3, H, W) uint8, already on the device
        yield step, augment(xb, gen, mean, std), augment(xb, gen, mean, std)


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync it, rename it over the old one. A kill at any
    moment leaves the previous complete checkpoint or the new one, never a torn file."""
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, foreign, or a pickle that would run code
        why = "refused: it holds more than weights" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        raise DeepFusionError(f"--resume {path}: not a readable deep_fusion.py checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        fix = "give the checkpoint.pt of a run folder of this deep_fusion.py, or start a new run"
        raise DeepFusionError(f"--resume {path}: not a {CKPT_FORMAT} checkpoint; {fix}")
    return ckpt


def config_for_resume(given: dict):
    """The checkpoint's config plus the runtime-only flags given now; any other flag that
    disagrees with the checkpoint is an error, since the run would not be the same run."""
    ckpt = load_checkpoint(given["resume"])
    saved = ckpt["config"]
    clash = [f"--{k.replace('_', '-')} {v} (checkpoint: {saved.get(k)})" for k, v in given.items()
             if k not in RUNTIME_ONLY and saved.get(k) != v]  # fmt: skip
    if clash:
        raise DeepFusionError(f"--resume {given['resume']}: checkpoint is from another config: {', '.join(clash)}")
    return Config(**{**saved, **{k: v for k, v in given.items() if k in RUNTIME_ONLY}}), ckpt


def stop(why, fix, ckpt_path, code=1):
    """End the run with one line: what happened, the checkpoint that survives it, the fix."""
    keep = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
    raise DeepFusionError(f"{why}; {keep}; {fix}", code)


def check_collapse(row, knn_init, cfg, done, warmup, ckpt_path):
    """Stop a collapsed run at the end of an epoch, before its checkpoint is written. Collapse:
    after the warmup, the epoch loss sits at log(2N-1), its value when all 2N projections
    coincide; or, after 50 steps too, the kNN monitor falls below the random-init backbone.
    Earlier, healthy runs dip below it while eval-mode BatchNorm statistics lag (0.9^50 < 1%)."""
    floor = math.log(2 * cfg.batch_size - 1)
    if done >= warmup and abs(row["loss"] - floor) < 0.01:
        why = f"loss {row['loss']:.4f} sits at log(2N-1) = {floor:.4f}: all projections coincide"
    elif done >= max(50, warmup) and "knn_acc" in row and row["knn_acc"] < knn_init - 0.02:
        why = f"backbone kNN {row['knn_acc']:.2%} fell below its random initialisation ({knn_init:.2%})"
    else:
        return
    stop(f"training collapsed at epoch {row['epoch']}: {why}", "raise --tau or lower --lr", ckpt_path)


def train(cfg, run_dir, data, device, ckpt=None, build=build):
    """SimCLR training of f and g; a checkpoint at the end of every epoch. Returns the history.
    Under torchrun every rank trains; only rank 0 evaluates and writes."""
    rank0 = world()[0] == 0
    if device.type == "cpu":  # denormal floats in a collapsing net's backward slow a CPU >15x
        torch.set_flush_denormal(True)
    f, g, opt, amp, scaler = build(cfg, data[0].shape[-1], device)
    epoch, history = 0, [{"epoch": 0}]
    if ckpt is not None:
        for part, key in ((f, "f"), (g, "g"), (opt, "opt"), (scaler, "scaler")):
            part.load_state_dict(ckpt[key])
        epoch, history = ckpt["epoch"], ckpt["history"]
        print(f"resumed from {cfg.resume} at epoch {epoch}", flush=True)
    elif rank0:  # the random-init baseline of every monitor
        history[0] |= evaluate(cfg, f, g, data, device, run_dir)
    gen, x = torch.Generator(device=device), data[0].to(device)  # the whole set, uint8, on the device
    steps = len(x) // cfg.batch_size
    total, warmup = cfg.epochs * steps, warmup_steps(cfg, steps)
    ckpt_path, t0, done0 = run_dir / "checkpoint.pt", time.time(), epoch * steps
    while epoch < cfg.epochs:
        f.train()
        g.train()
        ep_sum, log_sum = torch.zeros((), device=device), torch.zeros((), device=device)  # loss sums
        first_bad = torch.tensor(-1, device=device)  # the first step with a NaN/inf loss, or -1
        t_log, n_log = time.time(), 0
        try:
            for step, v1, v2 in batches(cfg, x, epoch, gen, *MEAN_STD[cfg.dataset]):
                gstep = epoch * steps + step
                for group in opt.param_groups:
                    group["lr"] = lr_at(gstep, total, warmup, group["base_lr"])
                loss = train_step(f, g, opt, scaler, v1, v2, cfg.tau, amp)
                n_log, log_sum, ep_sum = n_log + 1, log_sum + loss, ep_sum + loss
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), gstep, first_bad)  # no sync
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps:  # the host syncs: once per line
                    if first_bad >= 0:
                        cause = "lower --lr, or use --precision bf16 or fp32 if fp16 overflowed"
                        stop(f"loss became NaN/inf at step {int(first_bad)} (epoch {epoch + 1})", cause, ckpt_path)
                    now = time.time()
                    eta = datetime.timedelta(seconds=round((now - t0) / (gstep + 1 - done0) * (total - gstep - 1)))
                    print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps} | loss {log_sum.item() / n_log:.4f}"
                          f" | lr {opt.param_groups[0]['lr']:.4f} | {n_log * cfg.batch_size / (now - t_log):.0f} img/s"
                          f" | eta {eta}", flush=True)  # fmt: skip
                    log_sum, t_log, n_log = torch.zeros_like(log_sum), now, 0
        except KeyboardInterrupt:  # the epoch in progress is lost; the last epoch's checkpoint resumes exactly
            stop(f"interrupted in epoch {epoch + 1}", f"continue with: python deep_fusion.py --resume {ckpt_path}",
                 ckpt_path, 130)  # fmt: skip
        epoch += 1
        row = {"epoch": epoch, "loss": ep_sum.item() / steps, "lr": opt.param_groups[0]["lr"]}
        row["time_s"] = round(time.time() - t0, 2)
        if rank0 and ((cfg.eval_every and epoch % cfg.eval_every == 0) or epoch == cfg.epochs):
            row |= evaluate(cfg, f, g, data, device, run_dir, final=epoch == cfg.epochs)
        check_collapse(row, history[0].get("knn_acc"), cfg, epoch * steps, warmup, ckpt_path)
        history.append(row)
        if rank0:  # the checkpoint first: the metrics file never runs ahead of it
            nets = dict(f=f.state_dict(), g=g.state_dict(), opt=opt.state_dict(), scaler=scaler.state_dict())
            save_checkpoint(ckpt_path, dict(format=CKPT_FORMAT, config=dataclasses.asdict(cfg), epoch=epoch,
                                            history=history, **nets))  # fmt: skip
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        knn = f" | kNN {row['knn_acc']:.2%}" if "knn_acc" in row else ""
        print(f"epoch {epoch}/{cfg.epochs} done | loss {row['loss']:.4f}{knn}", flush=True)
    return history


# ---- 7. Evaluation: kNN, linear probe, fusion scores -----------------------------------


@torch.no_grad()
def features(f, x, device, mean, std, batch=512):
    """Backbone features h (n, D) of un-augmented uint8 images, in eval mode."""
    f.eval()
    m, s = constants_on(device, tuple(mean), tuple(std))[:2]
    x = x.to(device)  # one copy, not one per batch
    return torch.cat([f((x[i : i + batch] / 255 - m) / s).float() for i in range(0, len(x), batch)])


@torch.no_grad()
def knn_accuracy(train_h, train_y, test_h, test_y, k=200, t=0.1, chunk=1024):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar training samples vote for
    their class with weight exp(sim / t)."""
    train_h, test_h = F.normalize(train_h, dim=1), F.normalize(test_h, dim=1)
    train_y, test_y = train_y.to(train_h.device), test_y.to(train_h.device)
    C, correct = int(train_y.max()) + 1, torch.zeros((), device=train_h.device)
    for i in range(0, len(test_h), chunk):
        sim, idx = (test_h[i : i + chunk] @ train_h.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sim), C, device=sim.device).scatter_add_(1, train_y[idx], (sim / t).exp())  # (b, C)
        correct += (votes.argmax(1) == test_y[i : i + chunk]).sum()  # read once, at the end
    return correct.item() / len(test_h)


def linear_probe(train_h, train_y, test_h, test_y, epochs=100, batch=256, seed=0):
    """Logistic regression on frozen, standardised features (Adam, cosine); test accuracy. The
    classifier starts at zero (the problem is convex), so `seed` fixes the whole probe."""
    mu, sd = train_h.mean(0), train_h.std(0) + 1e-6
    train_h, test_h = (train_h - mu) / sd, (test_h - mu) / sd
    train_y, test_y = train_y.to(train_h.device), test_y.to(train_h.device)
    gen = torch.Generator(device=train_h.device).manual_seed(seed)
    clf = nn.Linear(train_h.shape[1], int(train_y.max()) + 1).to(train_h.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * math.ceil(len(train_h) / batch)))
    for _ in range(epochs):
        for idx in torch.randperm(len(train_h), generator=gen, device=train_h.device).split(batch):
            opt.zero_grad()
            F.cross_entropy(clf(train_h[idx]), train_y[idx]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (clf(test_h).argmax(1) == test_y).float().mean().item()


def others(labels, pair):
    """Boolean (n, n) masks over the keys j of each query i: `other` = j is neither i nor its
    partner view pair[i]; `same` = other and of i's class (nu_i - 2 keys per row)."""
    other = ~torch.eye(len(labels), dtype=torch.bool)
    other[torch.arange(len(labels)), pair] = False
    return (labels[:, None] == labels[None, :]) & other, other


def fusion_score(A, labels, pair):
    """THEORY.md's fusion scores of a map A (n, n) over labelled tokens (pair[i]: i's other view):
    F  = mean_i sum_{j in C_c(i), j != i, pair(i)} A_ij, chance mean_i (nu_i - 2) / n;
    F~ = mean_i of the same mass over the row's mass outside i and pair(i), chance mean_i (nu_i - 2) / (n - 2).
    A head that keeps its rows on itself scores below chance on F, never on F~.
    Returns (F, F~, chance of F, chance of F~); a stack of heads (H, n, n) is averaged first."""
    A = A.float().mean(0) if A.dim() == 3 else A.float()  # (n, n)
    same, other = others(labels, pair)
    n, k = len(labels), same.sum(1).float()  # k: nu_i - 2
    inside, outside = (A * same).sum(1), (A * other).sum(1).clamp_min(1e-12)  # (n,), (n,)
    return inside.mean().item(), (inside / outside).mean().item(), (k / n).mean().item(), (k / (n - 2)).mean().item()


def row_entropy(A):
    """Mean entropy (nats) of the rows of A (n, n)."""
    return -(A * A.clamp_min(1e-30).log()).sum(1).mean().item()


def cosine_control(h, labels, pair, entropy):
    """The fusion a head would show by only following the backbone's neighbourhoods: F~ of the
    parameter-free attention softmax(beta cos(h_i, h_j)) over the keys j != i, pair(i), with beta
    set (by bisection) so that its mean row entropy equals `entropy`, the head's own over those
    keys. It depends on the features h (n, D) alone. Returns (F~ of the control, beta)."""
    c = F.normalize(h.float(), dim=1)
    cos = (c @ c.T).masked_fill(~others(labels, pair)[1], float("-inf"))  # (n, n)
    lo, hi = 0.0, 1000.0  # entropy falls as beta grows: log(n - 2) at beta = 0
    for _ in range(40):
        beta = (lo + hi) / 2
        lo, hi = (beta, hi) if row_entropy(torch.softmax(beta * cos, 1)) > entropy else (lo, beta)
    return fusion_score(torch.softmax(beta * cos, 1), labels, pair)[1], beta


def fusion_report(attn, labels, pair, h):
    """Per layer of attn (L, heads, n, n), on the map averaged over heads: both fusion scores,
    the self and partner mass, the entropy of the rows outside self and partner, and the
    backbone control at that entropy; F~ per head; the chance levels."""
    A, other = attn.float().mean(1), others(labels, pair)[1]  # (L, n, n)
    rest = A * other / (A * other).sum(-1, keepdim=True).clamp_min(1e-12)  # rows outside self and partner
    scores = [fusion_score(a, labels, pair) for a in A]
    entropy = [row_entropy(r) for r in rest]
    control = [cosine_control(h, labels, pair, e) for e in entropy]
    return {
        "fusion": [s[0] for s in scores],
        "fusion_norm": [s[1] for s in scores],
        "fusion_chance": scores[0][2],
        "fusion_norm_chance": scores[0][3],
        "self_mass": A.diagonal(dim1=1, dim2=2).mean(1).tolist(),
        "partner_mass": A[:, torch.arange(len(pair)), pair].mean(1).tolist(),
        "entropy": entropy,
        "control_norm": [c[0] for c in control],
        "control_beta": [c[1] for c in control],
        "fusion_norm_per_head": [[fusion_score(a, labels, pair)[1] for a in layer] for layer in attn],
    }


def class_matrix(A, labels, pair):
    """K x K: the mean over class a's tokens of the mass on class b's (self and partner left
    out, each row renormalised), over its value for uniform attention: a flat 1 = class-blind,
    a bright diagonal = fusion. A (n, n); classes are those present in labels."""
    other = others(labels, pair)[1].float()
    onehot = F.one_hot(labels.unique(return_inverse=True)[1]).float()  # (n, K)
    mean_by_class = lambda M: onehot.T @ (M / M.sum(1, keepdim=True)) @ onehot / onehot.sum(0)[:, None]  # noqa: E731
    return mean_by_class(A * other) / mean_by_class(other)  # (K, K)


def balanced_sample(y, n, seed):
    """n indices drawn at random (seeded), class-balanced where the data allow: round-robin over
    the classes of a random permutation. Datasets on disk are often sorted by class, so a prefix
    of them is one class and would make the fusion score meaningless."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    yp = y[perm]
    order = torch.argsort(yp, stable=True)  # grouped by class, random within each class
    first = torch.searchsorted(yp[order], yp[order])  # where each one's class starts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(y)) - first  # 0 for a class's first draw, 1 for its second...
    return perm[torch.argsort(rank, stable=True)[:n]]


@torch.no_grad()
def attention_maps(cfg, f, g, x, y, device):
    """Every layer's attention on a labeled batch of both views, tokens sorted by class. Returns
    attn (L, heads, n, n), labels (n,), pair (n,) and the backbone features h (n, D), on the
    CPU, n = 2 * attn_batch."""
    mean, std = MEAN_STD[cfg.dataset]
    f.eval()
    g.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    idx = balanced_sample(y, cfg.attn_batch, cfg.seed)
    xb, yb = x[idx].to(device), y[idx]
    h = f(torch.cat([augment(xb, gen, mean, std), augment(xb, gen, mean, std)])).float()  # (n, D)
    attns = g(h, return_attention=True)[1]
    labels, pair = torch.cat([yb, yb]), torch.arange(2 * len(yb)).roll(len(yb))
    order = torch.argsort(labels, stable=True)
    rank = torch.argsort(order)  # the new position of each old token
    attn = torch.stack(attns).cpu()[:, :, order][:, :, :, order]
    return attn, labels[order], rank[pair[order]], h.cpu()[order]


def save_attention_png(attn, labels, pair, path):
    """Top row: one panel per layer (mean over heads), tokens sorted by class, grey lines at
    class boundaries, white = at or above the panel's 99th percentile. Bottom row: each layer's
    class_matrix stretched to the same size, mid-grey = uniform (1), white = twice uniform or more."""
    A = attn.float().mean(1)  # (L, n, n)
    L, n, _ = A.shape
    tokens = (A / A.flatten(1).quantile(0.99, dim=1)[:, None, None]).clamp(max=1)
    edges = torch.nonzero(labels.diff()).flatten() + 1  # first token of each new class
    tokens[:, edges, :] = 0.5
    tokens[:, :, edges] = 0.5
    classes = torch.stack([class_matrix(a, labels, pair) / 2 for a in A]).clamp(0, 1)  # (L, K, K)
    classes = F.interpolate(classes[:, None], size=(n, n), mode="nearest")[:, 0]  # (L, n, n)
    img = torch.cat([tokens, classes])[:, None].repeat(1, 3, 1, 1)  # (2L, 3, n, n)
    torchvision.utils.save_image(img, path, nrow=L, padding=4, pad_value=1.0)


def evaluate(cfg, f, g, data, device, run_dir, final=False):
    """The monitor: kNN accuracy of f's features (and, at the end, the linear probe); with the
    Transformer head also the fusion report of g's attention on a labeled test batch, saved in
    run_dir as attention.pt and attention.png."""
    h_train, h_test = (features(f, x, device, *MEAN_STD[cfg.dataset]) for x in (data[0], data[2]))
    out = {"knn_acc": knn_accuracy(h_train, data[1], h_test, data[3], cfg.knn_k, cfg.knn_t)}
    if final:
        out["linear_acc"] = linear_probe(h_train, data[1], h_test, data[3], cfg.linear_epochs, seed=cfg.seed)
    if cfg.head == "transformer":  # does fusion emerge as training goes on?
        attn, labels, pair, h = attention_maps(cfg, f, g, data[2], data[3], device)
        out |= fusion_report(attn, labels, pair, h)
        torch.save({"attn": attn.half(), "labels": labels, "pair": pair, "h": h.half()}, run_dir / "attention.pt")
        save_attention_png(attn, labels, pair, run_dir / "attention.png")
    return out


def peak_memory_mb(device):
    """Peak memory so far: the GPU's allocator on CUDA, else the process's peak RSS (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- 8. main ---------------------------------------------------------------------------


def run(cfg, ckpt=None, build=build):
    """Train with a checked config; write the run folder; return the results: the last epoch's
    row of the history (loss, kNN, linear probe, fusion) and what the run cost."""
    device, data = setup_distributed(cfg), load_dataset(cfg)
    rank0 = world()[0] == 0
    name = cfg.run_name or f"{cfg.dataset}-{cfg.head}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.resume).parent if ckpt else Path(cfg.out_dir) / name
    if rank0 and not ckpt:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(f"run folder {run_dir} | device {device} | {cfg.arch} + {cfg.head} head | {len(data[0])} images", flush=True)
    t0 = time.time()
    history = train(cfg, run_dir, data, device, ckpt, build)
    if not rank0:
        return {}
    results = history[-1] | {"knn_acc_init": history[0]["knn_acc"], "device": str(device)}
    results |= {"train_time_s": round(time.time() - t0, 1), "peak_memory_mb": round(peak_memory_mb(device), 1)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    line = (
        f"kNN {results['knn_acc']:.2%} (random init {results['knn_acc_init']:.2%}) | linear {results['linear_acc']:.2%}"
    )
    if "fusion" in results:
        by_layer = lambda key: " ".join(f"{s:.2f}" for s in results[key])  # noqa: E731
        line += f" | normalised fusion by layer {by_layer('fusion_norm')} (chance {results['fusion_norm_chance']:.2f}"
        line += f", backbone control {by_layer('control_norm')})"
    print(line, flush=True)
    if results["knn_acc"] < results["knn_acc_init"]:  # too early for the collapse rule to have fired
        warning = f"the backbone's kNN ended below its random initialisation's ({results['knn_acc_init']:.2%})"
        print(f"warning: {warning}", file=sys.stderr)
    return results


def main(argv=None, job=run) -> dict:
    """Command-line entry; tests and the notebook call main([...]). Errors: one line, exit 2.
    experiments/ passes its own job(cfg, ckpt) and shares the flags and the error handling."""
    rank = int(os.environ.get("RANK", 0))  # torchrun's; only rank 0 prints (print() is silent on None)
    try:
        with redirect_stdout(None) if rank else nullcontext():
            given = parse_flags(argv)
            cfg, ckpt = config_for_resume(given) if given.get("resume") else (resolve(Config(**given)), None)
            check_config(cfg)
            return job(cfg, ckpt)
    except DeepFusionError as e:
        print(f"deep_fusion.py: error{f' (rank {rank})' if rank else ''}: {e.args[0]}", file=sys.stderr)
        raise SystemExit(e.args[1] if len(e.args) > 1 else 2) from None
    finally:
        if world()[1] > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
