"""Long context on one GPU: the longest micro-batch that trains one optimizer step, for each long-context option.

    python bench/long_context.py samples --shared DIR --out SAMPLES.pt [--max-sample 32768 --total 1200000]
    python bench/long_context.py search CONFIG --samples SAMPLES.pt --out RESULTS.jsonl [--start 16384 --stop 2097152]
    python bench/long_context.py speed CONFIG --samples SAMPLES.pt --out RESULTS.jsonl --tokens 131072
    python bench/long_context.py table RESULTS.jsonl

DIR holds ``data/gsm8k_train.jsonl`` and ``assets/smollm2-tokenizer`` (the repository's ../shared, or a copy).

Samples: GSM8K chats joined into long conversations (question, worked answer, next question, ...) of up to
``--max-sample`` tokens each, tokenized by the project's own renderer with loss on every assistant turn; and, for the
speed runs, one conversation of ``--tokens`` tokens (``single``). A micro-batch of N tokens is one packed row of long
samples (each attends only to itself), cut to N tokens exactly.

``search`` builds the model of CONFIG once (random weights of the real shape, straight on the GPU), then trains one
optimizer step at N tokens, doubling N from ``--start`` until a step runs out of memory, then bisecting between the
last length that fitted and the first that did not until they are within ``--precision`` (5%) or ``--budget-s``
seconds are spent. Every step is a real ``fit`` of one step through Lightning (the module's own loss, checkpointing,
long-context options and optimizer); the memory allocator is reset between steps (a step that ran out of memory is
followed by ``gc`` and ``empty_cache``). It records, per step: N, whether it fitted, the step's time, peak GPU memory
(``max_memory_allocated``) and peak host memory (resident set, sampled every 20 ms, pinned buffers included), and
beside them the memory ``training/memory.py`` estimates before the step (``estimate_gib``, ``estimate_host_gib``), the
estimate by which a run refuses a length that cannot fit.

``speed`` trains ``--steps`` steps of one sample of ``--tokens`` tokens and of a packed row of the same length,
reporting tokens/s and model TFLOP/s (the throughput meter's convention: 6 FLOPs per trained and 4 per frozen weight
and token, attention per sample) from the last step, and both peaks.

The floor of each length: the per-layer checkpoints alone need ``layers x hidden x 2`` bytes a token; ``table``
reports each longest length as a fraction of (GPU memory left after weights and optimizer + usable host memory)
divided by that.
"""

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from random_model import SHAPES  # noqa: E402

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
ALL = {"tiled_loss": True, "tiled_mlp": True, "offload_checkpoints": True}
CONFIGS = {
    # Llama-3.1-8B shape, LoRA r=16 on a bf16 base
    "8b-lora-none": ("llama-3.1-8b", {"lora": LORA}),
    "8b-lora-liger": ("llama-3.1-8b", {"lora": LORA, "liger": True}),
    "8b-lora-tiled_loss": ("llama-3.1-8b", {"lora": LORA, "long_context": {"tiled_loss": True}}),
    "8b-lora-tiled_mlp": ("llama-3.1-8b", {"lora": LORA, "long_context": {"tiled_mlp": True}}),
    "8b-lora-offload": ("llama-3.1-8b", {"lora": LORA, "long_context": {"offload_checkpoints": True}}),
    "8b-lora-all": ("llama-3.1-8b", {"lora": LORA, "long_context": ALL}),
    # Llama-3.2-1B shape, full fine-tune, bf16 weights with the compensated AdamW
    "1b-full-none": ("llama-3.2-1b", {"optimizer": "adamw_kahan"}),
    "1b-full-all": ("llama-3.2-1b", {"optimizer": "adamw_kahan", "long_context": ALL}),
    # a smoke test of this script on a CPU
    "smoke-135m-lora": ("smollm2-135m", {"lora": LORA}),
}


