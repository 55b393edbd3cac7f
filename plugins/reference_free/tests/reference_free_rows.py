"""Preference rows for the tests, made from GSM8K in the repository's ../shared (a module of its own, not conftest,
so that test folders of several packages can be collected together)."""

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[4] / "shared"
SHORT_PAIRS = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
               {"prompt": "Is 7 prime?", "chosen": "Yes.", "rejected": "No, it is not."}]  # fmt: skip


def gsm8k_pairs(count: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows: a GSM8K question, its worked answer, and the next problem's."""
    with open(SHARED / "data" / "gsm8k_train.jsonl") as file:
        rows = [json.loads(line) for _, line in zip(range(count + 1), file)]
    return [{"prompt": a["question"], "chosen": a["answer"], "rejected": b["answer"]} for a, b in zip(rows, rows[1:])]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs_data(tokenizer, path: Path, **options):
    """The DPO plugin's data module over ``path``, set up for fitting, in row order."""
    from lt_posttrain_dpo import PreferenceDataModule

    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512,
                                shuffle=False, **options)  # fmt: skip
    data.connect(tokenizer)
    data.setup("fit")
    return data
