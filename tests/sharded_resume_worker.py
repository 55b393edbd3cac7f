"""ZeRO-3 training through Lightning's own loop on CPU ranks, checkpointed by ``TrainingStateCheckpoint`` and resumed
from ``ckpt_path="last"``, one rank of several (``python -m torch.distributed.run``), for ``test_sharded_resume.py``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sharded_resume_worker.py \\
        MODEL_DIR DATA OUT_DIR STEPS full|lora RUN [RUN ...]

runs, one after another, each ``RUN`` of ``STEPS`` optimizer steps, of a full fine-tune or of LoRA adapters
(one-sample micro-batches accumulated over 2, with ``deepspeed_accumulation_worker.CPUDeepSpeedStrategy`` at ZeRO
stage 3): ``uninterrupted``; ``stopped``, which stops once step ``STEPS - 1`` is done, a checkpoint written after
every step; and ``resumed``, which resumes where ``stopped`` left off. ``stopped`` and ``resumed`` share
``OUT_DIR/interrupted`` (``trainer.default_root_dir``, so the checkpoints are found as ``lt-posttrain fit
--ckpt_path last`` finds them). Each run writes ``OUT_DIR/RUN/``: the CSV log, ``steps-RANK.json``
(:class:`StepRecorder`) and, from rank 0, ``weights.pt`` (the trained weights, gathered).
"""

import json
import os
import sys
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from deepspeed_accumulation_worker import CPUDeepSpeedStrategy, StepRecorder
from lt_posttrain import InstructDataModule, SFTModule
from lt_posttrain.callbacks.random_state import RandomStateCheckpoint
from lt_posttrain.callbacks.training_state import TrainingStateCheckpoint
from lt_posttrain.training.sharding import gather_state_dict
from lt_posttrain.training.strategy import leave_process_group, prepare_strategy


class StopAfter(L.Callback):
    """Ends training once optimizer step ``step`` is done (after its checkpoint, which the trainer writes last)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit(model_dir: str, data: str, out: Path, steps: int, lora: Optional[dict], run: str) -> None:
    """The run ``run`` (see above), as ``lt-posttrain fit`` with ``training_state.every_n_steps 1`` trains."""
    L.seed_everything(0)
    module = SFTModule(model_dir, learning_rate=1e-3, schedule="linear", lora=lora)
    datamodule = InstructDataModule([data], max_length=512, batch_size=1, num_workers=0)
    recorder = StepRecorder()
    callbacks = [recorder, RandomStateCheckpoint(), TrainingStateCheckpoint(every_n_steps=1, keep_last=2)]
    if run == "stopped":
        callbacks.append(StopAfter(steps - 1))
    root = out / ("uninterrupted" if run == "uninterrupted" else "interrupted")
    trainer = L.Trainer(
        strategy=CPUDeepSpeedStrategy(stage=3), accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
        max_steps=steps, max_epochs=-1, accumulate_grad_batches=2, callbacks=callbacks, default_root_dir=root,
        logger=L.pytorch.loggers.CSVLogger(out / run), log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    prepare_strategy(trainer.strategy, micro_batch_size=1)
    trainer.fit(module, datamodule, ckpt_path="last" if run == "resumed" else None)
    weights = gather_state_dict(trainer.strategy)
    (out / run / f"steps-{trainer.global_rank}.json").write_text(json.dumps({"steps": recorder.steps}))
    if trainer.is_global_zero:
        torch.save({name: tensor.detach().clone() for name, tensor in weights.items()}, out / run / "weights.pt")
    trainer.strategy.barrier()


def main(model_dir: str, data: str, out_dir: str, steps: str, finetune: str, *runs: str) -> None:
    import deepspeed

    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    lora = {"r": 4, "alpha": 8, "dropout": 0.0} if finetune == "lora" else None
    for run in runs:
        fit(model_dir, data, Path(out_dir), int(steps), lora, run)
    leave_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
