"""``HFCheckpoint``: the Hugging Face model written at the end of training and, optionally, every N steps."""

from pathlib import Path
from typing import Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lt_posttrain.model.export import export_hf, recover_export
from lt_posttrain.model.lora import is_peft_model
from lt_posttrain.training.run_folder import check_writable
from lt_posttrain.training.sharding import gather_state_dict


class HFCheckpoint(L.Callback):
    """Export the trained model and tokenizer as a Hugging Face folder (``from_pretrained`` loads it).

    Args:
        output_dir: where the final model goes; step exports go to ``output_dir/step-N``. Default: ``hf_model``
            under the run directory (the logger's version folder).
        save_end_of_training: write the final model when training ends.
        save_every_n_steps: also write one every N optimizer steps (0: never).
        merge_lora: with ``model.lora``, write a plain Hugging Face model (the base with the adapter merged in)
            instead of the PEFT adapter folder.
        max_shard_size: the largest safetensors file of a model export (``"5GB"``, or bytes); larger models are
            split into numbered files with an index, as on the Hugging Face hub.

    Under DeepSpeed ZeRO-3 and FSDP the weights are gathered from their shards first (every rank takes part; rank 0
    alone writes): ZeRO-3 gathers one layer at a time into 16-bit tensors on rank 0's CPU, so no GPU ever holds the
    whole model; a LoRA export gathers the adapter's weights only.
    """

    def __init__(
        self,
        output_dir: Optional[str] = None,
        save_end_of_training: bool = True,
        save_every_n_steps: int = 0,
        merge_lora: bool = False,
        max_shard_size: Union[int, str] = "5GB",
    ):
        self.output_dir = output_dir
        self.save_end_of_training = save_end_of_training
        self.save_every_n_steps = save_every_n_steps
        self.merge_lora = merge_lora
        self.max_shard_size = max_shard_size
        self._last_step_saved = -1

    def resolved_output_dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A folder the export cannot be written to is one line now, not at the end of a long run."""
        if stage == "fit" and (self.save_end_of_training or self.save_every_n_steps) and trainer.is_global_zero:
            check_writable(self.resolved_output_dir(trainer), "checkpoint.output_dir")

    def remove_leftovers(self, trainer: L.Trainer) -> list[str]:
        """Put right what a killed export left beside the export folder (or a step export in it): a half-written
        folder removed, a switch finished or undone (:func:`~lt_posttrain.model.export.recover_export`). Returns
        the names removed."""
        return recover_export(self.resolved_output_dir(trainer))

    def _export(self, trainer: L.Trainer, module: L.LightningModule, folder: Path) -> None:
        state_dict = gather_state_dict(trainer.strategy, trainable_only=is_peft_model(module.model))
        if trainer.is_global_zero:
            trust_remote_code = bool(getattr(module, "hparams", {}).get("trust_remote_code", False))
            export_hf(module.model, module.tokenizer, folder, self.merge_lora, trust_remote_code, state_dict,
                      self.max_shard_size)  # fmt: skip
        trainer.strategy.barrier("hf_export")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.save_every_n_steps and step and step % self.save_every_n_steps == 0 and step != self._last_step_saved:
            self._last_step_saved = step
            self._export(trainer, module, self.resolved_output_dir(trainer) / f"step-{step}")

    def on_train_end(self, trainer, module) -> None:
        if self.save_end_of_training:
            folder = self.resolved_output_dir(trainer)
            self._export(trainer, module, folder)
            what = (
                "LoRA adapter (PEFT)" if is_peft_model(module.model) and not self.merge_lora else "Hugging Face model"
            )
            rank_zero_info(f"{what} written to {folder.resolve()}")
