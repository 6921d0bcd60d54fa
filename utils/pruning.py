"""Global magnitude pruning with hand-written masks (paper §6): exact counts, masks that only shrink.

A mask set is a dict {parameter name: bool tensor, True = kept}. Masks are applied by zeroing pruned entries
in place, never by re-parametrisation (torch.nn.utils.prune), so state_dict keys stay plain and a sparse
network loads into a dense one.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.recipe import SCOPES


def prunable_names(model: nn.Module, scope: str = "weights") -> list[str]:
    """`weights`: the weight of every Conv2d and Linear (OpenLTH); `all`: every parameter, biases and norm
    parameters included (the official code)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown prune scope {scope!r}; choose from {', '.join(SCOPES)}")
    if scope == "all":
        return [name for name, _ in model.named_parameters()]
    return [f"{module_name}.weight" if module_name else "weight" for module_name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def full_masks(model: nn.Module, scope: str = "weights") -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in prunable_names(model, scope)}


def scope_size(masks: dict[str, torch.Tensor]) -> int:
    return sum(m.numel() for m in masks.values())


def kept(masks: dict[str, torch.Tensor]) -> int:
    return int(sum(m.sum() for m in masks.values()))


@torch.no_grad()
def prune_round(model: nn.Module, masks: dict[str, torch.Tensor], fraction: float, round_index: int):
    """The masks of round `round_index` (>= 1): prune the smallest-magnitude kept weights of the whole scope.

    The kept count is round(N (1 - fraction)^r) of the N weights in scope, so after r rounds the density is
    (1 - fraction)^r to within one weight however the per-round rounding falls (pruning round(fraction * kept)
    each round would drift). Exactly that many are removed: a stable sort by |w| with already pruned entries
    last breaks ties by position, so the choice is deterministic on every device.
    """
    params = dict(model.named_parameters())
    names = list(masks)
    magnitude = torch.cat([params[n].detach().abs().flatten().double() for n in names])
    alive = torch.cat([masks[n].flatten() for n in names])
    target = round(scope_size(masks) * (1 - fraction) ** round_index)
    n_prune = int(alive.sum()) - target
    if n_prune <= 0:
        return {n: m.clone() for n, m in masks.items()}
    order = torch.argsort(torch.where(alive, magnitude, torch.inf), stable=True)
    new_alive = alive.clone()
    new_alive[order[:n_prune]] = False
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = new_alive[start:start + size].view_as(masks[n])
        start += size
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries. Called after every optimiser step: momentum and weight decay move pruned
    weights off zero during the step, and re-zeroing before the next forward keeps them exactly 0 there."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device), 0)


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict:
    """Global and per-tensor counts: {total, kept, density, layers: {name: {total, kept, density}}}."""
    layers = {n: {"total": m.numel(), "kept": int(m.sum()), "density": float(m.float().mean())}
              for n, m in masks.items()}
    total, alive = scope_size(masks), kept(masks)
    return {"total": total, "kept": alive, "density": alive / total, "layers": layers}


def save_masks(path, masks: dict[str, torch.Tensor]) -> None:
    from utils.results import atomic_path

    with atomic_path(path) as tmp:
        torch.save({n: m.cpu() for n, m in masks.items()}, tmp)


def load_masks(path, device=None) -> dict[str, torch.Tensor]:
    return {n: m.to(device) for n, m in torch.load(path, weights_only=True).items()}
