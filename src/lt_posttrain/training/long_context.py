"""Training on long samples (``model.long_context``): what grows with the sequence, each kept from growing whole.

- ``tiled_loss``: the SFT loss from the decoder's final hidden states, the output head run a tile of loss tokens at
  a time (:func:`lt_posttrain.training.tiled.tiled_token_logps`): the ``[tokens, vocab]`` logits never exist, under
  every strategy (unlike Liger's fused loss, which ZeRO-3 and FSDP refuse).
- ``tiled_mlp``: each decoder layer's MLP run a tile of tokens at a time, forward and backward
  (:class:`TiledMLPForward`): its ``[tokens, intermediate]`` activations exist for one tile at a time.
- ``offload_checkpoints``: the input each checkpointed decoder layer keeps for its recomputation copied to host
  memory as the forward goes on, and brought back ahead of the layer's backward (:class:`CheckpointOffload`): the GPU
  holds about one layer's activations.

Each option changes how much memory a step holds, never what it computes: the losses and gradients are those of the
run without it (``tests/test_long_context.py``).
"""

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import decoder_of, logit_scaling, output_head
from lt_posttrain.training.gradient_checkpointing import set_checkpoint_hooks
from lt_posttrain.training.tiled import TILE_BYTES, tiles_on_every_rank


