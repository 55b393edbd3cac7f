"""ORPO's and SimPO's losses as plain functions of each answer's mean token log-probability: neither needs a
reference model."""

from typing import Optional

import torch
import torch.nn.functional as F

_MINUS_LOG_2 = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation: ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below
    ``-log 2`` (Maechler, 2012)."""
    return torch.where(x < _MINUS_LOG_2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(mean_logps: torch.Tensor, chosen_nll: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's loss of each pair (Hong et al., 2024, eq. 6): ``chosen_nll - beta * log sigmoid(log odds(chosen) - log
    odds(rejected))``, where ``log odds(y) = m - log(1 - exp(m))`` of the answer's mean token log-probability ``m``.

    Args:
        mean_logps: ``[pairs, 2]`` each answer's mean token log-probability, chosen then rejected.
        chosen_nll: ``[pairs]`` the supervised term, the chosen sequence's mean token negative log-likelihood.
        beta: the weight of the odds-ratio term (the paper's lambda).

    Returns:
        ``(losses [pairs], rewards [pairs, 2])``; the rewards are ``beta * mean_logps`` (for the logged accuracy and
        margin).
    """
    mean_logps = mean_logps.float()
    chosen, rejected = mean_logps.unbind(-1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return chosen_nll - beta * F.logsigmoid(log_odds), beta * mean_logps.detach()


def simpo_losses(mean_logps: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0,
                 chosen_nll: Optional[torch.Tensor] = None,
                 sft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """SimPO's loss of each pair (Meng et al., 2024, eq. 6): ``-log sigmoid(beta * (m_chosen - m_rejected) - gamma)``
    of the answers' mean token log-probabilities ``m``; with ``label_smoothing`` ``e``, ``(1 - e)`` of it plus ``e``
    times the loss with the answers swapped; plus ``sft_weight * chosen_nll`` (CPO's supervised term).

    Args:
        mean_logps: ``[pairs, 2]`` each answer's mean token log-probability, chosen then rejected.
        beta: the scale of the reward ``beta * m``.
        gamma: the target margin between the chosen and the rejected reward.
        label_smoothing: the assumed share of pairs whose preference is wrong.
        chosen_nll: ``[pairs]`` the chosen answer's mean token negative log-likelihood (needed when ``sft_weight``).
        sft_weight: the weight of ``chosen_nll``.

    Returns:
        ``(losses [pairs], rewards [pairs, 2])``, the rewards ``beta * mean_logps``.
    """
    mean_logps = mean_logps.float()
    margin = beta * (mean_logps[:, 0] - mean_logps[:, 1]) - gamma
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    if sft_weight:
        losses = losses + sft_weight * chosen_nll
    return losses, beta * mean_logps.detach()
