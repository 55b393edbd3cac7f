"""Stage 3: a conversation becomes token ids and labels; only assistant turns carry loss.

The mask is built from the template itself, never by searching the text for a message's content: the conversation
is rendered turn by turn, so each character (and so each token) is known to come from the header, a prompt turn
or an assistant turn. A template that rewrites earlier turns when more follow (some reasoning models drop earlier
``<think>`` blocks) does not render turn by turn as a prefix of itself: the conversation is then cut where the
rewrite happens, and every assistant turn is trained once, in the context the template gives it at inference.
Text a template adds only at the end of a conversation (Phi-3's end-of-sequence token) is no rewrite: such a
conversation stays whole, and that text is trained after its last turn only.

Tool calls are part of the assistant turn that makes them, so they are trained like its text; tool results (``tool``
turns) never are. A turn's reasoning (``reasoning_content`` or ``thinking``) is rendered where the template renders
it, and trained unless the source says otherwise (``train_reasoning``): then the characters of the reasoning are
left out of the turn's span, and the rest of the turn stays trained.
"""

import functools
import os
import re
from itertools import accumulate
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Optional

from jinja2.exceptions import TemplateError

from lt_posttrain.batch import IGNORE_INDEX

TRAINED_ROLES = frozenset({"assistant"})
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "ipython", "function"})
"""The roles a conversation may hold: OpenAI's, and the names some chat templates give a tool's answer (Llama 3.1's
``ipython``, the older ``function``). Any other is a mistake in the data (a role a template renders as plain text,
or not at all), refused with the row rather than trained."""
ONE_PASS_FROM = 6  # messages: shorter conversations render turn by turn as fast
_TURN_ROLES = frozenset({"user", "tool", *TRAINED_ROLES})  # the roles after a conversation's leading system turns
_MARK, _MARK_END = "\ue000", "\ue001"  # private-use characters around a placeholder's number
_MARKERS = re.compile(f"{_MARK}(\\d+){_MARK_END}")
REASONING_KEYS = ("reasoning_content", "thinking")  # the fields a message may hold its reasoning in


def message_problem(messages: list[dict]) -> Optional[str]:
    """What is wrong with a conversation's messages, for a one-line error (None if nothing): an unknown role
    (:data:`KNOWN_ROLES`), a content that is neither text nor a list of content parts (``{"type": ...}``), or no
    content in a turn without tool calls."""
    for position, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in KNOWN_ROLES:
            return (f"message {position} has role {role!r}, which is none of {', '.join(sorted(KNOWN_ROLES))}: fix the "
                    "row, or map its roles (type: huggingface_instruct, role_mapping)")  # fmt: skip
        if content is None:
            if not message.get("tool_calls"):
                return f"message {position} ({role}) has no content: give it text, or remove the turn"
        elif not isinstance(content, str) and not (
            isinstance(content, list) and all(isinstance(part, dict) and "type" in part for part in content)
        ):
            return (f"message {position} ({role}): content must be text or a list of content parts "
                    f"({{\"type\": \"text\", \"text\": ...}}), got {content!r:.60}")  # fmt: skip
    return None


@dataclass
class RenderedConversation:
    """The template's text of (part of) a conversation and the character spans ``[start, end)`` that carry loss."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    weights: list[float] | None = None  # one per span (a message's ``weight``); ``None``: all 1


class MaskError(ValueError):
    """A message's ``train`` or ``weight`` cannot pick its mask; the caller names the source and the row."""


class RenderError(ValueError):
    """A renderer cannot render a conversation; the caller names the source and the row in the user's message."""


@dataclass(frozen=True)
class Masking:
    """Which tokens of a conversation carry loss (a source's ``mask`` and ``train_end_of_turn``).

    Args:
        mask: ``all_assistant`` (every assistant turn), ``last_assistant`` (the last one only), ``all_tokens``
            (the whole rendered conversation, as continued pre-training), or ``field`` (the assistant turns whose
            message has ``train`` true or missing, each weighted by the message's ``weight``, default 1).
        train_end_of_turn: train the text the template puts after an assistant turn's content (its end-of-turn
            token); ``False`` trains the content only (and, in a turn with tool calls, the calls).
        train_reasoning: train the reasoning of an assistant turn (its ``reasoning_content`` or ``thinking`` as the
            template renders it); ``False`` leaves those characters untrained, the rest of the turn trained.
    """

    mask: str = "all_assistant"
    train_end_of_turn: bool = True
    train_reasoning: bool = True


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):  # the usual case, and far faster than comparing character by character
        return len(a)
    return len(os.path.commonprefix([a, b]))


