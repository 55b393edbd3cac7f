"""Chat rows for the tests, made from GSM8K in the repository's ../shared (a module of its own, not conftest, so that
test folders of several packages can be collected together)."""

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[4] / "shared"


def gsm8k_chats(count: int) -> list[dict]:
    """``{"messages"}`` rows: a GSM8K question and its worked answer."""
    with open(SHARED / "data" / "gsm8k_train.jsonl") as file:
        rows = [json.loads(line) for _, line in zip(range(count), file)]
    return [{"messages": [{"role": "user", "content": row["question"]},
                          {"role": "assistant", "content": row["answer"]}]} for row in rows]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_data(tokenizer, path: Path, **options):
    """The core's chat data module over ``path``, set up for fitting, in row order."""
    from lt_posttrain import InstructDataModule

    data = InstructDataModule([str(path)], max_length=512, shuffle=False, **options)
    data.connect(tokenizer)
    data.setup("fit")
    return data
