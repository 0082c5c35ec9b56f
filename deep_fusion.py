"""Deep Fusion: SimCLR whose projection head is a Transformer attending across the batch.

Li & Pimentel-Alarcon, "Deep Fusion: Capturing Dependencies in Contrastive Learning via Transformer Projection
Heads", arXiv 2403.18681. One file: torch, torchvision, numpy.

  python deep_fusion.py                                        # CPU smoke run: synthetic data, tiny CNN
  python deep_fusion.py --dataset cifar10 --head transformer   # GPU: ResNet-18, the authors' head
  torchrun --nproc-per-node 4 deep_fusion.py --dataset cifar10 --batch-size 1024   # one global sequence
Measured (the first command, 2-core CPU, 36 s): kNN 74.8% (random-init backbone 29.3%), linear 89.5%. Results on
real images, with their commands: experiments/README.md; the theorems, proved and checked: tutorial.ipynb.

Index (paper / notebook -> code)
  views x -> f -> h -> g -> z (SimCLR)              augment, make_backbone, FFNHead, TransformerHead
  NT-Xent loss (SimCLR Eq. 1)                       nt_xent
  attention A = softmax(Q K^T / sqrt(m)) in a block Attention.forward (explicit and fused paths), Block
  Theorem 1's W^Q = W^K, made trainable             Attention(tied=True, scale=...)
  one sequence of 2N tokens across torchrun ranks   gather_tokens, train (DistributedDataParallel)
  fusion scores F_l, F~_l, self and partner mass    fusion_score, fusion_report, balanced_sample
  weighted kNN (Wu et al. 2018), linear probe on h  knn_accuracy, linear_probe
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pickle
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
from torchvision.transforms import v2 as transforms

# ---- 1. Config -------------------------------------------------------------------------
DATASETS, ARCHS = ("synthetic", "cifar10", "cifar100", "imagefolder"), ("tiny", "resnet18", "resnet34", "resnet50")
MOMENTUM, KNN_T, LOG_EVERY = 0.9, 0.1, 20  # SGD momentum (authors' code); kNN vote temperature; steps per log line


def ranks():
    """(rank, G processes): the process group's once there is one (torchrun's or a caller's own), else torchrun's."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
    qk_tied: bool = arg(False, "W^Q = W^K: attention logits are a similarity (Theorem 1's construction)")
    attn_scale: float = arg(0.0, "a learnable per-head attention logit scale starting here (0: fixed, as the authors)")
    mask_partner: bool = arg(False, "the Transformer head may not attend to a token's other view")
    epochs: int | None = arg(None, "training epochs (authors' code: 1000)")
    batch_size: int | None = arg(None, "N images per step; the head sees 2N tokens (authors' code: 1024)")
    lr: float = arg(0.06, "SGD learning rate per 128 images, scaled by N/128 (SimCLR CIFAR recipe)")
    weight_decay: float = arg(5e-4, "SGD weight decay (authors' code, SimCLR CIFAR recipe)")
    tau: float = arg(0.5, "NT-Xent temperature (SimCLR CIFAR recipe; authors' code: 0.02)")
    warmup_epochs: int | None = arg(None, "linear warmup epochs before the cosine decay, at most 10%% of the run")
    precision: str = arg("auto", "auto: bf16 on CUDA (fp16 without bf16), else fp32", ("auto", "bf16", "fp16", "fp32"))
    device: str = arg("auto", "auto: cuda, then mps, then cpu", ("auto", "cuda", "mps", "cpu"))
    compile: bool = arg(False, "torch.compile the backbone and the head")
    knn_k: int = arg(200, "kNN neighbours")
    linear_epochs: int = arg(100, "linear-probe epochs on frozen backbone features")
    eval_every: int | None = arg(None, "kNN and fusion monitor every this many epochs (0: at the end only)")
    attn_batch: int = arg(128, "labeled images (2x tokens) for the attention maps and fusion score")
    synthetic_train: int = arg(2048, "synthetic training images")
    synthetic_test: int = arg(512, "synthetic test images")
    seed: int = arg(0, "seed of initialisation, data order and augmentation")
    out_dir: str = arg("runs", "parent folder of run folders")
    run_name: str = arg("", "run folder name (default: dataset-head-time)")
    resume: str = arg("", "checkpoint.pt of a run to continue; its config is reused")


