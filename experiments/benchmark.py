"""Throughput of deep_fusion.py on one device, one batch of N images: augmentation img/s, the
batched on-device `augment` against torchvision's per-image pipeline with the same parameters;
a training step's img/s with each head; the Transformer head's share of its step; peak memory.

  python experiments/benchmark.py --device cpu
  python experiments/benchmark.py --device cuda --arch resnet18 --bench-steps 50 --compile
  python experiments/benchmark.py --memory --dataset imagefolder --image-size 64 --arch resnet50 --device cpu

It takes deep_fusion.py's flags (N = 512 unless --batch-size is given) and --bench-steps (timed
steps per figure, 10), prints one line per figure and writes <out-dir>/benchmark-<device>.json.
--memory instead counts the activations one training step keeps for its backward at --image-size (bf16, as
autocast on a GPU keeps them), without data or a GPU: measured on a few random images, scaled to N.
"""

import dataclasses
import functools
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, however this is started
from experiments import df, own_flags  # noqa: E402


def per_image_transform(mean, std, size):
    """The standard per-image torchvision pipeline with the parameters of df.augment."""
    crop = v2.RandomResizedCrop(size, scale=df.CROP_SCALE, ratio=df.CROP_RATIO, antialias=True)
    jitter = v2.RandomApply([v2.ColorJitter(*df.JITTER)], p=df.P_JITTER)
    to_float = v2.ToDtype(torch.float32, scale=True)
    steps = [crop, v2.RandomHorizontalFlip(), jitter, v2.RandomGrayscale(df.P_GRAY), to_float, v2.Normalize(mean, std)]
    return v2.Compose(steps)


def timed(fn, steps, device):
    """Seconds per call of fn, after two warm-up calls; the GPU's queue is drained at each reading."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(2):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def peak_memory_mb(device):
    """Peak memory so far: the GPU's allocator on CUDA, else the process's peak RSS (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(cfg, steps):
    """Every figure for the config's data, backbone and precision, as a dict."""
    if df.ranks()[1] > 1:  # torchrun's process count
        raise df.DeepFusionError("the benchmark measures one device; run it without torchrun")
    if steps < 1:
        raise df.DeepFusionError(f"--bench-steps {steps}: must be positive")
    device, data = df.setup_distributed(cfg), df.load_dataset(cfg)
    x, (mean, std) = data[0][: cfg.batch_size], df.MEAN_STD[cfg.dataset]
    xd, gen = x.to(device), torch.Generator(device=device).manual_seed(cfg.seed)
    per_image, n_pi = per_image_transform(mean, std, x.shape[-1]), min(len(x), 256)
    r = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    r |= {"arch": cfg.arch, "batch_size": cfg.batch_size, "precision": cfg.precision}
    r["aug_batched_img_s"] = len(x) / timed(lambda: df.augment(xd, gen, mean, std), steps, device)
    per_image_s = timed(lambda: [per_image(i) for i in x[:n_pi]], max(1, steps // 5), device)
    r["aug_per_image_img_s"] = n_pi / per_image_s
    r["aug_speedup"] = r["aug_batched_img_s"] / r["aug_per_image_img_s"]
    v1, v2_ = df.augment(xd, gen, mean, std), df.augment(xd, gen, mean, std)
    for head in ("ffn", "transformer"):  # the given head as configured, the other from its presets
        reset = dict.fromkeys(df.SIMCLR_HEAD)  # head_dim, head_depth, ... back to "per dataset"
        hcfg = cfg if head == cfg.head else df.resolve(dataclasses.replace(cfg, head=head, **reset))
        f, g, opt, amp, scaler = df.build(hcfg, x.shape[-1], device)
        step_s = timed(functools.partial(df.train_step, f, g, opt, scaler, v1, v2_, cfg.tau, amp), steps, device)
        r[f"step_img_s_{head}"] = len(x) / step_s
    h = torch.randn(2 * len(x), g.embed.in_features, device=device)  # (2N, D)

    def head_only():  # forward, loss and backward of the Transformer head alone, on 2N tokens
        with amp:
            z = g(h)
        df.nt_xent(*z.float().chunk(2), cfg.tau).backward()

    r["transformer_head_share"] = timed(head_only, steps, device) / step_s
    r["peak_memory_mb"] = peak_memory_mb(device)
    for key, value in r.items():
        print(f"{key:<28}{value:>12.2f}" if isinstance(value, float) else f"{key:<28}{value!s:>12}")
    print(f"augmentation speed-up: {r['aug_speedup']:.1f}x")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / f"benchmark-{device.type}.json").write_text(json.dumps(r, indent=2))
    return r


def saved_gib(fn):
    """GiB of the distinct tensors autograd saves for the backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**30


def activation_memory(cfg):
    """The activations a training step keeps for its backward, in bf16: f's measured on both views of 2 and of 4
    random images and extended to N along that line (they grow linearly with the batch, apart from the bf16 copies
    of the weights); g's on the whole 2N-token sequence."""
    size, device = cfg.image_size if cfg.dataset == "imagefolder" else 32, torch.device("cpu")
    f, g, _, _, _ = df.build(cfg, size, device)
    views = lambda n: torch.randn(2 * n, 3, size, size).contiguous(memory_format=torch.channels_last)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        two, four = (saved_gib(lambda n=n: f(views(n))) for n in (2, 4))
        f_gib = two + (four - two) / 2 * (cfg.batch_size - 2)
        g_gib = saved_gib(lambda: g(torch.randn(2 * cfg.batch_size, g.embed.in_features if cfg.head == "transformer"
                                                else g[0].in_features)))  # fmt: skip
    r = {"arch": cfg.arch, "image_size": size, "batch_size": cfg.batch_size, "head": cfg.head}
    r |= {"backbone_activations_gib": round(f_gib, 2), "head_activations_gib": round(g_gib, 2)}
    print(f"{cfg.arch} at {size} px, N = {cfg.batch_size} (2N = {2 * cfg.batch_size} views), {cfg.head} head, bf16: "
          f"activations kept for the backward {f_gib:.1f} GiB (backbone) + {g_gib:.2f} GiB (head)")  # fmt: skip
    return r


FLAGS = (
    ("--bench-steps", dict(type=int, default=10, help="timed steps per figure")),
    ("--memory", dict(action="store_true", help="activation memory of one training step at --image-size, no data")),
)  # and deep_fusion.py's


def main(argv=None):
    own, rest = own_flags(argv, *FLAGS)
    job = (
        (lambda cfg, ckpt: activation_memory(cfg)) if own.memory else lambda cfg, ckpt: benchmark(cfg, own.bench_steps)
    )
    return df.main(["--batch-size", "512", *rest], job=job)


if __name__ == "__main__":
    main()
