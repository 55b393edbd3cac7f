"""Lightning's DeepSpeed strategy on CPU ranks with gradient accumulation, one rank of several (``python -m
torch.distributed.run``), for ``test_deepspeed_accumulation.py``; :func:`train` is also the test's reference run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_accumulation_worker.py \
        MODEL_DIR DATA OUT_DIR STEPS STAGE [STAGE ...]

runs, for each ZeRO stage, ``STEPS`` optimizer steps of one-sample micro-batches accumulated over 2, and writes
``OUT_DIR/stage-S/``: the CSV log, ``steps-RANK.json`` (:class:`StepRecorder`) and, from rank 0, ``weights.pt`` (the
trained weights, gathered).
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lt_posttrain import InstructDataModule, SFTModule
from lt_posttrain.training.sharding import gather_state_dict
from lt_posttrain.training.strategy import leave_process_group, prepare_strategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy but for what ties it to CUDA: its accelerator check, and the GPU indices it
    checks and passes to ``deepspeed.initialize``, which CPU ranks do not have."""

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                     lr_scheduler=lr_scheduler, config=self.config,
                                                     dist_init_required=False)  # fmt: skip
        return engine, optimizer


class StepRecorder(L.Callback):
    """What each ``on_before_optimizer_step`` saw: the global step and the learning rate about to be used."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({"global_step": trainer.global_step, "lr": optimizer.param_groups[0]["lr"]})


def train(model_dir, data, out: Path, strategy, devices: int, batch_size: int, accumulate: int, steps: int):
    """``steps`` optimizer steps with a linearly decaying learning rate: ``(weights, report)``, the trained weights
    (gathered on rank 0; under ZeRO-3 empty elsewhere) and what the steps looked like on this rank."""
    L.seed_everything(0)
    module = SFTModule(str(model_dir), learning_rate=1e-3, schedule="linear")
    datamodule = InstructDataModule([str(data)], max_length=512, batch_size=batch_size, num_workers=0)
    recorder = StepRecorder()
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_steps=steps, max_epochs=-1,
        accumulate_grad_batches=accumulate, callbacks=[recorder], logger=L.pytorch.loggers.CSVLogger(out),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    prepare_strategy(trainer.strategy, micro_batch_size=batch_size)
    trainer.fit(module, datamodule)
    state = gather_state_dict(trainer.strategy)
    state = module.model.state_dict() if state is None else state
    report = {"steps": recorder.steps, "global_step": trainer.global_step}
    return {name: tensor.detach().float().clone() for name, tensor in state.items()}, report


def main(model_dir: str, data: str, out_dir: str, steps: str, *stages: str) -> None:
    import deepspeed

    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    world_size = int(os.environ["WORLD_SIZE"])
    for stage in map(int, stages):
        out = Path(out_dir) / f"stage-{stage}"
        strategy = CPUDeepSpeedStrategy(stage=stage)
        weights, report = train(model_dir, data, out, strategy, world_size, 1, 2, int(steps))
        (out / f"steps-{strategy.global_rank}.json").write_text(json.dumps(report))
        if strategy.global_rank == 0:
            torch.save(weights, out / "weights.pt")
        strategy.barrier()
    leave_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
