"""The reference for bench/long_context.py: TRL 1.16's SFTTrainer with its long-context settings, the same search.

    python bench/long_context_trl.py CONFIG --samples SAMPLES.pt --out RESULTS.jsonl [--start 16384 --budget-s 400]

CONFIG: ``trl-8b-lora`` (Llama-3.1-8B shape, LoRA r=16 on a bf16 base) or ``trl-1b-full`` (Llama-3.2-1B shape, full
fine-tune, bf16 weights, torch's AdamW). TRL's best long-context settings: Liger kernels (``use_liger_kernel``),
gradient checkpointing, ``activation_offloading``, ``padding_free`` with BFD packing (each sample attends to itself
through the flash-attention kwargs), SDPA attention. The micro-batch of N tokens is the same packed row as ours:
the long samples of SAMPLES.pt back to back, cut to N tokens, given pre-tokenized (loss on every token: the memory
is the same). The model is built once (random weights, on the GPU) and wrapped with PEFT once; each trial is a new
SFTTrainer of one step on it.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from long_context import HostPeak, cap_gpu_memory, model_folder, packed_row  # noqa: E402

CONFIGS = {"trl-8b-lora": ("llama-3.1-8b", True), "trl-1b-full": ("llama-3.2-1b", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    parser.add_argument("--samples", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/lt-long-context-trl")
    parser.add_argument("--start", type=int, default=16384)
    parser.add_argument("--stop", type=int, default=2**21)
    parser.add_argument("--precision", type=float, default=0.05)
    parser.add_argument("--budget-s", type=float, default=400)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    shape, lora = CONFIGS[args.config]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(shape, Path(args.shared), work)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cap_gpu_memory()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    samples = torch.load(args.samples)["packed"]
    resident = round(torch.cuda.memory_allocated() / 2**30, 2)

    def trial(tokens: int) -> dict:
        from datasets import load_dataset

        rows = Path(tempfile.mkdtemp(dir=work)) / "rows.jsonl"
        with open(rows, "w") as file:
            for sample in packed_row(samples, tokens):
                file.write(json.dumps({"input_ids": sample["input_ids"]}) + "\n")
        dataset = load_dataset("json", data_files=str(rows), split="train")
        config = SFTConfig(output_dir=str(work / "out"), max_steps=1, per_device_train_batch_size=1, bf16=True,
                           learning_rate=1e-5, gradient_checkpointing=True, use_liger_kernel=True,
                           activation_offloading=True, padding_free=True, packing=True, packing_strategy="bfd",
                           max_length=tokens, report_to=[], save_strategy="no", logging_steps=1,
                           dataset_num_proc=1, max_grad_norm=1.0, dataloader_num_workers=0)  # fmt: skip
        result = {"tokens": tokens}
        try:
            trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with HostPeak() as host:
                trainer.train()
            torch.cuda.synchronize()
            result.update(fits=True, step_s=round(time.perf_counter() - start, 2), host_peak_gib=round(host.peak / 2**30, 2),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))  # fmt: skip
        except torch.OutOfMemoryError as error:
            result.update(fits=False, error=str(error).splitlines()[0][:160])
        trainer = None
        gc.collect()
        torch.cuda.empty_cache()
        result.update(config=args.config, shape=shape, kind="search", resident_gib=resident,
                      options={"lora": {"r": 16}} if lora else {})
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        return result

    started, trials, fits, fails, tokens = time.perf_counter(), [], 0, None, args.start
    while tokens <= args.stop and time.perf_counter() - started < args.budget_s:
        trials.append(trial(tokens))
        if not trials[-1]["fits"]:
            fails = tokens
            break
        fits, tokens = tokens, tokens * 2
    while fails and fits and fails / fits > 1 + args.precision and time.perf_counter() - started < args.budget_s:
        middle = (fits + fails) // 2 // 1024 * 1024
        trials.append(trial(middle))
        fits, fails = (middle, fails) if trials[-1]["fits"] else (fits, middle)
    summary = {"config": args.config, "shape": shape, "options": {"lora": {"r": 16}} if lora else {},
               "kind": "longest", "longest": fits, "first_failing": fails, "trials": len(trials),
               "seconds": round(time.perf_counter() - started), "resident_gib": resident,
               "peak_gib": max((t.get("peak_gib", 0) for t in trials if t["fits"]), default=None),
               "host_peak_gib": max((t.get("host_peak_gib", 0) for t in trials if t["fits"]), default=None)}  # fmt: skip
    print("LONGEST " + json.dumps(summary), flush=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
