"""Data preparation speed: GSM8K-train read, rendered with the chat template, tokenized, masked and packed.

    python bench/data_prep.py [GSM8K_JSONL] [TOKENIZER_DIR] [--num-proc N] [--max-length 4096]

Cold: a fresh datasets cache (nothing tokenized yet), as on a first run. Warm: the same again, served from the cache.
Importing the datasets library is timed apart (``import_s``): a fit pays it once at start, whatever its data.
Prints one JSON line.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(SHARED / "data" / "gsm8k_train.jsonl"))
    parser.add_argument("tokenizer", nargs="?", default=str(SHARED / "assets" / "smollm2-tokenizer"))
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--max-length", type=int, default=4096)
    args = parser.parse_args()
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lt-bench-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    start = time.perf_counter()
    import datasets  # noqa: F401

    import_s = round(time.perf_counter() - start, 2)
    from transformers import AutoTokenizer

    from lt_posttrain.data.dataset import load_samples
    from lt_posttrain.data.packing import pack_best_fit
    from lt_posttrain.data.sources import Source

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    source = Source(name_or_path=args.data, type="huggingface_instruct", role_mapping={"user": "question", "assistant": "answer"})
    timings = {}
    for run in ("cold", "warm"):
        start = time.perf_counter()
        samples, _ = load_samples([source], tokenizer, args.max_length, None, num_proc=args.num_proc)
        rows = pack_best_fit(samples["length"][:], args.max_length)
        timings[f"{run}_s"] = round(time.perf_counter() - start, 2)
    tokens = sum(samples["length"][:])
    print(json.dumps({"rows": len(samples), "tokens": tokens, "loss_tokens": sum(samples["loss_count"][:]),
                      "packed_rows": len(rows), "fill": round(tokens / (len(rows) * args.max_length), 4),
                      "num_proc": args.num_proc, "cpus": os.cpu_count(), "import_s": import_s, **timings}))  # fmt: skip


if __name__ == "__main__":
    main()
