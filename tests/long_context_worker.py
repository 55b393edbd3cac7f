"""SFT steps with every ``model.long_context`` option (and gradient checkpointing) on CPU ranks under torch's DDP,
DeepSpeed ZeRO-2, ZeRO-3 and FSDP, one after the other in one launch (``python -m torch.distributed.run``), for
``test_long_context.py``.

Each is set up as Lightning's ``fit`` sets it up, by hand where Lightning refuses a CPU (as the DPO plugin's
``dpo_sharded_worker.py``): the real strategy object, ``configure_model`` inside its ``model_sharded_context``, then
the model wrapped (``DistributedDataParallel``, ``deepspeed.initialize``, ``FullyShardedDataParallel``) around a
module whose forward computes the loss, so the loss runs inside the wrapped forward as Lightning's training step does
(ZeRO-3 gathers the head's weight as the head runs, FSDP has the outer unit's weights unsharded).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/long_context_worker.py \\
        MODEL_DIR BATCHES OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches: step ``s`` of rank ``r`` takes ``s * world_size + r``.
Writes ``OUT_DIR/rank-N.json``: per strategy, the step losses (token means over every rank's micro-batch).
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lt_posttrain import SFTModule  # noqa: E402
from lt_posttrain.testing import leave_process_group, prepare_strategy  # noqa: E402

LONG_CONTEXT = {"tiled_loss": True, "tiled_mlp": True, "offload_checkpoints": True, "loss_tile_tokens": 16,
                "mlp_tile_tokens": 32}  # fmt: skip
LEARNING_RATE = 1e-3


class StepLoss(torch.nn.Module):
    """What the strategy wraps: the module, whose forward computes a micro-batch's share of the step's loss."""

    def __init__(self, module: SFTModule):
        super().__init__()
        self.module = module

    def forward(self, batch: dict, count: torch.Tensor) -> torch.Tensor:
        return self.module.loss(batch) / count


def new_module(model_dir: str) -> SFTModule:
    return SFTModule(model_dir, learning_rate=LEARNING_RATE, long_context=LONG_CONTEXT)


def ddp(model_dir: str, world_size: int) -> Callable:
    module = new_module(model_dir)
    module.configure_model()
    wrapped = torch.nn.parallel.DistributedDataParallel(StepLoss(module))
    optimizer = module.build_optimizer()

    def step(batch: dict, count: torch.Tensor) -> torch.Tensor:
        loss = wrapped(batch, count)
        (loss * world_size).backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


def deepspeed_stage(stage: int) -> Callable:
    def setup(model_dir: str, world_size: int) -> Callable:
        import deepspeed
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=stage)
        module = new_module(model_dir)
        module.trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=100,
                                   logger=False, enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
        prepare_strategy(strategy, micro_batch_size=1)
        strategy.set_world_ranks()
        strategy.connect(module)
        with strategy.model_sharded_context():
            module.configure_model()
        optimizer = module.build_optimizer()
        trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
        # Lightning passes the GPU index as args.device_rank, which a CPU rank does not have.
        engine, *_ = deepspeed.initialize(model=StepLoss(module), model_parameters=trainable, optimizer=optimizer,
                                          config=strategy.config, dist_init_required=False)  # fmt: skip

        def step(batch: dict, count: torch.Tensor) -> torch.Tensor:
            loss = engine(batch, count)
            engine.backward(loss * world_size)  # ZeRO averages the gradients over the ranks
            engine.step()
            return loss

        return step

    return setup


def fsdp(model_dir: str, world_size: int) -> Callable:
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")] * world_size,
                            cluster_environment=TorchElasticEnvironment(), precision_plugin=FSDPPrecision("32-true"))
    strategy.set_world_ranks()
    module = new_module(model_dir)
    module._trainer = SimpleNamespace(strategy=strategy)  # Lightning's Trainer refuses FSDP on CPU
    with strategy.model_sharded_context():
        module.configure_model()
    wrapped = FullyShardedDataParallel(StepLoss(module), cpu_offload=strategy.cpu_offload,
                                       mixed_precision=strategy.mixed_precision_config,
                                       sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device,
                                       **strategy.kwargs)  # fmt: skip
    optimizer = module.build_optimizer()

    def step(batch: dict, count: torch.Tensor) -> torch.Tensor:
        loss = wrapped(batch, count)
        (loss * world_size).backward()  # FSDP averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


STRATEGIES = {"ddp": ddp, "deepspeed_stage_2": deepspeed_stage(2), "deepspeed_stage_3": deepspeed_stage(3),
              "fsdp": fsdp}  # fmt: skip


def main(model_dir: str, batches_file: str, out_dir: str) -> None:
    import deepspeed

    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    batches = torch.load(batches_file)
    report = {}
    for name, setup in STRATEGIES.items():
        L.seed_everything(0)
        step, losses = setup(model_dir, world_size), []
        for index in range(rank, len(batches), world_size):
            count = batches[index]["loss_count"].clone().float()
            torch.distributed.all_reduce(count)
            total = step(batches[index], count).detach().clone()
            torch.distributed.all_reduce(total)
            losses.append(total.item())
        report[name] = losses
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