# -- samples ------------------------------------------------------------------------------------------------------
def long_conversations(shared: Path, max_tokens: int, total: int, tokenizer) -> list[list[dict]]:
    """GSM8K chats joined into conversations of up to about ``max_tokens`` tokens (about 190 tokens a pair, a
    random number of pairs each), cycling over the file until about ``total`` tokens are reached."""
    import random

    rows = [json.loads(line) for line in open(shared / "data" / "gsm8k_train.jsonl")]
    draw = random.Random(0)
    conversations, tokens, index = [], 0, 0
    while tokens < total:
        turns: list[dict] = []
        pairs_per_conversation = draw.randint(max(1, max_tokens // 2000), max(1, max_tokens // 190))
        for _ in range(pairs_per_conversation):
            row = rows[index % len(rows)]
            index += 1
            turns += [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        conversations.append(turns)
        tokens += pairs_per_conversation * 190
    return conversations


def make_samples(args) -> None:
    from transformers import AutoTokenizer

    from lt_posttrain.data.tokenize import tokenize_conversation

    shared = Path(args.shared)
    tokenizer = AutoTokenizer.from_pretrained(shared / "assets" / "smollm2-tokenizer")
    start = time.perf_counter()
    packed = []
    for conversation in long_conversations(shared, args.max_sample, args.total, tokenizer):
        packed += tokenize_conversation(conversation, tokenizer, args.max_sample)
    single_turns = long_conversations(shared, args.single, args.single, tokenizer)[0] * 2
    [single] = tokenize_conversation(single_turns, tokenizer, args.single)[:1]
    seconds = time.perf_counter() - start
    lengths = [len(sample["input_ids"]) for sample in packed]
    print(f"{len(packed)} samples, {sum(lengths):,} tokens (longest {max(lengths):,}), one sample of "
          f"{len(single['input_ids']):,}; tokenized in {seconds:.1f} s", flush=True)  # fmt: skip
    compact = [{key: torch.tensor(sample[key], dtype=torch.int32) for key in ("input_ids", "labels")}
               for sample in packed + [single]]  # fmt: skip
    torch.save({"packed": compact[:-1], "single": compact[-1]}, args.out)


def packed_row(samples: list[dict], tokens: int) -> list[dict]:
    """Samples back to back, the last one cut, ``tokens`` in all (cycling if the set is shorter)."""
    out, total, index = [], 0, 0
    while total < tokens:
        sample = samples[index % len(samples)]
        index += 1
        take = min(len(sample["input_ids"]), tokens - total)
        out.append({"input_ids": sample["input_ids"][:take].tolist(), "labels": sample["labels"][:take].tolist()})
        total += take
    return out


def micro_batch(samples: list[dict]) -> dict:
    from lt_posttrain import collate_packed

    from lt_posttrain.data.tokenize import count_loss_tokens

    batch = collate_packed(samples)
    loss_tokens = sum(count_loss_tokens(sample["labels"]) for sample in samples)
    batch["loss_count"] = torch.tensor(loss_tokens)
    batch["step_loss_count"] = torch.tensor(loss_tokens)
    return batch


# -- the model and one step ---------------------------------------------------------------------------------------
def model_folder(shape: str, shared: Path, work: Path) -> Path:
    """A folder with the shape's ``config.json`` and the tokenizer, no weights: the module builds the model from it."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = work / f"{shape}-config"
    tokenizer = AutoTokenizer.from_pretrained(shared / "assets" / "smollm2-tokenizer")
    LlamaConfig(**SHAPES[shape], max_position_embeddings=2**21, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cap_gpu_memory() -> None:
    """``LT_BENCH_GPU_GIB``: use at most that much of the GPU (an H200's 139 GiB held to an H100's 79.2, say)."""
    cap = os.environ.get("LT_BENCH_GPU_GIB")
    if cap and torch.cuda.is_available():
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total))


def make_module(folder: Path, options: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lt_posttrain import SFTModule

    class RandomWeights(SFTModule):
        """The module, with its model built from the config (random weights, on the device) instead of loaded."""

        def build_model(self):
            from lt_posttrain.model.attention import register_varlen_attention

            register_varlen_attention()
            config = AutoConfig.from_pretrained(self.hparams.name_or_path)
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="varlen")

    return RandomWeights(str(folder), dtype="bfloat16", learning_rate=1e-5, schedule="constant",
                         gradient_checkpointing=True, optimizer=options.pop("optimizer", "adamw"), **options)


class HostPeak:
    """The peak resident set of this process while in the ``with`` block, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def estimate_at_start(tokens: int, into: dict):
    """A callback that puts into ``into`` the memory a step of ``tokens`` tokens needs (``estimate_gib``, and
    ``estimate_host_gib`` offloaded), estimated before the first step as the module's own check estimates it
    (``training/memory.py``; the check itself needs a data module, which these fits do not have); nothing off CUDA."""
    import lightning as L

    from lt_posttrain.training.memory import ModelShape, device_memory, estimate_step, setup_of

    class EstimateAtStart(L.Callback):
        def on_fit_start(self, trainer, module):
            measured = device_memory(trainer.strategy.root_device)
            if measured:
                options = module._step_options(trainer.optimizers)
                memory = estimate_step(ModelShape.of(module.model.config), tokens,
                                       setup_of(module.model, measured[0], trainer.precision, **options))  # fmt: skip
                into.update(estimate_gib=round(memory.device / 2**30, 2),
                            estimate_host_gib=round(memory.host / 2**30, 2))

    return EstimateAtStart()


def fit_steps(module, batches: list[dict], work: Path, callbacks: tuple = ()) -> dict:
    """A Lightning fit of ``len(batches)`` optimizer steps; the last step's time and the peaks."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize()
            self.times.append(time.perf_counter() - self._start)

    clock = StepClock()
    gpu = torch.cuda.is_available()  # on a CPU: a smoke test of this script
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-true", max_steps=len(batches), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0 if gpu else None, default_root_dir=str(work), callbacks=[clock, *callbacks])  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with HostPeak() as host:
        trainer.fit(module, train_dataloaders=loader)
    result = {"step_s": round(clock.times[-1], 2), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "host_peak_gib": round(host.peak / 2**30, 2), "loss": round(float(trainer.logged_metrics["train/loss"]), 4)}
    del trainer, loader
    return result


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory(module) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def host_available() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def out_of_memory(error: BaseException) -> bool:
    """A GPU allocation that failed, or a page-locked host buffer that could not be had."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def try_length(module, samples, tokens: int, work: Path) -> dict:
    config = module.model.config if module.model is not None else None
    offloads = getattr(getattr(module, "long_context", None), "offload_checkpoints", False)
    if offloads and config is not None:  # the host would run out before the GPU: the kernel kills, it raises nothing
        need = config.num_hidden_layers * config.hidden_size * 2 * tokens
        if need > 0.92 * host_available():
            return {"fits": False, "tokens": tokens, "error": f"host memory: checkpoints need {need / 2**30:.0f} GiB, "
                    f"{host_available() / 2**30:.0f} GiB available"}  # fmt: skip
    estimated: dict = {}
    try:
        result = fit_steps(module, [micro_batch(packed_row(samples, tokens))], work,
                           [estimate_at_start(tokens, estimated)])  # fmt: skip
        result["fits"] = True
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        result = {"fits": False, "error": str(error).splitlines()[0][:160]}
    free_memory(module)
    result.update(estimated, tokens=tokens)
    return result


def resident_gib(module) -> float:
    """GPU memory held before a step: the weights (and, after a first step, the optimizer's state)."""
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def gpu_total_gib():
    return round(torch.cuda.mem_get_info()[1] / 2**30, 2) if torch.cuda.is_available() else None


def search(args) -> None:
    shape, options = CONFIGS[args.config]
    shared, work, out = Path(args.shared), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    samples = torch.load(args.samples)["packed"]
    cap_gpu_memory()
    module = make_module(model_folder(shape, shared, work), dict(options))
    started, trials = time.perf_counter(), []

    def record(result: dict) -> dict:
        result.update(config=args.config, shape=shape, options=options, kind="search",
                      resident_gib=resident_gib(module), gpu_total_gib=gpu_total_gib(),
                      gpu_cap_gib=os.environ.get("LT_BENCH_GPU_GIB"))
        print(json.dumps(result), flush=True)
        with open(out, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        trials.append(result)
        return result

    fits, fails = 0, None
    tokens = args.start
    while tokens <= args.stop and time.perf_counter() - started < args.budget_s:
        if record(try_length(module, samples, tokens, work))["fits"]:
            fits, tokens = tokens, tokens * 2
        else:
            fails = tokens
            break
    while fails and fits and fails / fits > 1 + args.precision and time.perf_counter() - started < args.budget_s:
        middle = (fits + fails) // 2 // 1024 * 1024
        if record(try_length(module, samples, middle, work))["fits"]:
            fits = middle
        else:
            fails = middle
    summary = {"config": args.config, "shape": shape, "options": options, "kind": "longest", "longest": fits,
               "first_failing": fails, "trials": len(trials), "seconds": round(time.perf_counter() - started),
               "peak_gib": max((t.get("peak_gib", 0) for t in trials if t["fits"]), default=None),
               "host_peak_gib": max((t.get("host_peak_gib", 0) for t in trials if t["fits"]), default=None),
               "estimate_gib": next((t.get("estimate_gib") for t in trials if t["tokens"] == fits), None),
               "resident_gib": trials[-1]["resident_gib"] if trials else None,
               "bisected_to": None if not (fails and fits) else round(fails / fits - 1, 3)}  # fmt: skip
    print("LONGEST " + json.dumps(summary), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(summary) + "\n")


def speed(args) -> None:
    """One sample of ``--tokens`` and a packed row of as many, ``--steps`` steps each, in one process."""
    from lt_posttrain.callbacks.throughput import attention_flops_per_square_token, matmul_flops_per_token

    shape, options = CONFIGS[args.config]
    shared, work, out = Path(args.shared), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    loaded = torch.load(args.samples)
    cap_gpu_memory()
    module = make_module(model_folder(shape, shared, work), dict(options))
    single = loaded["single"]
    cut = {key: single[key][: args.tokens].tolist() for key in ("input_ids", "labels")}
    rows = {"one sample": [cut],
            "packed row": packed_row(loaded["packed"], args.tokens)}  # fmt: skip
    for layout, samples in rows.items():
        if layout not in args.layouts:
            continue
        try:
            result = fit_steps(module, [micro_batch(samples)] * args.steps, work)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            result = {"error": str(error).splitlines()[0][:160]}
        lengths = torch.tensor([len(sample["input_ids"]) for sample in samples], dtype=torch.float64)
        if "step_s" in result:
            flops = (matmul_flops_per_token(module.model) * lengths.sum()
                     + attention_flops_per_square_token(module.model.config) * (lengths**2).sum())  # fmt: skip
            result.update(tokens_per_s=round(float(lengths.sum()) / result["step_s"]),
                          tflops=round(float(flops) / result["step_s"] / 1e12, 1))
        result.update(config=args.config, shape=shape, options=options, kind="speed", layout=layout,
                      tokens=int(lengths.sum()), samples=len(samples), longest_sample=int(lengths.max()))
        print(json.dumps(result), flush=True)
        with open(out, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        free_memory(module)


def table(path: str, host_gib: float, gpu_gib: float) -> str:
    results = [json.loads(line) for line in open(path) if line.strip()]
    rows = ["| configuration | longest N (tokens) | first failing | peak GPU GiB | estimated GiB | peak host GiB | "
            "fraction of floor | trials |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in results if r.get("kind") == "longest"):
        config = SHAPES[r["shape"]]
        per_token = config["num_hidden_layers"] * config["hidden_size"] * 2
        gpu_left = (gpu_gib - (r["resident_gib"] or 0)) * 2**30
        offloads = (r["options"].get("long_context") or {}).get("offload_checkpoints")
        floor = (gpu_left + (host_gib * 2**30 if offloads else 0)) / per_token
        rows.append(f"| {r['config']} | {r['longest']:,} | {r['first_failing'] or '-'} | {r['peak_gib']} | "
                    f"{r.get('estimate_gib', '-')} | {r['host_peak_gib']} | {r['longest'] / floor:.0%} of {floor:,.0f} | {r['trials']} |")
    speeds = [r for r in results if r.get("kind") == "speed"]
    if speeds:
        rows += ["", "| configuration | layout | tokens | step s | tokens/s | model TFLOP/s | MFU (of 800) | peak GPU GiB "
                 "| peak host GiB |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in speeds:
            if "error" in r:
                rows.append(f"| {r['config']} | {r['layout']} | {r['tokens']:,} | out of memory | | | | | |")
                continue
            rows.append(f"| {r['config']} | {r['layout']} | {r['tokens']:,} | {r['step_s']} | {r['tokens_per_s']:,} "
                        f"| {r['tflops']} | {r['tflops'] / 800:.0%} | {r['peak_gib']} | {r['host_peak_gib']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    samples = commands.add_parser("samples")
    samples.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    samples.add_argument("--out", required=True)
    samples.add_argument("--max-sample", type=int, default=32768)
    samples.add_argument("--total", type=int, default=1_200_000)
    samples.add_argument("--single", type=int, default=131072)
    for name in ("search", "speed"):
        command = commands.add_parser(name)
        command.add_argument("config", choices=CONFIGS)
        command.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
        command.add_argument("--samples", required=True)
        command.add_argument("--out", required=True)
        command.add_argument("--work", default="/tmp/lt-long-context")
    commands.choices["search"].add_argument("--start", type=int, default=16384)
    commands.choices["search"].add_argument("--stop", type=int, default=2**21)
    commands.choices["search"].add_argument("--precision", type=float, default=0.05)
    commands.choices["search"].add_argument("--budget-s", type=float, default=400)
    commands.choices["speed"].add_argument("--tokens", type=int, default=131072)
    commands.choices["speed"].add_argument("--steps", type=int, default=2)
    commands.choices["speed"].add_argument("--layouts", nargs="+", default=["one sample", "packed row"])
    show = commands.add_parser("table")
    show.add_argument("results")
    show.add_argument("--host-gib", type=float, default=100, help="host memory usable for offloaded checkpoints")
    show.add_argument("--gpu-gib", type=float, default=79.2)
    args = parser.parse_args()
    if args.command == "samples":
        make_samples(args)
    elif args.command == "search":
        search(args)
    elif args.command == "speed":
        speed(args)
    else:
        print(table(args.results, args.host_gib, args.gpu_gib))


if __name__ == "__main__":
    main()
