"""QLoRA and Liger kernels on a Llama-3.2-1B-shaped model (random weights), on one CUDA GPU: the loss, peak memory
and tokens/s of a few training steps per configuration, as a markdown table.

    pip install -e '.[liger,qlora]'          # peft, bitsandbytes, liger-kernel
    python bench/model_options.py [--tokenizer ../shared/assets/smollm2-tokenizer] [--steps 12] [--seq 2048]

Every configuration is a recipe run through the public API (``lt_posttrain.run``), each in its own process (fresh
GPU memory; Liger patches transformers' Llama module for the whole process):

- ``lora``: bf16 base, LoRA r=16 on every linear layer, AdamW, gradient checkpointing, bf16 autocast;
- ``qlora``: the same on a 4-bit NF4 base (double quantisation, bf16 compute) with paged 8-bit AdamW;
- ``qlora_liger``: ``qlora`` with Liger's kernels, the fused linear cross-entropy included (no logits tensor);
- ``liger_off`` / ``liger_on``: full fine-tune in bf16 (weights and AdamW states), gradient checkpointing, without
  and with Liger (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy). Same weights, seed and batches, so the first
  step's loss (before any update) must agree within bf16 tolerance.

Data: ``configs/data/arithmetic_chats.jsonl`` packed into rows of ``--seq`` tokens, ``--micro-batch`` rows a step;
tokens/s counts non-padding tokens after the throughput meter's warm-up steps.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / "configs" / "data" / "arithmetic_chats.jsonl"
TOKENIZER = REPO.parent / "shared" / "assets" / "smollm2-tokenizer"
SHAPE = "llama-3.2-1b"
BF16_TOLERANCE = 1e-2  # relative: a bf16 mantissa holds ~3 significant digits

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
QLORA = {
    "dtype": "bfloat16",
    "lora": LORA,
    "load_in_4bit": True,
    "optimizer": "paged_adamw_8bit",
    "learning_rate": 2e-4,
}
CASES = {
    "lora": ("bf16 base + LoRA r=16, AdamW", "bf16-mixed",
             {"dtype": "bfloat16", "lora": LORA, "learning_rate": 2e-4}),
    "qlora": ("4-bit NF4 base + LoRA r=16, paged AdamW 8-bit", "bf16-mixed", QLORA),
    "qlora_liger": ("4-bit NF4 base + LoRA r=16, paged AdamW 8-bit, Liger", "bf16-mixed", {**QLORA, "liger": True}),
    "liger_off": ("full fine-tune, bf16", "bf16-true", {"dtype": "bfloat16", "learning_rate": 1e-5}),
    "liger_on": ("full fine-tune, bf16, Liger", "bf16-true", {"dtype": "bfloat16", "learning_rate": 1e-5, "liger": True}),
}  # fmt: skip


def run_case(args) -> dict:
    """One configuration through ``lt_posttrain.run``; returns its losses, peak memory and throughput."""
    import torch

    from lt_posttrain import run
    from lt_posttrain.callbacks.throughput import ThroughputMeter
    from lt_posttrain.model.parameters import parameter_counts

    title, precision, model = CASES[args.case]
    work = Path(tempfile.mkdtemp(prefix=f"lt-model-options-{args.case}-"))
    recipe = {
        "seed_everything": 0,
        "model": {"name_or_path": args.model, "warmup": 0, "schedule": "constant", "gradient_checkpointing": True,
                  **model},
        "data": {"sources": [str(DATA)], "max_length": args.seq, "batch_size": args.micro_batch, "packing": True,
                 "val_fraction": 0},
        "trainer": {"accelerator": "gpu", "devices": 1, "precision": precision, "max_steps": args.steps,
                    "max_epochs": -1, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_checkpointing": False, "default_root_dir": str(work),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(work)}}},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"warmup_steps": 3},
    }  # fmt: skip
    cli = run(recipe, "fit")
    [meter] = [callback for callback in cli.trainer.callbacks if isinstance(callback, ThroughputMeter)]
    with open(next(work.rglob("metrics.csv"))) as metrics:
        losses = [float(row["train/loss"]) for row in csv.DictReader(metrics) if row.get("train/loss")]
    trainable, total = parameter_counts(cli.model.model)
    return {
        "case": args.case, "title": title, "precision": precision, "losses": losses,
        "peak_gib": round(meter.summary["peak_gib"], 2), "tokens_per_s": round(meter.summary["tokens_per_s"]),
        "trainable": trainable, "total": total, "liger_kernels": cli.model.liger_kernels,
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }  # fmt: skip


def run_in_process(case: str, model_dir: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--model", str(model_dir),
               "--steps", str(args.steps), "--seq", str(args.seq), "--micro-batch", str(args.micro_batch)]  # fmt: skip
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    found = [line[len("RESULT ") :] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not found:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case, "title": CASES[case][0], "error": tail}
    return json.loads(found[-1])


def markdown(results: list[dict]) -> str:
    """The table of every configuration, then the Liger on/off loss comparison."""
    rows = ["| configuration | precision | trainable params | loss, step 1 | loss, last step | peak GiB | tokens/s |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        if "error" in result:
            rows.append(f"| {result['title']} | failed: {result['error']} | | | | | |")
            continue
        kernels = f" ({', '.join(result['liger_kernels'])})" if result["liger_kernels"] else ""
        losses = result["losses"]
        rows.append(
            f"| {result['title']}{kernels} | {result['precision']} | {result['trainable'] / 1e6:,.1f} M of "
            f"{result['total'] / 1e6:,.0f} M | {losses[0]:.4f} | {losses[-1]:.4f} ({len(losses)} steps) | "
            f"{result['peak_gib']} | {result['tokens_per_s']:,} |"
        )
    by_case = {result["case"]: result for result in results if "error" not in result}
    if "liger_off" in by_case and "liger_on" in by_case:
        off, on = by_case["liger_off"]["losses"], by_case["liger_on"]["losses"]
        relative = abs(on[0] - off[0]) / abs(off[0])
        verdict = "within" if relative <= BF16_TOLERANCE else "OUTSIDE"
        steps = min(len(on), len(off))
        drift = max(abs(a - b) / abs(b) for a, b in zip(on[:steps], off[:steps]))
        rows += ["", f"Liger on vs off, step 1 (same weights and batch): {on[0]:.4f} vs {off[0]:.4f}, relative "
                 f"difference {relative:.1e}: {verdict} bf16 tolerance ({BF16_TOLERANCE:.0e}); largest over "
                 f"{steps} steps {drift:.1e}."]  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer folder saved with the random model")
    parser.add_argument("--work", default=None, help="where the random model is saved (default: a temporary folder)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one configuration, in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return

    import torch

    from random_model import main as save_random_model

    if not torch.cuda.is_available():
        sys.exit("bench/model_options.py needs a CUDA GPU")
    model_dir = Path(args.work or tempfile.mkdtemp(prefix="lt-model-options-")) / f"{SHAPE}-random"
    if not (model_dir / "config.json").exists():
        save_random_model(SHAPE, args.tokenizer, str(model_dir))
    results = [run_in_process(case, model_dir, args) for case in args.cases]
    for result in results:
        print(json.dumps(result))
    print()
    print(
        f"{torch.cuda.get_device_name()}, {SHAPE} shape (random weights), {args.micro_batch} x {args.seq} tokens a step"
    )
    print()
    print(markdown(results))


if __name__ == "__main__":
    main()
