"""Scaling over the GPUs of one machine, with random weights of real shapes, as a markdown table: tokens/s per GPU,
scaling against one GPU, and peak memory per GPU while the model loads and while it trains.

    pip install -e '.[deepspeed]'
    python bench/scale.py [--gpus N] [--cases zero2 zero3 two-node zero3-8b] [--steps 12] [--seq 2048] [--accumulate 2]
    python bench/scale.py --cases sequence-parallel [--gpus N] [--sp-lengths 131072 262144 ...] --work DIR

Cases, each a real ``lt-posttrain fit`` (its own processes, fresh GPU memory), a Llama-3.2-1B shape unless named:

- ``zero2``, ``zero3``: ``deepspeed_stage_2`` / ``deepspeed_stage_3`` on 1 GPU and on N GPUs (with one GPU, only
  these run: a check of the DeepSpeed path);
- ``two-node``: ``deepspeed_stage_3`` as two nodes of one GPU each: two ``torchrun --nnodes 2`` launches on this
  machine (``CUDA_VISIBLE_DEVICES`` gives each its own GPU), ``--trainer.num_nodes 2``;
- ``zero3-8b``: a Llama-3.1-8B shape with ``deepspeed_stage_3`` on N GPUs for a few steps, then its Hugging Face
  export, gathered from the shards, loaded back on one GPU: the same tensors as the initial model, changed by
  training, and a lower loss than the initial model's on training chats.
- ``sequence-parallel``: the longest one sample of a Llama-3.1-8B shape, full fine-tune, ``--sp-strategy``
  (``deepspeed_stage_3_offload``: one GPU cannot hold an 8B model's fp32 master weights and AdamW states otherwise),
  every ``model.long_context`` option on: on one GPU, and on N GPUs with ``model.sequence_parallel N`` (each GPU holds
  1/N of the sample). Each ``--sp-lengths`` length (ascending) is a fit of ``--sp-steps`` steps of one sample of that
  many tokens (GSM8K chats joined into one conversation, cut to the length), until one fails (the table says whether
  it ran out of memory); tokens/s per GPU at 128K and at the longest length that trained. An 8B fit at these lengths
  takes minutes: run one length per call where calls are capped (``--sp-lengths 131072``, then the next, with the
  same ``--work``: results accumulate there).

Every run: bf16 weights (DeepSpeed keeps fp32 master weights), bf16-mixed, gradient checkpointing, AdamW (torch),
constant learning rate; GSM8K-train chats (``--data``) packed into rows of ``--seq`` tokens, ``--micro-batch`` rows a
step per GPU; tokens/s counts non-padding tokens after the throughput meter's warm-up steps. Results are appended
to ``--results`` (one JSON line a run), so cases can be run separately; the table is made from the newest result of
each case there.
"""

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
TOKENIZER = SHARED / "assets" / "smollm2-tokenizer"
GSM8K = SHARED / "data" / "gsm8k_train.jsonl"
SMALL, LARGE = "llama-3.2-1b", "llama-3.1-8b"
CASES = ["zero2", "zero3", "two-node", "zero3-8b", "sequence-parallel"]
SP_LENGTHS = [2**17, 2**18, 2**19, 2**20, 2**21, 2**22]


class ScaleProbe(L.Callback):
    """Writes ``out/rank-N.json`` at the end of a run: this GPU's peak memory once the model is loaded and set up
    (before training) and over training, and on rank 0 the throughput meter's summary.

    Args:
        out: the folder for the reports.
    """

    def __init__(self, out: str):
        self.out = Path(out)
        self.load_peak_gib = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.load_peak_gib = _peak_gib()  # the throughput meter resets the peak when training starts

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        import torch

        from lt_posttrain.callbacks.throughput import ThroughputMeter

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                  "device": device, "load_peak_gib": self.load_peak_gib, "train_peak_gib": _peak_gib()}  # fmt: skip
        meters = [callback for callback in trainer.callbacks if isinstance(callback, ThroughputMeter)]
        if trainer.is_global_zero and meters and meters[0].summary:
            report["throughput"] = meters[0].summary
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report))