PRESETS = {  # defaults per run size
    "small": dict(arch="tiny", epochs=15, batch_size=128, warmup_epochs=1, eval_every=5),  # synthetic data, a CPU
    "full": dict(arch="resnet18", epochs=200, batch_size=512, warmup_epochs=10, eval_every=10),  # CIFAR SimCLR recipe
}
TRANSFORMER_HEAD = {
    "small": dict(head_dim=128, head_depth=4, head_heads=4, head_out=128),  # narrower on CPUs
    "full": dict(head_dim=256, head_depth=10, head_heads=16, head_out=512),  # the authors' code
}
SIMCLR_HEAD = dict(head_dim=None, head_depth=2, head_heads=1, head_out=128)  # Linear(D, D)-BN-ReLU-Linear(D, 128)
CKPT_FORMAT = "deep-fusion/5"  # 5: the config without sync_bn, momentum, knn_t, log_every
RUNTIME_ONLY = set("resume device precision compile out_dir run_name".split())  # a resumed run may change these
POSITIVE = "epochs batch_size lr tau knn_k head_dim head_depth head_heads head_out image_size".split()
POSITIVE += "synthetic_train synthetic_test attn_batch".split()
NON_NEGATIVE = "attn_scale weight_decay warmup_epochs eval_every linear_epochs".split()


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
    """Fill the None fields from the presets; then catch every flag mistake before any download or write."""
    size = "small" if cfg.dataset == "synthetic" else "full"
    preset = PRESETS[size] | (SIMCLR_HEAD if cfg.head == "ffn" else TRANSFORMER_HEAD[size])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None})
    for name in POSITIVE + NON_NEGATIVE:  # None: the FFN's width, D
        if (value := getattr(cfg, name)) is not None and (value < 0 or (value == 0 and name in POSITIVE)):
            need = "positive" if name in POSITIVE else "0 or more"
            raise DeepFusionError(f"--{name.replace('_', '-')} {value}: must be {need}")
    if cfg.batch_size % (G := ranks()[1]):
        raise DeepFusionError(f"--batch-size {cfg.batch_size} is the global N and must split evenly over {G} processes")
    if cfg.batch_size < 2:
        raise DeepFusionError("--batch-size 1: each image needs other images as negatives; use 2 or more")
    if cfg.head == "transformer" and cfg.head_dim % cfg.head_heads:
        raise DeepFusionError(f"--head-dim {cfg.head_dim} is not divisible by --head-heads {cfg.head_heads}")
    if cfg.device in ("cuda", "mps") and not getattr(torch, cfg.device).is_available():
        raise DeepFusionError(f"--device {cfg.device}: not available on this machine; use --device cpu or auto")
    return cfg


