"""Research diagnostics of a Transformer head's attention, beyond deep_fusion.py's fusion report:

  row_entropy      how spread a map's rows are (log(n - 2) = uniform over the keys outside self and partner)
  cosine_control   F~ of the parameter-free attention softmax(beta cos(h_i, h_j)) on the backbone's features,
                   at the head's own row entropy: the fusion that the backbone's neighbourhoods alone give
  class_matrix     K x K class-to-class attention over its uniform value
  report           per layer: entropy, the control at that entropy, and F~ per head; given each layer's input
                   tokens, the token control: the same cosine attention on the tokens that layer attends over
  block_inputs     each block's input tokens while a forward pass of the head runs
  attention_report the report on a run's fixed labelled batch (the same maps deep_fusion.evaluate draws)
  evaluate         deep_fusion.evaluate plus attention_report: the monitor that ablations.py and table.py train with

A head whose F~ does not beat its control adds no class structure beyond the backbone's own neighbourhoods.
"""

import torch
import torch.nn.functional as F

from experiments import df


def row_entropy(A):
    """Mean entropy (nats) of the rows of A (n, n)."""
    return -(A * A.clamp_min(1e-30).log()).sum(1).mean().item()


def rest_entropy(A, labels, pair):
    """Mean entropy of a map A's (n, n) rows over the keys outside self and partner, each row renormalised."""
    rest = A * df.others(labels, pair)[1]
    return row_entropy(rest / rest.sum(-1, keepdim=True).clamp_min(1e-12))


def cosine_control(h, labels, pair, entropy):
    """F~ of softmax(beta cos(h_i, h_j)) over the keys j != i, pair(i), with beta set by bisection so that its mean
    row entropy equals `entropy` (the head's own over those keys). Depends on h (n, D) alone. Returns (F~, beta)."""
    c = F.normalize(h.float(), dim=1)
    cos = (c @ c.T).masked_fill(~df.others(labels, pair)[1], float("-inf"))  # (n, n)
    lo, hi = 0.0, 1000.0  # entropy falls as beta grows: log(n - 2) at beta = 0
    for _ in range(40):
        beta = (lo + hi) / 2
        lo, hi = (beta, hi) if row_entropy(torch.softmax(beta * cos, 1)) > entropy else (lo, beta)
    return df.fusion_score(torch.softmax(beta * cos, 1), labels, pair)[1], beta


def class_matrix(A, labels, pair):
    """K x K: the mean over class a's tokens of the mass on class b's (self and partner left out, each row
    renormalised), over its value for uniform attention: a flat 1 is class-blind, a bright diagonal is fusion."""
    other = df.others(labels, pair)[1].float()
    onehot = F.one_hot(labels.unique(return_inverse=True)[1]).float()  # (n, K)
    mean_by_class = lambda M: onehot.T @ (M / M.sum(1, keepdim=True)) @ onehot / onehot.sum(0)[:, None]  # noqa: E731
    return mean_by_class(A.float() * other) / mean_by_class(other)  # (K, K)


def report(attn, labels, pair, h, tokens=None):
    """Per layer of attn (L, heads, n, n): the entropy of the rows outside self and partner (heads averaged), the
    backbone control at that entropy and its beta; F~ per head. With tokens (L of (n, d), each layer's input, in the
    order of labels): the token control, the cosine attention on the tokens a layer attends over, at its entropy."""
    entropy = [rest_entropy(a, labels, pair) for a in attn.float().mean(1)]  # heads averaged, per layer
    control = [cosine_control(h, labels, pair, e) for e in entropy]
    out = {
        "entropy": entropy,
        "control_norm": [c[0] for c in control],
        "control_beta": [c[1] for c in control],
        "fusion_norm_per_head": [[df.fusion_score(a, labels, pair)[1] for a in layer] for layer in attn],
    }
    if tokens is not None:
        out["token_control_norm"] = [cosine_control(x, labels, pair, e)[0] for x, e in zip(tokens, entropy)]
    return out


def block_inputs(g, forward):
    """Run forward() (a pass of the head g) and keep what g's embedding and each of its blocks receive: returns
    forward's result and [h, x_1, ..., x_L] (float, on the CPU), x_l the tokens layer l attends over."""
    kept = []
    keep = lambda module, args: kept.append(args[0].detach().float().cpu())  # noqa: E731
    hooks = [m.register_forward_pre_hook(keep) for m in (g.embed, *g.blocks)]
    try:
        return forward(), kept
    finally:
        for hook in hooks:
            hook.remove()


def attention_report(cfg, f, g, data, device):
    """report on deep_fusion.attention_maps' labelled batch (seeded: the same maps at every call), token control
    included: the blocks' inputs are put in the maps' class-sorted order by matching h."""
    (attn, labels, pair, h), (h_seen, *tokens) = block_inputs(
        g, lambda: df.attention_maps(cfg, f, g, *data[2:], device)
    )
    order = torch.cdist(h, h_seen).argmin(1)  # h = h_seen[order]: attention_maps sorts the tokens by class
    return report(attn, labels, pair, h, [x[order] for x in tokens])


def evaluate(cfg, f, g, data, device, run_dir, final=False):
    """deep_fusion.evaluate, and for a Transformer head the attention report on the same labeled batch (the same
    maps: the batch and its augmentation are seeded)."""
    out = df.evaluate(cfg, f, g, data, device, run_dir, final)
    return out | attention_report(cfg, f, g, data, device) if cfg.head == "transformer" else out