@dataclass(frozen=True)
class _Text:
    """``base[:cut] + ending``: the rendering of a conversation's first turns, held without copying ``base``.

    The one-pass path gives every turn's rendering as the whole conversation's rendering (``base``) up to where
    that turn ends, followed by what the template adds after a last turn (``ending``); the turn-by-turn path gives
    each rendering whole, as its ``ending`` (``base`` empty). Built by :meth:`of`, ``ending`` never starts with the
    character of ``base`` at ``cut``, so two texts on one base agree exactly up to the smaller ``cut``.
    """

    base: str
    cut: int
    ending: str

    @classmethod
    def of(cls, base: str, cut: int, ending: str) -> "_Text":
        same = _common_prefix_length(ending, base[cut : cut + len(ending)])
        return cls(base, cut + same, ending[same:])

    def __len__(self) -> int:
        return self.cut + len(self.ending)

    def piece(self, start: int, end: int) -> str:
        """The characters ``[start, end)``."""
        inside = self.base[start : min(end, self.cut)] if start < self.cut else ""
        return inside + self.ending[max(start - self.cut, 0) : max(end - self.cut, 0)]

    def common_prefix_length(self, other: "_Text") -> int:
        if not len(self) or not len(other):
            return 0
        if self.base is not other.base:
            assert self.cut == other.cut == 0, "texts on two bases"
            return _common_prefix_length(self.ending, other.ending)
        if self.cut != other.cut:
            return min(self.cut, other.cut)
        return self.cut + _common_prefix_length(self.ending, other.ending)

    def startswith(self, other: "_Text") -> bool:
        return self.common_prefix_length(other) == len(other)

    def endswith(self, suffix: str) -> bool:
        return len(suffix) <= len(self) and self.piece(len(self) - len(suffix), len(self)) == suffix

    def common_suffix_length(self, other: "_Text") -> int:
        most, size = min(len(self), len(other)), 64
        while True:  # compare growing tails: endings usually differ within a few characters
            size = min(size, most)
            mine, theirs = self.piece(len(self) - size, len(self)), other.piece(len(other) - size, len(other))
            same = len(os.path.commonprefix([mine[::-1], theirs[::-1]]))
            if same < size or size == most:
                return same
            size *= 8

    def stripped_length(self, end: int | None = None) -> int:
        """``len(text[:end].rstrip())``."""
        end = len(self) if end is None else end
        if end > self.cut and self.ending[: end - self.cut].rstrip():
            return self.cut + len(self.ending[: end - self.cut].rstrip())
        end = min(end, self.cut)
        while end and self.base[end - 1].isspace():
            end -= 1
        return end


_EMPTY = _Text("", 0, "")


def _marker(number: int) -> str:
    return f"{_MARK}{number}{_MARK_END}"


def _marker_positions(text: str, numbers) -> dict[int, int] | None:
    """Where each placeholder of ``numbers`` starts in ``text``: each exactly once, and no other."""
    found: dict[int, int] = {}
    for match in _MARKERS.finditer(text):
        number = int(match.group(1))
        if number in found:
            return None
        found[number] = match.start()
    if text.count(_MARK) != len(found) or found.keys() != set(numbers):
        return None
    return found


def _put_back(text: str, placed: list[tuple[int, int]], values: list[str]) -> str:
    """``text`` with each placeholder ``(start, number)`` of ``placed`` (in text order) replaced by its value."""
    pieces, at = [], 0
    for start, number in placed:
        pieces += [text[at:start], values[number]]
        at = start + len(_marker(number))
    return "".join(pieces) + text[at:]


def reasoning_of(message: dict) -> tuple[str, str] | None:
    """``(field, text)`` of a message's reasoning (``reasoning_content`` or ``thinking``), or ``None`` for none."""
    for key in REASONING_KEYS:
        value = message.get(key)
        if isinstance(value, str) and value:
            return key, value
    return None


class _NeedsTurnByTurn(Exception):
    """The one-pass renderings cannot answer (a leading assistant turn, or a turn that rewrote earlier ones)."""