# ---- 2. Data and augmentation: the whole set lives on the device, so an epoch needs no DataLoader workers ------
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def synthetic_dataset(n, seed, size=32, n_classes=10, glyph=11, copies=(3, 7)):
    """Offline and learnable: class k = 3-6 copies of a symmetric glyph on a flat background (survives augment)."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-3, 3, glyph), np.linspace(-3, 3, glyph), indexing="ij")
    r, box = np.hypot(xx, yy), np.maximum(abs(xx), abs(yy))
    shapes = [r <= 3, (r >= 2) & (r <= 3.2), box <= 2, box == 3, (xx == 0) | (yy == 0), abs(xx) == abs(yy)]
    shapes += [abs(yy) <= 1, abs(xx) <= 1, abs(xx) + abs(yy) <= 3, np.hypot(abs(xx) - 2, yy) <= 1.2]
    glyphs = np.stack(shapes)[:n_classes].astype(np.float32)  # (K, glyph, glyph)
    y, x = g.integers(0, n_classes, n), np.empty((n, 3, size, size), np.uint8)
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


def load_dataset(cfg):
    """(x_train, y_train, x_test, y_test): uint8 (n, 3, H, W), int64 (n,); imagefolder: Tiny-ImageNet-200's too."""
    if cfg.dataset == "synthetic":
        data = (*synthetic_dataset(cfg.synthetic_train, cfg.seed), *synthetic_dataset(cfg.synthetic_test, cfg.seed + 1))
    elif cfg.dataset == "imagefolder":
        root, splits, data = Path(cfg.data_dir), [], []
        for d in (root / "train", root / "val"):
            if (notes := d / "val_annotations.txt").exists():  # a line per image: name, class, box
                rows = [line.split("\t")[:2] for line in notes.read_text().splitlines() if line.strip()]
                classes = sorted({c for _, c in rows})
                splits.append(([(str(d / "images" / name), classes.index(c)) for name, c in rows], classes))
                continue
            try:  # a missing folder, no class folders, or class folders without images
                folder = torchvision.datasets.ImageFolder(d)
            except FileNotFoundError as e:
                raise DeepFusionError(f"--data-dir {root}: expected image files {d}/<class>/<image> ({e})") from None
            splits.append((folder.samples, folder.classes))  # [(path, class index)], [class name]
        if splits[0][1] != splits[1][1]:
            diff = sorted(set(splits[0][1]) ^ set(splits[1][1]))[:3]
            raise DeepFusionError(f"--data-dir {root}: train/ and val/ classes differ (e.g. {diff}); match them")
        resize = transforms.Compose([transforms.Resize((cfg.image_size, cfg.image_size)), transforms.PILToTensor()])
        for samples, _ in splits:
            print(f"reading {len(samples)} images under {root}", flush=True)
            x = []
            for path, _ in samples:
                try:
                    x.append(resize(torchvision.datasets.folder.default_loader(path)))  # (3, size, size) uint8
                except Exception as e:
                    raise DeepFusionError(f"cannot read image {path}: {e}; remove or replace the file") from None
            data += [torch.stack(x), torch.tensor([k for _, k in samples])]
    else:
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        G, first = ranks()[1], int(os.environ.get("LOCAL_RANK", ranks()[0])) == 0  # first: a machine's rank 0
        try:  # it alone downloads (ranks writing one archive at once corrupt it); the others wait, then read it
            if not first:
                dist.barrier()
            sets = [cls(cfg.data_dir, train=t, download=first) for t in (True, False)]
        except Exception as e:  # no network, disk full, corrupt archive; on the others: the download failed
            fix = "check the network or use --dataset synthetic"
            raise DeepFusionError(f"--dataset {cfg.dataset}: download to {cfg.data_dir} failed ({e}); {fix}") from None
        finally:
            if first and G > 1:  # done, or failed: the others go on
                dist.barrier()
        data = [t for s in sets for t in (torch.from_numpy(s.data).permute(0, 3, 1, 2), torch.tensor(s.targets))]
    if cfg.batch_size > (n := len(data[0])):
        raise DeepFusionError(f"--batch-size {cfg.batch_size} exceeds the {n} training images; lower it")
    if cfg.knn_k > n:
        raise DeepFusionError(f"--knn-k {cfg.knn_k} exceeds the {n}-image bank; use --knn-k {n} or less")
    if len(data[1].unique()) < 2:
        raise DeepFusionError(f"--data-dir {cfg.data_dir}: kNN and linear probe need at least 2 classes")
    return tuple(data)


# SimCLR's CIFAR augmentation (Chen et al. 2020, App. B.9; lightly's SimCLRTransform): crop 8-100% of the area,
# aspect 3/4-4/3, flip p=0.5, colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, no blur at 32 px.
CROP_SCALE, CROP_RATIO, JITTER, P_JITTER, P_GRAY = (0.08, 1.0), (3 / 4, 4 / 3), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as torchvision's rgb_to_grayscale
YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@functools.cache
def constants_on(device, mean, std):
    """mean, std, LUMA (3, 1, 1), YIQ, YIQ^-1 (3, 3) on `device`, built once (per call the host would wait)."""
    consts = (torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None], LUMA[:, None, None], YIQ)
    return *(c.to(device) for c in consts), torch.linalg.inv(YIQ.double()).float().to(device)


def augment(x, gen, mean, std, size=None):
    """One SimCLR view of a uint8 batch (B, 3, H, W) on its device: float (B, 3, size, size); `gen` draws it all."""
    B, dev, size = x.shape[0], x.device, size or x.shape[-1]
    u = lambda *shape: torch.rand(*shape, generator=gen, device=dev)  # noqa: E731
    # Random resized crop: 10 tries per image as torchvision, the first that fits, else the whole image.
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u(B, 10)
    ratio = torch.exp(math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * u(B, 10))
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()  # (B, 10): fractions of the side
    ok = (w <= 1) & (h <= 1)
    first = ok.int().argmax(1, keepdim=True)
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], 1.0)  # (B,)
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], 1.0)
    cx, cy = (1 - w) * (2 * u(B) - 1), (1 - h) * (2 * u(B) - 1)  # box centres in [-1, 1] coordinates
    flip = torch.where(u(B) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)  # per image: output grid -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    v = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour jitter, p=0.8: brightness, contrast, saturation blend v with black, its mean gray, its gray; then hue.
    on = (u(B) < P_JITTER).float()[:, None, None, None]  # (B, 1, 1, 1)
    factors = [1 + on * j * (2 * u(B, 1, 1, 1) - 1) for j in JITTER[:3]]
    mu, sd, luma, yiq, yiq_inv = constants_on(dev, tuple(mean), tuple(std))
    gray = lambda t: (t * luma).sum(1, keepdim=True)  # noqa: E731  (B, 1, H, W)
    for k, ref in zip(factors, (lambda t: 0, lambda t: gray(t).mean((2, 3), keepdim=True), gray)):
        v = ((v - ref(v)) * k + ref(v)).clamp(0, 1)
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
    """SimCLR's MLP, (2N, D) -> (2N, out), row by row: (depth - 1) x [Linear, BN, ReLU], Linear (depth 2: SimCLR)."""

    def __init__(self, in_dim, hidden_dim, out_dim, depth=2):
        dims, layers = [in_dim] + [hidden_dim] * (depth - 1), []
        for i, o in zip(dims, dims[1:]):
            layers += [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(dims[-1], out_dim))


