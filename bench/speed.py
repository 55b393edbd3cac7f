"""Training speed on a GPU: our `fit` beside TRL's SFTTrainer and a plain PyTorch loop, in one process tree.

    python bench/speed.py suite --anchors DIR --out RESULTS.jsonl [--shapes llama-3.2-1b smollm2-1.7b] [--runs ...]
    python bench/speed.py ours --shape llama-3.2-1b --liger 1 --gc 1 [--seq 4096 --micro-batch 4 --steps 30]
    python bench/speed.py table RESULTS.jsonl            # the markdown table for BENCHMARKS.md

`suite` runs every configuration as its own process (fresh GPU memory each), ours through the public API
(`lt_posttrain.run`) exactly as a recipe would, and TRL (`anchor_trl.py`) and the plain loop (`ceiling_probe.py`)
from DIR, which also holds `data/gsm8k_train.jsonl` and `assets/smollm2-tokenizer` next to them (`DIR/../data`).
Data: GSM8K-train as chats, SmolLM2 tokenizer, random weights of the real shape, bf16 weights and AdamW states
(fused), sequence 4096, micro-batch 4 rows; tokens/s counts non-padding tokens after 5 warm-up steps.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MEASURED_MATMUL_TFLOPS = 800  # a bf16 8192^3 matmul on the H100 used here: the ceiling MFU is measured against


def gsm8k_chats(anchors: Path, out: Path) -> Path:
    with open(anchors.parent / "data" / "gsm8k_train.jsonl") as rows, open(out, "w") as chats:
        for line in rows:
            row = json.loads(line)
            turns = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            chats.write(json.dumps({"messages": turns}) + "\n")
    return out


def ours(args) -> dict:
    """One fit through the public API; returns the throughput meter's summary and the losses."""
    import torch

    from lt_posttrain import run
    from lt_posttrain.callbacks.throughput import ThroughputMeter
    from random_model import main as save_random_model

    anchors = Path(args.anchors)
    work = Path(tempfile.mkdtemp(prefix="lt-bench-"))
    model_dir = work / args.shape
    save_random_model(args.shape, str(anchors.parent / "assets" / "smollm2-tokenizer"), str(model_dir))
    chats = gsm8k_chats(anchors, work / "gsm8k_chats.jsonl")
    mixed = args.precision == "bf16-mixed"  # fp32 weights and AdamW states, bf16 compute
    model = {"name_or_path": str(model_dir), "dtype": "float32" if mixed else "bfloat16", "learning_rate": 1e-5,
             "warmup": 0, "schedule": "constant", "optimizer": args.optimizer, "gradient_checkpointing": bool(args.gc),
             "attn_implementation": args.attention, "optimizer_in_backward": bool(args.in_backward)}  # fmt: skip
    if args.liger:
        model["liger"] = True
    recipe = {
        "seed_everything": 0,
        "model": model,
        "data": {"sources": [str(chats)], "max_length": args.seq, "batch_size": args.micro_batch, "packing": True,
                 "num_workers": 2, "num_proc": 8},
        "trainer": {"accelerator": args.accelerator, "devices": 1, "precision": args.precision, "max_steps": args.steps,
                    "gradient_clip_val": None if args.in_backward else 1.0, "logger": False,
                    "enable_progress_bar": False, "enable_checkpointing": False, "log_every_n_steps": 5, "default_root_dir": str(work)},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"warmup_steps": 5, "peak_tflops": MEASURED_MATMUL_TFLOPS},
    }  # fmt: skip
    if args.profile:
        recipe["trainer"]["callbacks"] = [{"class_path": "profile_steps.ProfileSteps",
                                           "init_args": {"out": args.profile, "first_step": 10, "steps": 3}}]
    start = time.perf_counter()
    cli = run(recipe, "fit")
    [meter] = [callback for callback in cli.trainer.callbacks if isinstance(callback, ThroughputMeter)]
    summary = meter.summary
    return {"system": "lt-posttrain", "arch": args.shape, "liger": bool(args.liger), "grad_ckpt": bool(args.gc),
            "attention": args.attention, "precision": args.precision, "profiled": bool(args.profile),
            "optimizer": meter_optimizer(cli), "in_backward": bool(args.in_backward), "seq": args.seq,
            "micro_batch": args.micro_batch, "steps": args.steps,
            "tokens_per_s": round(summary["tokens_per_s"]), "tflops": round(summary["tflops"], 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "final_loss": round(float(cli.trainer.logged_metrics["train/loss"]), 3),
            "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def meter_optimizer(cli) -> str:
    optimizer = cli.model.optimizers().optimizer
    return f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"


def _run(command: list[str], out: Path, timeout: int) -> None:
    """Run one configuration; append the JSON line it prints (``RESULT {...}`` or a bare JSON object) to ``out``."""
    print("$", " ".join(command), flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = {"command": " ".join(command), "error": f"timed out after {timeout} s"}
    else:
        lines = [line.removeprefix("RESULT ") for line in done.stdout.splitlines()]
        found = [line for line in lines if line.startswith("{") and "tokens_per_s" in line]
        result = json.loads(found[-1]) if found else {"error": done.stderr.strip().splitlines()[-1:]}
        result["command"] = " ".join(command)
    print(json.dumps(result), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(result) + "\n")


RUNS = ("ours-gc", "ours-nogc", "ours-noliger", "ours-mixed", "ours-kahan", "ours-kahan-in-backward", "ours-stochastic",
        "ours-stochastic-in-backward", "ours-profile", "trl-contiguous-liger", "trl-contiguous", "trl-padding-free", "loop-gc", "loop-nogc")


def suite(args) -> None:
    anchors, out, python = Path(args.anchors), Path(args.out), sys.executable
    shape_args = [str(args.seq), str(args.micro_batch)]
    for shape in args.shapes:
        common = ["--seq", str(args.seq), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps)]
        mine = [python, str(HERE / "speed.py"), "ours", "--shape", shape, "--anchors", str(anchors), *common]
        trl = [python, str(anchors / "anchor_trl.py"), shape]
        loop = [python, str(anchors / "ceiling_probe.py"), shape]
        commands = {
            "ours-gc": mine + ["--liger", "1", "--gc", "1"],
            "ours-mixed": mine + ["--liger", "1", "--gc", "1", "--precision", "bf16-mixed", "--optimizer", "auto"],
            "ours-kahan": mine + ["--liger", "1", "--gc", "1", "--optimizer", "adamw_kahan"],
            "ours-kahan-in-backward": mine + ["--liger", "1", "--gc", "1", "--optimizer", "adamw_kahan",
                                              "--in-backward", "1"],
            "ours-stochastic": mine + ["--liger", "1", "--gc", "1", "--optimizer", "adamw_stochastic"],
            "ours-stochastic-in-backward": mine + ["--liger", "1", "--gc", "1", "--optimizer", "adamw_stochastic",
                                                   "--in-backward", "1"],
            "ours-profile": mine + ["--liger", "1", "--gc", "1", "--profile", str(out.with_suffix(f".{shape}.profile.txt"))],
            "ours-nogc": mine + ["--liger", "1", "--gc", "0"],
            "ours-noliger": mine + ["--liger", "0", "--gc", "1"],
            "trl-contiguous-liger": trl + ["1", *shape_args, "25", "wrapped"],
            "trl-contiguous": trl + ["0", *shape_args, "25", "wrapped"],
            "trl-padding-free": trl + ["0", *shape_args, "25", "bfd"],
            "loop-gc": loop + ["1", "1", *shape_args, str(args.steps)],
            "loop-nogc": loop + ["1", "0", *shape_args, str(args.steps)],
        }
        for name in args.runs:
            _run(commands[name], out, args.timeout)


def table(path: str) -> str:
    """Markdown rows of a suite's results: ours first, ratios to TRL contiguous+Liger and to the plain loop with the
    same gradient checkpointing."""
    results = [json.loads(line) for line in open(path) if line.strip()]
    rows = ["| system | shape | attention | Liger | grad. ckpt | weights, optimizer | tokens/s | model TFLOP/s "
            "| MFU (of 800) | peak GiB | loss at the end | vs TRL contiguous+Liger | vs plain loop |",
            "|" + "---|" * 13]  # fmt: skip

    def name(result: dict) -> str:
        if result.get("system") == "trl":
            return "TRL 1.16 " + ("contiguous chunks" if result["strategy"] == "wrapped" else "padding-free")
        return "plain PyTorch loop" if result.get("probe") == "ceiling" else "lt-posttrain"

    def weights(result: dict) -> str:
        if result.get("system") != "lt-posttrain":
            return "bf16, torch AdamW"
        weights = "fp32 (bf16-mixed)" if result.get("precision") == "bf16-mixed" else "bf16"
        where = ", in the backward pass, no clipping" if result.get("in_backward") else ""
        return f"{weights}, {result.get('optimizer')}{where}"

    for arch in dict.fromkeys(result.get("arch") for result in results if "error" not in result):
        mine = [r for r in results if r.get("arch") == arch and "error" not in r and not r.get("profiled")]
        trl_liger = next((r for r in mine if r.get("system") == "trl" and r["liger"] and r["strategy"] == "wrapped"), None)
        for result in mine:
            tps, gc = result["tokens_per_s"], result.get("grad_ckpt", True)  # TRL runs with checkpointing
            tflops = result.get("tflops", result.get("model_tflops"))
            peak = result.get("peak_mem_gib", result.get("peak_gib"))
            loss = result.get("final_loss", result.get("loss_last"))
            loop = next((r for r in mine if r.get("probe") == "ceiling" and r["grad_ckpt"] == gc and r["liger"]), None)
            ratio_trl = f"{tps / trl_liger['tokens_per_s']:.2f}x" if trl_liger else "-"
            ratio_loop = f"{tps / loop['tokens_per_s']:.2f}x" if loop else "-"
            attention = "per sample" if result.get("strategy") != "wrapped" else "across samples"
            rows.append(f"| {name(result)} | {arch} | {attention} | {'yes' if result['liger'] else 'no'} | "
                        f"{'on' if gc else 'off'} | {weights(result)} | {tps:,} | {tflops} | "
                        f"{100 * tflops / MEASURED_MATMUL_TFLOPS:.0f}% | {peak} | {loss:.3f} | {ratio_trl} | "
                        f"{ratio_loop} |")  # fmt: skip
    failed = [r for r in results if "error" in r]
    rows += [f"\nFailed: `{r['command']}`: {r['error']}" for r in failed]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("suite", "ours"):
        command = commands.add_parser(name)
        command.add_argument("--anchors", default=str(HERE.parent.parent / "shared" / "bench"))
        command.add_argument("--seq", type=int, default=4096)
        command.add_argument("--micro-batch", type=int, default=4)
        command.add_argument("--steps", type=int, default=30)
    commands.choices["suite"].add_argument("--out", required=True)
    commands.choices["suite"].add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "smollm2-1.7b"])
    commands.choices["suite"].add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    commands.choices["suite"].add_argument("--timeout", type=int, default=300)
    commands.choices["ours"].add_argument("--shape", required=True)
    commands.choices["ours"].add_argument("--liger", type=int, default=1)
    commands.choices["ours"].add_argument("--gc", type=int, default=1)
    commands.choices["ours"].add_argument("--attention", default="varlen")
    commands.choices["ours"].add_argument("--accelerator", default="gpu", help="cpu: a smoke test of this script")
    commands.choices["ours"].add_argument("--precision", default="bf16-true")
    commands.choices["ours"].add_argument("--optimizer", default="adamw", help="adamw: plain bf16 AdamW, as TRL runs")
    commands.choices["ours"].add_argument("--in-backward", type=int, default=0,
                                          help="1: model.optimizer_in_backward (no gradient clipping then)")
    commands.choices["ours"].add_argument("--profile", help="write where the time of steps 10-12 goes to this file")
    commands.add_parser("table").add_argument("results")
    args = parser.parse_args()
    if args.command == "suite":
        suite(args)
    elif args.command == "ours":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print("RESULT " + json.dumps(ours(args)), flush=True)
    else:
        print(table(args.results))


if __name__ == "__main__":
    main()
