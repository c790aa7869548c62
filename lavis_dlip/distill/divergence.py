"""The divergences the loss terms are made of: KL of softened logits (Hinton et al.), of given
distributions (attention maps), from log-partitions a loss already computed, against a
teacher kept as its top-k logits, and feature distances over masked tokens. Each backward
pass that autograd would make in several passes over the vocabulary is written by hand."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T) over the last dim, times T^2
    (Hinton et al.), averaged over the rows that ``mask`` keeps."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t
    return _masked_mean(kl, mask)


def prob_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: Optional[torch.Tensor] = None,
            eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher || student) of given distributions (attention maps) over the last dim."""
    kl = (teacher_probs * (teacher_probs.clamp_min(eps).log() - student_probs.clamp_min(eps).log())).sum(-1)
    return _masked_mean(kl, mask)


class _LseKL(torch.autograd.Function):
    """Per row, KL(softmax(t) || softmax(z)) = p_t . (t - z) - lse(t) + lse(z), from the
    student's log-partition ``lse(z)`` as its loss computed it (differentiable), the
    teacher's, and the teacher's softmax ``p_t`` when its loss computed it (else here).
    The gradient to ``z`` is ``-p_t g``: one pass over the vocabulary, which autograd
    adds to the loss's own; the softmax part arrives through ``lse(z)``, in the pass the
    loss makes anyway. Autograd's ``soft_kl`` makes about ten passes."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, z_lse: torch.Tensor, t: torch.Tensor, t_lse: torch.Tensor,
                pt: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = torch.promote_types(z.dtype, torch.float32)  # sums over the vocabulary: never in half
        t = t.to(dtype)
        pt = torch.softmax(t, dim=-1) if pt is None else pt.to(dtype)
        ctx.save_for_backward(pt)
        ctx.z_dtype = z.dtype
        return (pt * (t - z.to(dtype))).sum(-1) - t_lse.to(dtype) + z_lse.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pt,) = ctx.saved_tensors
        return (pt * -grad[:, None]).to(ctx.z_dtype), grad, None, None, None


def lse_kl(student_logits: torch.Tensor, student_lse: torch.Tensor, teacher_logits: torch.Tensor,
           teacher_lse: Optional[torch.Tensor] = None, teacher_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``soft_kl`` at T = 1, mean over rows, from the log-partitions (and the teacher's
    softmax) the two models' losses computed (None: computed here); see ``_LseKL``."""
    if teacher_lse is None:
        teacher_lse = torch.logsumexp(teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)), -1)
    if teacher_probs is not None:
        teacher_probs = teacher_probs.detach()
    return _LseKL.apply(student_logits, student_lse, teacher_logits.detach(), teacher_lse.detach(),
                        teacher_probs).mean()


class _SparseGather(torch.autograd.Function):
    """``z.gather(-1, indices)`` whose gradient is a sparse tensor: autograd adds it
    into the gradient ``z`` gets from its loss, where a dense one would be a zero-filled
    ``[N, vocab]`` tensor, written, scattered into and added (several passes)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.shape = z.shape
        return z.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (indices,) = ctx.saved_tensors
        rows = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
        where = torch.stack([rows.reshape(-1), indices.reshape(-1)])
        return torch.sparse_coo_tensor(where, grad.reshape(-1), ctx.shape, check_invariants=False), None


class _GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax(z)`` at ``indices`` only, without an ``[N, vocab]`` log-softmax:
    one logsumexp forward, one softmax pass backward (autograd's gather, logsumexp
    and their sum would write and read ``[N, vocab]`` several times)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        ctx.save_for_backward(z, indices, lse)
        return z.gather(-1, indices) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, indices, lse = ctx.saved_tensors
        # d/dz_j of sum_k g_k (z_{i_k} - lse) = g_j [j among the indices] - softmax(z)_j * sum_k g_k
        out = torch.sub(z, lse).exp_().mul_(-grad.sum(-1, keepdim=True))
        return out.scatter_add_(-1, indices, grad), None


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
            temperature: float = 1.0, student_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``soft_kl`` against a teacher kept as its top-k logits per row (``values``,
    ``indices``) and the log-partition of all its logits / T (``lse``): the KL of the
    two distributions coarsened to those k tokens plus one bucket for the rest, a
    lower bound of the full KL that meets it as the rest's mass goes to zero.
    ``student_lse``: the student's own log-partition at T = 1, when its loss already
    computed it (differentiable; no second pass over the vocabulary)."""
    t = temperature
    z = student_logits if t == 1 else student_logits / t
    log_pt = values.float() / t - lse[:, None]
    pt = log_pt.exp()
    if student_lse is not None and t == 1:
        log_ps = _SparseGather.apply(z, indices.long()) - student_lse[:, None]
    else:
        log_ps = _GatheredLogSoftmax.apply(z, indices.long())
    rest_t = (1.0 - pt.sum(-1)).clamp_min(0.0)
    rest_s = (1.0 - log_ps.exp().sum(-1)).clamp_min(1e-12)  # finite gradients even when k covers everything
    kl = (pt * (log_pt - log_ps)).sum(-1) + rest_t * (rest_t.clamp_min(1e-12).log() - rest_s.log())
    return kl.mean() * t * t


FEATURE_LOSSES = ("mse", "mse_ln", "cosine")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token MSE (mean over channels), MSE of the LayerNorm-ed features (``mse_ln``:
    each token's features at zero mean and unit variance, so the loss does not grow with
    the teacher's activation scale) or 1 - cosine, averaged over kept tokens."""
    if kind == "mse_ln":
        student, teacher = (F.layer_norm(x, x.shape[-1:]) for x in (student, teacher))
        kind = "mse"
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(-1)
    else:
        per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    return _masked_mean(per_token, mask)


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