def render_conversation(
    messages: list[dict], render, masking: Masking = Masking(), tools: list[dict] | None = None
) -> list[RenderedConversation]:
    """Render ``messages`` with ``render(messages, add_generation_prompt) -> str`` and mark the assistant spans.

    An assistant turn's span starts after the generation prompt (its header is not trained) and ends after its
    end-of-turn token; whitespace the template puts after that token belongs to the next turn's header.
    Trailing turns after the last assistant turn are left out. Usually one conversation comes back; more when the
    template rewrites earlier turns (see the module docstring). Text that a template adds only at the end of the
    conversation (Phi-3's end-of-sequence token) is no rewrite: it is trained after the last turn only.

    A long conversation is rendered in one pass (:func:`render_in_one_pass`) where the template allows it, else
    turn by turn (:func:`render_turn_by_turn`); both give the same spans. ``masking`` picks the spans (see
    :class:`Masking`); ``all_tokens`` trains the whole rendering of the conversation. ``tools`` (the tools the
    conversation may call, as JSON schemas) are given to every rendering as ``render(..., tools=tools)``.
    """
    if tools:
        render = functools.partial(render, tools=tools)
    if masking.mask == "all_tokens":
        text = render(messages, False)
        return [RenderedConversation(text, [(0, len(text))])] if text else []
    if len(messages) >= ONE_PASS_FROM:
        rendered = render_in_one_pass(messages, render, masking)
        if rendered is not None:
            return rendered
    return render_turn_by_turn(messages, render, masking)


def render_turn_by_turn(messages: list[dict], render, masking: Masking = Masking()) -> list[RenderedConversation]:
    """:func:`render_conversation` from the renderings of every prefix of the conversation (``messages[:i + 1]``,
    and ``messages[:i]`` with the generation prompt before each assistant turn): the definition of the spans, and
    quadratic in the number of turns."""

    def probed_start(i: int, full: _Text) -> int:
        # Two renderings with this turn's content replaced show where its content starts.
        message, text = messages[i], full.ending
        probes = [render(messages[:i] + [{**message, "content": content}], False) for content in ("a", "b")]
        turn_start = _common_prefix_length(*probes)
        if not text.startswith(probes[0][:turn_start]):
            return 0
        return turn_start - _generated_before_content(text, turn_start, message, render)

    end_of_turn = functools.cache(lambda: _end_of_turn_text(render))

    def content_end(i: int, full: _Text) -> int:
        message, text = messages[i], full.ending
        if message.get("tool_calls"):  # the calls come after the content, and are trained with it
            return _before_end_of_turn(full, end_of_turn())
        # two renderings with a character after this turn's content show where the content ends
        content = message.get("content") or ""
        probes = [render(messages[:i] + [{**message, "content": content + end}], False) for end in "\0\1"]
        end = _common_prefix_length(*probes)
        return end if text[:end] == probes[0][:end] else len(text)

    def reasoning_span(i: int, full: _Text) -> tuple[int, int] | None:
        # the rendering with this turn's reasoning replaced by a placeholder shows where the reasoning is
        found = reasoning_of(messages[i])
        if found is None:
            return None
        text = render(messages[:i] + [{**messages[i], found[0]: _marker(0)}], False)
        real, marks = full.ending, text.count(_MARK) - full.ending.count(_MARK)
        if marks == 0:
            return None  # the template leaves it out
        before, _, after = text.partition(_marker(0))
        if marks != 1 or len(before) + len(after) > len(real) or not (real.startswith(before) and real.endswith(after)):
            raise RenderError(f"message {i}: cannot tell which characters of the rendering are its reasoning "
                              "(the template renders it more than once, or changes it)")  # fmt: skip
        return len(before), len(real) - len(after)

    def full_of(i: int) -> _Text | None:
        try:
            return _Text("", 0, render(messages[: i + 1], False))
        except TemplateError:
            if messages[i]["role"] in TRAINED_ROLES:
                raise
            return None  # a template that refuses a conversation ending here (no user turn yet, ...)

    fulls = (full_of(i) for i in range(len(messages)))
    prompts = lambda i: _Text("", 0, render(messages[:i], True)) if i else _EMPTY  # noqa: E731
    marked = _mark_turns(
        messages, fulls, prompts, probed_start, None if masking.train_end_of_turn else content_end,
        None if masking.train_reasoning else reasoning_span,
    )  # fmt: skip
    samples = [RenderedConversation(text.ending, *_selected(spans, messages, masking)) for text, spans in marked]
    return [sample for sample in samples if sample.spans]


