"""Stage 3: a conversation becomes token ids and labels; only assistant turns carry loss.

The mask is built from the template itself, never by searching the text for a message's content: the conversation
is rendered turn by turn, so each character (and so each token) is known to come from the header, a prompt turn
or an assistant turn. A template that rewrites earlier turns when more follow (some reasoning models drop earlier
``<think>`` blocks) does not render turn by turn as a prefix of itself: the conversation is then cut where the
rewrite happens, and every assistant turn is trained once, in the context the template gives it at inference.
Text a template adds only at the end of a conversation (Phi-3's end-of-sequence token) is no rewrite: such a
conversation stays whole, and that text is trained after its last turn only.
"""

import os
from itertools import accumulate
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

from lt_posttrain.batch import IGNORE_INDEX

TRAINED_ROLES = frozenset({"assistant"})
ONE_PASS_FROM = 6  # messages: shorter conversations render turn by turn as fast
_TURN_ROLES = frozenset({"user", "tool", *TRAINED_ROLES})  # the roles after a conversation's leading system turns
_MARK, _MARK_END = "\ue000", "\ue001"  # private-use characters around a placeholder's number


@dataclass
class RenderedConversation:
    """The template's text of (part of) a conversation and the character spans ``[start, end)`` that carry loss."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    weights: list[float] | None = None  # one per span (a message's ``weight``); ``None``: all 1


class MaskError(ValueError):
    """A message's ``train`` or ``weight`` cannot pick its mask; the caller names the source and the row."""


@dataclass(frozen=True)
class Masking:
    """Which tokens of a conversation carry loss (a source's ``mask`` and ``train_end_of_turn``).

    Args:
        mask: ``all_assistant`` (every assistant turn), ``last_assistant`` (the last one only), ``all_tokens``
            (the whole rendered conversation, as continued pre-training), or ``field`` (the assistant turns whose
            message has ``train`` true or missing, each weighted by the message's ``weight``, default 1).
        train_end_of_turn: train the text the template puts after an assistant turn's content (its end-of-turn
            token); ``False`` trains the content only.
    """

    mask: str = "all_assistant"
    train_end_of_turn: bool = True


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


def _marker(index: int) -> str:
    return f"{_MARK}{index}{_MARK_END}"


def _marker_starts(text: str, indices) -> list[int] | None:
    """Where the placeholders of ``indices`` start in ``text``: each exactly once, in order, and no other."""
    starts, at = [], 0
    for index in indices:
        found = text.find(_marker(index), at)
        if found < 0:
            return None
        starts.append(found)
        at = found + len(_marker(index))
    return starts if text.count(_MARK) == len(starts) else None


def _put_back(text: str, starts: list[int], contents: list[str]) -> str:
    """``text`` with the placeholder at each of ``starts`` replaced by its content."""
    pieces, at = [], 0
    for index, (start, content) in enumerate(zip(starts, contents)):
        pieces += [text[at:start], content]
        at = start + len(_marker(index))
    return "".join(pieces) + text[at:]


class _NeedsTurnByTurn(Exception):
    """The one-pass renderings cannot answer (a leading assistant turn, or a turn that rewrote earlier ones)."""


def render_conversation(messages: list[dict], render, masking: Masking = Masking()) -> list[RenderedConversation]:
    """Render ``messages`` with ``render(messages, add_generation_prompt) -> str`` and mark the assistant spans.

    An assistant turn's span starts after the generation prompt (its header is not trained) and ends after its
    end-of-turn token; whitespace the template puts after that token belongs to the next turn's header.
    Trailing turns after the last assistant turn are left out. Usually one conversation comes back; more when the
    template rewrites earlier turns (see the module docstring). Text that a template adds only at the end of the
    conversation (Phi-3's end-of-sequence token) is no rewrite: it is trained after the last turn only.

    A long conversation is rendered in one pass (:func:`render_in_one_pass`) where the template allows it, else
    turn by turn (:func:`render_turn_by_turn`); both give the same spans. ``masking`` picks the spans (see
    :class:`Masking`); ``all_tokens`` trains the whole rendering of the conversation.
    """
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

    def content_end(i: int, full: _Text) -> int:
        # two renderings with a character after this turn's content show where the content ends
        message, text = messages[i], full.ending
        probes = [render(messages[:i] + [{**message, "content": message["content"] + end}], False) for end in "\0\1"]
        end = _common_prefix_length(*probes)
        return end if text[:end] == probes[0][:end] else len(text)

    fulls = (_Text("", 0, render(messages[: i + 1], False)) for i in range(len(messages)))
    prompts = lambda i: _Text("", 0, render(messages[:i], True)) if i else _EMPTY  # noqa: E731
    marked = _mark_turns(messages, fulls, prompts, probed_start, None if masking.train_end_of_turn else content_end)
    samples = [RenderedConversation(text.ending, *_selected(spans, messages, masking)) for text, spans in marked]
    return [sample for sample in samples if sample.spans]


