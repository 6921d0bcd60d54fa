"""The distillation step, shared by train_distill.py and the benchmarks so both time the same code."""
from __future__ import annotations

import copy

import torch

from utils.losses import distill_loss
from utils.models import BottleneckLinear


def make_optimizer(model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                   bias_weight_decay: float = 0.0, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW(betas 0.9/0.999, eps 1e-8). `weight_decay` applies to tensors with >= 2 dims, `bias_weight_decay`
    to biases and norm parameters (the official code silently used 0.01 there; the paper says 0).
    Fused by default where torch has the kernel (CUDA, CPU): a few kernels per step instead of ~10 per tensor."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    if fused is None:
        fused = next(model.parameters()).device.type in ("cuda", "cpu")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": bias_weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


class TeacherTargets:
    """Teacher logits for training indices.

    With no augmentation and a frozen eval-mode teacher, the teacher's head-trunk output (for the default
    bottleneck: the L2-normalised 256-d vector) is a constant per image. `cache` holds it for every training
    image, so a step runs only the teacher's last layer; without a cache the whole teacher runs on `inputs`.
    """

    def __init__(self, teacher, inputs, cache: torch.Tensor | None = None):
        self.teacher, self.inputs, self.cache = teacher, inputs, cache
        self.last = with_constant_weight_norm(teacher.head.last) if cache is not None else None

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.last(self.cache[idx])
        return self.teacher(self.inputs(idx))


@torch.no_grad()
def with_constant_weight_norm(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a frozen module whose weight-normalised layers hold their normalised weight as a plain weight.

    The frozen teacher's rows never change, so normalising its 65,536 x 256 last layer every step (a quarter of a
    small-width step on a CPU) is wasted; the copy computes the same tensor once and gives bit-identical logits."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, BottleneckLinear) and m.weight_norm:
            m.weight.copy_(m.effective_weight())
            m.weight_norm = False
    return module


class DistillStep:
    """One optimiser step on this process's share `idx` of a global batch of `global_batch` images."""

    def __init__(self, student, optimizer, accelerator, inputs, teacher_targets: TeacherTargets, loss="ce",
                 teacher_temp=1.0, student_temp=1.0):
        self.student, self.optimizer, self.accelerator = student, optimizer, accelerator
        self.inputs, self.teacher_targets = inputs, teacher_targets
        self.loss, self.teacher_temp, self.student_temp = loss, teacher_temp, student_temp

    def __call__(self, idx: torch.Tensor, global_batch: int, record_grads: bool = False):
        """`record_grads` keeps the squared L2 norm of every parameter's gradient (device tensors, no host read)
        in `self.grad_sq` for utils.dynamics, before the optimiser consumes the gradients."""
        with self.accelerator.autocast():
            s_logits, embedding = self.student(self.inputs(idx), return_embedding=True)
            t_logits = self.teacher_targets(idx)
        per_sample = distill_loss(s_logits, t_logits, self.loss, self.teacher_temp, self.student_temp)
        # sum / global batch x world size: DDP's gradient average then equals the global-batch mean exactly,
        # also for an uneven split of the last batch.
        self.accelerator.backward(per_sample.sum() * (self.accelerator.num_processes / global_batch))
        if record_grads:
            self.grad_sq = {n: p.grad.float().pow(2).sum() for n, p in
                            self.accelerator.unwrap_model(self.student).named_parameters() if p.grad is not None}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return per_sample.detach(), s_logits.detach(), t_logits, embedding.detach()