@dataclass
class _Placeholders:
    """A conversation with its strings replaced by numbered placeholders: each message's reasoning (when asked),
    its content when not empty (a template may test whether it is) and the names of its tool calls.

    Attributes:
        messages: the messages with placeholders.
        values: the string each placeholder stands for, by number.
        numbers: the placeholders of each message.
        content, reasoning: the placeholder of each message's content or reasoning, where it has one.
    """

    messages: list[dict]
    values: list[str] = field(default_factory=list)
    numbers: list[list[int]] = field(default_factory=list)
    content: dict[int, int] = field(default_factory=dict)
    reasoning: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, messages: list[dict], with_reasoning: bool) -> "_Placeholders":
        held = cls([])
        for i, message in enumerate(messages):
            copy, first = dict(message), len(held.values)
            found = reasoning_of(message) if with_reasoning else None
            if found is not None:
                held.reasoning[i] = len(held.values)
                copy[found[0]] = held._hold(found[1])
            if message.get("content"):
                held.content[i] = len(held.values)
                copy["content"] = held._hold(message["content"])
            if message.get("tool_calls"):
                copy["tool_calls"] = [held._call_named(call) for call in message["tool_calls"]]
            if len(held.values) == first:
                raise _NeedsTurnByTurn  # nothing of this message to find in a rendering
            held.messages.append(copy)
            held.numbers.append(list(range(first, len(held.values))))
        return held

    def _hold(self, value) -> str:
        if not isinstance(value, str) or _MARK in value:
            raise _NeedsTurnByTurn
        self.values.append(value)
        return _marker(len(self.values) - 1)

    def _call_named(self, call) -> dict:
        # the name of a tool call, in OpenAI's shape ({"function": {"name", "arguments"}}) or flat
        if isinstance(call, dict) and isinstance(call.get("function"), dict) and call["function"].get("name"):
            return {**call, "function": {**call["function"], "name": self._hold(call["function"]["name"])}}
        if isinstance(call, dict) and call.get("name"):
            return {**call, "name": self._hold(call["name"])}
        raise _NeedsTurnByTurn


