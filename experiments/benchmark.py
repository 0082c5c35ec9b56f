"""Throughput of deep_fusion.py on one device, one batch of N images: augmentation img/s, the
batched on-device `augment` against torchvision's per-image pipeline with the same parameters;
a training step's img/s with each head; the Transformer head's share of its step; peak memory.

  python experiments/benchmark.py --device cpu
  python experiments/benchmark.py --device cuda --arch resnet18 --bench-steps 50 --compile

It takes deep_fusion.py's flags (N = 512 unless --batch-size is given) and --bench-steps (timed
steps per figure, 10), prints one line per figure and writes <out-dir>/benchmark-<device>.json.
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
    if df.WORLD > 1:  # torchrun's process count, as deep_fusion.py read it
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


FLAGS = (("--bench-steps", dict(type=int, default=10, help="timed steps per figure")),)  # and deep_fusion.py's


def main(argv=None):
    own, rest = own_flags(argv, *FLAGS)
    return df.main(["--batch-size", "512", *rest], job=lambda cfg, ckpt: benchmark(cfg, own.bench_steps))


if __name__ == "__main__":
    main()
