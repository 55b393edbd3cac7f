"""DPO steps on two CPU ranks under DDP, DeepSpeed ZeRO-3 and FSDP, one after the other in one launch
(``python -m torch.distributed.run``).

DDP is Lightning's own ``fit`` (launched by torchrun, Lightning runs it in place): 1 pair a micro-batch, 2
micro-batches accumulated, with ``precompute_reference`` (each rank scores its share of the pairs, then the reference
is freed). Lightning runs ZeRO-3 and FSDP on CUDA only, so for those this does by hand what its ``fit`` does (as the
core's ``tests/zero3_worker.py``): the real strategy object, ``configure_model`` inside the strategy's
``model_sharded_context``, then the model wrapped (``deepspeed.initialize``; ``FullyShardedDataParallel`` with the
strategy's settings) around a module whose forward computes the loss, so the reference runs inside the model's
forward as under Lightning. On CPU, FSDP needs the device itself (``device_id``), not the index Lightning passes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 dpo_sharded_worker.py \\
        MODEL_DIR PAIRS_FILE BATCHES LEARNING_RATE OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches for ZeRO-3 and FSDP: step ``s`` of rank ``r`` takes
``s * world_size + r``. Writes ``OUT_DIR/rank-N.json``: per strategy, the step losses (means over every rank's
pairs); under DDP whether the reference was held during a step; under ZeRO-3 and FSDP what the rank held of the
reference as created and after the steps, and what of the reference reached the optimizer and the trained module's
state dict.
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
from lt_posttrain.testing import leave_process_group  # noqa: E402
from lt_posttrain_dpo import DPOModule, PreferenceDataModule  # noqa: E402


class PairLosses(torch.nn.Module):
    """What the strategy wraps: the module, whose forward computes the pair losses (Lightning's wrapper runs the
    training step there)."""

    def __init__(self, module: DPOModule):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.pair_losses(batch)[0]


def partitions(model: torch.nn.Module) -> dict:
    """ZeRO-3, per weight: its full size, the size of this rank's partition, what the rank holds as the weight's own
    data, and its dtype."""
    return {name: [p.ds_numel, p.ds_tensor.numel(), p.numel(), str(p.dtype)] for name, p in model.named_parameters()}


def shards(model: torch.nn.Module) -> dict:
    """FSDP: how many weights this rank holds, and their dtypes."""
    weights = list(model.parameters())
    return {"held": sum(p.numel() for p in weights), "dtypes": sorted({str(p.dtype) for p in weights})}


def reference_in(optimizer: torch.optim.Optimizer, module: DPOModule) -> int:
    """How many of the reference's weights ``optimizer`` updates."""
    reference = {id(parameter) for parameter in module.reference_model.parameters()}
    return sum(id(parameter) in reference for group in optimizer.param_groups for parameter in group["params"])


def zero3(module: DPOModule, world_size: int) -> tuple[Callable, dict]:
    """``module`` set up for ZeRO-3 as Lightning's ``fit`` does: its training step, and what the optimizer and the
    state dict hold of the reference."""
    import deepspeed
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lt_posttrain.testing import prepare_strategy

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
    optimized = reference_in(optimizer, module)  # before DeepSpeed swaps the weights for its partitions
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    # Lightning passes the GPU index as args.device_rank, which a CPU rank does not have.
    engine, *_ = deepspeed.initialize(model=PairLosses(module), model_parameters=trainable, optimizer=optimizer,
                                      config=strategy.config, dist_init_required=False)  # fmt: skip

    def step(batch: dict) -> torch.Tensor:
        loss = engine(batch).mean()
        engine.backward(loss)
        engine.step()
        return loss

    return step, {"optimized": optimized, "saved": list(engine.module.state_dict())}


def fsdp(module: DPOModule, world_size: int) -> tuple[Callable, dict]:
    """``module`` set up for FSDP as Lightning's ``fit`` does: its training step, and what the optimizer and the
    state dict hold of the reference."""
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
    wrapped = FullyShardedDataParallel(PairLosses(module), cpu_offload=strategy.cpu_offload,
                                       mixed_precision=strategy.mixed_precision_config,
                                       sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device,
                                       **strategy.kwargs)  # fmt: skip
    optimizer = module.build_optimizer()  # as configure_optimizers: adamw for the fp32 weights

    def step(batch: dict) -> torch.Tensor:
        loss = wrapped(batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step, {"optimized": reference_in(optimizer, module), "saved": list(wrapped.state_dict())}


class StepLosses(L.Callback):
    """The logged ``train/loss`` of each optimizer step, and whether the reference model was held during each."""

    def __init__(self):
        self.losses, self.held = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.held.append(module.reference_model is not None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def ddp(model_dir: str, pairs_file: str, learning_rate: float, world_size: int) -> dict:
    """Lightning's DDP fit: 1 pair a micro-batch, 2 accumulated, on each rank, the reference precomputed."""
    steps = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, accumulate_grad_batches=2,
                        logger=False, callbacks=[steps], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = PreferenceDataModule([{"name_or_path": pairs_file, "type": "preference_pairs"}], max_length=512,
                                batch_size=1, shuffle=False)  # fmt: skip
    module = DPOModule(model_dir, beta=0.5, learning_rate=learning_rate, schedule="constant", precompute_reference=True)
    trainer.fit(module, data)
    return {"losses": steps.losses, "held": steps.held}


def main(model_dir: str, pairs_file: str, batches_file: str, learning_rate: str, out_dir: str) -> None:
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    report = {"ddp": ddp(model_dir, pairs_file, float(learning_rate), world_size)}
    batches = torch.load(batches_file)
    for name, setup, sizes in (("deepspeed", zero3, partitions), ("fsdp", fsdp, shards)):
        module = DPOModule(model_dir, beta=0.5, learning_rate=float(learning_rate))
        step, holds = setup(module, world_size)
        created, losses = sizes(module.reference_model), []
        for index in range(rank, len(batches), world_size):
            total = step(batches[index]).detach().clone()
            torch.distributed.all_reduce(total)
            losses.append(total.item() / world_size)
        report[name] = {
            "created": created,
            "after": sizes(module.reference_model),
            "runs_in": type(module.reference_model).__name__,
            "losses": losses,
            "optimized": holds["optimized"],
            "saved": [name for name in holds["saved"] if "reference" in name],
            "saved_count": len(holds["saved"]),
        }
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
