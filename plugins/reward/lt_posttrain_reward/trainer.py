"""``model: reward``: a reward model, a scalar head on a decoder, trained on preference pairs (Bradley-Terry)."""

from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from lt_posttrain import Batch, SFTModule, UserError, load_model
from lt_posttrain_reward.datamodule import RewardDataModule
from lt_posttrain_reward.loss import bradley_terry_losses, last_token_positions


class RewardModule(SFTModule):
    """A reward model: ``AutoModelForSequenceClassification`` with one label, a linear head (``score``) on the
    decoder's final hidden state of a conversation's last token, trained so that a pair's chosen conversation scores
    higher than its rejected one: per pair, ``-log sigmoid(r_chosen - r_rejected - margin)`` (Bradley-Terry; the
    rows' ``margin``, 0 by default), plus ``center_rewards_coefficient * (r_chosen + r_rejected) ** 2`` when set. Needs
    ``data: {class_path: reward}``.

    ``loss(batch)`` returns the sum over the micro-batch's pairs and the step divides by its number of pairs, so the
    gradient does not change with the batching. Logged: ``train/accuracy`` (the share of pairs whose chosen
    conversation scores higher) and ``train/margin`` (the mean ``r_chosen - r_rejected``); ``val/accuracy`` and
    ``test/accuracy`` over the whole set (summed over GPUs before the share is taken), besides ``val/loss``.

    The reward is read at each conversation's last token that is not the padding token, as Hugging Face's
    ``...ForSequenceClassification`` reads a right-padded row, so the exported model
    (``AutoModelForSequenceClassification.from_pretrained``) scores a conversation as training did; only those
    tokens go through the head. Starting from a causal LM (an SFT model), the head is new: initialised by the model's
    own scheme from the run's seed; its ``config.pad_token_id`` is set to the tokenizer's. LoRA and k-bit loading are
    not supported yet (the whole model trains).

    Args:
        center_rewards_coefficient: the weight of the centring term that keeps the rewards near 0 (TRL's
            ``center_rewards_coefficient``; Eisenstein et al., 2023 use 0.01); None: none.
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, center_rewards_coefficient: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise UserError(f"model.center_rewards_coefficient must be 0 or above, got {center_rewards_coefficient}")
        if self.lora is not None or self.hparams.load_in_4bit or self.hparams.load_in_8bit:
            raise UserError("model reward: LoRA and k-bit loading are not supported for reward models yet; remove "
                            "model.lora, model.load_in_4bit and model.load_in_8bit to train the whole model")
        self.center_rewards_coefficient = center_rewards_coefficient
        self._accuracy: Optional[torch.Tensor] = None  # [pairs ranked right, pairs] of an evaluation

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "predict":
            raise UserError("model reward scores conversations and generates no text: predict is not available; load "
                            "the exported model with AutoModelForSequenceClassification to score")  # fmt: skip
        datamodule = self.trainer.datamodule
        if datamodule is not None and not isinstance(datamodule, RewardDataModule):
            raise UserError("model reward learns from preference pairs: set data.class_path to reward (sources of "
                            "type reward_pairs, rows {prompt or messages, chosen, rejected, margin})")  # fmt: skip

    def build_model(self) -> torch.nn.Module:
        """``AutoModelForSequenceClassification`` of ``name_or_path`` with one label, its padding token the
        tokenizer's."""
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        hp = self.hparams
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # a causal LM has no head: transformers' table of the missing weight, in one line
        try:
            model = load_model(hp.name_or_path, AutoModelForSequenceClassification, hp.dtype, hp.attn_implementation,
                               hp.trust_remote_code, num_labels=1)  # fmt: skip
        finally:
            logging.set_verbosity(verbosity)
        if not any("ForSequenceClassification" in name for name in model.config.architectures or []):
            rank_zero_info(f"model reward: {hp.name_or_path} has no reward head; a new one is initialised")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    @property
    def head(self) -> torch.nn.Module:
        """The scalar head (``score``)."""
        head = getattr(self.model, "score", None)
        if not isinstance(head, torch.nn.Module):
            raise UserError(f"model reward: {type(self.model).__name__} has no 'score' head; use a model whose "
                            "AutoModelForSequenceClassification class has one (Llama, Qwen, Mistral, Gemma, ...)")
        return head

    def rewards(self, batch: Batch) -> torch.Tensor:
        """``[conversations]``: each conversation's reward, in float32."""
        hidden = self.hidden_states(batch)
        positions = last_token_positions(batch, self.model.config.pad_token_id)
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        return self.head(last).squeeze(-1).float()

    def pair_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses [pairs], rewards [pairs, 2])`` of a micro-batch of pairs (see :func:`bradley_terry_losses`)."""
        rewards = self.rewards(batch).view(-1, 2)
        return bradley_terry_losses(rewards, batch["margin"], self.center_rewards_coefficient), rewards

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the micro-batch's pair losses (the step divides by its number of pairs)."""
        losses, rewards = self.pair_losses(batch)
        margins = (rewards[:, 0] - rewards[:, 1]).detach()
        if self.trainer.training:
            self.log("train/accuracy", (margins > 0).float().mean(), batch_size=len(margins))
            self.log("train/margin", margins.mean(), batch_size=len(margins))
        elif self._accuracy is not None:
            self._accuracy += torch.stack([(margins > 0).sum(), torch.tensor(len(margins), device=margins.device)])
        return losses.sum()

    def _start_accuracy(self) -> None:
        self._accuracy = torch.zeros(2, device=self.device, dtype=torch.float64)

    def _log_accuracy(self, name: str) -> None:
        right, pairs = self.trainer.strategy.reduce(self._accuracy.clone(), reduce_op="sum")
        if pairs > 0:
            self.log(name, (right / pairs).float())
        self._accuracy = None

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._start_accuracy()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_accuracy("val/accuracy")

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._start_accuracy()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_accuracy("test/accuracy")
