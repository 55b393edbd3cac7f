"""``type: preference_pairs``: rows of a prompt and two answers to it, the preferred one (``chosen``) and the other
(``rejected``)."""

import math
from dataclasses import dataclass

from lt_posttrain import MessagesSourceType

REFERENCE_COLUMNS = ("reference_chosen_logp", "reference_rejected_logp")


@dataclass(frozen=True)
class Pair:
    """One preference pair: the prompt's turns, each answer's turns, and the answers' log-probabilities under the
    reference model when the row has them (NaN otherwise)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    reference: tuple[float, float] = (math.nan, math.nan)


class PreferencePairsSourceType(MessagesSourceType):
    """Rows ``{prompt or messages, chosen, rejected}``.

    - ``chosen``, ``rejected``: each answer, as text (one assistant turn) or a list of ``{role, content}`` turns
      ending with an assistant turn. Turns that both lists start with are the prompt, so whole conversations work
      (as in ``HuggingFaceH4/ultrafeedback_binarized``).
    - Otherwise the prompt is the ``messages`` column (a list of turns; ``messages_column``, ``role_key`` and
      ``content_key`` as for ``type: messages``) or else the ``prompt`` column (text: a user turn; or a list of
      turns, TRL's conversational form; ``input_key`` names another column).
    - ``reference_chosen_logp``, ``reference_rejected_logp`` (optional): each answer's log-probability under the
      reference model (the sum over its tokens, as the trainer's ``precomputed_reference`` reads it).

    Options (``options:`` of the source): ``chosen_key`` and ``rejected_key``, other names for the answer columns.
    As one conversation (:meth:`messages`), a row is its prompt and chosen answer: SFT, ``data preview`` and
    ``predict`` read the same rows.
    """

    reads = MessagesSourceType.reads | {"input_key"}

    def pair(self, row: dict, index: int) -> Pair:
        """The prompt and both answers of ``row`` (``index`` is its position, for error messages)."""
        keys = self.source.options.get("chosen_key", "chosen"), self.source.options.get("rejected_key", "rejected")
        settings = ("options.chosen_key", "options.rejected_key")
        chosen, rejected = (self.answer_turns(self.column(row, key, index, setting), index, key)
                            for key, setting in zip(keys, settings))  # fmt: skip
        shared = next((n for n, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        if shared:
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        else:
            prompt = self._prompt(row, index)
        for key, answer in zip(keys, (chosen, rejected)):
            if not answer or answer[-1]["role"] != "assistant":
                raise self.error(index, f"the {key!r} answer must end with an assistant turn (after the turns both "
                                        "answers share)")  # fmt: skip
        reference = tuple(math.nan if row.get(column) is None else float(row[column]) for column in REFERENCE_COLUMNS)
        return Pair(prompt, chosen, rejected, reference)

    def messages(self, row: dict, index: int) -> list[dict]:
        """The prompt followed by the chosen answer."""
        pair = self.pair(row, index)
        return pair.prompt + pair.chosen

    def _prompt(self, row: dict, index: int) -> list[dict]:
        prompt_key = self.source.input_key or "prompt"
        if row.get(self.source.messages_column) is not None:
            return super().messages(row, index)
        if isinstance(row.get(prompt_key), list):  # TRL's conversational form: the prompt's turns
            return self.answer_turns(row[prompt_key], index, prompt_key)
        if row.get(prompt_key) is not None:
            return [{"role": "user", "content": self.text(row[prompt_key], index, repr(prompt_key))}]
        raise self.error(
            index,
            f"no prompt: give a {self.source.messages_column!r} column of turns or a {prompt_key!r} column of text "
            "(input_key), or chosen and rejected as whole conversations",
        )