def render_in_one_pass(
    messages: list[dict], render, masking: Masking = Masking()
) -> list[RenderedConversation] | None:
    """:func:`render_conversation` at a cost linear in the conversation's length, or ``None`` where the template
    does not allow it (the caller then renders turn by turn).

    The conversation is rendered twice whole: as it is, and with its strings (every non-empty content, the names
    of tool calls, and the reasoning when it is not trained) replaced by placeholders. Putting the strings back into
    the second rendering must give the first, so the template renders each of them once, unchanged, a message's
    after the earlier messages'. Each turn's rendering as the last turn (what the turn-by-turn path renders) is then
    read from a short conversation with placeholders: the leading system turns, the turns from the last user turn
    before it on, and of a run of tool calls after that user turn only the turns from the latest assistant turn on.
    Everything such a rendering shares with the whole one must be the same, and the turn's spans come from the same
    rules as turn by turn. What is assumed: a turn renders the same whether the turns left out are there or not (a
    template that rewrites a turn because of a later one still falls back: the short renderings show the rewrite).
    Not used for a conversation that starts with an assistant turn, a message with no such string (an empty
    content and no tool call), a content that is not a string, or a template that rewrites earlier turns.
    """
    count = len(messages)
    if messages[0]["role"] in TRAINED_ROLES:
        return None
    try:
        held = _Placeholders.of(messages, with_reasoning=not masking.train_reasoning)
    except _NeedsTurnByTurn:
        return None
    head = next((i for i, message in enumerate(messages) if message["role"] in _TURN_ROLES), count)
    marker_length = [len(_marker(number)) for number in range(len(held.values))]
    try:
        whole, base = render(messages, False), render(held.messages, False)
        at = _marker_positions(base, range(len(held.values)))
        if at is None:
            return None
        order = sorted(at, key=at.__getitem__)
        if _put_back(base, [(at[number], number) for number in order], held.values) != whole:
            return None
        starts = [min(at[number] for number in numbers) for numbers in held.numbers]
        ends = [max(at[number] + marker_length[number] for number in numbers) for numbers in held.numbers]
        if any(ends[i] > starts[i + 1] for i in range(count - 1)):
            return None  # a message's strings among another's

        def as_last(indices: list[int], first: int, add_generation_prompt: bool) -> _Text:
            # the rendering of the turns ``indices`` as a _Text on ``base``: the same text as ``base`` from turn
            # ``first``'s first placeholder (from the start where ``indices`` are the first turns) to the last
            # turn's last one, then its own ending
            text = render([held.messages[i] for i in indices], add_generation_prompt)
            own = _marker_positions(text, [number for i in indices for number in held.numbers[i]])
            if own is None:
                raise _NeedsTurnByTurn
            last = indices[-1]
            own_end = max(own[number] + marker_length[number] for number in held.numbers[last])
            whole_prefix = last == len(indices) - 1
            origin = 0 if whole_prefix else min(own[number] for number in held.numbers[first])
            if text[origin:own_end] != base[0 if whole_prefix else starts[first] : ends[last]]:
                raise _NeedsTurnByTurn  # the turns render otherwise when they come last
            ending = text[own_end:]
            if _MARK in ending:
                raise _NeedsTurnByTurn
            return _Text.of(base, ends[last], ending)

        def check_bounds(i: int, full: _Text, before: list) -> None:
            # Where a turn's span starts (where the renderings ``before`` it part from ``full``) or ends (before
            # trailing whitespace) at one of its placeholders, the real string may go on matching: the text of the
            # generation prompt after the header (DeepSeek-R1's "<think>\n") may begin the content, a content may
            # end with whitespace. Those turns render turn by turn.
            bounds = {at[number]: number for number in held.numbers[i]}
            for text in before:
                common = text.common_prefix_length(full) if text is not None else -1
                if common in bounds and common < len(text):
                    if held.values[bounds[common]].startswith(text.piece(common, common + 1)):
                        raise _NeedsTurnByTurn
            end = full.stripped_length()
            ends_at = {at[number] + marker_length[number]: number for number in held.numbers[i]}
            if end in ends_at and held.values[ends_at[end]][-1:].isspace():
                raise _NeedsTurnByTurn

        fulls, prompts, last_user, last_assistant, previous = [], {}, None, None, None
        for i, message in enumerate(messages):
            first = head if last_user is None else last_user
            first -= (first - head) % 2  # keep each turn's parity, for templates that check the alternation
            if i <= first:
                window = list(range(i + 1))
            elif last_user is not None and last_assistant is not None and last_assistant > last_user + 1:
                # tool rounds since the last user turn: from the latest assistant turn on, after the user turn
                window = [*range(head), *range(first, last_user + 1), *range(last_assistant, i + 1)]
                first = last_assistant
            else:
                window = [*range(head), *range(first, i + 1)]
            try:
                fulls.append(as_last(window, first, False))
            except TemplateError:
                if message["role"] in TRAINED_ROLES:
                    raise
                fulls.append(None)  # as turn by turn
            if message["role"] in TRAINED_ROLES:
                prompts[i] = as_last(window[:-1], first, True)
                check_bounds(i, fulls[-1], [prompts[i], previous])
                last_assistant = i
            if message["role"] == "user":
                last_user, last_assistant = i, None
            previous = fulls[-1] if fulls[-1] is not None else previous
        if fulls[-1] is None or fulls[-1].cut != len(base) or fulls[-1].ending:
            return None  # the last turn, rendered after the turns it was given, does not end as the whole does

        def probed_start(i: int, full: _Text) -> int:
            raise _NeedsTurnByTurn

        end_of_turn = functools.cache(lambda: _end_of_turn_text(render))

        def content_end(i: int, full: _Text) -> int:
            if messages[i].get("tool_calls"):
                return _before_end_of_turn(full, end_of_turn())
            if i not in held.content:
                raise _NeedsTurnByTurn
            return at[held.content[i]] + marker_length[held.content[i]]

        def reasoning_span(i: int, full: _Text) -> tuple[int, int] | None:
            number = held.reasoning.get(i)
            return None if number is None else (at[number], at[number] + marker_length[number])

        marked = _mark_turns(
            messages, fulls, prompts.__getitem__, probed_start, None if masking.train_end_of_turn else content_end,
            None if masking.train_reasoning else reasoning_span,
        )  # fmt: skip
    except (_NeedsTurnByTurn, TemplateError, ValueError):
        return None
    placed = [at[number] for number in order]
    shifts = list(accumulate(len(held.values[number]) - marker_length[number] for number in order))

    def real(position: int) -> int:  # a position of ``base`` in ``whole``
        before = bisect_right(placed, position - 1)  # placeholders that start before it
        inside = before and position < placed[before - 1] + marker_length[order[before - 1]]
        if inside:
            raise _NeedsTurnByTurn
        return position + (shifts[before - 1] if before else 0)

    samples = []
    try:
        for text, spans in marked:
            cut = real(text.cut)

            def moved(position: int) -> int:
                return real(position) if position <= text.cut else cut + position - text.cut

            spans, weights = _selected(spans, messages, masking)
            moved_spans = [(moved(a), moved(b)) for a, b in spans]
            if moved_spans:
                samples.append(RenderedConversation(whole[:cut] + text.ending, moved_spans, weights))
    except _NeedsTurnByTurn:
        return None
    return samples


