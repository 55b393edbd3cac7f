"""KTO steps on two CPU ranks under DDP, DeepSpeed ZeRO-3 and FSDP, one after the other in one launch
(``python -m torch.distributed.run``), the reference another model so that the KL estimate is not 0.

DDP is Lightning's own ``fit`` (launched by torchrun, Lightning runs it in place): 1 answer a micro-batch, 2
micro-batches accumulated, 2 ranks, so a step's KL estimate is summed over 2 micro-batches on each of 2 ranks.
Lightning runs ZeRO-3 and FSDP on CUDA only, so for those this does by hand what its ``fit`` does (as
``plugins/dpo/tests/dpo_sharded_worker.py``): the real strategy object, ``configure_model`` inside the strategy's
``model_sharded_context``, the model wrapped around a module whose forward gives this rank's share of the step's
mean loss (the KL estimate summed over ranks inside it, as in ``fit``).

    python -m torch.distributed.run --standalone --nproc_per_node 2 kto_sharded_worker.py \\
        MODEL_DIR REFERENCE_DIR ROWS_FILE BATCHES LEARNING_RATE OUT_DIR

``BATCHES`` is a ``torch.save``'d list of micro-batches for ZeRO-3 and FSDP: step ``s`` of rank ``r`` takes
``s * world_size + r``, each the first of its step on its rank, with the step's mismatched sequences. Writes
``OUT_DIR/rank-N.json``: per strategy, the step losses (means over every rank's answers) and KL estimates, and how many
of the reference's weights the optimizer holds.
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
from lt_posttrain_kto import KTOModule, UnpairedPreferenceDataModule  # noqa: E402


class StepShare(torch.nn.Module):
    """What the strategy wraps: the module, whose forward gives this rank's share of the step's mean answer loss (and
    the step's KL estimate)."""

    def __init__(self, module: KTOModule):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        answers = batch["step_loss_count"].clone().float()
        torch.distributed.all_reduce(answers)
        losses, _, kl = self.module.answer_losses(batch, training=True)
        return losses.sum() / answers, kl


def kto(model_dir: str, reference_dir: str, learning_rate: float) -> KTOModule:
    return KTOModule(model_dir, reference_name_or_path=reference_dir, beta=0.5, learning_rate=learning_rate,
                     schedule="constant")  # fmt: skip


def reference_in(optimizer: torch.optim.Optimizer, module: KTOModule) -> int:
    reference = {id(parameter) for parameter in module.reference_model.parameters()}
    return sum(id(parameter) in reference for group in optimizer.param_groups for parameter in group["params"])


class StepLosses(L.Callback):
    """The logged ``train/loss`` and ``train/kl`` of each optimizer step."""

    def __init__(self):
        self.losses, self.kls = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.kls.append(float(module._step_kl))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def ddp(model_dir: str, reference_dir: str, rows_file: str, learning_rate: float, world_size: int) -> dict:
    """Lightning's DDP fit: 1 answer a micro-batch, 2 accumulated, on each rank."""
    steps = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, accumulate_grad_batches=2,
                        logger=False, callbacks=[steps], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = UnpairedPreferenceDataModule([{"name_or_path": rows_file, "type": "labelled_completions"}], max_length=512,
                                        batch_size=1, shuffle=False)  # fmt: skip
    trainer.fit(kto(model_dir, reference_dir, learning_rate), data)
    return {"losses": steps.losses, "kls": steps.kls}


def zero3(module: KTOModule, world_size: int):
    """``module`` set up for ZeRO-3 as Lightning's ``fit`` does: its training step, and the reference weights its
    optimizer holds."""
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
    optimized = reference_in(optimizer, module)  # before DeepSpeed swaps the weights for its partitions
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    # Lightning passes the GPU index as args.device_rank, which a CPU rank does not have.
    engine, *_ = deepspeed.initialize(model=StepShare(module), model_parameters=trainable, optimizer=optimizer,
                                      config=strategy.config, dist_init_required=False)  # fmt: skip

    def step(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        share, kl = engine(batch)
        engine.backward(share * world_size)  # the engine averages the gradients over ranks
        engine.step()
        return share, kl

    return step, optimized


def fsdp(module: KTOModule, world_size: int):
    """``module`` set up for FSDP as Lightning's ``fit`` does: its training step, and the reference weights its
    optimizer holds."""
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

    def step(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        share, kl = wrapped(batch)
        (share * world_size).backward()  # FSDP averages the gradients over ranks
        optimizer.step()
        optimizer.zero_grad()
        return share, kl

    return step, reference_in(optimizer, module)


def main(model_dir: str, reference_dir: str, rows_file: str, batches_file: str, learning_rate: str,
         out_dir: str) -> None:  # fmt: skip
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    report = {"ddp": ddp(model_dir, reference_dir, rows_file, float(learning_rate), world_size)}
    batches = torch.load(batches_file)
    for name, setup in (("deepspeed", zero3), ("fsdp", fsdp)):
        module = kto(model_dir, reference_dir, float(learning_rate))
        (step, optimized), losses, kls = setup(module, world_size), [], []
        for index in range(rank, len(batches), world_size):
            share, kl = step(batches[index])
            share = share.detach().clone()
            torch.distributed.all_reduce(share)
            losses.append(share.item())
            kls.append(float(kl))
        report[name] = {"losses": losses, "kls": kls, "optimized": optimized,
                        "runs_in": type(module.reference_model).__name__}  # fmt: skip
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
