"""KTO's loss and its KL estimate as plain functions of the answers' log-probabilities."""

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["kto", "apo_zero_unpaired"]


def kl_estimate(kl_sum: torch.Tensor, kl_count: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: the mean over mismatched (prompt, answer) pairs of ``log pi(y'|x) - log
    ref(y'|x)``, given as its sum and count (summed over micro-batches and ranks first), clamped at 0 and detached: it
    shifts the loss, no gradient flows through it (Ethayarajh et al., 2024, section 4.1; TRL's ``KTOTrainer``)."""
    return (kl_sum / kl_count.clamp(min=1)).clamp(min=0).detach()


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
               loss_type: LossType = "kto") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """KTO's loss of each answer (Ethayarajh et al., 2024, eq. 7, as TRL 1.16's ``KTOTrainer`` computes it).

    With ``r = log pi(y|x) - log ref(y|x)``: a desirable answer's loss is ``desirable_weight * (1 - sigmoid(beta * (r
    - kl)))``, an undesirable one's ``undesirable_weight * (1 - sigmoid(beta * (kl - r)))``. ``apo_zero_unpaired``
    (D'Oosterlinck et al., 2024) leaves ``kl`` out: ``1 - sigmoid(beta * r)`` and ``sigmoid(beta * r)``.

    Args:
        policy: ``[answers]`` each answer's log-probability under the trained model (summed over its tokens).
        reference: the same under the reference model.
        desirable: ``[answers]`` bool, the rows' labels.
        kl: the reference point (:func:`kl_estimate`), a 0-d tensor.
        beta: how strongly the loss holds the model near the reference.
        desirable_weight, undesirable_weight: what each kind of answer's loss is multiplied by (to balance data with
            more of one kind).
        loss_type: ``kto`` or ``apo_zero_unpaired``.

    Returns:
        ``(losses [answers], rewards [answers])``: the weighted losses, and the implicit rewards ``beta * r``.
    """
    logratios = policy - reference.to(policy.dtype)
    if loss_type == "kto":
        losses = torch.where(desirable, 1 - F.sigmoid(beta * (logratios - kl)), 1 - F.sigmoid(beta * (kl - logratios)))
    else:
        losses = torch.where(desirable, 1 - F.sigmoid(beta * logratios), F.sigmoid(beta * logratios))
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(losses.dtype)
    return weights * losses, beta * logratios.detach()
