"""``type: labelled_completions``: rows of a prompt, one answer to it, and a label saying whether that answer is
desirable (KTO's unpaired preference data, TRL's ``{prompt, completion, label}``)."""

from dataclasses import dataclass

from lt_posttrain import MessagesSourceType


@dataclass(frozen=True)
class LabelledCompletion:
    """One row: the prompt's turns, the answer's turns, and whether the answer is desirable."""

    prompt: list[dict]
    completion: list[dict]
    desirable: bool


class LabelledCompletionsSourceType(MessagesSourceType):
    """Rows ``{prompt or messages, completion, label}``.

    - ``completion``: the answer, as text (one assistant turn) or a list of ``{role, content}`` turns ending with an
      assistant turn.
    - ``label``: ``true`` when the answer is desirable, ``false`` when it is not (``1``/``0`` work too).
    - The prompt: the ``messages`` column (a list of turns; ``messages_column``, ``role_key`` and ``content_key`` as
      for ``type: messages``), else the ``prompt`` column (``input_key`` names another), text for one user turn or a
      list of turns (TRL's conversational form).

    Options (``options:`` of the source): ``completion_key`` and ``label_key``, other names for those columns. As one
    conversation (:meth:`messages`), a row is its prompt and its answer, whatever the label: ``data preview`` and
    ``predict`` read the same rows.
    """

    reads = MessagesSourceType.reads | {"input_key"}

    def labelled(self, row: dict, index: int) -> LabelledCompletion:
        """The prompt, answer and label of ``row`` (``index`` is its position, for error messages)."""
        options = self.source.options
        completion_key, label_key = options.get("completion_key", "completion"), options.get("label_key", "label")
        value = self.column(row, completion_key, index, "options.completion_key")
        completion = self.answer_turns(value, index, completion_key)
        if not completion or completion[-1]["role"] != "assistant":
            raise self.error(index, f"the {completion_key!r} answer must end with an assistant turn")
        label = self.column(row, label_key, index, "options.label_key")
        if label not in (True, False):  # 1 and 0 compare equal to True and False
            raise self.error(index, f"{label_key!r} must be true (a desirable answer) or false, got {label!r:.60}")
        return LabelledCompletion(self._prompt(row, index), completion, bool(label))

    def messages(self, row: dict, index: int) -> list[dict]:
        """The prompt followed by the answer."""
        labelled = self.labelled(row, index)
        return labelled.prompt + labelled.completion

    def _prompt(self, row: dict, index: int) -> list[dict]:
        prompt_key = self.source.input_key or "prompt"
        if row.get(self.source.messages_column) is not None:
            return super().messages(row, index)
        value = row.get(prompt_key)
        if isinstance(value, list):
            return self.answer_turns(value, index, prompt_key)
        if value is not None:
            return [{"role": "user", "content": self.text(value, index, repr(prompt_key))}]
        raise self.error(index, f"no prompt: give a {self.source.messages_column!r} column of turns or a "
                                f"{prompt_key!r} column (text or a list of turns; input_key names another)")
