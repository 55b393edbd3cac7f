"""Per-sample attention for packed rows: torch's varlen flash kernel on GPU, a per-sample loop elsewhere.

Registered as the transformers attention implementation ``"varlen"``, so any architecture that routes attention
through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen, Mistral, Gemma, ...) uses it. No mask function is registered for
it, so transformers never builds a dense mask. Sample boundaries arrive as ``cu_seq_lens_q/k`` and
``max_length_q/k`` keyword arguments of ``model(...)``; without them (a right-padded batch) plain causal attention
is exact for every real token.
"""

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

VARLEN = "varlen"

SCORES_PER_BLOCK = 2**24
"""The attention scores (``[batch, heads, queries, keys]`` float32 values) the CPU backward holds at once: a long
sample's queries are taken a block at a time, so no ``[tokens, tokens]`` matrix is ever built (64 MiB)."""


def _expand_kv(key: torch.Tensor, value: torch.Tensor, heads: int, dim: int):
    groups = heads // key.shape[dim]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=dim), value.repeat_interleave(groups, dim=dim)


_VARLEN_TAKES_GQA: Optional[bool] = None  # read once, outside any compiled code (dynamo cannot trace inspect)


def _varlen_attn_takes_enable_gqa() -> bool:
    global _VARLEN_TAKES_GQA
    if _VARLEN_TAKES_GQA is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # a torch without the varlen kernel: the CPU path is used
            _VARLEN_TAKES_GQA = False
        else:
            _VARLEN_TAKES_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters
    return _VARLEN_TAKES_GQA


def _varlen_cuda(query, key, value, cu_q, cu_k, max_q, max_k, scaling):
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, tokens, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * tokens, heads, dim)
    k = key.transpose(1, 2).reshape(batch * tokens, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * tokens, value.shape[1], dim)
    # Grouped-query attention: the flash kernel reads each key/value head for its group of query heads itself, so
    # k and v are never expanded. newer torch asks for enable_gqa; its first releases of varlen_attn pass them through
    # unchecked.
    extra = {"enable_gqa": True} if k.shape[1] != heads and _varlen_attn_takes_enable_gqa() else {}
    out = varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale=scaling, window_size=(-1, 0), **extra)
    return out.view(batch, tokens, heads, dim)


def _per_sample_loop(query, key, value, cu_seq_lens, scale):
    # SDPA's CPU kernel for causal attention without a mask is flash attention, in blocks: no [tokens, tokens] matrix
    # (tests/test_long_context.py watches for one)
    key, value = _expand_kv(key, value, query.shape[1], dim=1)
    out = torch.zeros_like(query)
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end > start:  # static shapes pad the boundaries with zero-length samples
            out[..., start:end, :] = F.scaled_dot_product_attention(
                query[..., start:end, :], key[..., start:end, :], value[..., start:end, :], is_causal=True, scale=scale
            )
    return out


# The per-sample loop as one operator: torch.compile sees an opaque call (the loop reads the boundaries on the host,
# which would break the compiled graph and recompile for every new set of lengths), and selective checkpointing sees
# one attention operator whose output it can keep, as on the GPU.
@torch.library.custom_op("lt_posttrain::per_sample_attention", mutates_args=())
def per_sample_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, scale: Optional[float]
) -> torch.Tensor:
    """Causal attention of each sample marked by ``cu_seq_lens`` to itself alone, one SDPA call per sample;
    ``[batch, heads, tokens, dim]`` in and out (key and value may have fewer heads)."""
    return _per_sample_loop(query, key, value, cu_seq_lens, scale)


@per_sample_attention.register_fake
def _(query, key, value, cu_seq_lens, scale):
    return torch.empty_like(query)