class Attention(nn.Module):
    """Multi-head self-attention over the n = 2N tokens of a batch, no positions. tied: W^Q = W^K (no W^K at all), so
    a logit is a similarity <q_i, q_j> (Theorem 1's construction); scale > 0: a learnable per-head logit scale."""

    def __init__(self, dim, heads, tied=False, scale=0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} does not split into {heads} heads: make it a multiple of the head count"
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
            s = s if mask is None else s.masked_fill(~mask, float("-inf"))
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
    """g: Linear(D -> d), L blocks, Linear(d -> out), BN (authors' code). The 2N embeddings are ONE sequence: g is
    permutation-equivariant over the batch; every token sees every other, its partner i + N too unless masked."""

    def __init__(self, in_dim, dim=256, depth=10, heads=16, out_dim=512, mask_partner=False, **attn):
        super().__init__()
        self.mask_partner = mask_partner
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, **attn) for _ in range(depth))
        self.out = nn.Linear(dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, h, return_attention=False, paired=True):  # h (2N, D); paired: rows i, i + N are one image
        assert h.dim() == 2, f"h is {tuple(h.shape)}: give one sequence (2N, D); the batch is the sequence"
        n, mask = h.shape[0], None
        if self.mask_partner and paired:  # False at (i, i + N mod 2N)
            mask = ~torch.eye(n, dtype=torch.bool, device=h.device).roll(n // 2, 1)  # (2N, 2N)
        x, attns = self.embed(h), []  # (2N, d)
        for block in self.blocks:
            x, A = block(x, mask, return_attention)
            attns.append(A)  # (heads, 2N, 2N) per layer
        z = self.bn(self.out(x))  # (2N, out)
        return (z, attns) if return_attention else z


# ---- 5. Loss ---------------------------------------------------------------------------
def nt_xent(z1, z2, tau):
    """NT-Xent (SimCLR Eq. 1), mean over 2N anchors: positive = the other view, 2N-2 negatives; fp32 in autocast too."""
    N = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(torch.promote_types(z1.dtype, torch.float32)), dim=1)  # (2N, d)
        s = z @ z.T / tau  # (2N, 2N) cosine similarity / tau
        s = s.masked_fill(torch.eye(2 * N, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
        return F.cross_entropy(s, torch.arange(2 * N, device=z.device).roll(N))  # row i's positive: i + N mod 2N


# ---- 6. Training -----------------------------------------------------------------------
def setup_distributed(cfg):
    """The device; under torchrun also the process group (nccl / gloo), whose timeout ends a run that lost a rank."""
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if ranks()[1] > 1 and not dist.is_initialized():  # torchrun's processes; one process: no process group
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return device


def make_optimizer(cfg, f, g, device):
    """SGD for f and g, lr x N/128 (SimCLR CIFAR recipe); the learnable attention scales without weight decay."""
    lr = cfg.lr * cfg.batch_size / 128  # also each group's base_lr: the schedule's peak
    named = [*f.named_parameters(), *g.named_parameters()]
    groups = [{"params": [p for name, p in named if not name.endswith("log_scale")], "base_lr": lr}]
    groups += [{"params": [p for name, p in named if name.endswith("log_scale")], "weight_decay": 0.0, "base_lr": lr}]
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def build(cfg, image_size, device):
    """f and g from the seed on the device, the optimizer, the autocast context and the GradScaler (fp16 only)."""
    torch.manual_seed(cfg.seed)
    f, D = make_backbone(cfg.arch, image_size)
    if ranks()[1] > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch
        f = nn.SyncBatchNorm.convert_sync_batchnorm(f)
    if cfg.head == "ffn":
        g = FFNHead(D, cfg.head_dim or D, cfg.head_out, cfg.head_depth)
    else:
        attn = dict(tied=cfg.qk_tied, scale=cfg.attn_scale)
        g = TransformerHead(D, cfg.head_dim, cfg.head_depth, cfg.head_heads, cfg.head_out, cfg.mask_partner, **attn)
    f, g = f.to(device), g.to(device)
    if cfg.compile:  # in place: the state_dict keys stay those of the plain modules
        f.compile()
        g.compile()
    auto = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    precision = auto if cfg.precision == "auto" else cfg.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # fp32: None, autocast off
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return f, g, make_optimizer(cfg, f, g, device), amp, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def lr_at(step, total, warmup, base):
    """Linear warmup, then cosine decay to 0 (SimCLR), per step."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def gather_tokens(h):
    """This rank's h = [v1_r; v2_r] (2B, D) -> [v1_0 ... v1_{G-1}; v2_0 ... v2_{G-1}] (2N, D): partners i, i + N again.
    Its backward sums a token's gradient over the G ranks' equal losses; DDP's mean then gives f the one-process one."""
    if (G := ranks()[1]) == 1:
        return h
    hs = torch.stack(dist_nn.all_gather(h))  # (G, 2B, D)
    return hs.view(G, 2, -1, hs.shape[-1]).transpose(0, 1).reshape(-1, hs.shape[-1])  # (2, G, B, D) -> (2N, D)


def train_step(f, g, opt, scaler, v1, v2, tau, amp):
    """One SimCLR step on two views (B, 3, H, W) of this rank's B = N/G images; returns the loss, on the device."""
    with amp:  # one forward of both views, so BN statistics and attention span both
        h = f(torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last))  # (2B, D), this rank's
        z = g(gather_tokens(h))  # (2N, out): the head attends over the global batch
    loss = nt_xent(*z.float().chunk(2), tau)  # logits in fp32
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def batches(cfg, x, epoch, gen, mean, std):
    """(step, v1, v2) of one epoch; order and views depend on (seed, epoch, step) alone: resume repeats them."""
    rank, G = ranks()
    steps, B = len(x) // cfg.batch_size, cfg.batch_size // G  # B: this rank's share of the N images
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).to(x.device)
    perm = perm[: steps * cfg.batch_size].view(steps, cfg.batch_size)[:, rank * B : (rank + 1) * B]  # (steps, B)
    for step in range(steps):
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * steps + step + (rank << 40))  # each rank its own stream
        xb = x[perm[step]]  # (B, 3, H, W) uint8, already on the device
        yield step, augment(xb, gen, mean, std), augment(xb, gen, mean, std)


