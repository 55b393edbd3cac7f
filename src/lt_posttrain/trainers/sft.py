"""``SFTModule``: supervised fine-tuning of a Hugging Face causal LM; the base of every trainer.

A custom trainer subclasses it and overrides :meth:`SFTModule.loss` (and nothing else). Normalisation lives here,
once: ``loss(batch)`` returns a *sum* over the loss tokens of its micro-batch, and the step divides by the loss
tokens of the whole optimizer step, over every micro-batch of the accumulation window and every rank. So the
gradient does not depend on the micro-batch size, the accumulation, packing or the number of GPUs.
"""

import math
from typing import Literal, Optional

import lightning as L
import torch

from lt_posttrain.model.attention import VARLEN
from lt_posttrain.model.loading import load_causal_lm, load_tokenizer, resolve_model_path
from lt_posttrain.model.optim import Schedule, build_adamw, build_schedule, warmup_steps_of
from lt_posttrain.trainers.losses import token_cross_entropy_sum

PACKED_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class SFTModule(L.LightningModule):
    """Supervised fine-tuning: mean cross-entropy over assistant tokens, token-weighted over the optimizer step.

    Args:
        name_or_path: a hub id, a local Hugging Face folder, a ``.gguf`` file, or ``package://PKG/FILE`` (a file
            shipped in an installed Python package).
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (never on norms, biases and embeddings).
        warmup: linear warm-up; below 1 a fraction of the training steps, from 1 up a number of steps.
        schedule: the learning rate after warm-up: ``cosine`` or ``linear`` decay to zero, or ``constant``.
        dtype: dtype the weights are loaded in (``float32`` keeps fp32 master weights under mixed precision).
        attn_implementation: the transformers attention implementation. ``varlen`` (default): each packed sample
            attends only to itself, with torch's varlen flash kernel on GPU and no dense mask; ``sdpa``, ``eager``,
            ... are transformers' own (packed samples then get a dense block-diagonal mask).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trust_remote_code: allow a hub model's own Python code to run (off: only transformers' code runs).
        max_new_tokens: tokens generated per prompt by ``lt-posttrain predict`` (greedy).
    """

    def __init__(
        self,
        name_or_path: str,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup: float = 0.0,
        schedule: Schedule = "cosine",
        dtype: Dtype = "float32",
        attn_implementation: Optional[str] = "varlen",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        max_new_tokens: int = 256,
    ):
        super().__init__()
        self.save_hyperparameters()
        resolve_model_path(name_or_path)  # a wrong path fails now, in one line, not after the data is prepared
        self.tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        self.model = None

    # -- the model -------------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """Create the Hugging Face model (override to build it another way: a model factory)."""
        hp = self.hparams
        model = load_causal_lm(hp.name_or_path, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits ``[batch, sequence, vocab]`` for a padded or packed micro-batch."""
        keys = PACKED_KEYS if self.hparams.attn_implementation == VARLEN else ("attention_mask", "position_ids")
        inputs = {key: batch[key] for key in keys if key in batch}
        return self.model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits

    # -- the loss: the one method a custom trainer overrides --------------------------------------------------
    def loss(self, batch: dict) -> torch.Tensor:
        """The *sum* of the per-token losses of this micro-batch (not a mean: the step normalises).

        ``batch["targets"]`` holds the token each position predicts (``-100`` where no loss); optional
        ``batch["target_weights"]`` scales each position's loss.
        """
        return token_cross_entropy_sum(self(batch), batch["targets"], batch.get("target_weights"))

    # -- steps --------------------------------------------------------------------------------------------------
    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def on_train_epoch_start(self) -> None:
        self._step_stats = torch.zeros(2, device=self.device)  # [loss of this step so far, input tokens]
        if not hasattr(self, "_tokens_seen"):
            self._tokens_seen = torch.zeros((), device=self.device, dtype=torch.float64)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step_loss_count = self._sum_over_ranks(batch["step_loss_count"].clone()).clamp(min=1)
        share = self.loss(batch) / step_loss_count  # this micro-batch's part of the step's token-mean loss
        self._step_stats += torch.stack([share.detach().float(), batch["num_tokens"].float()])
        # Lightning divides by accumulate_grad_batches and data parallelism averages over ranks: undo both.
        return share * (self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def on_before_optimizer_step(self, optimizer) -> None:
        step_loss, tokens = self._sum_over_ranks(self._step_stats.clone())
        self._tokens_seen += tokens
        self.log("train/loss", step_loss, prog_bar=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self.log("train/tokens_seen", self._tokens_seen.float())
        self._step_stats.zero_()

    def _evaluation_start(self) -> None:
        self._eval_stats = torch.zeros(2, device=self.device, dtype=torch.float64)  # [loss sum, loss tokens]

    def _evaluation_step(self, batch: dict) -> None:
        self._eval_stats += torch.stack([self.loss(batch).detach().double(), batch["loss_count"].double()])

    def _evaluation_end(self, name: str) -> None:
        loss_sum, count = self._sum_over_ranks(self._eval_stats.clone())
        if count > 0:  # token-weighted over the whole set, not a mean of batch means
            self.log(name, (loss_sum / count).float(), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._evaluation_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val/loss")

    def on_test_epoch_start(self) -> None:
        self._evaluation_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test/loss")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy completions of the prompts: ``{"prompt", "reference", "generated"}`` per conversation."""
        prompt_ids = batch["input_ids"]
        if self.model.config._attn_implementation == VARLEN:  # generation needs the padding mask and a KV cache
            self.model.set_attn_implementation("sdpa")
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=batch["attention_mask"], max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        texts = self.tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        return [
            {"prompt": prompt, "reference": reference, "generated": text}
            for prompt, reference, text in zip(batch["prompt"], batch["reference"], texts)
        ]

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_adamw(self.model, hp.learning_rate, hp.weight_decay)
        total = self.total_optimizer_steps()
        scheduler = build_schedule(optimizer, hp.schedule, warmup_steps_of(total, hp.warmup), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        """``max_steps`` if set, else epochs times optimizer steps per epoch (counted from the data plan: Lightning's
        ``estimated_stepping_batches`` would drop a restored data-loader state)."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        if trainer.datamodule is None:
            return int(trainer.estimated_stepping_batches)
        batches = len(trainer.datamodule.train_dataloader())
        if isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
        return math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs or 1, 1)
