"""Reward model steps on two CPU ranks under DDP, DeepSpeed ZeRO-3 and FSDP, one after the other in one launch
(``python -m torch.distributed.run``).

DDP is Lightning's own ``fit`` (launched by torchrun, Lightning runs it in place): 1 pair a micro-batch, 2
micro-batches accumulated, 2 ranks, validated at the end (the accuracy summed over ranks). Lightning runs ZeRO-3 and
FSDP on CUDA only, so for those this does by hand what its ``fit`` does (as
``plugins/dpo/tests/dpo_sharded_worker.py``): the real strategy object, ``configure_model`` inside the strategy's
``model_sharded_context``, the model wrapped around a module whose forward gives this rank's share of the step's mean
pair loss.

    python -m torch.distributed.run --standalone --nproc_per_node 2 reward_sharded_worker.py \\
        MODEL_DIR PAIRS_FILE BATCHES LEARNING_RATE OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches: step ``s`` of rank ``r`` takes ``s * world_size + r``.
Writes ``OUT_DIR/rank-N.json``: each strategy's step losses (means over every rank's pairs), and DDP's validation
accuracy.
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
from lt_posttrain_reward import RewardDataModule, RewardModule  # noqa: E402


class StepLosses(L.Callback):
    """The logged ``train/loss`` of each optimizer step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


class StepShare(torch.nn.Module):
    """What the strategy wraps: the module, whose forward gives this rank's share of the step's mean pair loss."""

    def __init__(self, module: RewardModule):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        pairs = batch["step_loss_count"].clone().float()
        torch.distributed.all_reduce(pairs)
        return self.module.pair_losses(batch)[0].sum() / pairs


def reward(model_dir: str, learning_rate: float) -> RewardModule:
    return RewardModule(model_dir, learning_rate=learning_rate, schedule="constant", center_rewards_coefficient=0.01)


def ddp(model_dir: str, pairs_file: str, learning_rate: float, world_size: int) -> dict:
    """Lightning's DDP fit: 1 pair a micro-batch, 2 accumulated, on each rank; then a validation of the pairs."""
    losses = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, accumulate_grad_batches=2,
                        logger=False, callbacks=[losses], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    sources = [{"name_or_path": pairs_file, "type": "reward_pairs"}]
    data = RewardDataModule(sources, val_sources=sources, max_length=512, batch_size=1, shuffle=False)
    module = reward(model_dir, learning_rate)
    trainer.fit(module, data)
    trainer.limit_val_batches = 1.0
    [metrics] = trainer.validate(module, data, verbose=False)
    return {"losses": losses.losses, "accuracy": metrics["val/accuracy"]}


def zero3(module: RewardModule, world_size: int):
    """``module`` set up for ZeRO-3 as Lightning's ``fit`` does; its training step."""
    import deepspeed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    strategy = DeepSpeedStrategy(stage=3)
    module.trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=100, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    prepare_strategy(strategy, micro_batch_size=2)
    strategy.set_world_ranks()
    strategy.connect(module)
    with strategy.model_sharded_context():
        module.configure_model()
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

    return step


def fsdp(module: RewardModule, world_size: int):
    """``module`` set up for FSDP as Lightning's ``fit`` does; its training step."""
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

    return step


def main(model_dir: str, pairs_file: str, batches_file: str, learning_rate: str, out_dir: str) -> None:
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    report = {"ddp": ddp(model_dir, pairs_file, float(learning_rate), world_size)}
    batches = torch.load(batches_file)
    for name, setup in (("deepspeed", zero3), ("fsdp", fsdp)):
        step, losses = setup(reward(model_dir, float(learning_rate)), world_size), []
        for index in range(rank, len(batches), world_size):
            share = step(batches[index]).detach().clone()
            torch.distributed.all_reduce(share)
            losses.append(share.item())
        report[name] = {"losses": losses}
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
