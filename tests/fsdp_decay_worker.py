"""One rank of two (``python -m torch.distributed.run``): the weight-decay groups of a tiny Llama before and after
FSDP flattens it (as Lightning's FSDPStrategy wraps it: ``use_orig_params``, a unit per decoder layer), for
``test_fsdp_weight_decay.py``. Prints ``GROUPS {"before": [...], "after": [...]}`` (the names given weight decay)."""

import json
import sys

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import AutoModelForCausalLM

from lt_posttrain.model.optim import decay_groups
from lt_posttrain.model.sharding import WRAPPER_PREFIXES, fit_to_strategy


def decayed(model: torch.nn.Module) -> list[str]:
    ids = {id(p) for p in decay_groups(model, 0.1)[0]["params"]}
    return sorted(WRAPPER_PREFIXES.sub("", name) for name, p in model.named_parameters() if id(p) in ids)


def main(model_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = decayed(model)
    strategy = FSDPStrategy()
    fit_to_strategy(model, strategy, fused_loss=False)  # records the full shapes, sets the wrap policy
    FullyShardedDataParallel(model, device_id=torch.device("cpu"), **strategy.kwargs)
    assert all(p.ndim == 1 for p in model.parameters())  # flattened shards
    print("GROUPS " + json.dumps({"before": before, "after": decayed(model)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
