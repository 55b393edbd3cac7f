"""DeepSpeed ZeRO-3 on CPU, one rank of several (``python -m torch.distributed.run``), for the sharded-export tests.

Lightning's DeepSpeed strategy runs on CUDA only, so this does by hand what its ``fit`` does before training: the
real ``DeepSpeedStrategy`` config, ``SFTModule.configure_model`` inside the strategy's ``model_sharded_context``
(``deepspeed.zero.Init``), then ``deepspeed.initialize`` with the module's own optimizer. The Hugging Face export is
then gathered from the partitions and written by rank 0, as ``HFCheckpoint`` does; and the full model answers three
prompts as the validation answers are generated (each rank its share, in lockstep).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/zero3_worker.py MODEL_DIR OUT_DIR

writes ``OUT_DIR/full`` (a full fine-tune's export) and ``OUT_DIR/lora`` (a LoRA adapter's), and
``OUT_DIR/rank-N.json`` with what each rank held and the answers.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import lightning as L  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

from conftest import gsm8k_chats  # noqa: E402
from lt_posttrain import SFTModule  # noqa: E402
from lt_posttrain.callbacks.validation_answers import answer_prompts  # noqa: E402
from lt_posttrain.data.prompts import prompt_of  # noqa: E402
from lt_posttrain.model.export import export_hf  # noqa: E402
from lt_posttrain.model.lora import is_peft_model  # noqa: E402
from lt_posttrain.training.sharding import gather_state_dict  # noqa: E402
from lt_posttrain.training.strategy import leave_process_group, prepare_strategy  # noqa: E402


def sharded_module(model_dir: str, lora) -> tuple[SFTModule, DeepSpeedStrategy]:
    """An ``SFTModule`` configured and wrapped by DeepSpeed as a ZeRO-3 ``fit`` would, and its strategy."""
    world_size = int(os.environ["WORLD_SIZE"])
    strategy = DeepSpeedStrategy(stage=3)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    prepare_strategy(strategy, micro_batch_size=1)
    strategy.set_world_ranks()
    module = SFTModule(model_dir, learning_rate=1e-3, lora=lora)
    module.trainer = trainer
    strategy.connect(module)
    with strategy.model_sharded_context():
        module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    # Lightning passes the GPU index as args.device_rank, which a CPU rank does not have.
    engine, *_ = deepspeed.initialize(model=module, model_parameters=trainable, optimizer=optimizer,
                                      config=strategy.config, dist_init_required=False)  # fmt: skip
    strategy.model = engine
    return module, strategy


def export(module: SFTModule, strategy: DeepSpeedStrategy, folder: Path) -> dict:
    """Gather and write ``module``'s model as ``HFCheckpoint`` does; what this rank held, for the test to check."""
    held = {name: list(parameter.shape) for name, parameter in module.model.named_parameters()}
    state = gather_state_dict(strategy, trainable_only=is_peft_model(module.model))
    if strategy.global_rank == 0:
        export_hf(module.model, module.tokenizer, folder, state_dict=state, max_shard_size=2_000_000)
    strategy.barrier()
    return {"held": held, "gathered": sorted(state)}


def answers(module: SFTModule, strategy: DeepSpeedStrategy) -> list[dict]:
    """Three GSM8K prompts answered (greedy, six tokens) by the partitioned model, as the validation answers are:
    two by rank 0 and one by rank 1, which repeats a prompt to call ``generate`` as often as rank 0 (each step of
    generation gathers the weights with every rank); every rank gets all three answers."""
    prompts = [prompt_of(chat["messages"], module.tokenizer) for chat in gsm8k_chats(3)]
    module.model.eval()
    return answer_prompts(module.model, module.tokenizer, prompts, strategy.global_rank, strategy.world_size,
                          max_new_tokens=6, batch_size=1, synced=True)  # fmt: skip


def main(model_dir: str, out_dir: str) -> None:
    # The shared-memory all-reduce is an optional op that DeepSpeed would compile first (minutes); gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    out = Path(out_dir)
    report = {}
    for name, lora in (("full", None), ("lora", {"r": 4, "alpha": 8, "dropout": 0.0})):
        module, strategy = sharded_module(model_dir, lora)
        report[name] = export(module, strategy, out / name)
        if name == "full":
            report["answers"] = answers(module, strategy)
    (out / f"rank-{strategy.global_rank}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
