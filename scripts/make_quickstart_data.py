"""Write the quickstart's instruction set: arithmetic word problems as chats, answered the same way every time.

Deterministic (seeded), so the file in ``configs/data/`` can be rebuilt: ``python scripts/make_quickstart_data.py``.
"""

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Juno", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards"]
SYSTEM = "You are a careful math tutor. Show the calculation, then give the result after '####'."


def problem(rng: random.Random) -> tuple[str, str]:
    (name, other), item = rng.sample(NAMES, 2), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        question = f"{name} has {a} {item} and {other} gives {name} {b} more. How many {item} does {name} have now?"
        answer = f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}.\n#### {a + b}"
    elif kind == "sub":
        a = a + b
        question = f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} are left?"
        answer = f"{name} starts with {a} {item} and gives away {b}: {a} - {b} = {a - b}.\n#### {a - b}"
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        question = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in all?"
        answer = f"There are {a} boxes of {b} {item}: {a} * {b} = {a * b}.\n#### {a * b}"
    return question, answer


def main(path: str = "configs/data/arithmetic_chats.jsonl", count: int = 600, seed: int = 0) -> None:
    rng = random.Random(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        for _ in range(count):
            question, answer = problem(rng)
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            file.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
