"""Preference training speed on a GPU: our trainers beside TRL's on the same rows, each run in its own process.

    python bench/preference.py suite --shared DIR --out RESULTS.jsonl [--runs ours-kto trl-kto ...]
    python bench/preference.py run NAME --shared DIR [--shape llama-3.2-1b --steps 30 ...]   # prints RESULT {...}
    python bench/preference.py table RESULTS.jsonl            # the markdown table for BENCHMARKS.md

DIR holds ``data/gsm8k_train.jsonl`` and ``assets/smollm2-tokenizer`` (the repository's ../shared, or a copy of it).
The model is a random-weight model of a real shape (``bench/random_model.py``) saved once and loaded by every run; bf16
weights, plain AdamW (torch's), gradient checkpointing, Liger's RMSNorm, RoPE and SwiGLU kernels where both sides
allow them (``--liger 0`` for none). The rows are GSM8K chats: for KTO, a question with its worked answer (desirable)
or, every third row, the next problem's (undesirable); for DPO, a question with its worked answer (chosen) and the
next problem's (rejected), about 214 tokens a sequence, 430 a pair. TRL's DPOTrainer refuses Liger's fused
cross-entropy and computes the log-probabilities with its own chunked LM head; ours come from the hidden states a
tile of answer tokens at a time: neither side holds the ``[tokens, vocab]`` logits.

Both sides are timed the same way: from the end of the warm-up steps to the end of the last step (the GPU
synchronised at both ends), counting the rows and the non-padding tokens of the training sequences (not the
mismatched sequences of KTO's KL estimate, which both sides run as well); peak GPU memory is read at the end, counted
from the start of training (both frozen reference models included).

A trainer is a set of runs in :data:`RUNS`: a function that takes the parsed options and returns the result, and
the rows it trains on (:data:`ROWS`). Another trainer (DPO) adds its ``ours-dpo``/``trl-dpo`` runs and rows writer.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = Path(tempfile.gettempdir()) / "lt-preference-bench"


# -- rows -------------------------------------------------------------------------------------------------------
def kto_rows(shared: Path, out: Path, count: int) -> Path:
    """``{"prompt", "completion", "label"}`` rows in TRL's conversational form, which ``type: labelled_completions``
    reads as well."""
    with open(shared / "data" / "gsm8k_train.jsonl") as file:
        rows = [json.loads(line) for _, line in zip(range(count + 1), file)]
    with open(out, "w") as file:
        for n, (row, following) in enumerate(zip(rows, rows[1:])):
            answer = following["answer"] if n % 3 == 1 else row["answer"]
            file.write(json.dumps({"prompt": [{"role": "user", "content": row["question"]}],
                                   "completion": [{"role": "assistant", "content": answer}],
                                   "label": n % 3 != 1}) + "\n")  # fmt: skip
    return out


def dpo_rows(shared: Path, out: Path, count: int) -> Path:
    """``{"prompt", "chosen", "rejected"}`` rows in TRL's conversational form, which ``type: preference_pairs`` reads
    as well: a question, its worked answer and the next problem's."""
    with open(shared / "data" / "gsm8k_train.jsonl") as file:
        rows = [json.loads(line) for _, line in zip(range(count + 1), file)]
    with open(out, "w") as file:
        for row, following in zip(rows, rows[1:]):
            pair = {"prompt": [{"role": "user", "content": row["question"]}],
                    "chosen": [{"role": "assistant", "content": row["answer"]}],
                    "rejected": [{"role": "assistant", "content": following["answer"]}]}  # fmt: skip
            file.write(json.dumps(pair) + "\n")
    return out


ROWS = {"kto": kto_rows, "dpo": dpo_rows}