def _mark_turns(
    messages: list[dict], fulls, prompt_of, probed_start, content_end=None, reasoning_span=None
) -> list[tuple[_Text, list]]:
    """The samples of a conversation, as ``(text, spans)`` with spans ``(start, end, turn index)``, from the
    renderings of its prefixes: ``fulls`` yields the rendering of ``messages[:i + 1]`` for each ``i`` (``None``
    where the template refuses to end a conversation with an untrained turn: nothing is learnt from it),
    ``prompt_of(i)`` is that of ``messages[:i]`` with the generation prompt, ``probed_start(i, full)`` where turn
    ``i``'s trained text starts when its rendering does not follow the earlier ones, ``content_end(i, full)``
    (given when the end-of-turn text is not trained) where its content ends, and ``reasoning_span(i, full)`` (given
    when reasoning is not trained) the characters ``(start, end)`` of its reasoning, or ``None``."""
    samples: list[tuple[_Text, list]] = []
    current: _Text | None = None
    spans: list[tuple[int, int]] = []
    previous = _EMPTY
    for i, (message, full) in enumerate(zip(messages, fulls)):
        if full is None:
            continue
        if current is not None and not full.startswith(current):
            kept = _continued_length(current, spans, full)
            if kept is None:
                samples.append((current, spans))  # the template rewrote what this sample has already trained
                current, spans = None, []
            else:  # the earlier rendering's ending was the conversation's end, not part of its last turn
                spans = [(start, min(end, kept), turn) for start, end, turn in spans]
        if message["role"] in TRAINED_ROLES:
            prompt = prompt_of(i)
            start = max(prompt.common_prefix_length(full), previous.common_prefix_length(full))
            if i == 0 or (not full.startswith(previous) and not full.startswith(prompt)):
                # Nothing rendered before this turn (a leading assistant turn still gets the template's header and
                # default system prompt), or this turn made the template rewrite earlier turns.
                start = max(start, probed_start(i, full))
            end = full.stripped_length()
            if content_end is not None:
                end = min(end, content_end(i, full))
            current = full
            pieces = [(start, end)]
            hole = reasoning_span(i, full) if reasoning_span is not None else None
            if hole is not None:
                pieces = [(start, min(end, hole[0])), (max(start, hole[1]), end)]
            spans += [(piece_start, piece_end, i) for piece_start, piece_end in pieces if piece_end > piece_start]
        previous = full
    if current is not None:
        samples.append((current, spans))
    return [(text, spans) for text, spans in samples if spans]


