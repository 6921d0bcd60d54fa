"""The teacher-student objective (SPEC §2): per-sample soft-target cross-entropy, its KL form, or MSE."""
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