@dataclass
class LongContext:
    """What a step on a long sample keeps from growing whole; each is off unless set (``long_context: true`` turns
    on every one).

    Args:
        tiled_loss: the loss from the final hidden states and the output head, a tile of loss tokens at a time,
            recomputed in the backward pass: the ``[tokens, vocab]`` logits are never held (one tile's are).
        tiled_mlp: each decoder layer's MLP run a tile of tokens at a time, and each tile recomputed in the
            backward pass: its ``[tokens, intermediate]`` activations are never held whole.
        offload_checkpoints: the input each decoder layer keeps under gradient checkpointing (which this turns on)
            copied to host memory during the forward pass, on a side CUDA stream, and brought back ahead of the
            layer's backward.
        loss_tile_tokens: loss tokens per tile; default: as many as 256 MiB of float32 logits hold (512 for a
            128k vocabulary).
        mlp_tile_tokens: tokens per MLP tile; default: the model's hidden size (DeepSpeed's and Liger's choice, so a
            tile's intermediate activations weigh about as much as one of the MLP's weights).
        check_memory: before the first step on a CUDA device, estimate the memory a step of the longest micro-batch
            needs and refuse, in one line, one that cannot fit (``training/memory.py``); on whether or not the other
            options are, and not turned on by ``long_context: true``'s shorthand (it is on already).
    """

    tiled_loss: bool = False
    tiled_mlp: bool = False
    offload_checkpoints: bool = False
    loss_tile_tokens: Optional[int] = None
    mlp_tile_tokens: Optional[int] = None
    check_memory: bool = True

    def __post_init__(self):
        for key in ("loss_tile_tokens", "mlp_tile_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"model.long_context.{key} must be 1 or more, got {value}")

    def loss_tile_bytes(self, vocab_size: int) -> int:
        """The ``tile_bytes`` of :func:`~lt_posttrain.training.tiled.tiled_token_logps` for ``loss_tile_tokens``."""
        return TILE_BYTES if self.loss_tile_tokens is None else 4 * vocab_size * self.loss_tile_tokens


LongContextOption = Union[bool, LongContext]


def long_context_options(value: Union[LongContextOption, dict, None]) -> LongContext:
    """The :class:`LongContext` of a recipe's ``model.long_context``: ``true`` every option, ``false`` or absent
    none, a mapping or a :class:`LongContext` those it sets."""
    if isinstance(value, LongContext):
        return value
    if isinstance(value, dict):
        return LongContext(**value)
    if value is True:
        return LongContext(tiled_loss=True, tiled_mlp=True, offload_checkpoints=True)
    return LongContext()


def check_tiled_loss(model) -> None:
    """Refuse, in one line, a model whose logits the tiled loss cannot compute from its head: logits scaled by the
    architecture (Granite, Cohere), or a head without ``out_features``."""
    head, _ = output_head(model)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    scaling = logit_scaling(config)
    if scaling:
        raise UserError(f"model.long_context.tiled_loss: {config.model_type} scales its logits ({scaling}), which "
                        "the tiled loss does not; set it to false")  # fmt: skip
    if not isinstance(getattr(head, "out_features", None), int):
        raise UserError(f"model.long_context.tiled_loss: the output head is a {type(head).__name__} without "
                        "out_features (the vocabulary size); set it to false")  # fmt: skip


class TiledMLPForward:
    """An MLP's forward run a tile of tokens at a time, each tile under non-reentrant activation checkpointing: the
    forward keeps only each tile's input (a view of the MLP's input) and output, and the backward recomputes one tile's
    intermediate activations at a time. An MLP is position-wise, so the output is the untiled one's.

    Why checkpointing rather than DeepSpeed's ``TiledMLP`` or Liger's ``LigerTiledMLPFunction`` (an autograd function
    whose backward runs one backward per tile, each adding to the weights' ``.grad``): there, every weight's gradient
    is accumulated once per tile, and a data-parallel strategy acts on each accumulation. DeepSpeed marks its weights
    (``ds_grad_is_ready``) so that ZeRO waits for the last tile; Liger adds ``no_sync`` for DDP and FSDP wrappers it can
    find; under torch's own DDP the scheme raises "Expected to mark a variable ready only once" (tried with two gloo
    ranks). Here the tiles are ordinary nodes of the autograd graph, so the engine sums each weight's gradient over
    the tiles before accumulating it once: DDP, DeepSpeed ZeRO-1/2/3 and FSDP see the backward of an untiled MLP,
    with no strategy-specific code. The cost is the same as theirs: the MLP's forward runs twice a step (three times
    under gradient checkpointing, whose recomputation of the layer runs it once more). Under ZeRO-3, which gathers the
    weights of the MLP's linear layers each time they run (a collective), every rank runs as many tiles as the rank
    with the most tokens (:func:`~lt_posttrain.training.tiled.tiles_on_every_rank`), the extra ones of one token.

    Args:
        forward: the MLP's own forward (bound), ``hidden_states [..., hidden] -> [..., hidden]``.
        tokens: tokens per tile; an input of at most this many runs untiled.
    """

    def __init__(self, forward: Callable, tokens: int):
        self.forward, self.tokens = forward, tokens

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            return self.forward(hidden_states, *args, **kwargs)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        count = -(-rows.shape[0] // self.tokens)
        module = getattr(self.forward, "__self__", None)
        every = tiles_on_every_rank(count, module.parameters() if isinstance(module, nn.Module) else ())
        if every <= 1:
            return self.forward(hidden_states)
        tiles = list(rows.split(self.tokens)) + [rows[:1]] * (every - count)  # ZeRO-3's extra tiles, dropped
        grad = torch.is_grad_enabled()
        pieces = [checkpoint(self.forward, tile, use_reentrant=False) if grad else self.forward(tile) for tile in tiles]
        if not all(isinstance(piece, torch.Tensor) for piece in pieces):
            raise UserError(f"model.long_context.tiled_mlp: the MLP's forward returns a {type(pieces[0]).__name__}, "
                            "not a tensor of its input's tokens; set it to false")  # fmt: skip
        # cat, not writes into one output: its backward hands each tile a view of the gradient (in-place writes would
        # copy the whole gradient once per tile)
        return torch.cat(pieces)[: rows.shape[0]].view(*hidden_states.shape[:-1], -1)


def tile_mlps(model, tokens: Optional[int] = None) -> int:
    """Run the MLP of each decoder layer of ``model`` (PEFT-wrapped or not) a tile of ``tokens`` tokens at a time
    (:class:`TiledMLPForward`; default: the hidden size), as its instance's ``forward``: the weights, their names and
    the state dict are unchanged. Returns the number of MLPs tiled.

    Raises:
        UserError: the decoder has no ``layers``, or a layer no ``mlp`` module.
    """
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"model.long_context.tiled_mlp: the decoder ({type(decoder).__name__}) has no list of layers "
                        "whose MLPs could be tiled; set it to false")  # fmt: skip
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    tokens = tokens or config.get_text_config().hidden_size
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise UserError(f"model.long_context.tiled_mlp: decoder layer {index} ({type(layer).__name__}) has no mlp "
                            "module to tile; set it to false")  # fmt: skip
        if not isinstance(mlp.forward, TiledMLPForward):
            mlp.forward = TiledMLPForward(mlp.forward, tokens)
    return len(layers)


class HostBuffers:
    """Host buffers for offloaded checkpoints, page-locked where CUDA is, and kept for the next step.

    Not torch's pinned allocator: it rounds every block up to a power of two, so a step's checkpoints of 3.1 GiB a
    layer (Llama-3.1-8B at 400K tokens) would take 4 GiB each, 128 GiB for 32 layers instead of 98. These are
    allocated at their size (rounded up by at most 1/16) and page-locked with ``cudaHostRegister``; a free buffer of
    up to 5/4 of the size asked for serves again, so steps of similar lengths reuse the same memory. When none fits,
    the free ones are released (after the device has finished with them) before a new one is allocated, so the
    buffers held never exceed one step's needs by much.

    Args:
        pin: page-lock the buffers (CUDA); without it they are plain host memory (a CPU run).
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of at least ``nbytes`` bytes, until :meth:`give_back`."""
        fitting = [buffer for buffer in self._free if nbytes <= buffer.numel() <= nbytes * 5 // 4]
        if fitting:
            buffer = min(fitting, key=lambda candidate: candidate.numel())
            self._free.remove(buffer)
            return buffer
        self.release()
        granule = max(1 << max(nbytes.bit_length() - 5, 0), 1)
        return self._allocate(-(-nbytes // granule) * granule)

    def give_back(self, buffer: torch.Tensor) -> None:
        self._free.append(buffer)

    def release(self) -> None:
        """Free the buffers not in use."""
        if self._free and self.pin:
            torch.cuda.synchronize()  # no copy from or to them is still queued
            for buffer in self._free:
                torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        self._free.clear()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if not self.pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        page = 4096  # cudaHostRegister takes whole pages
        size = -(-nbytes // page) * page
        raw = torch.empty(size + page, dtype=torch.uint8)
        offset = -raw.data_ptr() % page
        buffer = raw[offset : offset + size]
        if int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, 0)) != 0:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # torch's allocator, rounded up
        return buffer


class _Offloaded:
    """One saved tensor on the host: its copy there, and (once prefetched) its copy on the way back."""

    def __init__(self, tensor: torch.Tensor, buffers: HostBuffers, stream: Optional[Any], sequence: int):
        self.device, self.stream, self.sequence = tensor.device, stream, sequence
        nbytes = tensor.numel() * tensor.element_size()
        buffer = buffers.take(nbytes)
        weakref.finalize(self, buffers.give_back, buffer)
        self.host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        self.back: Optional[torch.Tensor] = None
        if stream is None:
            self.host.copy_(tensor.detach())  # a CPU run: a plain copy, so the bookkeeping runs as on a GPU
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is computed
        with torch.cuda.stream(stream):
            self.host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done

    @property
    def on_host(self) -> bool:
        return self.back is None

    def prefetch(self) -> None:
        """Start the copy back to the device (after the copy to the host, on the same stream)."""
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.back = self.host.to(self.device, non_blocking=True)
                self.ready = self.stream.record_event()

    def bring_back(self) -> torch.Tensor:
        """The tensor on its device, ready on the current stream."""
        if self.stream is None:
            return self.host
        current = torch.cuda.current_stream(self.device)
        if self.back is None:
            current.wait_stream(self.stream)
            return self.host.to(self.device, non_blocking=True)
        current.wait_event(self.ready)
        tensor, self.back = self.back, None
        tensor.record_stream(current)
        return tensor


class CheckpointOffload:
    """The inputs that checkpointed layers keep for their recomputation, offloaded to host memory
    (``torch.autograd.graph.saved_tensors_hooks``), each brought back ahead of its layer's backward.

    Under non-reentrant checkpointing a layer saves only its inputs (``_checkpoint_hook`` replaces what its operations
    save with placeholders), and it saves them outside its own hooks: :meth:`hooks` is entered around each layer's
    checkpoint (``set_checkpoint_hooks``), so they see the layer's input and nothing else. On a GPU, :meth:`pack`
    copies it to page-locked host memory (:class:`HostBuffers`) on a side stream, which waits for the forward so
    far; the device's copy is freed once the host's is made. In the backward pass, layers unpack their inputs in the
    reverse order of the forward; :meth:`unpack` hands back the tensor (already prefetched, or copied now) and starts
    bringing back the one packed before it, so the copy overlaps this layer's recomputation and backward. On a CPU
    the copies are plain copies, so the same bookkeeping runs (and is tested) there.

    Not ``torch.autograd.graph.save_on_cpu``: it copies on the compute stream and waits for each copy, in both
    directions, so nothing overlaps.
    """

    def __init__(self):
        self._buffers: Optional[HostBuffers] = None
        self._streams: dict = {}
        self._packed: list[weakref.ref] = []  # in the order the forward packed them
        self._sequence = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The saved-tensor hooks that offload what a layer's checkpoint keeps, to enter around the checkpoint."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0 or isinstance(tensor, nn.Parameter):
            return tensor
        if self._buffers is None:
            self._buffers = HostBuffers(pin=tensor.is_cuda)
        stream = self._stream(tensor.device) if tensor.is_cuda else None
        self._sequence += 1
        offloaded = _Offloaded(tensor, self._buffers, stream, self._sequence)
        self._packed = [ref for ref in self._packed if ref() is not None]
        self._packed.append(weakref.ref(offloaded))
        return offloaded

    def unpack(self, packed) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        tensor = packed.bring_back()
        earlier = [ref() for ref in self._packed]
        earlier = [item for item in earlier if item is not None and item.sequence < packed.sequence and item.on_host]
        if earlier:
            max(earlier, key=lambda item: item.sequence).prefetch()
        return tensor

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


def offload_checkpoints(model: nn.Module, offload: CheckpointOffload) -> int:
    """Run the checkpoint of every checkpointed decoder layer of ``model`` (``training/gradient_checkpointing.py``)
    with :class:`CheckpointOffload`'s hooks; returns how many layers it reaches (0: none is checkpointed)."""
    return set_checkpoint_hooks(model, offload.hooks)


def check_offload(model: nn.Module, strategy: Any) -> None:
    """Refuse, in one line, what the checkpoint offload cannot reach: a model without gradient checkpointing, or
    FSDP's own activation checkpointing (``activation_checkpointing_policy``), which is not the model's."""
    from lt_posttrain.training.strategy import FSDP, distribution

    if distribution(strategy).family == FSDP and getattr(strategy, "_activation_checkpointing_kwargs", None):
        raise UserError("model.long_context.offload_checkpoints offloads the model's own gradient checkpoints, not "
                        "FSDP's: remove the strategy's activation_checkpointing_policy (model.gradient_checkpointing "
                        "checkpoints each decoder layer)")  # fmt: skip
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(f"model.long_context.offload_checkpoints offloads gradient checkpoints, which "
                        f"{type(base).__name__} does not support; set it to false")  # fmt: skip