def _peak_gib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def recipe(args, model_dir: Path, strategy: str, devices: int, num_nodes: int, steps: int, run_dir: Path,
           export_dir: Path = None, overrides: dict = None) -> dict:  # fmt: skip
    """The recipe of one run (the CLI's keys); ``overrides`` updates its sections key by key."""
    source = {"type": "huggingface_instruct", "name_or_path": str(args.data),
              "role_mapping": {"user": "question", "assistant": "answer"}}  # fmt: skip
    sections = {
        "seed_everything": 0,
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", "learning_rate": args.learning_rate,
                  "warmup": 0, "schedule": "constant", "gradient_checkpointing": True},
        "data": {"sources": [source], "max_length": args.seq, "batch_size": args.micro_batch, "packing": True,
                 "val_fraction": 0, "num_workers": 2},
        "trainer": {"accelerator": args.accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy,
                    "precision": "bf16-mixed", "max_steps": steps, "max_epochs": -1, "log_every_n_steps": 1,
                    "accumulate_grad_batches": args.accumulate,
                    "gradient_clip_val": 1.0, "enable_progress_bar": False, "enable_checkpointing": False,
                    "enable_model_summary": False, "default_root_dir": str(run_dir),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run_dir / "logs")}}},
        "checkpoint": {"save_end_of_training": export_dir is not None,
                       "output_dir": str(export_dir) if export_dir else None},
        "throughput": {"warmup_steps": min(3, steps - 2)},
    }  # fmt: skip
    for section, values in (overrides or {}).items():
        sections[section] = {**sections[section], **values}
    return sections


