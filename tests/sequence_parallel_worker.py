"""SFT steps with ``model.sequence_parallel`` 2 and every ``model.long_context`` option on two CPU ranks under
DeepSpeed ZeRO-3 and FSDP, one after the other in one launch (``python -m torch.distributed.run``), for
``test_sequence_parallel.py``. Each strategy is set up by hand as ``long_context_worker.py`` sets it up (Lightning
refuses both on a CPU), with the module built for sequence parallelism; both ranks take the same packed row each step
and keep their halves of it (``shard_row``), the attention split over them (``UlyssesAttention``).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sequence_parallel_worker.py \\
        MODEL_DIR BATCHES OUT_DIR

``BATCHES`` is a ``torch.save``'d list of packed micro-batches, one a step. Writes ``OUT_DIR/rank-N.json``: per
strategy, the step losses (the sum of the ranks' parts over the row's loss tokens).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import long_context_worker  # noqa: E402
from lt_posttrain import SFTModule  # noqa: E402
from lt_posttrain.testing import leave_process_group  # noqa: E402
from lt_posttrain.training.sequence_parallel import SequenceParallel, UlyssesAttention, shard_row  # noqa: E402

SIZE = 2


def new_module(model_dir: str) -> SFTModule:
    return SFTModule(model_dir, learning_rate=long_context_worker.LEARNING_RATE,
                     long_context=long_context_worker.LONG_CONTEXT, sequence_parallel=SIZE)  # fmt: skip


STRATEGIES = ("deepspeed_stage_3", "fsdp")


def main(model_dir: str, batches_file: str, out_dir: str) -> None:
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see long_context_worker.py
    deepspeed.init_distributed("gloo")
    long_context_worker.new_module = new_module  # the strategies' set-up builds this module
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    parallel = SequenceParallel.start(SIZE)
    UlyssesAttention(AutoConfig.from_pretrained(model_dir), parallel).install()
    batches = torch.load(batches_file)
    report = {}
    for name in STRATEGIES:
        L.seed_everything(0)
        step, losses = long_context_worker.STRATEGIES[name](model_dir, world_size), []
        for batch in batches:
            count = batch["loss_count"].clone().float()  # the row's: the same on both ranks
            total = step(shard_row(batch, parallel.rank, SIZE, pad_id=0), count).detach().clone()
            torch.distributed.all_reduce(total)
            losses.append(total.item())
        report[name] = losses
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
