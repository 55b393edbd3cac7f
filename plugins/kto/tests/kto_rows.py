"""Labelled answers for the tests, made from GSM8K in the repository's ../shared (a module of its own, not conftest,
so that test folders of several packages can be collected together)."""

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[4] / "shared"
SHORT_ROWS = [{"prompt": "2+2?", "completion": "4", "label": True},
              {"prompt": "Is 7 prime?", "completion": "No, it is not.", "label": False}]  # fmt: skip


def gsm8k_rows(count: int) -> list[dict]:
    """``{"prompt", "completion", "label"}`` rows: a GSM8K question with the first step and the result of its worked
    answer (desirable) or, every third row, of the next problem's (undesirable). Short answers (~30 tokens): each
    answer token goes through the 49k-word output head, the costly part on CPU."""
    with open(SHARED / "data" / "gsm8k_train.jsonl") as file:
        rows = [json.loads(line) for _, line in zip(range(count + 1), file)]

    def short(answer: str) -> str:
        lines = answer.splitlines()
        return f"{lines[0]}\n{lines[-1]}"

    return [{"prompt": row["question"], "completion": short(following["answer"] if n % 3 == 1 else row["answer"]),
             "label": n % 3 != 1} for n, (row, following) in enumerate(zip(rows, rows[1:]))]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def labelled_data(tokenizer, path: Path, **options):
    """The KTO data module over ``path``, set up for fitting, in row order."""
    from lt_posttrain_kto import UnpairedPreferenceDataModule

    data = UnpairedPreferenceDataModule([{"name_or_path": str(path), "type": "labelled_completions"}], max_length=512,
                                        shuffle=False, **options)  # fmt: skip
    data.connect(tokenizer)
    data.setup("fit")
    return data