def environment(extra: dict = None) -> dict:
    """This process's environment (kept whole: NCCL settings of the machine included), with ``bench/`` importable
    for :class:`ScaleProbe` and ``extra`` on top."""
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def fit_command(recipe_file: Path, probe_dir: Path) -> list[str]:
    return ["-m", "lt_posttrain.cli", "fit", "--config", str(recipe_file), "--trainer.callbacks+=scale.ScaleProbe",
            f"--trainer.callbacks.out={probe_dir}"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_all(launches: list, timeout: int) -> list:
    """The exit statuses of ``launches``; past ``timeout`` seconds each is stopped with its process group (the
    ranks it started) and counts as failed."""
    deadline = time.monotonic() + timeout
    codes = []
    for launch in launches:
        try:
            codes.append(launch.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for each in launches:
                if each.poll() is None:
                    os.killpg(each.pid, signal.SIGKILL)
                each.wait()
            return ["timeout"] * len(launches)
    return codes


def run_fit(args, name: str, model_dir: Path, strategy: str, gpus: int, nodes: int = 1, steps: int = None,
            export_dir: Path = None, overrides: dict = None) -> dict:  # fmt: skip
    """One fit on ``gpus`` GPUs in all (over ``nodes`` torchrun nodes when more than one); its result as a dict
    (``overrides``: see :func:`recipe`)."""
    steps = steps or args.steps
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work))
    probe_dir = run_dir / "probe"
    recipe_file = run_dir / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(args, model_dir, strategy, gpus // nodes, nodes, steps, run_dir,
                                                 export_dir, overrides)))  # fmt: skip
    started = time.perf_counter()
    if nodes == 1:
        env = environment({"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))})
        launches = [subprocess.Popen([sys.executable, *fit_command(recipe_file, probe_dir)], cwd=run_dir, env=env,
                                     stdout=open(run_dir / "node-0.log", "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)]  # fmt: skip
    else:  # one torchrun "node" per GPU group of this machine, as on a cluster with one launcher per node
        port, per_node = free_port(), gpus // nodes
        launches = []
        for node in range(nodes):
            visible = ",".join(str(node * per_node + index) for index in range(per_node))
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
                       "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                       *fit_command(recipe_file, probe_dir)]  # fmt: skip
            launches.append(subprocess.Popen(command, cwd=run_dir, env=environment({"CUDA_VISIBLE_DEVICES": visible}),
                                             stdout=open(run_dir / f"node-{node}.log", "w"),
                                             stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    codes = wait_all(launches, args.timeout)
    wall = time.perf_counter() - started
    result = {"case": name, "strategy": strategy, "gpus": gpus, "nodes": nodes, "steps": steps,
              "wall_s": round(wall, 1), "run_dir": str(run_dir)}  # fmt: skip
    if any(codes):
        log = (run_dir / "node-0.log").read_text()
        tail = log.strip().splitlines()[-20:]
        return {**result, "error": f"exit status {codes}", "log_tail": tail, "out_of_memory": "out of memory" in log
                or "OutOfMemoryError" in log}  # fmt: skip
    reports = [json.loads(path.read_text()) for path in sorted(probe_dir.glob("rank-*.json"))]
    summary = next((report["throughput"] for report in reports if "throughput" in report), None)
    if summary is None or len(reports) != gpus:
        return {**result, "error": f"{len(reports)} rank reports of {gpus}, throughput summary: {bool(summary)}"}
    with open(next(run_dir.rglob("metrics.csv"))) as metrics:
        losses = [float(row["train/loss"]) for row in csv.DictReader(metrics) if row.get("train/loss")]
    return {
        **result, "device": reports[0]["device"], "ranks": len(reports),
        "tokens_per_s": round(summary["tokens_per_s"]), "tokens_per_s_per_gpu": round(summary["tokens_per_s"] / gpus),
        "tflops": round(summary["tflops"], 1), "mfu": summary.get("mfu"),
        "load_peak_gib": round(max(report["load_peak_gib"] for report in reports), 2),
        "train_peak_gib": round(max(report["train_peak_gib"] for report in reports), 2),
        "losses": losses,
    }  # fmt: skip


CHECK_EXPORT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
initial_dir, export_dir, data, device = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(export_dir)
rows = [json.loads(line) for line, _ in zip(open(data), range(4))]
chats = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]
texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
batch = [tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids for text in texts]
def loss_and_state(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    with torch.no_grad():
        losses = [model(input_ids=ids.to(device), labels=ids.to(device), use_cache=False).loss.item() for ids in batch]
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    return sum(losses) / len(losses), state
initial_loss, initial = loss_and_state(initial_dir)
export_loss, exported = loss_and_state(export_dir)
shapes = lambda state: {name: tensor.shape for name, tensor in state.items()}
print("RESULT " + json.dumps({
    "tensors": len(exported), "same_names_and_shapes": shapes(exported) == shapes(initial),
    "changed_tensors": sum(not torch.equal(exported[n], initial[n]) for n in initial if n in exported),
    "finite": all(torch.isfinite(t.float()).all().item() for t in exported.values()),
    "initial_loss": round(initial_loss, 4), "export_loss": round(export_loss, 4),
}))
"""


def check_export(args, initial_dir: Path, export_dir: Path) -> dict:
    """The export loaded back on one GPU beside the initial model (in a fresh process)."""
    files = sorted(export_dir.glob("*.safetensors"))
    device = "cuda:0" if args.accelerator == "gpu" else "cpu"
    command = [sys.executable, "-c", CHECK_EXPORT, str(initial_dir), str(export_dir), str(args.data), device]
    done = subprocess.run(command,
                          capture_output=True, text=True, timeout=args.timeout,
                          env=environment({"CUDA_VISIBLE_DEVICES": "0"}))  # fmt: skip
    found = [line[len("RESULT ") :] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    check = json.loads(found[-1]) if found else {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**check, "files": len(files), "gib": round(sum(file.stat().st_size for file in files) / 2**30, 2)}


def random_model(args, shape: str) -> Path:
    """A saved model of ``shape`` with random weights (made once per ``--work`` folder, on GPU 0)."""
    folder = Path(args.work) / f"{shape}-random"
    if not (folder / "config.json").exists():
        command = [sys.executable, str(HERE / "random_model.py"), shape, str(args.tokenizer), str(folder)]
        subprocess.run(command, check=True, env=environment({"CUDA_VISIBLE_DEVICES": "0"}), timeout=args.timeout)
    return folder


def long_chats(args, tokens: int, count: int) -> Path:
    """``count`` conversations of GSM8K chats joined turn after turn (the rows taken in turn, again from the start
    when they run out), each of more than ``tokens`` tokens (a chat is about 250 tokens of 2.7 characters), as a
    ``messages`` JSON-lines file in ``--work``; a fit with ``data.max_length`` = ``tokens`` cuts each to one sample
    of exactly that length."""
    path = Path(args.work) / f"long-chats-{tokens}-{count}.jsonl"
    if path.exists():
        return path
    rows = [json.loads(line) for line in open(args.data)]
    turns, at = tokens // 150 + 1, 0
    with open(path, "w") as file:
        for _ in range(count):
            messages = []
            for _ in range(turns):
                row, at = rows[at % len(rows)], at + 1
                messages += [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]  # fmt: skip
            file.write(json.dumps({"messages": messages}) + "\n")
    return path


def sequence_parallel_runs(args) -> list[dict]:
    """The ``sequence-parallel`` case: for one GPU and for ``--gpus``, each length of ``--sp-lengths`` until one
    fails."""
    large, results = random_model(args, LARGE), []
    for gpus in sorted({1, args.gpus}):
        for length in sorted(args.sp_lengths):
            chats = long_chats(args, length, args.sp_steps + 1)
            overrides = {
                "model": {"sequence_parallel": gpus, "long_context": True},
                "data": {"sources": [str(chats)], "max_length": length, "batch_size": 1, "num_workers": 0},
                "trainer": {"accumulate_grad_batches": 1},
            }  # fmt: skip
            result = run_fit(args, f"sp-{gpus}-{length}", large, args.sp_strategy, gpus, steps=args.sp_steps,
                             overrides=overrides)  # fmt: skip
            results.append({**result, "sequence_parallel": gpus, "sample_tokens": length})
            if "error" in result:
                break
    return results


def run_case(args, case: str) -> list[dict]:
    if case == "sequence-parallel":
        return sequence_parallel_runs(args)
    small = random_model(args, SMALL) if case != "zero3-8b" else None
    if case in ("zero2", "zero3"):
        strategy = f"deepspeed_stage_{case[-1]}"
        return [run_fit(args, f"{case}-{gpus}", small, strategy, gpus) for gpus in sorted({1, args.gpus})]
    if case == "two-node":
        return [run_fit(args, "two-node-2", small, "deepspeed_stage_3", gpus=2, nodes=2)]
    large = random_model(args, LARGE)
    export_dir = Path(args.work) / "zero3-8b-export"
    result = run_fit(args, f"zero3-8b-{args.gpus}", large, "deepspeed_stage_3", args.gpus, steps=args.steps_8b,
                     export_dir=export_dir)  # fmt: skip
    if "error" not in result:
        result["export"] = check_export(args, large, export_dir)
    return [result]


def markdown(results: list[dict]) -> str:
    """One row per run; scaling is tokens/s per GPU against the same strategy's one-GPU run."""
    rows = ["| run | strategy | GPUs (nodes) | tokens/s | tokens/s per GPU | scaling | peak GiB per GPU: load / train "
            "| loss, first → last step | wall s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    one_gpu = {r["case"].rsplit("-", 1)[0]: r for r in results if r["gpus"] == 1 and "error" not in r}
    same_run_on_one_gpu = {"zero2": "zero2", "zero3": "zero3", "two-node": "zero3"}  # no 8B run fits on one GPU
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | {r['strategy']} | {r['gpus']} ({r['nodes']}) | failed: {r['error']} "
                        "| | | | | |")  # fmt: skip
            continue
        base = one_gpu.get(same_run_on_one_gpu.get(r["case"].rsplit("-", 1)[0], ""))
        scaling = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}" if base and r["gpus"] > 1 else ""
        rows.append(
            f"| {r['case']} | {r['strategy']} | {r['gpus']} ({r['nodes']}) | {r['tokens_per_s']:,} | "
            f"{r['tokens_per_s_per_gpu']:,} | {scaling} | {r['load_peak_gib']} / {r['train_peak_gib']} | "
            f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} ({len(r['losses'])}) | {r['wall_s']} |"
        )
    for r in results:
        check = r.get("export")
        if check and "error" not in check:
            verdict = "pass" if (check["same_names_and_shapes"] and check["finite"] and check["changed_tensors"]
                                 and check["export_loss"] < check["initial_loss"]) else "FAIL"  # fmt: skip
            rows += ["", f"{r['case']} export ({verdict}): {check['files']} safetensors files, {check['gib']} GiB; "
                     f"{check['tensors']} tensors, names and shapes as the initial model's: "
                     f"{check['same_names_and_shapes']}, {check['changed_tensors']} changed by training, all finite: "
                     f"{check['finite']}; mean loss on 4 training chats {check['export_loss']} (initial model "
                     f"{check['initial_loss']})."]  # fmt: skip
        elif check:
            rows += ["", f"{r['case']} export check failed: {check['error']}"]
    return "\n".join(rows)


def sequence_parallel_markdown(results: list[dict]) -> str:
    """Per GPU count: the longest sample that trained, tokens/s per GPU at 128K and at that length, peak memory."""
    rows = ["| GPUs (sequence_parallel) | strategy | longest sample trained | first length that failed | tokens/s per "
            "GPU at 128K | tokens/s per GPU at the longest | peak GiB per GPU at the longest |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for gpus in sorted({r["gpus"] for r in results}):
        mine = sorted((r for r in results if r["gpus"] == gpus), key=lambda r: r["sample_tokens"])
        trained = [r for r in mine if "error" not in r]
        failed = [r for r in mine if "error" in r]
        longest = trained[-1] if trained else None
        at_128k = next((r for r in trained if r["sample_tokens"] == 2**17), None)
        failure = (f"{failed[0]['sample_tokens']:,} ({'out of memory' if failed[0].get('out_of_memory') else 'error'})"
                   if failed else "none (every length tried trained)")  # fmt: skip
        longest_tokens = f"{longest['sample_tokens']:,}" if longest else "none"
        rows.append(
            f"| {gpus} ({mine[0]['sequence_parallel']}) | {mine[0]['strategy']} | {longest_tokens} | {failure} | "
            f"{at_128k['tokens_per_s_per_gpu'] if at_128k else ''} | "
            f"{longest['tokens_per_s_per_gpu'] if longest else ''} | {longest['train_peak_gib'] if longest else ''} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs of the multi-GPU runs (default: all)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--steps-8b", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2, help="rows of --seq tokens per GPU and micro-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--data", type=Path, default=GSM8K, help="GSM8K-train rows (question, answer)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="saved with the random models")
    parser.add_argument("--work", default=None, help="random models and runs (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines to append to (default: in --work)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--sp-lengths", type=int, nargs="+", default=SP_LENGTHS,
                        help="sample lengths of the sequence-parallel case, tried in ascending order")
    parser.add_argument("--sp-steps", type=int, default=3, help="steps of each sequence-parallel run")
    parser.add_argument("--sp-strategy", default="deepspeed_stage_3_offload", help="strategy of the 8B runs")
    parser.set_defaults(accelerator="gpu")
    args = parser.parse_args()

    import torch

    available = torch.cuda.device_count()
    args.gpus = args.gpus or available
    if available < 1:
        sys.exit("bench/scale.py needs a CUDA GPU")
    if args.gpus < 2:  # the one-GPU rows of zero2/zero3 still run: a check of the DeepSpeed path on one GPU
        skipped = [case for case in args.cases if case in ("two-node", "zero3-8b")]
        if skipped:
            print(f"one GPU: skipping {', '.join(skipped)} (they need 2 or more)", flush=True)
        args.cases = [case for case in args.cases if case not in skipped]
    args.work = str(Path(args.work or tempfile.mkdtemp(prefix="lt-scale-")).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.results = args.results or Path(args.work) / "scale.jsonl"
    for case in args.cases:
        for result in run_case(args, case):
            print(json.dumps(result), flush=True)
            with open(args.results, "a") as file:
                file.write(json.dumps(result) + "\n")
    newest = {}
    for line in Path(args.results).read_text().splitlines():
        result = json.loads(line)
        newest[result["case"]] = result
    device = next((r["device"] for r in newest.values() if "device" in r), "GPU")
    print(f"\n{device}; {SMALL} shape unless named; {args.accumulate} x {args.micro_batch} x {args.seq} tokens per GPU "
          "and optimizer step\n")
    plain = [r for r in newest.values() if not r["case"].startswith("sp-")]
    if plain:
        print(markdown(plain))
    parallel = [r for r in newest.values() if r["case"].startswith("sp-")]
    if parallel:
        print(f"\nOne sample of the {LARGE} shape, full fine-tune, every long-context option, {args.sp_steps} steps a "
              "length\n")
        print(sequence_parallel_markdown(parallel))


if __name__ == "__main__":
    main()
