"""Reward pairs for the tests, made from GSM8K in the repository's ../shared (a module of its own, not conftest, so
that test folders of several packages can be collected together)."""

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[4] / "shared"
SHORT_PAIRS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
               {"prompt": "Is 7 prime?", "chosen": "Yes.", "rejected": "No, it is not."}]  # fmt: skip


def gsm8k_pairs(count: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected", "margin"}`` rows: a GSM8K question, the first step and the result of its
    worked answer and of the next problem's (short: ~30 tokens each), every other row a margin."""
    with open(SHARED / "data" / "gsm8k_train.jsonl") as file:
        rows = [json.loads(line) for _, line in zip(range(count + 1), file)]

    def short(answer: str) -> str:
        lines = answer.splitlines()
        return f"{lines[0]}\n{lines[-1]}"

    pairs = [{"prompt": a["question"], "chosen": short(a["answer"]), "rejected": short(b["answer"])}
             for a, b in zip(rows, rows[1:])]  # fmt: skip
    return [{**pair, "margin": 0.5 * (n + 1)} if n % 2 == 0 else pair for n, pair in enumerate(pairs)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reward_data(tokenizer, path: Path, **options):
    """The reward data module over ``path``, set up for fitting, in row order."""
    from lt_posttrain_reward import RewardDataModule

    data = RewardDataModule([{"name_or_path": str(path), "type": "reward_pairs"}], max_length=512, shuffle=False,
                            **options)  # fmt: skip
    data.connect(tokenizer)
    data.setup("fit")
    return data
