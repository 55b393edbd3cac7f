"""Sequence parallelism (``model.sequence_parallel: N``): every packed row split along the sequence over N ranks, so
that one sample longer than a device holds trains on N devices (Ulysses: DeepSpeed's and ArcticTraining's ALST).

The ranks form groups of N consecutive ranks (DeepSpeed's and Megatron's layout): ranks ``g*N .. g*N + N - 1`` are
sequence-parallel group ``g``, which is data-parallel rank ``g`` of ``world_size / N``.

- The data: the data plan is dealt to the data-parallel ranks (:func:`data_parallel_rank`), so the N ranks of a group
  get the same micro-batch, and each rank's loaders keep its 1/N of the packed row (:func:`row_part`, on the host,
  in the loader's workers; the trainer checks the first batch is a part, :func:`check_row_part`). The row is padded to a
  multiple of N with a padding sample. Targets are shifted inside each sample before the row is cut, so a shard's
  last position predicts the next shard's first token; position ids (the position within each sample, which rotary
  embeddings read) are cut with the tokens; the sample boundaries ``cu_seq_lens_q/k`` and ``max_length_q/k`` stay
  those of the whole row.
- The attention (:class:`UlyssesAttention`): each layer's queries, keys and values are exchanged (all-to-all) from a
  1/N shard of the sequence with every head into the whole sequence with 1/N of the heads, the varlen attention runs
  over the whole row with its own sample boundaries (a boundary may fall anywhere, across shards), and the output is
  exchanged back. Everything else in the model (embeddings, norms, MLPs, the output head, the loss) works token by
  token, so each rank computes it for its shard alone: ``model.long_context``'s tiled loss and tiled MLP, and the
  checkpoint offload, are per-rank operations and compose unchanged.
- The loss: each rank's loss is the sum over its shard's targets divided by the loss tokens of the whole optimizer
  step; the N ranks of a group hold the same counts, so every count summed over ranks is divided by N
  (:func:`count_over_ranks`). Gradients: the backward of one rank's shard loss reaches the other ranks of its group
  through the all-to-all, so each rank ends with the gradient of the whole group's loss through the weights as used
  on its own shard: the step's gradient is the sum over the group's ranks, and over the data-parallel groups. The
  trainer already turns the strategy's mean over all ranks into a sum (it scales the loss by the world size), so
  DDP, ZeRO and FSDP need nothing else; they see each rank as a data-parallel rank.

Why DeepSpeed's :class:`~deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF` (the maintained Ulysses
for Hugging Face models, ALST's), and which parts of it: its attention module is used as it is, over our per-sample
varlen attention. It passes the model's keyword arguments through to the attention it wraps, so the varlen kernel
gets the whole row's ``cu_seq_lens`` and sees exactly what one device would see; its exchange is a registered operator
with its backward (correct under ``torch.compile``), and it replicates key/value heads when N exceeds them. It runs on
gloo (CPU) as on NCCL. Not used: ``register_with_transformers``, which keeps its groups in a module-global state that
can be made once per process (tests build several) and replaces the attention function process-wide (we pass our own
group, and ``varlen_attention`` calls it); ``UlyssesSPDataLoaderAdapter``, which gathers each rank's own batch and
deals the shards round-robin, while here the plan already gives a group's ranks the same micro-batch (no
communication, and the data position of a resumed run stays the plan's); its ``TiledMLP`` and
``sequence_tiled_compute``, whose per-tile backward accumulates each weight's gradient once per tile, which torch's
DDP refuses (``training/long_context.py`` says more). Its one cost we would not have: it gathers the position ids over
the group in every layer (for flash-attention's detection of packed rows; a ``[1, tokens]`` integer tensor).
"""

import importlib.util
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch

from lt_posttrain.batch import IGNORE_INDEX, Batch, is_packed, sample_count
from lt_posttrain.errors import UserError
from lt_posttrain.model.attention import VARLEN, set_sequence_parallel_attention, varlen_attention_local

SHARDED_KEYS = {"input_ids": None, "targets": IGNORE_INDEX, "target_weights": 0.0, "position_ids": None}
"""The batch keys cut along the sequence, and the value a padding position gets (None: see :func:`shard_row`)."""


def sequence_parallel_of(module: Any) -> int:
    """N of ``model.sequence_parallel`` for a LightningModule (1 for a module without sequence parallelism)."""
    return int(getattr(module, "sequence_parallel", 1) or 1)


def data_parallel_rank(trainer: Any) -> tuple[int, int]:
    """``(rank, ranks)`` of data parallelism: the trainer's global rank and world size, over the sequence-parallel
    size of its LightningModule (the ranks of a group share a micro-batch)."""
    size = sequence_parallel_of(trainer.lightning_module)
    return trainer.global_rank // size, trainer.world_size // size


