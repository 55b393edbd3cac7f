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
from bisect import bisect_left
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

from lt_posttrain.batch import IGNORE_INDEX

TRAINED_ROLES = frozenset({"assistant"})


@dataclass
class RenderedConversation:
    """The template's text of (part of) a conversation and the character spans ``[start, end)`` that carry loss."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):  # the usual case, and far faster than comparing character by character
        return len(a)
    return len(os.path.commonprefix([a, b]))


def render_conversation(messages: list[dict], render) -> list[RenderedConversation]:
    """Render ``messages`` with ``render(messages, add_generation_prompt) -> str`` and mark the assistant spans.

    An assistant turn's span starts after the generation prompt (its header is not trained) and ends after its
    end-of-turn token; whitespace the template puts after that token belongs to the next turn's header.
    Trailing turns after the last assistant turn are left out. Usually one conversation comes back; more when the
    template rewrites earlier turns (see the module docstring). Text that a template adds only at the end of the
    conversation (Phi-3's end-of-sequence token) is no rewrite: it is trained after the last turn only.
    """
    samples: list[RenderedConversation] = []
    current: RenderedConversation | None = None
    previous = ""
    for i, message in enumerate(messages):
        full = render(messages[: i + 1], False)
        if current is not None and not full.startswith(current.text):
            kept = _continued_length(current, full)
            if kept is None:
                samples.append(current)  # the template rewrote what this sample has already trained
                current = None
            else:  # the earlier rendering's ending was the conversation's end, not part of its last turn
                current.spans = [(start, min(end, kept)) for start, end in current.spans]
        if message["role"] in TRAINED_ROLES:
            prompt = render(messages[:i], True) if i else ""
            start = max(_common_prefix_length(prompt, full), _common_prefix_length(previous, full))
            if i == 0 or (not full.startswith(previous) and not full.startswith(prompt)):
                # Nothing rendered before this turn (a leading assistant turn still gets the template's header and
                # default system prompt), or this turn made the template rewrite earlier turns: two renderings with
                # this turn's content replaced show where its content starts.
                probes = [render(messages[:i] + [{**message, "content": text}], False) for text in ("a", "b")]
                turn_start = _common_prefix_length(*probes)
                if full.startswith(probes[0][:turn_start]):
                    start = max(start, turn_start - _generated_before_content(full, turn_start, message, render))
            end = len(full.rstrip())
            if current is None:
                current = RenderedConversation(text=full)
            current.text = full
            if end > start:
                current.spans.append((start, end))
        previous = full
    if current is not None:
        samples.append(current)
    return [sample for sample in samples if sample.spans]


def _continued_length(current: RenderedConversation, full: str) -> int | None:
    """Where ``current``'s trained text ends when ``full`` (the rendering with one more turn) continues it, except
    for an ending that ``full`` also ends with (text the template adds at the end of every conversation); ``None``
    when the template rewrote earlier text."""
    text = current.text
    common = _common_prefix_length(text, full)
    if not full.endswith(text[common:]):
        return None
    # Every cut between the start of the shared ending and ``common`` splits ``text`` into a prefix of ``full``
    # and an ending of it (``<|end|>\n<|`` of Phi-3 is both); the turn ends at the last line break among them.
    shared = len(os.path.commonprefix([text[::-1], full[::-1]]))
    earliest = max(len(text) - shared, 0)
    line_break = max(text.rfind(space, earliest, common) for space in "\n ")
    kept = len(text[: line_break + 1 if line_break >= 0 else common].rstrip())
    if not current.spans or kept <= current.spans[-1][0]:
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
    return [_labelled(ids, offsets, part.spans, max_length) for part, (ids, offsets) in zip(rendered, pairs)]


def _labelled(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], max_length: int):
    input_ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    starts = [start for start, _end in offsets]  # non-decreasing: tokens come in text order
    for span_start, span_end in spans:
        first, last = bisect_left(starts, span_start), bisect_left(starts, span_end)
        labels[first:last] = input_ids[first:last]
    truncated = max(0, len(input_ids) - max_length)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


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


def tokenize_conversation(messages: list[dict], tokenizer, max_length: int, chat_template: str | None = None) -> list[dict]:
    """Stage 3 in one call: ``messages`` to a list of samples (usually one), each with ``input_ids`` and ``labels``."""
    render = template_renderer(tokenizer, chat_template)
    return tokenize_rendered_batch(render_conversation(messages, render), tokenizer, max_length)


def count_loss_tokens(labels: list[int]) -> int:
    """Tokens that carry loss in one sample (its first label never does)."""
    rest = labels[1:]
    return len(rest) - rest.count(IGNORE_INDEX)
