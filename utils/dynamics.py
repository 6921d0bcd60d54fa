"""Training-dynamics diagnostics: gradient and Adam step sizes, how much of them Adam's eps damps, BN statistics.

Near alpha = 0 the student's first gradients are round-off sized, far below AdamW's eps (1e-8), and a few steps
later Adam takes full-size sign steps (docs/method.md). These numbers make that visible. They are
computed on logging steps only, from the gradients DistillStep recorded and the optimiser's moment estimates.
"""
from __future__ import annotations

import torch
from torch import nn


def weight_names(model: nn.Module) -> list[str]:
    """Parameters reported per layer: every weight with >= 2 dims (convs and linears)."""
    return [n for n, p in model.named_parameters() if p.ndim >= 2]


@torch.no_grad()
def adam_directions(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Per parameter, the step AdamW just took apart from weight decay: lr * m_hat / (sqrt(v_hat) + eps)."""
    out, group_of = {}, {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        state, group = optimizer.state.get(p), group_of.get(id(p))
        if not state or group is None:
            continue
        t = float(state["step"])
        (b1, b2), eps = group["betas"], group["eps"]
        v_hat_sqrt = (state["exp_avg_sq"].float() / (1 - b2 ** t)).sqrt()
        out[name] = (group["lr"] * state["exp_avg"].float() / (1 - b1 ** t) / (v_hat_sqrt + eps),
                     v_hat_sqrt < eps)
    return out


@torch.no_grad()
def step_diagnostics(model: nn.Module, optimizer, grad_sq: dict[str, torch.Tensor], per_layer: bool) -> dict:
    """Global (and optionally per-layer) sizes of the last step, as floats (one host read for all of them).

    train/grad_norm       L2 norm of the gradient of the batch-mean loss
    train/adam_step_norm  L2 norm of Adam's update (without weight decay)
    train/eps_damped      fraction of parameter elements whose sqrt(v_hat) < eps: there eps, not the gradient
                          history, sets the step size, so the step is smaller than lr
    per layer (dynamics/<weight>/...): grad_rms, step_rms, weight_rms, eps_damped
    """
    directions = adam_directions(model, optimizer)
    params = dict(model.named_parameters())
    values = {"train/grad_norm": torch.stack(list(grad_sq.values())).sum().sqrt(),
              "train/adam_step_norm": torch.stack([d.pow(2).sum() for d, _ in directions.values()]).sum().sqrt(),
              "train/eps_damped": sum(m.sum() for _, m in directions.values()).float()
                                  / sum(m.numel() for _, m in directions.values())}
    if per_layer:
        for name in weight_names(model):
            if name not in directions:
                continue
            d, damped = directions[name]
            n = d.numel()
            values |= {f"dynamics/{name}/grad_rms": (grad_sq[name] / n).sqrt(),
                       f"dynamics/{name}/step_rms": d.pow(2).mean().sqrt(),
                       f"dynamics/{name}/weight_rms": params[name].float().pow(2).mean().sqrt(),
                       f"dynamics/{name}/eps_damped": damped.float().mean()}
    keys = list(values)
    return dict(zip(keys, torch.stack([values[k].float() for k in keys]).tolist()))


class BatchNormStats:
    """Forward hooks that record each BatchNorm2d's batch statistics on a marked forward pass, to compare them
    with the running statistics that the eval-mode probes use:
    dynamics/<bn>/running_var_ratio  mean over channels of running_var / batch_var (1 = the probe sees the
                                     same scale as training)
    dynamics/<bn>/mean_shift         mean over channels of |running_mean - batch_mean| / sqrt(batch_var)
    """

    def __init__(self, model: nn.Module):
        self.active, self.batch = False, {}
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        for name, m in self.modules.items():
            m.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.active and module.training:
                x = inputs[0].detach().float()
                self.batch[name] = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True))
        return hook

    @torch.no_grad()
    def read(self) -> dict:
        values = {}
        for name, (mean, var) in self.batch.items():
            m = self.modules[name]
            values[f"dynamics/{name}/running_var_ratio"] = (m.running_var / var.clamp_min(1e-12)).mean()
            values[f"dynamics/{name}/mean_shift"] = ((m.running_mean - mean).abs() / var.clamp_min(1e-12).sqrt()).mean()
        self.batch = {}
        return dict(zip(values, torch.stack(list(values.values())).tolist())) if values else {}
