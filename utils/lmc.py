"""Linear mode connectivity (paper §6): points on the segment between two networks, BN statistics at each
point, and the two barrier definitions."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def interpolate_state(a: dict, b: dict, gamma: float) -> dict:
    """(1 - gamma) a + gamma b for every floating-point entry of two state dicts (parameters and BN running
    statistics), in float64 then cast back, so gamma = 0 / 1 give a / b exactly and a pair (a, a) gives a at
    every gamma. Integer entries (num_batches_tracked) are taken from a."""
    out = {}
    for key, va in a.items():
        vb = b[key]
        if va.is_floating_point():
            out[key] = ((1 - gamma) * va.double() + gamma * vb.double()).to(va.dtype)
        else:
            out[key] = va.clone()
    return out


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, images: torch.Tensor, normalize, batch_size: int) -> None:
    """Reset every BatchNorm's running statistics and recompute them on `images` (uint8, un-augmented): a
    train-mode pass with momentum None, i.e. the equal-weight average of the batches' means and unbiased
    variances (torch.optim.swa_utils.update_bn). With one batch they are exactly that batch's statistics.
    The model is left in eval mode; the layers' momenta are restored."""
    layers = batch_norms(model)
    if not layers:
        model.eval()
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(images), batch_size):
        model(normalize(images[start:start + batch_size]))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.eval()


def error_along_path(model: nn.Module, a: dict, b: dict, gammas, evaluate, bn: str = "recompute",
                     bn_images=None, normalize=None, bn_batch_size: int = 500) -> list[float]:
    """Test error at each gamma of (1 - gamma) a + gamma b, loaded into `model`. `evaluate(model)` returns
    accuracy. BN statistics: recomputed on `bn_images` at every point (default) or interpolated with the
    parameters (`bn='interpolate'`)."""
    errors = []
    for gamma in gammas:
        model.load_state_dict(interpolate_state(a, b, float(gamma)))
        if bn == "recompute":
            recompute_bn_stats(model, bn_images, normalize, bn_batch_size)
        errors.append(1.0 - evaluate(model))
    return errors


def barriers(gammas, errors) -> dict:
    """`linear`: max_gamma err(gamma) - ((1 - gamma) err_0 + gamma err_1) (Entezari et al.); `mean`:
    max_gamma err(gamma) - (err_0 + err_1) / 2 (Frankle et al.'s instability). Both are 0 for a flat path."""
    g = torch.as_tensor(list(gammas), dtype=torch.float64)
    e = torch.as_tensor(list(errors), dtype=torch.float64)
    return {"linear": float((e - ((1 - g) * e[0] + g * e[-1])).max()),
            "mean": float(e.max() - (e[0] + e[-1]) / 2), "max_error": float(e.max())}
