"""Probing (docs/method.md): eval-mode encoder features, a linear probe and a k-NN probe, on cached features."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(fn, n: int, inputs, batch_size: int = 512, accelerator=None, autocast=None) -> torch.Tensor:
    """Features `fn(inputs(index))` of items 0..n-1 as float32, in order.

    `inputs` maps a 1-D index tensor to a model-ready batch (e.g. a gather from uint8 images plus
    normalisation). With several processes each handles a contiguous shard and the shards are all-gathered,
    so every process ends with the full feature matrix.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else None
    shard = math.ceil(n / world)
    index = torch.arange(rank * shard, min((rank + 1) * shard, n), device=device)
    outs = []
    with autocast() if autocast is not None else contextlib.nullcontext():
        for idx in index.split(batch_size):
            outs.append(fn(inputs(idx)).float())
    feats = torch.cat(outs)
    if world == 1:
        return feats
    padded = torch.zeros(shard, feats.shape[1], device=feats.device)
    padded[:len(feats)] = feats
    return accelerator.gather(padded)[:n]


def standardize(train: torch.Tensor, *others: torch.Tensor):
    """Per-feature standardisation with the train mean and unbiased std (near-zero std -> 1, as sklearn)."""
    std, mean = torch.std_mean(train, 0)  # its mean is exact for a constant feature (train.mean(0) can be off by ulps)
    std = torch.where(std < 10 * torch.finfo(std.dtype).eps, torch.ones_like(std), std)
    return tuple((x - mean) / std for x in (train, *others))


def linear_probe(train_x, train_y, eval_sets: dict, num_classes: int, seed: int = 0, epochs: int = 10,
                 batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.01) -> dict:
    """Linear(D, C) with PyTorch's default uniform init, AdamW, minibatch CE; top-1 on each eval set.

    As in the paper's code the batch order is drawn once (from `seed`) and reused every epoch.
    """
    g = torch.Generator().manual_seed(seed)
    dim, device = train_x.shape[1], train_x.device
    probe = nn.Linear(dim, num_classes)
    bound = 1 / math.sqrt(dim)  # nn.Linear's default init, drawn from our generator
    with torch.no_grad():
        probe.weight.uniform_(-bound, bound, generator=g)
        probe.bias.uniform_(-bound, bound, generator=g)
    probe = probe.to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.randperm(len(train_x), generator=g).to(device)
    batches = order.split(batch_size)
    for _ in range(epochs):
        for idx in batches:
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return {name: (probe(x).argmax(1) == y).float().mean().item() for name, (x, y) in eval_sets.items()}


@torch.no_grad()
def knn_predict(train_x, train_y, test_x, num_classes: int, k: int = 20, metric: str = "l2",
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """k-NN predictions by chunked matmul.

    l2 (paper): exact Euclidean neighbours, unweighted majority vote; among equidistant candidates for the
    last neighbour slots the lower train index wins, and a tied vote goes to the smallest label.
    cosine: DINO-style, L2-normalised features and votes weighted by exp(similarity / temperature).
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"unknown k-NN metric {metric!r}; choose from l2, cosine")
    k = min(k, len(train_x))
    onehot = F.one_hot(train_y, num_classes).to(train_x.dtype)
    if metric == "cosine":
        train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    else:
        # Distances are translation invariant, but |q|^2 + |t|^2 - 2 q.t cancels catastrophically when all features
        # share a large offset. Shift by the per-feature (lower) median: a value from the data, so integer-valued
        # features stay integers and exact ties stay exact.
        shift = train_x.median(0).values
        train_x, test_x = train_x - shift, test_x - shift
    train_sq = (train_x * train_x).sum(1)
    preds = []
    for q in test_x.split(chunk):
        if metric == "cosine":
            sim, idx = (q @ train_x.T).topk(k, dim=1)
            votes = torch.zeros(len(q), num_classes, device=q.device, dtype=q.dtype)
            votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        else:
            dist = (q * q).sum(1, keepdim=True) + train_sq - 2 * q @ train_x.T
            values, idx = dist.topk(k, dim=1, largest=False)
            votes = onehot[idx].sum(1)
            kth = values[:, -1:]
            # Where candidates at the k-th distance were left out, topk's pick among them is arbitrary: redo those
            # rows taking equidistant candidates by lower train index (exactly k per row).
            ambiguous = ((dist == kth).sum(1) > (values == kth).sum(1)).nonzero().squeeze(1)
            if len(ambiguous):
                d, kth = dist[ambiguous], kth[ambiguous]
                closer, tied = d < kth, d == kth
                chosen = closer | (tied & (tied.cumsum(1) <= k - closer.sum(1, keepdim=True)))
                votes[ambiguous] = chosen.to(onehot.dtype) @ onehot
        preds.append(votes.argmax(1))  # argmax returns the first maximum: ties go to the smallest label
    return torch.cat(preds)


def knn_probe(train_x, train_y, eval_sets: dict, num_classes: int, **kwargs) -> dict:
    return {name: (knn_predict(train_x, train_y, x, num_classes, **kwargs) == y).float().mean().item()
            for name, (x, y) in eval_sets.items()}


def probe_features(train, evals: dict, num_classes: int, args, prefix: str) -> dict:
    """All probes of one feature set: {f"{prefix}/{probe}[_std]/{eval_name}": accuracy}.

    `train` is (features, labels); `evals` maps an eval-set name (test, val) to (features, labels).
    """
    variants = [("", train, evals)]
    if args.probe_standardized:
        names = list(evals)
        std_train, *std_evals = standardize(train[0], *(evals[n][0] for n in names))
        variants.append(("_std", (std_train, train[1]), {n: (x, evals[n][1]) for n, x in zip(names, std_evals)}))
    out = {}
    for suffix, (tx, ty), es in variants:
        lin = linear_probe(tx, ty, es, num_classes, seed=args.probe_seed, epochs=args.probe_epochs)
        knn = knn_probe(tx, ty, es, num_classes, k=args.knn_k, metric=args.knn_metric)
        out.update({f"{prefix}/linear{suffix}/{n}": v for n, v in lin.items()})
        out.update({f"{prefix}/knn{suffix}/{n}": v for n, v in knn.items()})
    return out