@torch.library.custom_op("lt_posttrain::per_sample_attention_backward", mutates_args=())
def per_sample_attention_backward(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
    scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of :func:`per_sample_attention`'s query, key and value, sample by sample (softmax attention's
    backward written out, in float32). A sample's queries are taken a block at a time against the keys up to the
    block's last one, so at most :data:`SCORES_PER_BLOCK` scores are held: memory linear in the sample's length."""
    return _per_sample_backward(grad, query, key, value, cu_seq_lens, scale)


def _per_sample_backward(grad, query, key, value, cu_seq_lens, scale):
    heads, kv_heads = query.shape[1], key.shape[1]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, g = query.float(), grad.float()
    k, v = (tensor.float().repeat_interleave(heads // kv_heads, dim=1) for tensor in (key, value))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        block = max(1, SCORES_PER_BLOCK // (q.shape[0] * heads * max(end - start, 1)))
        for first in range(start, end, block):  # queries first..last-1 see keys start..last-1
            last = min(first + block, end)
            rows, keys = slice(first, last), slice(start, last)
            scores = q[..., rows, :] @ k[..., keys, :].transpose(-1, -2) * scale
            positions = torch.arange(start, last, device=q.device)
            causal = positions[first - start :, None] >= positions[None, :]
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            dv[..., keys, :] += probs.transpose(-1, -2) @ g[..., rows, :]
            dprobs = g[..., rows, :] @ v[..., keys, :].transpose(-1, -2)
            dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True)) * scale
            dq[..., rows, :] = dscores @ k[..., keys, :]
            dk[..., keys, :] += dscores.transpose(-1, -2) @ q[..., rows, :]
    groups = (query.shape[0], kv_heads, heads // kv_heads, *key.shape[2:])
    dk, dv = (tensor.view(groups).sum(dim=2) for tensor in (dk, dv))  # each key/value head serves its group
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


@per_sample_attention_backward.register_fake
def _(grad, query, key, value, cu_seq_lens, scale):
    # The layouts the real operator returns (a compiled backward reshapes by them): the query's gradient in the
    # query's strides (zeros_like keeps them), the key's and value's contiguous (summed over each head's group).
    contiguous = (torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device) for tensor in (key, value))
    return torch.empty_like(query), *contiguous


def _save_attention_inputs(ctx, inputs, output):
    query, key, value, cu_seq_lens, scale = inputs
    ctx.save_for_backward(query, key, value, cu_seq_lens)
    ctx.scale = scale


def _attention_backward(ctx, grad):
    query, key, value, cu_seq_lens = ctx.saved_tensors
    return (*per_sample_attention_backward(grad, query, key, value, cu_seq_lens, ctx.scale), None, None)


per_sample_attention.register_autograd(_attention_backward, setup_context=_save_attention_inputs)


_sequence_parallel = None  # the attention split over a sequence-parallel group, while one is installed


def set_sequence_parallel_attention(attention) -> None:
    """Route :func:`varlen_attention`'s packed rows through ``attention`` (a callable with its signature that splits
    it over the ranks of a sequence-parallel group, ``training/sequence_parallel.py``), or back to one device
    (None). Process-wide, as the attention functions of transformers are: every varlen model of the process gets
    rows split the same way."""
    global _sequence_parallel
    _sequence_parallel = attention


def varlen_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: ``query`` ``[batch, heads, tokens, dim]`` in, ``[batch, tokens, heads, dim]``
    out; causal within each sample marked by ``cu_seq_lens_q/k``. Under sequence parallelism a packed row's part
    goes through the installed exchange (:func:`set_sequence_parallel_attention`), which calls
    :func:`varlen_attention_local` on the whole row."""
    if _sequence_parallel is not None and kwargs.get("cu_seq_lens_q") is not None:
        return _sequence_parallel(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return varlen_attention_local(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def varlen_attention_local(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """:func:`varlen_attention` on this device's tensors alone."""
    if dropout and module.training:
        raise ValueError("varlen attention has no dropout: set attention_dropout to 0 or use attn_implementation sdpa")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        key, value = _expand_kv(key, value, query.shape[1], dim=1)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling)
        return out.transpose(1, 2), None
    dtype = _flash_dtype(query)
    if query.is_cuda and dtype is not None:
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        out = _varlen_cuda(q, k, v, cu_q, cu_k, kwargs["max_length_q"], kwargs["max_length_k"], scaling)
        return out.to(query.dtype), None
    return per_sample_attention(query, key, value, cu_q, scaling).transpose(1, 2), None


def _flash_dtype(query: torch.Tensor):
    """The half-precision dtype the flash kernel runs in: the query's, or autocast's for a float32 query (e.g. from
    a bitsandbytes layer, which returns its input's dtype); None for float32 without autocast (then exact SDPA)."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def register_varlen_attention() -> str:
    """Make ``attn_implementation="varlen"`` available to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    _varlen_attn_takes_enable_gqa()
    return VARLEN