def render_in_one_pass(
    messages: list[dict], render, masking: Masking = Masking()
) -> list[RenderedConversation] | None:
    """:func:`render_conversation` at a cost linear in the conversation's length, or ``None`` where the template
    does not allow it (the caller then renders turn by turn).

    The conversation is rendered twice whole: as it is, and with every content replaced by a placeholder. Putting
    the contents back into the second rendering must give the first, so the template renders every content once,
    unchanged, in order. Each turn's rendering as the last turn (what the turn-by-turn path renders) is then read
    from a short conversation: the leading system turns and the turns from the last user turn before it on, with
    placeholders. Everything such a rendering shares with the whole one must be the same, and the turn's spans
    come from the same rules as turn by turn. What is assumed: a turn renders the same whether the turns more than
    one user turn back are there or not (a template that rewrites a turn because of a later one still falls back:
    the short renderings show the rewrite). Not used for a conversation that starts with an assistant turn, a turn
    whose content is not a non-empty string, or a template that rewrites earlier turns.
    """
    count = len(messages)
    contents = [message.get("content") for message in messages]
    if messages[0]["role"] in TRAINED_ROLES or not all(
        isinstance(content, str) and content and _MARK not in content for content in contents
    ):
        return None
    placeheld = [{**message, "content": _marker(i)} for i, message in enumerate(messages)]
    head = next((i for i, message in enumerate(messages) if message["role"] in _TURN_ROLES), count)
    try:
        whole, base = render(messages, False), render(placeheld, False)
        starts = _marker_starts(base, range(count))
        if starts is None or _put_back(base, starts, contents) != whole:
            return None

        def as_last(indices: list[int], first: int, add_generation_prompt: bool) -> _Text:
            # the rendering of the turns ``indices`` as a _Text on ``base``: the same text as ``base`` from turn
            # ``first``'s content (from the start where ``indices`` are the first turns) to the last turn's, then
            # its own ending
            text = render([placeheld[i] for i in indices], add_generation_prompt)
            own, last = _marker_starts(text, indices), indices[-1]
            if own is None:
                raise _NeedsTurnByTurn
            whole_prefix = indices[-1] == len(indices) - 1
            origin, base_origin = (0, 0) if whole_prefix else (own[indices.index(first)], starts[first])
            if text[origin : own[-1]] != base[base_origin : starts[last]]:
                raise _NeedsTurnByTurn  # the turns render otherwise when they come last
            ending = text[own[-1] + len(_marker(last)) :]
            if _MARK in ending:
                raise _NeedsTurnByTurn
            return _Text.of(base, starts[last] + len(_marker(last)), ending)

        fulls, prompts, last_user = [], {}, None
        for i, message in enumerate(messages):
            first = head if last_user is None else last_user
            first -= (first - head) % 2  # keep each turn's parity, for templates that check the alternation
            window = list(range(i + 1)) if i <= first else list(range(head)) + list(range(first, i + 1))
            fulls.append(as_last(window, first, False))
            if message["role"] in TRAINED_ROLES:
                prompts[i] = as_last(window[:-1], first, True)
            if message["role"] == "user":
                last_user = i

        def probed_start(i: int, full: _Text) -> int:
            raise _NeedsTurnByTurn

        def content_end(i: int, full: _Text) -> int:
            return starts[i] + len(_marker(i))

        marked = _mark_turns(
            messages, fulls, prompts.__getitem__, probed_start, None if masking.train_end_of_turn else content_end
        )
    except (_NeedsTurnByTurn, TemplateError, ValueError):
        return None
    shifts = list(accumulate(len(content) - len(_marker(i)) for i, content in enumerate(contents)))

    def real(position: int) -> int:  # a position of ``base`` in ``whole``
        before = bisect_right(starts, position - 1)  # placeholders that start before it
        inside = before and position < starts[before - 1] + len(_marker(before - 1))
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


def _mark_turns(messages: list[dict], fulls, prompt_of, probed_start, content_end=None) -> list[tuple[_Text, list]]:
    """The samples of a conversation, as ``(text, spans)`` with spans ``(start, end, turn index)``, from the
    renderings of its prefixes: ``fulls`` yields the rendering of ``messages[:i + 1]`` for each ``i``,
    ``prompt_of(i)`` is that of ``messages[:i]`` with the generation prompt, ``probed_start(i, full)`` where turn
    ``i``'s trained text starts when its rendering does not follow the earlier ones, and ``content_end(i, full)``
    (given when the end-of-turn text is not trained) where its content ends."""
    samples: list[tuple[_Text, list]] = []
    current: _Text | None = None
    spans: list[tuple[int, int]] = []
    previous = _EMPTY
    for i, (message, full) in enumerate(zip(messages, fulls)):
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
            if end > start:
                spans.append((start, end, i))
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
    """``render(messages, add_generation_prompt) -> str`` with the tokenizer's chat template (or ``chat_template``)."""

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    return render


def tokenize_conversation(
    messages: list[dict], tokenizer, max_length: int, chat_template: str | None = None, masking: Masking = Masking()
) -> list[dict]:
    """Stage 3 in one call: ``messages`` to a list of samples (usually one), each with ``input_ids`` and ``labels``
    (and ``token_weights``, the loss weight of each token, with ``masking.mask == "field"``)."""
    render = template_renderer(tokenizer, chat_template)
    return tokenize_rendered_batch(render_conversation(messages, render, masking), tokenizer, max_length)


def count_loss_tokens(labels: list[int]) -> int:
    """Tokens that carry loss in one sample (its first label never does)."""
    rest = labels[1:]
    return len(rest) - rest.count(IGNORE_INDEX)
