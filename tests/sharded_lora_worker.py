"""LoRA steps under DeepSpeed ZeRO-3 or FSDP on CPU, then the adapter export, one rank of several (``python -m
torch.distributed.run``), for ``test_sharded_lora.py``.

ZeRO-3 is set up by ``zero3_worker.sharded_module``; FSDP as ``plugins/dpo/tests/dpo_sharded_worker.py`` does it
(Lightning's Trainer refuses FSDP on CPU), around the ``SFTModule`` itself so that its state dict is keyed as under
Lightning. The export is ``HFCheckpoint``'s own.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sharded_lora_worker.py \\
        deepspeed|fsdp MODEL_DIR BATCHES OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches: step ``s`` of rank ``r`` takes ``s * world_size + r``.
Writes the exports ``OUT_DIR/adapter`` and ``OUT_DIR/merged`` (``merge_lora``); from rank 0 ``OUT_DIR/initial.pt``
and ``OUT_DIR/trained.pt``, every weight of the model before and after the steps, gathered apart from the export;
and ``OUT_DIR/rank-N.json``: the step losses (means over every rank's loss tokens), the exports the rank wrote, and
how much of the model it held.
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
from lt_posttrain.callbacks import hf_export  # noqa: E402
from lt_posttrain.training.losses import token_cross_entropy_sum  # noqa: E402
from lt_posttrain.training.strategy import leave_process_group  # noqa: E402

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LEARNING_RATE = 1e-3  # that of zero3_worker.sharded_module


def zero3(model_dir: str) -> tuple[SFTModule, object, Callable, Callable, Callable]:
    """The module under ZeRO-3: ``(module, trainer, forward, step, gather)``; ``step(loss)`` backpropagates and
    steps, ``gather()`` is every weight of the model, whole, on every rank."""
    import deepspeed

    from zero3_worker import sharded_module

    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    module, strategy = sharded_module(model_dir, LORA)
    engine = strategy.deepspeed_engine

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    def gather() -> dict:
        with deepspeed.zero.GatheredParameters(list(module.model.parameters())):
            return {name: p.detach().clone() for name, p in module.model.named_parameters()}

    return module, module.trainer, engine, step, gather


def fsdp_wrapped(module: SFTModule, precision: str = "32-true", max_steps: int = -1) -> tuple[object, torch.nn.Module]:
    """``module`` configured, converted and wrapped as Lightning's ``FSDPStrategy.setup`` does under ``precision``
    (a CPU rank of an initialised process group): ``(trainer, wrapped)``, the trainer a stand-in that holds the
    strategy."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    world_size, plugin = int(os.environ["WORLD_SIZE"]), FSDPPrecision(precision)
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")] * world_size,
                            cluster_environment=TorchElasticEnvironment(), precision_plugin=plugin)  # fmt: skip
    strategy.set_world_ranks()
    module._trainer = trainer = SimpleNamespace(strategy=strategy, is_global_zero=strategy.is_global_zero,
                                                max_steps=max_steps)  # fmt: skip
    with strategy.model_sharded_context():
        module.configure_model()
    plugin.convert_module(module)
    strategy.model = wrapped = FullyShardedDataParallel(
        module, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device, **strategy.kwargs,
    )  # fmt: skip
    return trainer, wrapped


def fsdp_gathered(module: SFTModule, wrapped: torch.nn.Module) -> dict:
    """Every weight of ``module``'s model, whole, on every rank."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        named = module.model.named_parameters()
        return {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for name, p in named}


def optimizer_step(optimizer: torch.optim.Optimizer) -> Callable:
    """``step(loss)``: backpropagate ``loss``, step ``optimizer`` and zero the gradients."""

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def fsdp(model_dir: str) -> tuple[SFTModule, object, Callable, Callable, Callable]:
    """The module under FSDP, as :func:`zero3` returns it."""
    from lt_posttrain.training.optimizer import build_optimizer

    torch.distributed.init_process_group("gloo")
    module = SFTModule(model_dir, learning_rate=LEARNING_RATE, lora=LORA)
    trainer, wrapped = fsdp_wrapped(module)
    optimizer = build_optimizer("adamw", module.model, LEARNING_RATE, 0.0)  # as configure_optimizers
    return module, trainer, wrapped, optimizer_step(optimizer), lambda: fsdp_gathered(module, wrapped)


def sharded_steps(forward: Callable, step: Callable, batches: list[dict]) -> list[float]:
    """This rank's micro-batches (step ``s`` takes ``s * world_size + rank``), one optimizer step each; the step
    losses, means over every rank's loss tokens."""
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    losses = []
    for index in range(rank, len(batches), world_size):
        batch = batches[index]
        count = batch["loss_count"].clone()
        torch.distributed.all_reduce(count)
        share = token_cross_entropy_sum(forward(batch), batch["targets"]) / count
        step(share * world_size)  # the strategies average the gradients over the ranks
        total = share.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item())
    return losses


def one_process_steps(module: SFTModule, optimizer: torch.optim.Optimizer, batches: list[dict], ranks: int) -> list:
    """The steps of :func:`sharded_steps` in one process, each over the micro-batches of every rank: the losses."""
    losses = []
    for first in range(0, len(batches), ranks):
        group = batches[first : first + ranks]
        count = sum(batch["loss_count"] for batch in group)
        loss = sum(token_cross_entropy_sum(module(batch), batch["targets"]) for batch in group) / count
        optimizer_step(optimizer)(loss)
        losses.append(loss.item())
    return losses


def main(strategy_name: str, model_dir: str, batches_file: str, out_dir: str) -> None:
    rank, out, batches = int(os.environ["RANK"]), Path(out_dir), torch.load(batches_file)
    L.seed_everything(0)  # FSDP: every rank draws LoRA's A as the one-process run does
    module, trainer, forward, step, gather = {"deepspeed": zero3, "fsdp": fsdp}[strategy_name](model_dir)
    held = sum(p.numel() for p in module.model.parameters())
    initial = gather()
    losses = sharded_steps(forward, step, batches)
    trained = gather()
    if rank == 0:
        torch.save(initial, out / "initial.pt")
        torch.save(trained, out / "trained.pt")

    writes, export_hf = [], hf_export.export_hf

    def recorded_export(model, tokenizer, folder: Path, *args) -> Path:
        writes.append(folder.name)
        return export_hf(model, tokenizer, folder, *args)

    hf_export.export_hf = recorded_export
    for name, merge_lora in (("adapter", False), ("merged", True)):
        hf_export.HFCheckpoint(merge_lora=merge_lora)._export(trainer, module, out / name)
    full = sum(p.numel() for p in initial.values())
    report = {"losses": losses, "wrote": writes, "held": held, "full": full}
    (out / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
