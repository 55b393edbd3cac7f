"""Training speed on a GPU: our `fit` beside TRL's SFTTrainer and a plain PyTorch loop, in one process tree.

    python bench/speed.py suite --anchors DIR --out RESULTS.jsonl [--shapes llama-3.2-1b smollm2-1.7b] [--runs ...]
    python bench/speed.py ours --shape llama-3.2-1b --liger 1 --gc 1 [--seq 4096 --micro-batch 4 --steps 30]
    python bench/speed.py ours --shape llama-3.2-1b --liger loss --gc 1 --compile layers     # compiled layers
    python bench/speed.py ours --shape llama-3.1-8b --lora 16 --gc 1 --micro-batch 4         # LoRA r=16, bf16 base
    python bench/speed.py table RESULTS.jsonl            # the markdown table for BENCHMARKS.md
    python bench/speed.py ours --shape tiny --accelerator cpu --precision 32-true --liger 0 --seq 256 \
        --micro-batch 1 --steps 8 --compile layers       # a smoke test of this script on a CPU

`suite` runs every configuration as its own process (fresh GPU memory each), ours through the public API
(`lt_posttrain.run`) exactly as a recipe would, and TRL (`anchor_trl.py`) and the plain loop (`ceiling_probe.py`)
from DIR, which also holds `data/gsm8k_train.jsonl` and `assets/smollm2-tokenizer` next to them (`DIR/../data`).
Data: GSM8K-train as chats, SmolLM2 tokenizer, random weights of the real shape, bf16 weights and AdamW states
(fused), sequence 4096, micro-batch 4 rows; tokens/s counts non-padding tokens after 5 warm-up steps. Each random
model is saved once under ``--models`` (default ``/tmp/lt-bench-models``; 16 GB for the 8B shape) and reused.

Besides the steady state, each of our runs reports ``first_step_s`` (from the fit's start, the model built and
placed, to the end of step 1: what a compiled run pays once), ``to_first_step_s`` (the same from the call of ``run``:
data and model loading too) and ``compile_s`` (torch.compile's own time: Dynamo and the backend, forward and
backward graphs, from ``torch._dynamo.utils.compilation_time_metrics``). MFU is the throughput meter's: model
FLOPs as it counts them (6 per trained weight and token, 4 per frozen one, attention per sample, no recomputation)
over ``--peak-tflops`` (800, a bf16 8192^3 matmul on the H100 used here).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MEASURED_MATMUL_TFLOPS = 800  # a bf16 8192^3 matmul on the H100 used here: the ceiling MFU is measured against
MODELS = Path(tempfile.gettempdir()) / "lt-bench-models"


def random_model(shape: str, tokenizer: Path, models: Path) -> Path:
    """The folder of a random model of ``shape``, saved once under ``models`` and reused by every later run."""
    from random_model import main as save_random_model

    folder = models / shape
    if not (folder / "config.json").exists():
        models.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=models))
        save_random_model(shape, str(tokenizer), str(staging))
        import torch

        torch.cuda.empty_cache()  # the model was built on the GPU: give its blocks back before the fit
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    return folder


def compile_seconds() -> float:
    """torch.compile's time so far in this process: Dynamo with the backend's forward compile, and the backward
    graphs the backend compiles at their first backward."""
    import torch._dynamo.utils

    metrics = torch._dynamo.utils.compilation_time_metrics
    keys = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
    return sum(sum(metrics.get(key, [])) for key in keys)


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

    anchors = Path(args.anchors)
    work = Path(tempfile.mkdtemp(prefix="lt-bench-"))
    model_dir = random_model(args.shape, anchors.parent / "assets" / "smollm2-tokenizer", Path(args.models))
    chats = gsm8k_chats(anchors, work / "gsm8k_chats.jsonl")
    mixed = args.precision == "bf16-mixed"  # fp32 weights and AdamW states, bf16 compute
    full = args.precision in ("32-true", "32")  # a CPU smoke test
    checkpointing = checkpointing_of(args)
    model = {"name_or_path": str(model_dir), "dtype": "float32" if mixed or full else "bfloat16",
             "learning_rate": 1e-5, "warmup": 0, "schedule": "constant", "optimizer": args.optimizer,
             "gradient_checkpointing": checkpointing, "attn_implementation": args.attention,
             "optimizer_in_backward": bool(args.in_backward), "compile": args.compile or False}  # fmt: skip
    if args.liger in ("1", "loss"):  # loss: the fused loss alone (a compiled layer fuses the rest itself)
        model["liger"] = True if args.liger == "1" else {"fused_linear_cross_entropy": True}
    if args.lora:
        model["lora"] = {"r": args.lora, "alpha": 2 * args.lora, "dropout": 0.0}
    recipe = {
        "seed_everything": 0,
        "model": model,
        "data": {"sources": [str(chats)], "max_length": args.seq, "batch_size": args.micro_batch, "packing": True,
                 "num_workers": 2, "num_proc": 8, "static_shapes": bool(args.compile or args.static_shapes)},
        "trainer": {"accelerator": args.accelerator, "devices": 1, "precision": args.precision, "max_steps": args.steps,
                    "gradient_clip_val": None if args.in_backward else 1.0, "logger": False,
                    "enable_progress_bar": False, "enable_checkpointing": False, "log_every_n_steps": 5,
                    "default_root_dir": str(work)},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"warmup_steps": 5, "peak_tflops": args.peak_tflops},
    }  # fmt: skip
    recipe["trainer"]["callbacks"] = [{"class_path": "step_clock.FirstStepClock"}]
    if args.profile:
        recipe["trainer"]["callbacks"].append({"class_path": "profile_steps.ProfileSteps",
                                               "init_args": {"out": args.profile, "first_step": 10, "steps": 3}})
    start = time.perf_counter()
    cli = run(recipe, "fit")
    [meter] = [callback for callback in cli.trainer.callbacks if isinstance(callback, ThroughputMeter)]
    [clock] = [callback for callback in cli.trainer.callbacks if type(callback).__name__ == "FirstStepClock"]
    summary = meter.summary
    shutil.rmtree(work, ignore_errors=True)
    return {"system": "lt-posttrain", "arch": args.shape, "liger": args.liger != "0", "liger_kernels": args.liger,
            "grad_ckpt": bool(args.gc), "checkpointing": checkpointing, "compile": args.compile,
            "static_shapes": bool(args.compile or args.static_shapes), "lora": args.lora,
            "attention": args.attention, "precision": args.precision, "profiled": bool(args.profile),
            "optimizer": meter_optimizer(cli), "in_backward": bool(args.in_backward), "seq": args.seq,
            "micro_batch": args.micro_batch, "steps": args.steps,
            "tokens_per_s": round(summary["tokens_per_s"]), "tflops": round(summary["tflops"], 1),
            "mfu": round(summary["mfu"], 4) if "mfu" in summary else None, "peak_tflops": args.peak_tflops,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "final_loss": round(float(cli.trainer.logged_metrics["train/loss"]), 3),
            "first_step_s": round(clock.step_end - clock.fit_start, 2),
            "to_first_step_s": round(clock.step_end - start, 2), "compile_s": round(compile_seconds(), 2),
            "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def checkpointing_of(args):
    """``model.gradient_checkpointing`` of ``--gc`` (0 or 1), ``--save`` and ``--every``."""
    if not args.gc:
        return False
    save = [name for name in (args.save or "").split(",") if name]
    return {"save": save, "every": args.every} if save or args.every != 1 else True


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
        "ours-stochastic-in-backward", "ours-profile", "ours-static", "ours-compile", "ours-compile-liger",
        "ours-compile-nogc", "ours-compile-cudagraphs", "ours-selective", "ours-selective-projections",
        "ours-compile-selective", "ours-lora", "ours-lora-nogc", "ours-lora-compile", "ours-lora-compile-nogc",
        "trl-contiguous-liger", "trl-contiguous", "trl-padding-free", "loop-gc", "loop-nogc")  # fmt: skip
SAVE_PROJECTIONS = "attention,attention_projections"


def suite(args) -> None:
    anchors, out, python = Path(args.anchors), Path(args.out), sys.executable
    shape_args = [str(args.seq), str(args.micro_batch)]
    for shape in args.shapes:
        common = ["--seq", str(args.seq), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps)]
        mine = [python, str(HERE / "speed.py"), "ours", "--shape", shape, "--anchors", str(anchors), "--models",
                args.models, *common]
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
            "ours-profile": mine + ["--liger", "1", "--gc", "1",
                                    "--profile", str(out.with_suffix(f".{shape}.profile.txt"))],
            "ours-nogc": mine + ["--liger", "1", "--gc", "0"],
            "ours-noliger": mine + ["--liger", "0", "--gc", "1"],
            # static shapes alone (the padding's cost), then compiled layers (static shapes on): Liger's fused loss
            # alone, the layer's own small kernels left to the compiler, or every Liger kernel inside the graph
            "ours-static": mine + ["--liger", "1", "--gc", "1", "--static-shapes", "1"],
            "ours-compile": mine + ["--liger", "loss", "--gc", "1", "--compile", "layers"],
            "ours-compile-liger": mine + ["--liger", "1", "--gc", "1", "--compile", "layers"],
            "ours-compile-nogc": mine + ["--liger", "loss", "--gc", "0", "--compile", "layers"],
            "ours-compile-cudagraphs": mine + ["--liger", "loss", "--gc", "1", "--compile", "cuda_graphs"],
            # selective checkpointing: what a checkpointed layer keeps instead of recomputing
            "ours-selective": mine + ["--liger", "1", "--gc", "1", "--save", "attention"],
            "ours-selective-projections": mine + ["--liger", "1", "--gc", "1", "--save", SAVE_PROJECTIONS],
            "ours-compile-selective": mine + ["--liger", "loss", "--gc", "1", "--compile", "layers",
                                              "--save", SAVE_PROJECTIONS],
            # LoRA r=16 on a bf16 base (--shapes llama-3.1-8b); without checkpointing 2 rows (4 do not fit at 8B)
            "ours-lora": mine + ["--lora", "16", "--liger", "1", "--gc", "1"],
            "ours-lora-nogc": mine + ["--lora", "16", "--liger", "1", "--gc", "0", "--micro-batch", "2"],
            "ours-lora-compile": mine + ["--lora", "16", "--liger", "loss", "--gc", "1", "--compile", "layers"],
            "ours-lora-compile-nogc": mine + ["--lora", "16", "--liger", "loss", "--gc", "0", "--compile", "layers",
                                              "--micro-batch", "2"],
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
    rows = ["| system | shape | attention | Liger | grad. ckpt | compiled | weights, optimizer | rows | tokens/s "
            "| model TFLOP/s | MFU | peak GiB | loss at the end | first step s (compile s) | vs TRL contiguous+Liger "
            "| vs plain loop |",
            "|" + "---|" * 16]  # fmt: skip

    def name(result: dict) -> str:
        if result.get("system") == "trl":
            return "TRL 1.16 " + ("contiguous chunks" if result["strategy"] == "wrapped" else "padding-free")
        return "plain PyTorch loop" if result.get("probe") == "ceiling" else "lt-posttrain"

    def weights(result: dict) -> str:
        if result.get("system") != "lt-posttrain":
            return "bf16, torch AdamW"
        precision = result.get("precision")
        weights = "fp32 (bf16-mixed)" if precision == "bf16-mixed" else "fp32" if precision == "32-true" else "bf16"
        where = ", in the backward pass, no clipping" if result.get("in_backward") else ""
        lora = f"LoRA r={result['lora']} on a {weights} base, " if result.get("lora") else f"{weights}, "
        return f"{lora}{result.get('optimizer')}{where}"

    def liger(result: dict) -> str:
        default = "yes" if result["liger"] else "no"
        return {"loss": "fused loss", "0": "no"}.get(str(result.get("liger_kernels")), default)

    def checkpointing(result: dict, gc: bool) -> str:
        options = result.get("checkpointing")
        if isinstance(options, dict):
            every = f", 1 layer in {options['every']}" if options.get("every", 1) != 1 else ""
            return f"keeps {' + '.join(options.get('save') or ['inputs'])}{every}"
        return "on" if gc else "off"

    def first_step(result: dict) -> str:
        if "first_step_s" not in result:
            return "-"
        compiled = f" ({result['compile_s']})" if result.get("compile") else ""
        return f"{result['first_step_s']}{compiled}"

    for arch in dict.fromkeys(result.get("arch") for result in results if "error" not in result):
        mine = [r for r in results if r.get("arch") == arch and "error" not in r and not r.get("profiled")]
        trl_liger = next((r for r in mine if r.get("system") == "trl" and r["liger"] and r["strategy"] == "wrapped"),
                         None)
        for result in mine:
            tps, gc = result["tokens_per_s"], result.get("grad_ckpt", True)  # TRL runs with checkpointing
            tflops = result.get("tflops", result.get("model_tflops"))
            mfu = result.get("mfu") or tflops / MEASURED_MATMUL_TFLOPS  # the meter's, else the same convention
            peak = result.get("peak_mem_gib", result.get("peak_gib"))
            loss = result.get("final_loss", result.get("loss_last"))
            loop = next((r for r in mine if r.get("probe") == "ceiling" and r["grad_ckpt"] == gc and r["liger"]), None)
            ratio_trl = f"{tps / trl_liger['tokens_per_s']:.2f}x" if trl_liger else "-"
            ratio_loop = f"{tps / loop['tokens_per_s']:.2f}x" if loop else "-"
            attention = "per sample" if result.get("strategy") != "wrapped" else "across samples"
            rows.append(f"| {name(result)} | {arch} | {attention} | {liger(result)} | {checkpointing(result, gc)} | "
                        f"{result.get('compile') or 'no'} | {weights(result)} | {result.get('micro_batch', '-')} | "
                        f"{tps:,} | {tflops} | {100 * mfu:.0f}% | {peak} | {loss:.3f} | {first_step(result)} | "
                        f"{ratio_trl} | {ratio_loop} |")  # fmt: skip
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
        command.add_argument("--models", default=str(MODELS), help="where the random models are kept between runs")
    commands.choices["suite"].add_argument("--out", required=True)
    commands.choices["suite"].add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "smollm2-1.7b"])
    commands.choices["suite"].add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    commands.choices["suite"].add_argument("--timeout", type=int, default=300)
    commands.choices["ours"].add_argument("--shape", required=True)
    commands.choices["ours"].add_argument("--liger", choices=("0", "1", "loss"), default="1",
                                          help="loss: Liger's fused loss alone")
    commands.choices["ours"].add_argument("--gc", type=int, default=1)
    commands.choices["ours"].add_argument("--save", help="selective checkpointing: outputs kept, comma-separated "
                                          "(attention, attention_projections, matmuls)")
    commands.choices["ours"].add_argument("--every", type=int, default=1, help="checkpoint one layer in EVERY")
    commands.choices["ours"].add_argument("--compile", choices=("layers", "cuda_graphs"),
                                          help="model.compile (turns data.static_shapes on)")
    commands.choices["ours"].add_argument("--static-shapes", type=int, default=0)
    commands.choices["ours"].add_argument("--lora", type=int, default=0, help="LoRA rank (0: a full fine-tune)")
    commands.choices["ours"].add_argument("--peak-tflops", type=float, default=MEASURED_MATMUL_TFLOPS)
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