def _selected(spans: list, messages: list[dict], masking: Masking) -> tuple[list, list | None]:
    """The spans ``(start, end, turn)`` of one sample that ``masking`` trains, as ``(spans, weights)``."""
    if masking.mask == "last_assistant":
        last = max(i for i, message in enumerate(messages) if message["role"] in TRAINED_ROLES)
        return [(start, end) for start, end, turn in spans if turn == last], None
    if masking.mask != "field":
        return [(start, end) for start, end, _turn in spans], None
    kept, weights = [], []
    for start, end, turn in spans:
        train, weight = messages[turn].get("train", True), messages[turn].get("weight", 1.0)
        if not isinstance(train, bool):
            raise MaskError(f"message {turn}: 'train' must be true or false, got {train!r:.40}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise MaskError(f"message {turn}: 'weight' must be a number of 0 or more, got {weight!r:.40}")
        if train and weight > 0:
            kept.append((start, end))
            weights.append(float(weight))
    return kept, weights


def _continued_length(text: _Text, spans: list, full: _Text) -> int | None:
    """Where the trained text of a sample (``text``, with ``spans``) ends when ``full`` (the rendering with one more
    turn) continues it, except for an ending that ``full`` also ends with (text the template adds at the end of
    every conversation); ``None`` when the template rewrote earlier text."""
    common = text.common_prefix_length(full)
    if not full.endswith(text.piece(common, len(text))):
        return None
    # Every cut between the start of the shared ending and ``common`` splits ``text`` into a prefix of ``full``
    # and an ending of it (``<|end|>\n<|`` of Phi-3 is both); the turn ends at the last line break among them.
    earliest = max(len(text) - text.common_suffix_length(full), 0)
    between = text.piece(earliest, common)
    line_break = max(between.rfind(space) for space in "\n ")
    cut = earliest + line_break + 1 if line_break >= 0 else common
    kept = text.stripped_length(cut)
    if not spans or kept <= spans[-1][0]:
        return None
    return kept


def _generated_before_content(full: str, content_start: int, message: dict, render) -> int:
    """How much of the text right before ``content_start`` the model generates: what the template puts between the
    generation prompt and the content of ``message`` when the turn follows a user turn (an empty think block), if
    ``full`` has that text there too. A turn is then trained from the same place whatever its position."""
    user = {"role": "user", "content": "a"}
    try:
        prompt = render([user], True)
        probes = [render([user, {**message, "content": text}], False) for text in ("a", "b")]
    except (TemplateError, ValueError):  # a template that refuses this pair (roles must alternate, ...)
        return 0
    generated = probes[0][_common_prefix_length(prompt, probes[0]) : _common_prefix_length(*probes)]
    return len(generated) if generated and full[:content_start].endswith(generated) else 0


def _end_of_turn_text(render) -> str:
    """What the template puts after the content of an answer that ends a conversation (its end-of-turn token),
    without trailing whitespace."""
    conversation = [{"role": "user", "content": "a"}]
    probes = [render([*conversation, {"role": "assistant", "content": "b" + end}], False) for end in "\0\1"]
    return probes[0][_common_prefix_length(*probes) + 1 :].rstrip()


def _before_end_of_turn(full: _Text, end_of_turn: str) -> int:
    """Where the last turn of ``full`` ends without its end-of-turn text ``end_of_turn`` (and the whitespace before
    it); where the turn does not end with that text, its end."""
    end = full.stripped_length()
    if end_of_turn and full.piece(end - len(end_of_turn), end) == end_of_turn:
        return full.stripped_length(end - len(end_of_turn))
    return end


def tokenize_rendered(rendered: RenderedConversation, tokenizer, max_length: int) -> dict:
    """Token ids and labels (``-100`` where no loss) of ``rendered``, cut to ``max_length`` tokens.

    Returns ``input_ids``, ``labels`` and ``truncated`` (tokens dropped). A token carries loss when its first
    character lies in an assistant span. The first label is always ``-100``: nothing predicts the first token,
    which also keeps packed samples from predicting across their boundary.
    """
    return tokenize_rendered_batch([rendered], tokenizer, max_length)[0]


def tokenize_rendered_batch(rendered: list[RenderedConversation], tokenizer, max_length: int) -> list[dict]:
    """:func:`tokenize_rendered` of many conversations in one call of the tokenizer (its batch path is parallel)."""
    if not rendered:
        return []
    texts = [part.text for part in rendered]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's own: no per-token Python objects
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        pairs = [(encoding.ids, encoding.offsets) for encoding in encodings]
    else:
        encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs = zip(encodings["input_ids"], encodings["offset_mapping"])
    return [_labelled(ids, offsets, part, max_length) for part, (ids, offsets) in zip(rendered, pairs)]


def _labelled(input_ids: list[int], offsets: list[tuple[int, int]], rendered: RenderedConversation, max_length: int):
    input_ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    weights = None if rendered.weights is None else [0.0] * len(input_ids)
    starts = [start for start, _end in offsets]  # non-decreasing: tokens come in text order
    for number, (span_start, span_end) in enumerate(rendered.spans):
        first, last = bisect_left(starts, span_start), bisect_left(starts, span_end)
        labels[first:last] = input_ids[first:last]
        if weights is not None:
            weights[first:last] = [rendered.weights[number]] * (last - first)
    truncated = max(0, len(input_ids) - max_length)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    sample = {"input_ids": input_ids, "labels": labels, "truncated": truncated}
    if weights is not None:
        sample["token_weights"] = weights[:max_length]
    return sample


def template_renderer(tokenizer, chat_template: str | None = None, **template_kwargs):
    """``render(messages, add_generation_prompt, tools=None) -> str`` with the tokenizer's chat template (or
    ``chat_template``), as transformers renders it: ``tools`` (JSON schemas) are given to the template, and a
    message's reasoning (``reasoning_content`` or ``thinking``, whichever it has) as the template reads it: under its
    field, or, for a template that reads reasoning from the content (DeepSeek-R1's), before the content as
    ``<think>\nREASONING\n</think>\n\n``. A message with reasoning is an error for a template that reads none."""
    reasoning_keys: dict[str, str | None] = {}  # by template

    def render(messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        template = tokenizer.get_chat_template(chat_template, tools)
        if template not in reasoning_keys:
            reasoning_keys[template] = _reasoning_key(tokenizer, template)
        return tokenizer.apply_chat_template(
            _with_reasoning_key(messages, reasoning_keys[template]),
            tools=tools or None,  # an empty list would still print a template's tool instructions
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    return render


def _reasoning_key(tokenizer, template: str) -> str | None:
    """The field of a message that ``template`` reads its reasoning from: the first of :data:`REASONING_KEYS`
    whose text shows in the rendering of a question and an answer with a reasoning in that field (a template may
    read ``thinking`` from content parts and ``reasoning_content`` from the message, as Mistral's do). Else
    ``content`` for a template that finds the reasoning in the content (it splits it at ``</think>``), or ``None``."""
    probe = "\ue002"
    for key in REASONING_KEYS:
        answer = {"role": "assistant", "content": "b", key: probe}
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}, answer], chat_template=template, tokenize=False
            )
        except (TemplateError, ValueError):  # a template that wants other conversations: it shows nothing here
            continue
        if probe in text:
            return key
    return "content" if "</think>" in template else None