def row_part(trainer: Any, pad_id: int) -> Optional[Callable]:
    """What cuts each packed micro-batch of a loader to this rank's part (:func:`shard_row`, picklable for loader
    workers), or None without sequence parallelism."""
    size = sequence_parallel_of(getattr(trainer, "lightning_module", None))
    if size == 1:
        return None
    return partial(shard_row, rank=trainer.global_rank % size, size=size, pad_id=pad_id)


def check_row_part(batch: Batch, size: int) -> None:
    """Refuse, in one line, a micro-batch that is not a rank's part of a row (a data module that does not cut its rows
    with :func:`row_part`): the attention would take it for a part and join N whole rows."""
    if not is_packed(batch):
        raise UserError(f"model.sequence_parallel {size} splits packed rows; set data.packing true")
    if int(batch["cu_seq_lens_q"][-1]) != batch["input_ids"].shape[-1] * size:
        raise UserError(f"model.sequence_parallel {size}: the data module's packed rows are not cut into the ranks' "
                        "parts (InstructDataModule's loaders cut them); use a data module derived from it, or "
                        "model.sequence_parallel 1")


def count_over_ranks(total: torch.Tensor, size: int) -> torch.Tensor:
    """A count summed over all ranks (``step_loss_count``, ``loss_count``), corrected for the N ranks of each
    sequence-parallel group holding the same count: exact, since each count is in the sum N times."""
    return total if size == 1 else torch.div(total, size, rounding_mode="floor")


def check_heads(config: Any, size: int) -> None:
    """Refuse, in one line, a model whose attention heads N ranks cannot share: the query heads are split evenly over
    the ranks, and the key/value heads too, or each one replicated over N / kv-heads ranks (N a multiple of them)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    key = f"model.sequence_parallel {size}"
    if not isinstance(heads, int):
        raise UserError(f"{key}: the model's config has no num_attention_heads to split over the ranks")
    if heads % size:
        raise UserError(f"{key}: the model's {heads} attention heads do not split evenly over {size} ranks; choose a "
                        f"size that divides {heads}")  # fmt: skip
    if kv_heads % size and size % kv_heads:
        raise UserError(f"{key}: the model's {kv_heads} key/value heads neither split evenly over {size} ranks nor "
                        f"replicate evenly to them; choose a size that divides {kv_heads} or a multiple of "
                        "it")  # fmt: skip


def check_sequence_parallel(size: int, world_size: Optional[int], attn_implementation: Optional[str],
                            packing: Optional[bool], per_token_loss: bool = True,
                            trainer_name: str = "") -> None:  # fmt: skip
    """Refuse, in one line, what sequence parallelism cannot run, before anything loads.

    Args:
        size: N of ``model.sequence_parallel``.
        world_size: the ranks of the run (``trainer.devices`` x ``trainer.num_nodes``; None: not known yet).
        attn_implementation: ``model.attn_implementation``.
        packing: ``data.packing`` (None: a data module without the key, not checked).
        per_token_loss: the trainer's loss is SFT's sum over positions (a rank computes it over its shard alone).
        trainer_name: the trainer's class name, for the message.
    """
    key = f"model.sequence_parallel {size}"
    if size < 1:
        raise UserError(f"model.sequence_parallel must be 1 (off) or more, got {size}")
    if size == 1:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{key} runs DeepSpeed's Ulysses attention, and DeepSpeed is not installed: "
                        "pip install 'lt-posttrain[deepspeed]'")  # fmt: skip
    if world_size is not None and world_size % size:
        raise UserError(f"{key} does not divide the {world_size} ranks of the run (trainer.devices x "
                        "trainer.num_nodes); choose a size that divides them, or more devices")  # fmt: skip
    if attn_implementation != VARLEN:
        raise UserError(f"{key} splits the varlen attention; set model.attn_implementation varlen (it is "
                        f"{attn_implementation})")  # fmt: skip
    if packing is False:
        raise UserError(f"{key} splits packed rows; set data.packing true")
    if not per_token_loss:
        raise UserError(f"{key}: {trainer_name} has a loss of its own, and sequence parallelism computes only SFT's "
                        "sum over token positions (each rank over its part of the row); use model.sequence_parallel 1")


def shard_row(batch: Batch, rank: int, size: int, pad_id: int) -> Batch:
    """Rank ``rank``'s 1/``size`` of a packed micro-batch (``[1, tokens]``), for sequence parallelism.

    The row is padded to a multiple of ``size`` tokens with one padding sample (token ``pad_id``, no loss, positions
    from 0), and always gets its boundary (of zero length when no padding is needed), so a loader with static shapes
    keeps them. ``input_ids``, ``targets`` (already shifted: each position's target is the next token of its sample,
    wherever the cut falls), ``target_weights`` and ``position_ids`` are cut to the rank's part; ``cu_seq_lens_q/k``
    and ``max_length_q/k`` stay the whole row's, which the attention sees whole (:class:`UlyssesAttention`);
    ``num_samples`` leaves the padding sample out; ``num_tokens`` counts this part's non-padding tokens. Counts from
    the data plan (``loss_count``, ``step_loss_count``) stay the whole micro-batch's (:func:`count_over_ranks`).

    Raises:
        UserError: the batch is not packed.
    """
    if not is_packed(batch):
        raise UserError("model.sequence_parallel splits packed rows; set data.packing true")
    tokens = batch["input_ids"].shape[-1]
    padded = -(-tokens // size) * size
    part, pad = padded // size, padded - tokens
    start, end = rank * part, (rank + 1) * part
    samples = sample_count(batch)
    bounds = batch["cu_seq_lens_q"]
    real_end = int(bounds[samples])  # the real samples' tokens; padding samples follow them
    out = dict(batch)
    for key, pad_value in SHARDED_KEYS.items():
        if key not in batch:
            continue
        tensor = batch[key]
        if pad:
            if key == "position_ids":
                tail = torch.arange(pad, dtype=tensor.dtype).expand(*tensor.shape[:-1], pad)
            else:
                fill = pad_id if key == "input_ids" else pad_value
                tail = torch.full((*tensor.shape[:-1], pad), fill, dtype=tensor.dtype)
            tensor = torch.cat([tensor, tail.to(tensor.device)], dim=-1)
        out[key] = tensor[..., start:end].contiguous()
    boundaries = torch.cat([bounds, bounds.new_tensor([padded])])
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = boundaries
    out["max_length_q"] = max(int(batch["max_length_q"]), pad)
    out["max_length_k"] = max(int(batch["max_length_k"]), pad)
    out["num_samples"] = samples
    out["num_tokens"] = torch.tensor(max(0, min(end, real_end) - start))
    return out


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in sequence parallelism: ``size`` ranks a group, this one ``rank`` of its ``group`` (a torch
    process group of its own, so the exchanges never interleave with the strategy's gradient reductions)."""

    size: int
    rank: int
    group: Any

    @classmethod
    def start(cls, size: int) -> "SequenceParallel":
        """Make the process groups (every rank calls this, in the same order) and DeepSpeed's communication layer
        (over torch's process group, which Lightning has made)."""
        import torch.distributed as dist

        world, me = dist.get_world_size(), dist.get_rank()
        mine = None
        for first in range(0, world, size):
            group = dist.new_group(list(range(first, first + size)))
            if first <= me < first + size:
                mine = group
        _deepspeed_communication()
        return cls(size, me % size, mine)


