"""``model: orpo`` and ``model: simpo``: preference optimisation without a reference model, from each answer's mean
token log-probability under the trained model."""

from dataclasses import dataclass

import torch

from lt_posttrain import (
    IGNORE_INDEX,
    Batch,
    SFTModule,
    UserError,
    output_head,
    sample_ids,
    sum_per_sample,
    tiled_token_logps,
)
from lt_posttrain_dpo import PreferenceDataModule
from lt_posttrain_reference_free.batches import next_token_targets
from lt_posttrain_reference_free.losses import orpo_losses, simpo_losses


@dataclass(frozen=True)
class PairScores:
    """What the losses read of a micro-batch of pairs under the trained model.

    Attributes:
        mean_logps: ``[pairs, 2]`` each answer's mean token log-probability (over its tokens that carry loss,
            end-of-turn token included), chosen then rejected.
        chosen_nll: ``[pairs]`` the chosen sequence's mean token negative log-likelihood, over the chosen answer's
            tokens or, with ``prompt_loss``, over every token of prompt and answer.
    """

    mean_logps: torch.Tensor
    chosen_nll: torch.Tensor


class ReferenceFreePreferenceModule(SFTModule):
    """The common part of ORPO and SimPO: a micro-batch of pairs becomes :class:`PairScores` in one forward pass,
    the log-probabilities computed tile by tile from the final hidden states (never the ``[tokens, vocab]`` logits),
    and ``loss(batch)`` is the sum of the pair losses of :meth:`pair_losses`, which a subclass defines. Each pair's
    ``loss_count`` is 1, so the step's loss is the mean over its pairs whatever the batching. Needs ``data:
    {class_path: preference}``.

    Args:
        beta: the loss's scale (see the subclass).
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    prompt_loss = False  # whether chosen_nll covers the prompt's tokens too

    def __init__(self, *args, beta: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        if beta <= 0:
            raise UserError(f"model.beta must be above 0, got {beta}")
        self.beta = beta

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage != "predict" and datamodule is not None and not isinstance(datamodule, PreferenceDataModule):
            raise UserError(f"model {self.short_name} learns from preference pairs: set data.class_path to "
                            "preference (sources of type preference_pairs, rows {prompt or messages, chosen, "
                            "rejected})")  # fmt: skip

    @property
    def short_name(self) -> str:
        return type(self).__name__.removesuffix("Module").lower()

    def pair_scores(self, batch: Batch) -> PairScores:
        """:class:`PairScores` of a micro-batch of pairs (each pair's chosen sequence, then its rejected one)."""
        head, softcap = output_head(self.model)
        answer_targets = batch["targets"]
        scored = answer_targets
        if self.prompt_loss:  # every next token of the chosen sequences; the rejected ones' answers only
            chosen = sample_ids(batch) % 2 == 0
            scored = torch.where(chosen, next_token_targets(batch), answer_targets)
        logps = tiled_token_logps(self.hidden_states(batch), head, scored, softcap)
        answer = answer_targets != IGNORE_INDEX
        answer_logps = sum_per_sample(torch.where(answer, logps, 0.0), batch)
        mean_logps = (answer_logps / sum_per_sample(answer.float(), batch)).view(-1, 2)
        if self.prompt_loss:
            scored_count = sum_per_sample((scored != IGNORE_INDEX).float(), batch)
            chosen_nll = -(sum_per_sample(logps, batch) / scored_count)[0::2]
        else:
            chosen_nll = -mean_logps[:, 0]
        return PairScores(mean_logps, chosen_nll)

    def pair_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses [pairs], rewards [pairs, 2])`` of a micro-batch of pairs."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the micro-batch's pair losses (the step divides by its number of pairs); logs the share of
        pairs whose chosen answer has the larger reward (``reward_accuracy``) and the mean reward difference
        (``reward_margin``)."""
        losses, rewards = self.pair_losses(batch)
        stage = "train" if self.trainer.training else "test" if self.trainer.testing else "val"
        margins = rewards[:, 0] - rewards[:, 1]
        self.log(f"{stage}/reward_accuracy", (margins > 0).float().mean(), batch_size=len(margins))
        self.log(f"{stage}/reward_margin", margins.mean(), batch_size=len(margins))
        return losses.sum()


class ORPOModule(ReferenceFreePreferenceModule):
    """ORPO, odds ratio preference optimisation (Hong et al., 2024): per pair, the chosen sequence's mean token
    negative log-likelihood minus ``beta * log sigmoid(log odds(chosen) - log odds(rejected))``, where ``log odds(y) =
    m - log(1 - exp(m))`` of the answer's mean token log-probability ``m``. No reference model.

    Args:
        beta: the weight of the odds-ratio term (the paper's lambda; TRL's ``beta``).
        prompt_loss: the supervised term covers every token of the chosen sequence, prompt included, as the ORPO
            authors' code and TRL's ``ORPOTrainer`` do; false: the chosen answer's tokens only.
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, beta: float = 0.1, prompt_loss: bool = True, **kwargs):
        super().__init__(*args, beta=beta, **kwargs)
        self.prompt_loss = prompt_loss

    def pair_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.pair_scores(batch)
        return orpo_losses(scores.mean_logps, scores.chosen_nll, self.beta)


class SimPOModule(ReferenceFreePreferenceModule):
    """SimPO, simple preference optimisation (Meng et al., 2024): per pair, ``-log sigmoid(beta * (m_chosen -
    m_rejected) - gamma)`` of the answers' mean token log-probabilities ``m``. No reference model.

    Args:
        beta: the scale of the reward ``beta * m`` (the paper uses 2 to 10).
        gamma: the target reward margin (TRL's ``simpo_gamma``; the paper's ``gamma``, not ``gamma / beta``).
        label_smoothing: the assumed share of pairs whose preference is wrong (0: none).
        sft_weight: the weight of the chosen answer's mean token negative log-likelihood added to each pair's loss
            (TRL's ``cpo_alpha``, CPO-SimPO; 0: plain SimPO).
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0, **kwargs):  # fmt: skip
        super().__init__(*args, beta=beta, **kwargs)
        if not 0 <= label_smoothing < 0.5:
            raise UserError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if sft_weight < 0:
            raise UserError(f"model.sft_weight must be 0 or above, got {sft_weight}")
        self.gamma, self.label_smoothing, self.sft_weight = gamma, label_smoothing, sft_weight

    def pair_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.pair_scores(batch)
        return simpo_losses(scores.mean_logps, self.beta, self.gamma, self.label_smoothing, scores.chosen_nll,
                            self.sft_weight)  # fmt: skip