def _with_reasoning_key(messages: list[dict], key: str | None) -> list[dict]:
    """``messages`` with each message's reasoning where ``key`` (from :func:`_reasoning_key`) says."""
    if not any(name in message for message in messages for name in REASONING_KEYS):
        return messages
    renamed = []
    for i, message in enumerate(messages):
        found = reasoning_of(message)
        if found is not None and key is None:
            raise RenderError(
                f"message {i} has reasoning ({found[0]!r}), which the chat template does not render (it reads no "
                f"{' or '.join(REASONING_KEYS)} field, nor a think block in the content): use a template that "
                "renders reasoning (data.chat_template), or remove the field"
            )
        if found is not None and any(name in message for name in REASONING_KEYS if name != key):
            message = {name: value for name, value in message.items() if name not in REASONING_KEYS}
            if key == "content":
                message["content"] = f"<think>\n{found[1]}\n</think>\n\n{message.get('content') or ''}"
            else:
                message[key] = found[1]
        renamed.append(message)
    return renamed


def tokenize_conversation(
    messages: list[dict],
    tokenizer,
    max_length: int,
    chat_template: str | None = None,
    masking: Masking = Masking(),
    tools: list[dict] | None = None,
) -> list[dict]:
    """Stage 3 in one call: ``messages`` (which may call ``tools``) to a list of samples (usually one), each with
    ``input_ids`` and ``labels`` (and ``token_weights``, the loss weight of each token, with
    ``masking.mask == "field"``)."""
    render = template_renderer(tokenizer, chat_template)
    return tokenize_rendered_batch(render_conversation(messages, render, masking, tools), tokenizer, max_length)


def count_loss_tokens(labels: list[int]) -> int:
    """Tokens that carry loss in one sample (its first label never does)."""
    rest = labels[1:]
    return len(rest) - rest.count(IGNORE_INDEX)
