"""A full fine-tune of bf16 weights under FSDP on CPU ranks, with the optimizer that ``model.optimizer`` picks, one rank
of several (``python -m torch.distributed.run``), for ``test_sharded_precision.py``.

Set up as Lightning's ``FSDPStrategy.setup`` does under ``trainer.precision: bf16-true`` (the module converted to
bf16, then wrapped: ``sharded_lora_worker.fsdp_wrapped``), and the optimizer from ``SFTModule.configure_optimizers``
over the sharded weights.

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

import torch

from lt_posttrain import SFTModule
from lt_posttrain.training.strategy import leave_process_group
from sharded_lora_worker import fsdp_gathered, fsdp_wrapped, optimizer_step, sharded_steps


def main(optimizer_name: str, model_dir: str, batches_file: str, learning_rate: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    batches = torch.load(batches_file)
    module = SFTModule(model_dir, learning_rate=float(learning_rate), schedule="constant", optimizer=optimizer_name)
    _, wrapped = fsdp_wrapped(module, "bf16-true", max_steps=len(batches) // int(os.environ["WORLD_SIZE"]))
    optimizer = module.configure_optimizers()["optimizer"]
    losses = sharded_steps(wrapped, optimizer_step(optimizer), batches)
    trained = fsdp_gathered(module, wrapped)
    if int(os.environ["RANK"]) == 0:
        torch.save(trained, Path(out_dir) / "trained.pt")
        kind = type(optimizer)
        report = {"optimizer": f"{kind.__module__}.{kind.__name__}", "losses": losses}
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
