"""InfoNCE against the MoCo queue and the CLIM loss (README, "The method").

    L = InfoNCE(q, k) + mix_weight * mean_j [ lam_j * InfoNCE(q_mix_j, k) + (1 - lam_j) * InfoNCE(q_mix_j, k_pos) ]

j runs over the mixed queries (the one at image_size, plus one per multi-resolution size), lam_j
is per sample, and every InfoNCE takes its negatives from the queue. All vectors L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float):
    """MoCo's logits [n, 1+K] = [q.k, q.queue] / T and labels (zeros: the positive is column 0).

    `queue` is [dim, K] as in facebookresearch/moco.
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue.detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits, labels


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample InfoNCE loss [n] (cross-entropy of moco_logits)."""
    logits, labels = moco_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, labels, reduction="none")


def clim_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
              mixed: list[tuple[torch.Tensor, torch.Tensor]] = (), k_pos: torch.Tensor | None = None,
              mix_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(scalar loss, terms). `mixed` is a list of (q_mix [n, d], lam [n]) pairs; empty = MoCo v2."""
    loss_moco = info_nce(q, k, queue, temperature).mean()
    terms = {"loss_moco": loss_moco.detach()}
    if not mixed:
        terms["loss"] = loss_moco.detach()
        return loss_moco, terms
    per_query = []
    for q_mix, lam in mixed:
        lam = lam.to(q_mix.dtype)
        to_anchor = info_nce(q_mix, k, queue, temperature)
        to_positive = info_nce(q_mix, k_pos, queue, temperature)
        per_query.append((lam * to_anchor + (1 - lam) * to_positive).mean())
    loss_mix = torch.stack(per_query).mean()
    loss = loss_moco + mix_weight * loss_mix
    terms.update(loss_mix=loss_mix.detach(), loss=loss.detach())
    return loss, terms