def save_checkpoint(path, state):
    """Atomic: a temporary file, fsynced, renamed over the old one; a kill leaves the old or the new, never half."""
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def config_for_resume(given: dict):
    """(config, checkpoint) for --resume: the saved config, where only RUNTIME_ONLY flags may differ."""
    path = given["resume"]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers, never code
    except Exception as e:  # missing, truncated, foreign, or a pickle that would run code
        why = "refused: it holds more than weights" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        raise DeepFusionError(f"--resume {path}: not a readable deep_fusion.py checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        fix = "give the checkpoint.pt of a run folder of this deep_fusion.py, or start a new run"
        raise DeepFusionError(f"--resume {path}: not a {CKPT_FORMAT} checkpoint; {fix}")
    saved = ckpt["config"]
    clash = [f"--{k.replace('_', '-')} {v} (checkpoint: {saved.get(k)})" for k, v in given.items()
             if k not in RUNTIME_ONLY and saved.get(k) != v]  # fmt: skip
    if clash:
        raise DeepFusionError(f"--resume {path}: checkpoint is from another config: {', '.join(clash)}")
    return Config(**{**saved, **{k: v for k, v in given.items() if k in RUNTIME_ONLY}}), ckpt


def stop(why, fix, ckpt_path, code=1):
    """End the run with one line: what happened, the checkpoint that survives it, the fix."""
    keep = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
    raise DeepFusionError(f"{why}; {keep}; {fix}", code)


def check_collapse(row, cfg, steps, warmup, ckpt_path):
    """Stop a run whose loss sits at log(2N-1) past the warmup (all z equal), before its checkpoint; on every rank."""
    floor = math.log(2 * cfg.batch_size - 1)
    if row["epoch"] * steps >= warmup and abs(row["loss"] - floor) < 0.01:
        why = f"loss {row['loss']:.4f} sits at log(2N-1) = {floor:.4f}: all projections coincide"
        stop(f"training collapsed at epoch {row['epoch']}: {why}", "raise --tau or lower --lr", ckpt_path)


def train(cfg, run_dir, data, device, ckpt=None, build=build, monitor=None):
    """SimCLR training of f and g, a checkpoint per epoch; returns the history. Rank 0 alone evaluates and writes."""
    monitor = monitor or evaluate  # experiments/fusion.py passes its own
    rank, G = ranks()
    if device.type == "cpu":  # denormal floats in a collapsing net's backward slow a CPU >15x
        torch.set_flush_denormal(True)
    f, g, opt, amp, scaler = build(cfg, data[0].shape[-1], device)
    f_, g_ = (nn.parallel.DistributedDataParallel(m) if G > 1 else m for m in (f, g))  # see gather_tokens
    epoch, history = (ckpt["epoch"], ckpt["history"]) if ckpt else (0, [{"epoch": 0}])
    if ckpt:
        for part, key in ((f, "f"), (g, "g"), (opt, "opt"), (scaler, "scaler")):
            if ckpt[key]:  # empty: a GradScaler saved off (bf16, fp32) starts fresh where fp16 turns it on
                part.load_state_dict(ckpt[key])
        print(f"resumed from {cfg.resume} at epoch {epoch}", flush=True)
    elif rank == 0:  # the random-init baseline of every monitor
        history[0] |= monitor(cfg, f, g, data, device, run_dir)
    gen, x = torch.Generator(device=device), data[0].to(device)  # the whole set, uint8, on the device
    steps = len(x) // cfg.batch_size
    total, warmup = cfg.epochs * steps, min(cfg.warmup_epochs * steps, cfg.epochs * steps // 10)  # warmup <= 10%
    ckpt_path, t0, done0 = run_dir / "checkpoint.pt", time.time(), epoch * steps
    while epoch < cfg.epochs:
        f.train()
        g.train()
        ep_sum, log_sum = torch.zeros((), device=device), torch.zeros((), device=device)  # loss sums
        first_bad = torch.tensor(-1, device=device)  # the first step with a NaN/inf loss, or -1
        t_log, n_log = time.time(), 0
        for step, v1, v2 in batches(cfg, x, epoch, gen, *MEAN_STD[cfg.dataset]):
            gstep = epoch * steps + step
            for group in opt.param_groups:
                group["lr"] = lr_at(gstep, total, warmup, group["base_lr"])
            loss = train_step(f_, g_, opt, scaler, v1, v2, cfg.tau, amp)
            n_log, log_sum, ep_sum = n_log + 1, log_sum + loss, ep_sum + loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), gstep, first_bad)  # no sync
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps or gstep == done0:  # a sync per line; the first at once
                if first_bad >= 0:
                    cause = "lower --lr, or use --precision bf16 or fp32 if fp16 overflowed"
                    stop(f"loss became NaN/inf at step {int(first_bad)} (epoch {epoch + 1})", cause, ckpt_path)
                now = time.time()
                eta = datetime.timedelta(seconds=round((now - t0) / (gstep + 1 - done0) * (total - gstep - 1)))
                print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps} | loss {log_sum.item() / n_log:.4f}"
                      f" | lr {opt.param_groups[0]['lr']:.4f} | {n_log * cfg.batch_size / (now - t_log):.0f} img/s"
                      f" | eta {eta}", flush=True)  # fmt: skip
                log_sum, t_log, n_log = torch.zeros_like(log_sum), now, 0
        epoch += 1
        row = {"epoch": epoch, "loss": ep_sum.item() / steps, "lr": opt.param_groups[0]["lr"]}
        row["time_s"] = round(time.time() - t0, 2)
        if rank == 0 and ((cfg.eval_every and epoch % cfg.eval_every == 0) or epoch == cfg.epochs):
            row |= monitor(cfg, f, g, data, device, run_dir, final=epoch == cfg.epochs)
        check_collapse(row, cfg, steps, warmup, ckpt_path)
        history.append(row)
        if rank == 0:  # the checkpoint first: the metrics file never runs ahead of it
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
    """Backbone features h (n, D) of un-augmented uint8 images (n, 3, H, W), in eval mode."""
    f.eval()
    m, s = constants_on(device, tuple(mean), tuple(std))[:2]
    x = x.to(device)  # one copy, not one per batch
    return torch.cat([f((x[i : i + batch] / 255 - m) / s).float() for i in range(0, len(x), batch)])


