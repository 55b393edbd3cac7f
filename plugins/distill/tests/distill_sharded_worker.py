"""Distillation steps on two CPU ranks under DDP, DeepSpeed ZeRO-3 and FSDP, one after the other in one launch
(``python -m torch.distributed.run``).

DDP is Lightning's own ``fit`` (launched by torchrun, Lightning runs it in place): 1 chat a micro-batch, 2
micro-batches accumulated, 2 ranks. Lightning runs ZeRO-3 and FSDP on CUDA only, so for those this does by hand what
its ``fit`` does (as ``plugins/dpo/tests/dpo_sharded_worker.py``): the real strategy object, ``configure_model``
inside the strategy's ``model_sharded_context`` (the teacher is created there too), the model wrapped around a module
whose forward computes the loss, and each rank's share of the step divided as ``SFTModule.training_step`` divides it
(by the loss tokens of the whole step, times the ranks, since the strategies average the gradients over ranks).

    python -m torch.distributed.run --standalone --nproc_per_node 2 distill_sharded_worker.py \\
        STUDENT_DIR TEACHER_DIR CHATS_FILE BATCHES LEARNING_RATE OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches: step ``s`` of rank ``r`` takes ``s * world_size + r``.
Writes ``OUT_DIR/rank-N.json``: each strategy's step losses (means over every rank's loss tokens), and under ZeRO-3
and FSDP what the rank held of the teacher and what the teacher ran as.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lt_posttrain.testing import leave_process_group, prepare_strategy  # noqa: E402
from lt_posttrain_distill import DistillModule  # noqa: E402

from lt_posttrain import InstructDataModule  # noqa: E402


class StepLosses(L.Callback):
    """The logged ``train/loss`` of each optimizer step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


class StepShare(torch.nn.Module):
    """What the strategy wraps: the module, whose forward gives this rank's share of the step's mean token loss."""

    def __init__(self, module: DistillModule):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        tokens = batch["step_loss_count"].clone().float()
        torch.distributed.all_reduce(tokens)
        return self.module.loss(batch) / tokens


def distill(student_dir: str, teacher_dir: str, learning_rate: float) -> DistillModule:
    return DistillModule(student_dir, teacher_name_or_path=teacher_dir, divergence="jsd", beta=0.3, temperature=1.5,
                         learning_rate=learning_rate, schedule="constant")  # fmt: skip


def ddp(student_dir: str, teacher_dir: str, chats_file: str, learning_rate: float, world_size: int) -> list[float]:
    """Lightning's DDP fit: 1 chat a micro-batch, 2 accumulated, on each rank."""
    losses = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, accumulate_grad_batches=2,
                        logger=False, callbacks=[losses], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = InstructDataModule([chats_file], max_length=512, batch_size=1, shuffle=False)
    trainer.fit(distill(student_dir, teacher_dir, learning_rate), data)
    return losses.losses


def partitions(model: torch.nn.Module) -> dict:
    """ZeRO-3, per weight: its full size, the size of this rank's partition, and what the rank holds as the weight's
    own data."""
    return {name: [p.ds_numel, p.ds_tensor.numel(), p.numel()] for name, p in model.named_parameters()}


def shards(model: torch.nn.Module) -> dict:
    """FSDP: how many weights this rank holds."""
    return {"held": sum(p.numel() for p in model.parameters())}


def zero3(module: DistillModule, world_size: int):
    """``module`` set up for ZeRO-3 as Lightning's ``fit`` does: its training step and what it holds of the teacher."""
    import deepspeed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    strategy = DeepSpeedStrategy(stage=3)
    module.trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=100, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    prepare_strategy(strategy, micro_batch_size=1)
    strategy.set_world_ranks()
    strategy.connect(module)
    with strategy.model_sharded_context():
        module.configure_model()
    held = partitions(module.teacher_model)
    optimizer = module.configure_optimizers()["optimizer"]
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    # Lightning passes the GPU index as args.device_rank, which a CPU rank does not have.
    engine, *_ = deepspeed.initialize(model=StepShare(module), model_parameters=trainable, optimizer=optimizer,
                                      config=strategy.config, dist_init_required=False)  # fmt: skip

    def step(batch: dict) -> torch.Tensor:
        share = engine(batch)
        engine.backward(share * world_size)  # the engine averages the gradients over ranks
        engine.step()
        return share

    return step, held


def fsdp(module: DistillModule, world_size: int):
    """``module`` set up for FSDP as Lightning's ``fit`` does: its training step and what it holds of the teacher."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    environment, precision = TorchElasticEnvironment(), FSDPPrecision("32-true")
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")] * world_size, cluster_environment=environment,
                            precision_plugin=precision)  # fmt: skip
    strategy.set_world_ranks()
    module._trainer = SimpleNamespace(strategy=strategy)  # Lightning's Trainer refuses FSDP on CPU
    with strategy.model_sharded_context():
        module.configure_model()
    wrapped = FullyShardedDataParallel(StepShare(module), cpu_offload=strategy.cpu_offload,
                                       mixed_precision=strategy.mixed_precision_config,
                                       sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device,
                                       **strategy.kwargs)  # fmt: skip
    optimizer = module.build_optimizer()  # as configure_optimizers

    def step(batch: dict) -> torch.Tensor:
        share = wrapped(batch)
        (share * world_size).backward()  # FSDP averages the gradients over ranks
        optimizer.step()
        optimizer.zero_grad()
        return share

    return step, shards(module.teacher_model)


def main(student_dir: str, teacher_dir: str, chats_file: str, batches_file: str, learning_rate: str,
         out_dir: str) -> None:  # fmt: skip
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    report = {"ddp": ddp(student_dir, teacher_dir, chats_file, float(learning_rate), world_size)}
    batches = torch.load(batches_file)
    for name, setup in (("deepspeed", zero3), ("fsdp", fsdp)):
        module = distill(student_dir, teacher_dir, float(learning_rate))
        (step, held), losses = setup(module, world_size), []
        for index in range(rank, len(batches), world_size):
            share = step(batches[index]).detach().clone()
            torch.distributed.all_reduce(share)
            losses.append(share.item())
        report[name] = losses
        report[f"{name}_teacher"] = {"held": held, "runs_in": type(module.teacher_model).__name__}
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
