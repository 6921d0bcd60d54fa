"""The teacher-student objective (docs/method.md): per-sample soft-target cross-entropy, its KL form, or MSE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.choices import LOSSES


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "ce",
                 teacher_temp: float = 1.0, student_temp: float = 1.0) -> torch.Tensor:
    """Per-sample loss (shape [B]); the training objective is its batch mean.

    ce:  H(softmax(t/tau_t), softmax(s/tau_s)) = -sum_k p_k log q_k
    kl:  KL(p || q) = CE - H(p): the same gradient as ce, with 0 as its minimum
    mse: mean over output units of (s - t)^2 on the raw logits (appendix experiments)
    """
    if kind == "mse":
        return (student_logits - teacher_logits).pow(2).mean(-1)
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / teacher_temp, dim=-1)
    p = log_p.exp()
    if kind == "ce":
        return -(p * log_q).sum(-1)
    if kind == "kl":
        return (p * (log_p - log_q)).sum(-1)
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")


def soft_targets(teacher_logits: torch.Tensor, teacher_temp: float = 1.0):
    """The teacher's side of `kl_and_ce_to`, computed once per image: tempered logits, probabilities, their
    sum (1 up to round-off) and entropy."""
    t = teacher_logits.float() / teacher_temp
    log_p = F.log_softmax(t, dim=-1)
    p = log_p.exp()
    return t, p, p.sum(-1), -(p * log_p).sum(-1)


def kl_and_ce_to(student_logits: torch.Tensor, targets, student_temp: float = 1.0):
    """Per-sample KL(p || q) and CE = H(p) + KL (float64) against `soft_targets`, precise where KL is tiny.

    log p - log q = (t - s) + (lse(s) - lse(t)), and lse(s) - lse(t) = log E_p[exp(d)] with d = s - t, so
    KL = max(d) + log1p(E_p[expm1(d - max d)]) - E_p[d]. Every term is of the size of d, not of log K (~11 for
    65,536 outputs, whose float32 ulp is 1e-6: the direct form's floor), and d = 0 gives exactly 0 (E_p divides
    by sum(p)). Round-off: about 1e-10 at KL ~ 1e-8, where the direct form is off by 1e-6."""
    t, p, total, entropy = targets
    d = student_logits.float() / student_temp - t
    top = d.amax(-1, keepdim=True)
    spread = (p * torch.expm1(d - top)).sum(-1) / total
    kl = top.squeeze(-1).double() + torch.log1p(spread.double()) - ((p * d).sum(-1) / total).double()
    return kl, entropy.double() + kl


def kl_and_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float = 1.0,
              student_temp: float = 1.0):
    return kl_and_ce_to(student_logits, soft_targets(teacher_logits, teacher_temp), student_temp)


@torch.no_grad()
def loss_diagnostics(student_logits, teacher_logits, teacher_temp=1.0, student_temp=1.0) -> dict:
    """Batch sums of CE, KL and both entropies (for logging steps only; they cost extra passes)."""
    log_q = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / teacher_temp, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    ce = -(p * log_q).sum(-1)
    h_target = -(p * log_p).sum(-1)
    return {"ce": ce.sum(), "kl": (ce - h_target).sum(), "entropy_teacher": h_target.sum(),
            "entropy_student": -(q * log_q).sum(-1).sum()}