def knn_accuracy(train_h, train_y, test_h, test_y, k=200, t=KNN_T, chunk=1024):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar training samples vote with weight exp(sim / t)."""
    train_h, test_h = F.normalize(train_h, dim=1), F.normalize(test_h, dim=1)
    train_y, test_y = train_y.to(train_h.device), test_y.to(train_h.device)
    C, correct = int(train_y.max()) + 1, torch.zeros((), device=train_h.device)
    for i in range(0, len(test_h), chunk):
        sim, idx = (test_h[i : i + chunk] @ train_h.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sim), C, device=sim.device).scatter_add_(1, train_y[idx], (sim / t).exp())  # (b, C)
        correct += (votes.argmax(1) == test_y[i : i + chunk]).sum()  # read once, at the end
    return correct.item() / len(test_h)


def linear_probe(train_h, train_y, test_h, test_y, epochs=100, batch=256, seed=0):
    """Test accuracy of logistic regression on frozen, standardised features; starts at 0, so `seed` fixes it."""
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
    return (clf(test_h).argmax(1) == test_y).float().mean().item()


def others(labels, pair):
    """(same, other), (n, n) masks of keys j per query i: other: j is not i or pair[i]; same: other, in i's class."""
    other = ~torch.eye(len(labels), dtype=torch.bool)
    other[torch.arange(len(labels)), pair] = False
    return (labels[:, None] == labels[None, :]) & other, other


