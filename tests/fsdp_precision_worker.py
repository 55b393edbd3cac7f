"""A full fine-tune of bf16 weights under FSDP on CPU ranks, with the optimizer that ``model.optimizer`` picks, one rank
of several (``python -m torch.distributed.run``), for ``test_precision.py``.

Set up as Lightning's ``FSDPStrategy.setup`` does under ``trainer.precision: bf16-true`` (the module converted to
bf16, then wrapped; Lightning's Trainer refuses FSDP on CPU, so the wrapping is done here as in
``sharded_lora_worker.py``), and the optimizer from ``SFTModule.configure_optimizers`` over the sharded weights.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_precision_worker.py \\
        OPTIMIZER MODEL_DIR BATCHES LEARNING_RATE OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches: step ``s`` of rank ``r`` takes ``s * world_size + r``.
Rank 0 writes ``OUT_DIR/trained.pt`` (every weight after the steps, gathered) and ``OUT_DIR/report.json`` (the
optimizer's class and the step losses, means over every rank's loss tokens).
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from lt_posttrain import SFTModule
from lt_posttrain.strategies import leave_process_group
from lt_posttrain.trainers.losses import token_cross_entropy_sum


def main(optimizer_name: str, model_dir: str, batches_file: str, learning_rate: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    batches = torch.load(batches_file)
    precision = FSDPPrecision("bf16-true")
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")] * world_size,
                            cluster_environment=TorchElasticEnvironment(), precision_plugin=precision)  # fmt: skip
    strategy.set_world_ranks()
    module = SFTModule(model_dir, learning_rate=float(learning_rate), schedule="constant", optimizer=optimizer_name)
    module._trainer = SimpleNamespace(strategy=strategy, max_steps=len(batches) // world_size)
    with strategy.model_sharded_context():
        module.configure_model()
    module = precision.convert_module(module)
    wrapped = FullyShardedDataParallel(
        module, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device, **strategy.kwargs,
    )  # fmt: skip
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for index in range(rank, len(batches), world_size):
        batch = batches[index]
        count = batch["loss_count"].clone()
        torch.distributed.all_reduce(count)
        share = token_cross_entropy_sum(wrapped(batch).float(), batch["targets"]) / count
        (share * world_size).backward()  # FSDP averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        total = share.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item())
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        named = module.model.named_parameters()
        trained = {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for name, p in named}
    if rank == 0:
        torch.save(trained, Path(out_dir) / "trained.pt")
        kind = type(optimizer)
        report = {"optimizer": f"{kind.__module__}.{kind.__name__}", "losses": losses}
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
