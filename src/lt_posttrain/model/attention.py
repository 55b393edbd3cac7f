"""Per-sample attention for packed rows: torch's varlen flash kernel on GPU, a per-sample loop elsewhere.

Registered as the transformers attention implementation ``"varlen"``, so any architecture that routes attention
through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen, Mistral, Gemma, ...) uses it. No mask function is registered for
it, so transformers never builds a dense mask. Sample boundaries arrive as ``cu_seq_lens_q/k`` and
``max_length_q/k`` keyword arguments of ``model(...)``; without them (a right-padded batch) plain causal attention
is exact for every real token.
"""

import functools
import inspect

import torch
import torch.nn.functional as F

VARLEN = "varlen"


def _expand_kv(key: torch.Tensor, value: torch.Tensor, heads: int, dim: int):
    groups = heads // key.shape[dim]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=dim), value.repeat_interleave(groups, dim=dim)


@functools.cache
def _varlen_attn_takes_enable_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _varlen_cuda(query, key, value, cu_q, cu_k, max_q, max_k, scaling):
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, tokens, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * tokens, heads, dim)
    k = key.transpose(1, 2).reshape(batch * tokens, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * tokens, value.shape[1], dim)
    # Grouped-query attention: the flash kernel reads each key/value head for its group of query heads itself, so
    # k and v are never expanded. newer torch asks for enable_gqa; its first releases of varlen_attn pass them through unchecked.
    extra = {"enable_gqa": True} if k.shape[1] != heads and _varlen_attn_takes_enable_gqa() else {}
    out = varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale=scaling, window_size=(-1, 0), **extra)
    return out.view(batch, tokens, heads, dim)


def _per_sample(query, key, value, cu_q, scaling):
    key, value = _expand_kv(key, value, query.shape[1], dim=1)
    out = torch.empty_like(query)
    bounds = cu_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        out[..., start:end, :] = F.scaled_dot_product_attention(
            query[..., start:end, :], key[..., start:end, :], value[..., start:end, :], is_causal=True, scale=scaling
        )
    return out.transpose(1, 2)


def varlen_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: ``query`` ``[batch, heads, tokens, dim]`` in, ``[batch, tokens, heads, dim]``
    out; causal within each sample marked by ``cu_seq_lens_q/k``."""
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
    return _per_sample(query, key, value, cu_q, scaling), None


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
    return VARLEN