def fusion_score(A, labels, pair):
    """(F, F~, chance of F, chance of F~) of a map A (n, n), or (H, n, n) averaged over heads (notebook section 5):
    F  = mean_i sum_{j in C_c(i), j != i, pair(i)} A_ij, chance mean_i (nu_i - 2) / n;
    F~ = mean_i of that mass over the row's mass outside i and pair(i), chance mean_i (nu_i - 2) / (n - 2)."""
    A = A.float().mean(0) if A.dim() == 3 else A.float()  # (n, n)
    same, other = others(labels, pair)
    n, k = len(labels), same.sum(1).float()  # k: nu_i - 2
    inside, outside = (A * same).sum(1), (A * other).sum(1).clamp_min(1e-12)  # (n,), (n,)
    return inside.mean().item(), (inside / outside).mean().item(), (k / n).mean().item(), (k / (n - 2)).mean().item()


def fusion_report(attn, labels, pair):
    """Per layer of attn (L, heads, n, n), averaged over heads: F, F~, their chance levels, self and partner mass."""
    A = attn.float().mean(1)  # (L, n, n)
    fusion, norm, chance, norm_chance = zip(*[fusion_score(a, labels, pair) for a in A])
    out = dict(fusion=list(fusion), fusion_norm=list(norm), fusion_chance=chance[0], fusion_norm_chance=norm_chance[0])
    self_mass, partner_mass = A.diagonal(dim1=1, dim2=2).mean(1), A[:, torch.arange(len(pair)), pair].mean(1)  # (L,)
    return out | dict(self_mass=self_mass.tolist(), partner_mass=partner_mass.tolist())


