"""One rank of two (``python -m torch.distributed.run``): what depends on a tiny Llama's weight shapes, before and
after FSDP flattens them (as Lightning's FSDPStrategy wraps it: ``use_orig_params``, a unit per decoder layer), for
``test_fsdp_full_shapes.py``. Writes ``OUT/rank<N>.json`` = ``{"before": [...], "after": [...], "matmul_before": N,
"matmul_after": N}``: the names given weight decay and the throughput meter's matrix-product parameter count (a file
per rank: two ranks printing to one pipe can interleave their lines)."""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import AutoModelForCausalLM

from lt_posttrain.callbacks.throughput import matmul_parameters
from lt_posttrain.training.optimizer import decay_groups
from lt_posttrain.training.sharding import WRAPPER_PREFIXES, fit_to_strategy
from lt_posttrain.training.strategy import leave_process_group


def decayed(model: torch.nn.Module) -> list[str]:
    ids = {id(p) for p in decay_groups(model, 0.1)[0]["params"]}
    return sorted(WRAPPER_PREFIXES.sub("", name) for name, p in model.named_parameters() if id(p) in ids)


def main(model_dir: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before, matmul_before = decayed(model), matmul_parameters(model)
    strategy = FSDPStrategy()
    fit_to_strategy(model, strategy, fused_loss=False)  # records the full shapes, sets the wrap policy
    FullyShardedDataParallel(model, device_id=torch.device("cpu"), **strategy.kwargs)
    assert all(p.ndim == 1 for p in model.parameters())  # flattened shards
    report = {"before": before, "after": decayed(model), "matmul_before": matmul_before,
              "matmul_after": matmul_parameters(model)}  # fmt: skip
    Path(out, f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