# -- the clock ----------------------------------------------------------------------------------------------------
class StepClock:
    """Rows and tokens per second from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.rows, self.tokens, self.end = warmup, None, 0, 0, None

    def step_end(self, step: int, rows: int, tokens: int, last: bool) -> None:
        if step == self.warmup:
            _synchronize()
            self.start = time.perf_counter()
        elif step > self.warmup:
            self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        if last:
            _synchronize()
            self.end = time.perf_counter()

    def result(self) -> dict:
        import torch

        seconds = self.end - self.start
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        return {"measured_steps_s": round(seconds, 2), "rows_per_s": round(self.rows / seconds, 1),
                "tokens_per_s": round(self.tokens / seconds), "peak_mem_gib": peak}  # fmt: skip


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class LightningStepClock(L.Callback):
    """:class:`StepClock` for a Lightning run: the rows and tokens of each training micro-batch."""

    def __init__(self, warmup: int = 5):
        self.clock, self.rows, self.tokens = StepClock(warmup), 0, 0

    def on_train_start(self, trainer, module) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows += int(batch["loss_count"])
        self.tokens += int(batch["num_tokens"])
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.clock.step_end(trainer.global_step, self.rows, self.tokens, trainer.global_step == trainer.max_steps)
            self.rows = self.tokens = 0


# -- runs ---------------------------------------------------------------------------------------------------------
def ours_kto(args) -> dict:
    rows = kto_rows(Path(args.shared), WORK / "kto_rows.jsonl", args.rows_per_step * (args.steps + 2) * 2)
    return ours(args, "kto", "unpaired_preference", "labelled_completions", rows, args.rows_per_step, {})


def trl_kto(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    rows = kto_rows(Path(args.shared), WORK / "kto_rows.jsonl", args.rows_per_step * (args.steps + 2) * 2)
    dataset = load_dataset("json", data_files=str(rows), split="train")  # from_list breaks there (NOTES.md)
    models = [AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
              for _ in range(2)]  # fmt: skip
    config = KTOConfig(output_dir=str(WORK / "trl"), max_steps=args.steps, per_device_train_batch_size=args.rows_per_step,
                       bf16=args.accelerator == "gpu", use_cpu=args.accelerator == "cpu", learning_rate=5e-7, lr_scheduler_type="constant", logging_steps=5, beta=0.1,
                       gradient_checkpointing=True, max_length=args.max_length, use_liger_kernel=bool(args.liger),
                       report_to=[], save_strategy="no", dataset_num_proc=8, dataloader_num_workers=2)  # fmt: skip
    clock = StepClock(args.warmup)

    class Clock(TrainerCallback):
        tokens = 0

        def on_step_end(self, arguments, state, control, **kwargs):
            tokens, self.tokens = trainer._total_train_tokens - self.tokens, trainer._total_train_tokens
            clock.step_end(state.global_step, arguments.per_device_train_batch_size, tokens,
                           state.global_step == arguments.max_steps)  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    trainer = KTOTrainer(model=models[0], ref_model=models[1], args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[Clock()])  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"system": "trl", "trainer": "kto", "layout": "padded", **clock.result(),
            "final_loss": round(losses[-1], 4) if losses else None}


def ours_dpo(args) -> dict:
    rows = dpo_rows(Path(args.shared), WORK / "dpo_rows.jsonl", args.pairs_per_step * (args.steps + 2) * 2)
    result = ours(args, "dpo", "preference", "preference_pairs", rows, args.pairs_per_step,
                  {"precompute_reference": bool(args.precompute)})  # fmt: skip
    return {**result, "precompute": bool(args.precompute)}


def ours(args, trainer: str, data: str, source_type: str, rows: Path, per_step: int, options: dict) -> dict:
    """One fit of our ``trainer`` (short name) on ``rows`` through the public API, as a recipe would run it."""
    from lt_posttrain import run

    model = {"name_or_path": args.model_dir, "dtype": "bfloat16", "learning_rate": 5e-7, "warmup": 0,
             "schedule": "constant", "optimizer": "adamw", "gradient_checkpointing": True, "beta": 0.1,
             **options}  # fmt: skip
    if args.liger:
        model["liger"] = {"rms_norm": True, "rope": True, "swiglu": True}
    packed = args.layout == "packed"
    recipe = {
        "seed_everything": 0,
        "model": {"class_path": trainer, "init_args": model},
        "data": {"class_path": data, "init_args": {
            "sources": [{"name_or_path": str(rows), "type": source_type}], "shuffle": False,
            "max_length": args.pack_tokens if packed else args.max_length, "packing": packed,
            "batch_size": 1 if packed else per_step, "num_workers": 2, "num_proc": 8}},
        "trainer": {"accelerator": args.accelerator, "devices": 1, "precision": "bf16-true", "max_steps": args.steps,
                    "gradient_clip_val": 1.0, "logger": False, "enable_progress_bar": False,
                    "enable_checkpointing": False, "default_root_dir": str(WORK / "runs"),
                    "callbacks": [{"class_path": "preference.LightningStepClock", "init_args": {"warmup": args.warmup}}]},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"enabled": False},
    }  # fmt: skip
    cli = run(recipe, "fit")
    [clock] = [callback for callback in cli.trainer.callbacks if type(callback).__name__ == "LightningStepClock"]
    return {"system": "lt-posttrain", "trainer": trainer, "layout": args.layout, **clock.clock.result(),
            "final_loss": round(float(cli.trainer.logged_metrics["train/loss"]), 4)}


def trl_dpo(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = dpo_rows(Path(args.shared), WORK / "dpo_rows.jsonl", args.pairs_per_step * (args.steps + 2) * 2)
    dataset = load_dataset("json", data_files=str(rows), split="train")  # from_list breaks there (NOTES.md)
    models = [AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
              for _ in range(1 if args.precompute else 2)]  # fmt: skip
    config = DPOConfig(output_dir=str(WORK / "trl"), max_steps=args.steps,
                       per_device_train_batch_size=args.pairs_per_step, bf16=args.accelerator == "gpu",
                       use_cpu=args.accelerator == "cpu", learning_rate=5e-7,
                       lr_scheduler_type="constant", logging_steps=5, beta=0.1, gradient_checkpointing=True,
                       max_length=args.max_length, use_liger_kernel=bool(args.liger), max_grad_norm=1.0,
                       precompute_ref_log_probs=bool(args.precompute), report_to=[], save_strategy="no",
                       dataset_num_proc=8, dataloader_num_workers=2)  # fmt: skip
    clock = StepClock(args.warmup)

    class Clock(TrainerCallback):
        tokens = 0

        def on_step_end(self, arguments, state, control, **kwargs):
            tokens, self.tokens = trainer._total_train_tokens - self.tokens, trainer._total_train_tokens
            clock.step_end(state.global_step, arguments.per_device_train_batch_size, tokens,
                           state.global_step == arguments.max_steps)  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # With precomputed log-probabilities TRL scores the pairs with the policy before training and holds no reference.
    reference = None if args.precompute else models[1]
    trainer = DPOTrainer(model=models[0], ref_model=reference, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[Clock()])  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"system": "trl", "trainer": "dpo", "layout": "padded", "precompute": bool(args.precompute),
            **clock.result(), "final_loss": round(losses[-1], 4) if losses else None}


RUNS = {
    "ours-kto": (ours_kto, {"layout": "packed"}),
    "ours-kto-padded": (ours_kto, {"layout": "padded"}),
    "trl-kto": (trl_kto, {}),
    "ours-dpo": (ours_dpo, {"layout": "packed", "precompute": 0}),
    "ours-dpo-padded": (ours_dpo, {"layout": "padded", "precompute": 0}),
    "trl-dpo": (trl_dpo, {"precompute": 0}),
    "ours-dpo-precompute": (ours_dpo, {"layout": "packed", "precompute": 1}),
    "trl-dpo-precompute": (trl_dpo, {"precompute": 1}),
}


# -- suite and table ----------------------------------------------------------------------------------------------
def _one(command: list[str], out: Path, timeout: int) -> None:
    """Run one configuration; append the JSON line it prints (``RESULT {...}``), or its error, to ``out``."""
    print("$", " ".join(command), flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout} s"}
    else:
        found = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(found[-1]) if found else {"error": done.stderr.strip().splitlines()[-3:]}
    result["command"] = " ".join(command)
    print(json.dumps(result), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(result) + "\n")


def suite(args) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = WORK / args.shape
    if not (model_dir / "config.json").exists():
        tokenizer = Path(args.shared) / "assets" / "smollm2-tokenizer"
        subprocess.run([sys.executable, str(HERE / "random_model.py"), args.shape, str(tokenizer), str(model_dir)],
                       check=True)  # fmt: skip
    common = ["--shared", args.shared, "--shape", args.shape, "--model-dir", str(model_dir), "--steps",
              str(args.steps), "--warmup", str(args.warmup), "--rows-per-step", str(args.rows_per_step),
              "--pairs-per-step", str(args.pairs_per_step),
              "--max-length", str(args.max_length), "--pack-tokens", str(args.pack_tokens), "--liger", str(args.liger),
              "--accelerator", args.accelerator]
    for name in args.runs:
        _one([sys.executable, str(HERE / "preference.py"), "run", name, *common], Path(args.out), args.timeout)


def table(path: str) -> str:
    """Markdown rows of a suite's results, each trainer's TRL run (with the same reference handling) the reference
    of its ratios."""
    results = [json.loads(line) for line in open(path) if line.strip()]
    rows = ["| system | trainer | batches | tokens/s | rows/s | peak GiB | loss at the end | tokens/s vs TRL | "
            "memory vs TRL |", "|" + "---|" * 9]  # fmt: skip
    for trainer in dict.fromkeys(result.get("trainer") for result in results if "error" not in result):
        mine = [result for result in results if result.get("trainer") == trainer and "error" not in result]
        for result in mine:
            trl = next((other for other in mine if other["system"] == "trl"
                        and other.get("precompute") == result.get("precompute")), None)  # fmt: skip
            speed = f"{result['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
            memory = f"{result['peak_mem_gib'] / trl['peak_mem_gib']:.2f}x" if trl else "-"
            system = "TRL 1.16" if result["system"] == "trl" else "lt-posttrain"
            name = f"{trainer}, reference precomputed" if result.get("precompute") else trainer
            rows.append(f"| {system} | {name} | {result['layout']} | {result['tokens_per_s']:,} | "
                        f"{result['rows_per_s']} | {result['peak_mem_gib']} | {result['final_loss']} | {speed} | "
                        f"{memory} |")  # fmt: skip
    rows += [f"\nFailed: `{result['command']}`: {result['error']}" for result in results if "error" in result]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (commands.add_parser("suite"), commands.add_parser("run")):
        command.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
        command.add_argument("--shape", default="llama-3.2-1b")
        command.add_argument("--steps", type=int, default=30)
        command.add_argument("--warmup", type=int, default=5)
        command.add_argument("--rows-per-step", type=int, default=16, help="rows of a padded micro-batch (TRL's too)")
        command.add_argument("--pairs-per-step", type=int, default=8, help="DPO: pairs of a padded micro-batch")
        command.add_argument("--max-length", type=int, default=1024, help="tokens of a row at most")
        command.add_argument("--pack-tokens", type=int, default=4096, help="tokens of a packed micro-batch")
        command.add_argument("--liger", type=int, default=1)
        command.add_argument("--accelerator", default="gpu", help="cpu: a smoke test of this script (--liger 0)")
    commands.choices["suite"].add_argument("--out", required=True)
    commands.choices["suite"].add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    commands.choices["suite"].add_argument("--timeout", type=int, default=240)
    commands.choices["run"].add_argument("name", choices=list(RUNS))
    commands.choices["run"].add_argument("--model-dir", required=True)
    commands.add_parser("table").add_argument("results")
    args = parser.parse_args()
    if args.command == "suite":
        suite(args)
    elif args.command == "run":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        WORK.mkdir(parents=True, exist_ok=True)
        function, options = RUNS[args.name]
        for key, value in options.items():
            setattr(args, key, value)
        result = {"shape": args.shape, "liger": bool(args.liger), "steps": args.steps, **function(args)}
        print("RESULT " + json.dumps(result), flush=True)
    else:
        print(table(args.results))


if __name__ == "__main__":
    main()