def balanced_sample(y, n, seed):
    """n seeded random indices, round-robin over the classes: a prefix of a class-sorted dataset would be one class."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    onehot = F.one_hot(y[perm])  # (len(y), classes), in the drawn order
    rank = (onehot.cumsum(0) * onehot).sum(1)  # 1 for a class's first draw, 2 for its second...
    return perm[torch.argsort(rank, stable=True)[:n]]


@torch.no_grad()
def attention_maps(cfg, f, g, x, y, device):
    """attn (L, heads, n, n), labels (n,), pair (n,), h (n, D) of both views of attn_batch images, sorted by class."""
    mean, std = MEAN_STD[cfg.dataset]
    f.eval()
    g.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    idx = balanced_sample(y, cfg.attn_batch, cfg.seed)
    xb, yb = x[idx].to(device), y[idx]
    h = f(torch.cat([augment(xb, gen, mean, std), augment(xb, gen, mean, std)])).float()  # (n, D)
    labels, pair = torch.cat([yb, yb]), torch.arange(2 * len(yb)).roll(len(yb))
    order = torch.argsort(labels, stable=True)
    rank = torch.argsort(order)  # the new position of each old token
    attn = torch.stack(g(h, return_attention=True)[1]).cpu()[:, :, order][:, :, :, order]  # (L, heads, n, n)
    return attn, labels[order], rank[pair[order]], h.cpu()[order]


def save_attention_png(attn, labels, path):
    """Per layer (mean over heads), class-sorted tokens on one scale: n A = 1 (uniform) white, 0 blue, 2+ red; a bar."""
    rgb = lambda t: torch.stack([1 - (-t).clamp(min=0), 1 - t.abs(), 1 - t.clamp(min=0)], -3)  # noqa: E731  t: n A - 1
    A = attn.float().mean(1)  # (L, n, n)
    L, n, _ = A.shape
    img = rgb((n * A - 1).clamp(-1, 1))  # (L, 3, n, n)
    edges = torch.nonzero(labels.diff()).flatten() + 1  # first token of each new class
    img[:, :, edges, :] = 0.5
    img[:, :, :, edges] = 0.5
    grid = torchvision.utils.make_grid(img, nrow=L, padding=4, pad_value=1.0)  # (3, n + 8, L (n + 4) + 4)
    bar = rgb(torch.linspace(-1, 1, grid.shape[-1] - 8).expand(max(8, n // 16), -1))  # (3, rows, width)
    torchvision.utils.save_image(torch.cat([grid, F.pad(bar, (4, 4, 0, 4), value=1.0)], dim=1), path)


def evaluate(cfg, f, g, data, device, run_dir, final=False):
    """kNN on f's features (at the end also the linear probe); a Transformer head's fusion report and maps."""
    h_train, h_test = (features(f, x, device, *MEAN_STD[cfg.dataset]) for x in (data[0], data[2]))
    out = {"knn_acc": knn_accuracy(h_train, data[1], h_test, data[3], cfg.knn_k)}
    if final:
        out["linear_acc"] = linear_probe(h_train, data[1], h_test, data[3], cfg.linear_epochs, seed=cfg.seed)
    if cfg.head == "transformer":  # does fusion emerge as training goes on?
        attn, labels, pair, h = attention_maps(cfg, f, g, data[2], data[3], device)
        out |= fusion_report(attn, labels, pair)
        torch.save({"attn": attn.half(), "labels": labels, "pair": pair, "h": h.half()}, run_dir / "attention.pt")
        save_attention_png(attn, labels, run_dir / "attention.png")
    return out


# ---- 8. main ---------------------------------------------------------------------------
def run(cfg, ckpt=None, build=build, monitor=None):
    """Train with a checked config, write the run folder; return the results: the last epoch's row and its cost."""
    device, data = setup_distributed(cfg), load_dataset(cfg)
    name = cfg.run_name or f"{cfg.dataset}-{cfg.head}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.resume).parent if ckpt else Path(cfg.out_dir) / name
    if ranks()[0] == 0 and not ckpt:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(f"run folder {run_dir} | device {device} | {cfg.arch} + {cfg.head} head | {len(data[0])} images", flush=True)
    t0, saved = time.time(), run_dir / "checkpoint.pt"
    try:  # Ctrl-C: the epoch in progress is lost; the last finished epoch's checkpoint resumes exactly
        history = train(cfg, run_dir, data, device, ckpt, build, monitor)
    except KeyboardInterrupt:
        stop("interrupted", f"continue with --resume {saved}" if saved.exists() else "run it again", saved, 130)
    if ranks()[0]:  # rank 0 alone evaluates and writes
        return {}
    r = history[-1] | {"knn_acc_init": history[0]["knn_acc"], "device": str(device)}  # the results
    r["train_time_s"] = round(time.time() - t0, 1)
    (run_dir / "results.json").write_text(json.dumps(r, indent=2))
    line = f"kNN {r['knn_acc']:.2%} (random init {r['knn_acc_init']:.2%}) | linear {r['linear_acc']:.2%}"
    if "fusion" in r:  # F~ per layer
        line += f" | normalised fusion F~ by layer {' '.join(f'{v:.3f}' for v in r['fusion_norm'])}"
        line += f" (chance {r['fusion_norm_chance']:.3f})"
    print(line, flush=True)
    if r["knn_acc"] < r["knn_acc_init"]:  # reported, never a stop: early dips recover
        print(f"warning: the backbone's kNN ended below its random init's ({r['knn_acc_init']:.2%})", file=sys.stderr)
    return r


def main(argv=None, job=run) -> dict:
    """The command line; errors: one line, exit 2. experiments/ scripts pass their own job(cfg, ckpt)."""
    try:
        with redirect_stdout(None) if ranks()[0] else nullcontext():  # only rank 0 prints
            given = parse_flags(argv)
            cfg, ckpt = config_for_resume(given) if given.get("resume") else (Config(**given), None)
            return job(resolve(cfg), ckpt)
    except DeepFusionError as e:
        print(f"deep_fusion.py: error{f' (rank {ranks()[0]})' if ranks()[0] else ''}: {e.args[0]}", file=sys.stderr)
        raise SystemExit(e.args[1] if len(e.args) > 1 else 2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
