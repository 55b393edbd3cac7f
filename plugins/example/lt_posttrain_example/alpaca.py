"""``type: alpaca``: Stanford Alpaca's rows, ``{"instruction", "input", "output"}``, as conversations."""

from lt_posttrain import SourceType


class AlpacaSourceType(SourceType):
    """The instruction (followed by the ``input``, when there is one, after a blank line) is the user turn and the
    ``output`` the assistant turn. A row whose output is null is dropped (and counted).

    Options (``options:`` of the source): ``system``, a system prompt put before every conversation.
    """

    def messages(self, row: dict, index: int) -> list[dict]:
        missing = [column for column in ("instruction", "output") if column not in row]
        if missing:
            raise self.error(index, f"no column {missing[0]!r}; alpaca rows have instruction, input (optional) and "
                                    f"output, these have {', '.join(row)}")  # fmt: skip
        if row["output"] is None:
            return []
        prompt = self.text(row["instruction"], index, "'instruction'")
        if row.get("input"):
            prompt += "\n\n" + self.text(row["input"], index, "'input'")
        system = self.source.options.get("system")
        return [
            *([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": self.text(row["output"], index, "'output'")},
        ]