def _deepspeed_communication() -> None:
    """DeepSpeed's ``deepspeed.comm`` over the process group torch already has (Lightning made it), which DeepSpeed's
    Ulysses attention calls; under Lightning's DeepSpeed strategy it exists already."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    if deepspeed.comm.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # its shared-memory all-reduce is an optional operator DeepSpeed would compile first (minutes); gloo does it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)


class UlyssesAttention:
    """The varlen attention of every model in the process, split over a sequence-parallel group with DeepSpeed's
    ``UlyssesSPAttentionHF`` (see the module's docstring); installed by :meth:`install` and removed by
    :meth:`remove`. Packed rows only: a batch without sample boundaries (a padded batch, generation) attends as on
    one device.

    Args:
        config: the model's config (heads, key/value heads, head size, layers).
        parallel: this rank's :class:`SequenceParallel`.
    """

    def __init__(self, config: Any, parallel: SequenceParallel):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        check_heads(config, parallel.size)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.heads
        head_size = getattr(text, "head_dim", None) or text.hidden_size // self.heads
        self.attention = UlyssesSPAttentionHF(
            attn=varlen_attention_local, batch_size=1, attn_head_count=self.heads, attn_head_size=head_size,
            kv_head_count=self.kv_heads, num_hidden_layers=text.num_hidden_layers, process_group=parallel.group,
            seq_length_is_variable=True,
        )  # fmt: skip

    def __call__(self, module, query, key, value, attention_mask=None, **kwargs):
        return self.attention(module, query, key, value, None, **kwargs)

    def install(self) -> None:
        set_sequence_parallel_attention(self)

    def remove(self, model: Optional[torch.nn.Module] = None) -> None:
        """Stop splitting the attention; ``model``'s attention layers get back the key/value grouping that DeepSpeed
        changes on them when it replicates key/value heads (transformers' own attention reads it)."""
        set_sequence_parallel_attention(None)
        for module in model.modules() if model is not None else ():
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = self.heads // self.kv_heads

