"""``SFTModule``: supervised fine-tuning of a Hugging Face causal LM; the base of every trainer.

A custom trainer subclasses it and overrides :meth:`SFTModule.loss` (and nothing else). Normalisation lives here,
once: ``loss(batch)`` returns a *sum* over the loss tokens of its micro-batch, and the step divides by the loss
tokens of the whole optimizer step, over every micro-batch of the accumulation window and every rank. So the
gradient does not depend on the micro-batch size, the accumulation, packing or the number of GPUs.
"""

import copy
import math
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lt_posttrain.batch import PACKED_KEYS, Batch
from lt_posttrain.model.attention import VARLEN
from lt_posttrain.model.generation import generate_answers
from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import (
    FUSED_LOSS,
    LigerKernels,
    apply_liger_kernels,
    decoder_of,
    fused_loss_parts,
    output_head,
    require_liger,
)
from lt_posttrain.model.loading import import_model_code, load_causal_lm, load_tokenizer, resolve_model_path
from lt_posttrain.model.lora import LoraOptions, apply_lora
from lt_posttrain.model.parameters import describe_parameter_counts
from lt_posttrain.model.quantization import (
    bitsandbytes_config,
    check_quantization,
    is_quantized,
    prepare_quantized_for_training,
)
from lt_posttrain.training.compile import (
    Compile,
    check_static_shapes,
    compile_decoder_layers,
    compile_mode,
    why_not_compiled,
)
from lt_posttrain.training.gradient_checkpointing import (
    CheckpointOption,
    GradientCheckpointing,
    apply_gradient_checkpointing,
    checkpoint_options,
    describe_checkpointing,
)
from lt_posttrain.training.long_context import (
    CheckpointOffload,
    LongContext,
    check_offload,
    check_tiled_loss,
    long_context_options,
    offload_checkpoints,
    tile_mlps,
)
from lt_posttrain.training.checkpoint_io import weights_mismatch
from lt_posttrain.training.losses import (
    fused_linear_cross_entropy_sum,
    fused_loss_weighs_tokens,
    tiled_cross_entropy_sum,
    token_cross_entropy_sum,
)
from lt_posttrain.training.memory import ModelShape, check_step, device_memory, host_available, setup_of
from lt_posttrain.training.optimizer import (
    OptimizerName,
    OptimizerOptions,
    Schedule,
    apply_recipe_values,
    build_schedule,
    recipe_values,
    warmup_steps_of,
)
from lt_posttrain.training.optimizer_in_backward import check_optimizer_in_backward
from lt_posttrain.training.precision import clip_under_bf16_autocast
from lt_posttrain.training.sequence_parallel import (
    SequenceParallel,
    UlyssesAttention,
    check_heads,
    check_row_part,
    check_sequence_parallel,
    count_over_ranks,
)
from lt_posttrain.training.sharding import FrozenModel, fit_to_strategy, sharded_creation
from lt_posttrain.training.strategy import distribution

# The attention inputs a batch may hold: varlen reads the packed layout's boundaries, the others the mask or positions.
VARLEN_INPUTS = ("attention_mask", *PACKED_KEYS)
DENSE_INPUTS = ("attention_mask", "position_ids")
Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class SFTModule(L.LightningModule):
    """Supervised fine-tuning: mean cross-entropy over assistant tokens, token-weighted over the optimizer step.

    Args:
        name_or_path: a hub id, a local Hugging Face folder, a ``.gguf`` file, or ``package://PKG/FILE`` (a file
            shipped in an installed Python package).
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (never on norms, biases and embeddings).
        warmup: linear warm-up; below 1 a fraction of the training steps, from 1 up a number of steps.
        schedule: the learning rate after warm-up: ``cosine`` or ``linear`` decay to zero, or ``constant``.
        dtype: dtype the weights are loaded in (``float32`` keeps fp32 master weights under mixed precision).
        attn_implementation: the transformers attention implementation. ``varlen`` (default): each packed sample
            attends only to itself, with torch's varlen flash kernel on GPU and no dense mask; ``sdpa``, ``eager``,
            ... are transformers' own (packed samples then get a dense block-diagonal mask).
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass to save memory
            (non-reentrant): ``true``, or a mapping (:class:`~lt_posttrain.training.gradient_checkpointing.
            GradientCheckpointing`) for selective checkpointing: ``save`` (outputs kept instead of recomputed:
            ``attention``, ``attention_projections``, ``matmuls``) and ``every`` (checkpoint one layer in ``every``).
        trust_remote_code: allow a hub model's own Python code to run (off: only transformers' code runs).
        max_new_tokens: tokens generated per prompt by ``lt-posttrain predict`` (greedy).
        lora: train LoRA adapters (:class:`~lt_posttrain.model.lora.LoraOptions`) instead of every weight; None:
            a full fine-tune. The export is then a PEFT adapter folder (``checkpoint.merge_lora`` for a merged model).
        load_in_4bit: QLoRA: load the base weights as 4-bit NF4 (double quantisation, bf16 compute) with
            bitsandbytes; needs ``lora`` and a CUDA GPU.
        load_in_8bit: load the base weights in 8 bits with bitsandbytes; needs ``lora`` and a CUDA GPU.
        liger: Liger kernels (CUDA): ``true`` for every one the architecture supports, or a mapping
            (:class:`~lt_posttrain.model.kernels.LigerKernels`) of ``rms_norm``, ``rope``, ``swiglu``,
            ``fused_linear_cross_entropy``.
        optimizer: ``auto`` (default): ``adamw_kahan`` when the trained weights are bf16 (``trainer.precision
            bf16-true``), so no update rounds away, else ``adamw``; ``adamw`` (torch's, fused on GPU; on bf16 weights
            it warns that small updates are lost); ``adamw_kahan`` (torch-optimi, Kahan-compensated);
            ``adamw_stochastic`` (torchao, bf16 stochastic rounding, no extra memory); ``adamw_8bit``
            or ``paged_adamw_8bit`` (bitsandbytes, CUDA); or the import path of an optimizer class.
        optimizer_in_backward: step each weight in the backward pass as soon as its gradient is complete, and free
            the gradient (``adamw_kahan`` or ``adamw_stochastic``, one device; no clipping, no accumulation): the
            gradients of the whole model are never held together (see ``training/optimizer_in_backward.py``).
        long_context: for long samples (:class:`~lt_posttrain.training.long_context.LongContext`): ``tiled_loss``,
            the loss from the final hidden states a tile of tokens at a time, never the ``[tokens, vocab]`` logits;
            ``tiled_mlp``, each layer's MLP a tile of tokens at a time; ``offload_checkpoints``, the checkpoints of
            gradient checkpointing (turned on) in host memory until their layer's backward; ``true`` for every
            option. The losses and gradients stay those of the run without it.
        compile: ``layers`` (or ``true``): each decoder layer compiled with ``torch.compile``, once for every layer
            and step; needs ``data.static_shapes: true``. ``cuda_graphs``: the same, each layer's kernels captured as
            CUDA graphs (GPU). Off, with one line, under DeepSpeed and FSDP, or where torch cannot compile (see
            ``training/compile.py``).
        sequence_parallel: N, the ranks that share every packed row (1: off): each holds 1/N of the row, and the
            attention exchanges sequence parts for head parts between them (DeepSpeed's Ulysses over the varlen
            attention, each sample attending to itself wherever the cuts fall); data parallelism is over the
            world size / N groups. Needs ``data.packing``, ``attn_implementation: varlen``, N dividing the world
            size and the attention heads (the key/value heads, or a multiple of them), and SFT's loss (see
            ``training/sequence_parallel.py``). The losses and gradients stay those of one rank with the whole row.
    """

    def __init__(
        self,
        name_or_path: str,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup: float = 0.0,
        schedule: Schedule = "cosine",
        dtype: Dtype = "float32",
        attn_implementation: Optional[str] = "varlen",
        gradient_checkpointing: CheckpointOption = False,
        trust_remote_code: bool = False,
        max_new_tokens: int = 256,
        lora: Optional[LoraOptions] = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        liger: Union[bool, LigerKernels] = False,
        optimizer: OptimizerName = "auto",
        optimizer_in_backward: bool = False,
        long_context: Union[bool, LongContext] = False,
        compile: Compile = False,
        sequence_parallel: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()  # as given: the CLI passes mappings where the signature says dataclass
        self.lora = LoraOptions(**lora) if isinstance(lora, dict) else lora
        self.liger = LigerKernels(**liger) if isinstance(liger, dict) else liger
        self.long_context = long_context_options(long_context)
        fused_loss = isinstance(self.liger, LigerKernels) and self.liger.fused_linear_cross_entropy
        if self.long_context.tiled_loss and fused_loss:
            raise UserError("model.long_context.tiled_loss and model.liger.fused_linear_cross_entropy both compute the "
                            "loss without the logits: set one of them")  # fmt: skip
        self.checkpointing = checkpoint_options(gradient_checkpointing)
        # Wrong paths and options fail now, in one line, not after the data is prepared.
        resolve_model_path(name_or_path)
        check_quantization(load_in_4bit, load_in_8bit, lora)
        if liger:
            require_liger()
        self.optimizer_options = OptimizerOptions(optimizer, optimizer_in_backward)
        self.sequence_parallel = sequence_parallel
        check_sequence_parallel(sequence_parallel, None, attn_implementation, None, self._loss_is_per_token(),
                                type(self).__name__)  # fmt: skip
        self.tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        config = import_model_code(name_or_path, trust_remote_code)  # outside ZeRO-3's zero.Init (configure_model's)
        if sequence_parallel > 1:
            check_heads(config, sequence_parallel)
        self.model = None
        self.checkpoint_offload: Optional[CheckpointOffload] = None  # with long_context.offload_checkpoints
        self.liger_kernels: list[str] = []
        self._frozen_models: list[FrozenModel] = []
        self._sequence_parallel: Optional[SequenceParallel] = None  # this rank's place, once the ranks are up
        self._ulysses: Optional[UlyssesAttention] = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.optimizer_options.in_backward:
            check_optimizer_in_backward(self.trainer)
        if compile_mode(self.hparams.compile) and stage != "predict":
            check_static_shapes(self.trainer.datamodule)
        if self.sequence_parallel > 1 and stage != "predict":
            self.check_sequence_parallel(self.trainer, self.trainer.datamodule)
            if self._sequence_parallel is None:
                self._sequence_parallel = SequenceParallel.start(self.sequence_parallel)

    def check_sequence_parallel(self, trainer, datamodule=None) -> None:
        """Refuse, in one line, what ``sequence_parallel`` cannot run with ``trainer``'s ranks and ``datamodule``'s
        batches (the command line asks before any process starts, :meth:`setup` again)."""
        check_sequence_parallel(self.sequence_parallel, trainer.world_size, self.hparams.attn_implementation,
                                getattr(datamodule, "packing", None), self._loss_is_per_token(),
                                type(self).__name__)  # fmt: skip

    @classmethod
    def _loss_is_per_token(cls) -> bool:
        """Whether :meth:`loss` is SFT's own sum over positions, which each rank of a sequence-parallel group
        computes over its part of the row alone."""
        return cls.loss is SFTModule.loss

    def _split_attention(self, batch: Batch) -> None:
        """Under sequence parallelism, from the first batch on: the attention split over the group (the data module's
        loaders cut each row into the ranks' parts, ``row_part``; the first batch is checked to be one)."""
        if self._sequence_parallel is None or self._ulysses is not None:
            return
        check_row_part(batch, self._sequence_parallel.size)
        self._ulysses = UlyssesAttention(self.model.config, self._sequence_parallel)
        self._ulysses.install()

    def teardown(self, stage: str) -> None:
        if self._ulysses is not None:
            self._ulysses.remove(self.model)
            self._ulysses = None

    # -- the model -------------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """Create the Hugging Face model: the model factory, to override to build it another way (a different class,
        extra modules). Liger kernels, gradient checkpointing and LoRA are applied to what it returns, in
        :meth:`configure_model`; quantization happens here, as the weights load."""
        hp = self.hparams
        quantization = bitsandbytes_config(hp.load_in_4bit, hp.load_in_8bit)
        return load_causal_lm(hp.name_or_path, hp.dtype, hp.attn_implementation, hp.trust_remote_code, quantization)

    def configure_model(self) -> None:
        """Lightning's hook: :meth:`build_model`, then Liger kernels, k-bit preparation, gradient checkpointing,
        LoRA and compiled layers, as configured; logs what was applied and the trainable parameter count."""
        if self.model is not None:
            return
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        checkpointing = self.checkpointing
        with sharded_creation(strategy):  # ZeRO-3: the weights load straight into their partitions
            model = self.build_model()
            if self.long_context.offload_checkpoints:
                check_offload(model, strategy)
                if not checkpointing:
                    rank_zero_info("model.long_context.offload_checkpoints: gradient checkpointing on (its "
                                   "checkpoints are what is offloaded)")  # fmt: skip
                    checkpointing = GradientCheckpointing()
            self.liger_kernels = apply_liger_kernels(model, self.liger) if self.liger else []
            if self.long_context.tiled_loss and FUSED_LOSS in self.liger_kernels:
                self.liger_kernels.remove(FUSED_LOSS)  # liger: true; the tiled loss computes it, under any strategy
            if is_quantized(model):
                model = prepare_quantized_for_training(model)
            checkpointed = apply_gradient_checkpointing(model, checkpointing) if checkpointing else []
            self._checkpointing_applied = checkpointing if checkpointed else None
            if self.lora is not None:
                model = apply_lora(model, self.lora)
        if self.long_context.tiled_mlp:
            tile_mlps(model, self.long_context.mlp_tile_tokens)
        if self.long_context.offload_checkpoints:
            self.checkpoint_offload = CheckpointOffload()
            offload_checkpoints(model, self.checkpoint_offload)
        fit_to_strategy(model, strategy, FUSED_LOSS in self.liger_kernels)  # ZeRO-3's LoRA init, FSDP's wrapping
        if FUSED_LOSS in self.liger_kernels:
            fused_loss_parts(model)  # refuses now a head the fused loss cannot use
        if self.long_context.tiled_loss:
            check_tiled_loss(model)
        if self.liger_kernels:
            rank_zero_info(f"Liger kernels ({model.config.model_type}): {', '.join(self.liger_kernels)}")
        if checkpointed:
            rank_zero_info(describe_checkpointing(checkpointed, model, checkpointing))
        self._compile_layers(model, strategy)
        rank_zero_info(describe_parameter_counts(model))
        self.model = model

    def _compile_layers(self, model: torch.nn.Module, strategy) -> None:
        mode = compile_mode(self.hparams.compile)
        if not mode or (self._trainer is not None and self._trainer.state.fn == "predict"):
            return  # generation grows its inputs token by token: no static shapes to compile for
        device = getattr(strategy, "root_device", None) or next(model.parameters()).device
        reason = why_not_compiled(strategy, device)
        if not reason and (self.long_context.tiled_mlp or self.long_context.offload_checkpoints):
            reason = ("not with model.long_context's tiled_mlp or offload_checkpoints (per-layer wrappers and hooks "
                      "the compiler cannot trace once for all layers)")  # fmt: skip
        if not reason and self.sequence_parallel > 1:
            reason = "not with model.sequence_parallel (the attention's exchange between ranks is not compiled)"
        if reason:
            rank_zero_warn(f"model.compile: the layers run uncompiled: {reason}")
            return
        count = compile_decoder_layers(model, mode, device)
        rank_zero_info(f"model.compile: {count} decoder layers compiled ({mode}) at their first step")

    def prepare_frozen_model(self, name_or_path: str) -> None:
        """For :meth:`frozen_model` from another path, called in ``__init__``: a wrong path fails at once, in one
        line, and a hub model's own code is imported now (outside ZeRO-3's creation context)."""
        resolve_model_path(name_or_path)
        import_model_code(name_or_path, self.hparams.trust_remote_code)

    def frozen_model(self, name_or_path: Optional[str] = None) -> FrozenModel:
        """A frozen model (a reference, a teacher) placed as the trained model is (:class:`FrozenModel`): under one
        device or DDP a plain module that moves and casts with this one, under DeepSpeed ZeRO-3 partitioned and run
        by an inference engine, under FSDP wrapped as the model. Call it in :meth:`configure_model`, after
        ``super().configure_model()``; it is in neither ``parameters()`` (not trained) nor ``state_dict()`` (not
        checkpointed), and always in eval mode.

        Args:
            name_or_path: a model to load as the trained one is (its ``dtype``, attention, remote-code setting; same
                tokenizer; see :meth:`prepare_frozen_model`); default: a copy of the trained model as it is now (under
                ZeRO-3, whose partitions do not copy, :meth:`build_model` again, with the same Liger kernels).
        """
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        with sharded_creation(strategy):
            if name_or_path:
                model = load_causal_lm(name_or_path, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
            elif distribution(strategy).zero3:
                model = self.build_model()
                if self.liger_kernels:
                    apply_liger_kernels(model, self.liger)
            else:
                model = copy.deepcopy(self.model)
        frozen = FrozenModel(model.eval().requires_grad_(False), strategy)
        self._frozen_models.append(frozen)
        return frozen

    def release_frozen_model(self, frozen: FrozenModel) -> None:
        """Free a frozen model from :meth:`frozen_model` once it is no longer needed (DPO's reference after its
        log-probabilities are computed): it stops moving with this module and cannot run afterwards."""
        self._frozen_models.remove(frozen)
        frozen.release()

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in self.__dict__.get("_frozen_models", ()):
            frozen.module.eval()  # a frozen model runs without dropout, always
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for frozen in self.__dict__.get("_frozen_models", ()):
            if not frozen.sharded:  # the strategy places a sharded one
                frozen.module._apply(fn, recurse)
        return self

    def model_inputs(self, batch: Batch) -> dict:
        """The keyword arguments of the model's forward for a padded or packed micro-batch."""
        keys = VARLEN_INPUTS if self.hparams.attn_implementation == VARLEN else DENSE_INPUTS
        return {
            "input_ids": batch["input_ids"],
            "use_cache": False,
            **{key: batch[key] for key in keys if key in batch},
        }

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``[batch, sequence, vocab]`` for a padded or packed micro-batch."""
        return self.model(**self.model_inputs(batch)).logits

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """The final hidden states ``[batch, sequence, hidden]``, the output head's input (no logits computed)."""
        return decoder_of(self.model)(**self.model_inputs(batch)).last_hidden_state

    # -- the loss: the one method a custom trainer overrides --------------------------------------------------
    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the per-token losses of this micro-batch (not a mean: the step normalises).

        ``batch`` (:class:`~lt_posttrain.batch.Batch`): ``batch["targets"]`` holds the token each position predicts
        (``IGNORE_INDEX`` where no loss); optional ``batch["target_weights"]`` scales each position's loss.
        """
        targets, weights = batch["targets"], batch.get("target_weights")
        if self.long_context.tiled_loss:
            head, softcap = output_head(self.model)
            tile_bytes = self.long_context.loss_tile_bytes(head.out_features)
            return tiled_cross_entropy_sum(self.hidden_states(batch), head, targets, weights, softcap, tile_bytes)
        if self._fused_loss_applies(weights):
            _, head, softcap = fused_loss_parts(self.model)
            return fused_linear_cross_entropy_sum(self.hidden_states(batch), head.weight, targets, weights, softcap)
        return token_cross_entropy_sum(self(batch), targets, weights)

    def _fused_loss_applies(self, weights: Optional[torch.Tensor]) -> bool:
        if FUSED_LOSS not in self.liger_kernels:
            return False
        if weights is not None and not fused_loss_weighs_tokens():
            rank_zero_warn("sample weights: this liger-kernel cannot weight tokens in its fused loss (0.8.5 can); "
                           "computing the loss from the full logits instead")  # fmt: skip
            return False
        return True

    # -- steps --------------------------------------------------------------------------------------------------
    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def on_fit_start(self) -> None:
        # The optimizer and schedule as the recipe built them; a checkpoint's states replace them after this hook.
        self._recipe_values = recipe_values(self.trainer)
        if self.long_context.check_memory:
            self.check_step_memory()

    def check_step_memory(self) -> None:
        """Before the first step on a CUDA device: refuse, in one line, a data plan whose longest micro-batch cannot
        fit (``training/memory.py``); log the estimate, or warn when it is close. The model and optimizer exist and
        are placed; the data module knows its longest micro-batch (not a streamed one's)."""
        trainer = self.trainer
        measured = device_memory(trainer.strategy.root_device)
        shape = ModelShape.of(self.model.config) if self.model is not None and measured else None
        longest = getattr(trainer.datamodule, "longest_micro_batch_tokens", lambda: None)() if shape else None
        if not longest:
            return
        in_use, available = measured
        host = host_available()
        if trainer.world_size > 1:  # every rank decides alike: on the device and host with the least
            least = torch.tensor([available, host or 0], device=self.device)
            gathered = trainer.strategy.all_gather(least).reshape(-1, 2).min(dim=0).values.tolist()
            available, host = int(gathered[0]), (int(gathered[1]) or None)
        tokens = -(-longest // self.sequence_parallel)
        setup = setup_of(self.model, in_use, trainer.precision, **self._step_options(trainer.optimizers))
        memory, warning = check_step(shape, tokens, setup, available, host, str(trainer.strategy.root_device),
                                     trainer.num_devices)  # fmt: skip
        if warning:
            rank_zero_warn(warning)
        else:
            rank_zero_info(f"memory: a step of the longest micro-batch ({tokens:,} tokens) needs about "
                           f"{memory.device / 2**30:.1f} GiB of {trainer.strategy.root_device}'s "
                           f"{available / 2**30:.1f} (an estimate)")

    def _step_options(self, optimizers) -> dict:
        """How a step of this module runs, for :class:`~lt_posttrain.training.memory.StepSetup`."""
        long_context, strategy = self.long_context, self.trainer.strategy
        placed = distribution(strategy)
        own = placed.keeps_master_weights or placed.shards_weights  # DeepSpeed's and FSDP's buffers: measured only
        if not self._loss_is_per_token():
            loss = "unknown"
        else:
            loss = "tiled" if long_context.tiled_loss else "fused" if FUSED_LOSS in self.liger_kernels else "logits"
        config = self.model.config.get_text_config()
        # states not to count: the strategy's, already there, or those of an optimizer a subclass builds its own way
        states_known = not own and not any(getattr(optimizer, "state", None) for optimizer in optimizers)
        states_known = states_known and type(self).build_optimizer is SFTModule.build_optimizer
        return dict(
            optimizer=self.optimizer_options.resolved(self.model, strategy) if states_known else None,
            gradients=not (own or self.optimizer_options.in_backward),
            checkpointing=getattr(self, "_checkpointing_applied", self.checkpointing),
            offload=long_context.offload_checkpoints, loss=loss,
            loss_tile_bytes=long_context.loss_tile_bytes(config.vocab_size),
            mlp_tile_tokens=(long_context.mlp_tile_tokens or config.hidden_size) if long_context.tiled_mlp else None,
            liger=frozenset(self.liger_kernels),
        )  # fmt: skip

    def on_train_start(self) -> None:  # not on_train_epoch_start: Lightning skips it when resuming mid-epoch
        if self.trainer.ckpt_path and getattr(self, "_recipe_values", None) is not None:
            # A resume takes the recipe's learning rate and weight decay, on the recipe's schedule at the restored step
            # (training/resume.py says what a resume may change).
            apply_recipe_values(self.trainer, self._recipe_values)
        # DeepSpeed's engine zeroes the gradients at its own boundary; elsewhere optimizer_step frees them
        self._frees_gradients = not distribution(self.trainer.strategy).keeps_master_weights
        self._step_stats = torch.zeros(2, device=self.device)  # [loss of this step so far, input tokens]
        tokens_seen = getattr(self, "_tokens_seen", torch.zeros((), dtype=torch.float64))  # restored on resume
        self._tokens_seen = tokens_seen.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if hasattr(self, "_tokens_seen"):
            checkpoint["tokens_seen"] = float(self._tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tokens_seen" in checkpoint:
            self._tokens_seen = torch.tensor(checkpoint["tokens_seen"], dtype=torch.float64)

    def _count_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """A count summed over ranks, each sequence-parallel group's counted once (its ranks hold the same)."""
        return count_over_ranks(self._sum_over_ranks(value), self.sequence_parallel)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``LightningModule.load_state_dict``; weights of another model (a checkpoint of another architecture, size
        or LoRA setting) are one line rather than torch's list of every tensor."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            mismatch = weights_mismatch(error)
            if mismatch is None:
                raise
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            raise UserError(f"{f'--ckpt_path {path}: ' if path else ''}the checkpoint's weights do not fit this model "
                            f"({mismatch}); resume with the model and settings it was written with") from error

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self._split_attention(batch)
        step_loss_count = self._count_over_ranks(batch["step_loss_count"].clone()).clamp(min=1)
        share = self.loss(batch) / step_loss_count  # this micro-batch's part of the step's token-mean loss
        self._step_stats += torch.stack([share.detach().float(), batch["num_tokens"].float()])
        # Lightning divides by accumulate_grad_batches and data parallelism averages over ranks: undo both. Under
        # sequence parallelism, the sum over a group's ranks is the sum its gradient needs (see sequence_parallel.py).
        return share * (self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._frees_gradients:
            # Free the gradients now: Lightning zeroes them only after the next forward, which then holds them too.
            optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        plugin = self.trainer.precision_plugin
        if not clip_under_bf16_autocast(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        step_loss, tokens = self._sum_over_ranks(self._step_stats.clone())
        self._tokens_seen += tokens
        self.log("train/loss", step_loss, prog_bar=True)
        # A CPU tensor: a float would be copied to the GPU from pageable memory, which waits for the queued steps.
        self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])))
        self.log("train/tokens_seen", self._tokens_seen.float())
        self._step_stats.zero_()

    def _evaluation_start(self) -> None:
        self._eval_stats = torch.zeros(2, device=self.device, dtype=torch.float64)  # [loss sum, loss tokens]

    def _evaluation_step(self, batch: Batch) -> None:
        self._split_attention(batch)
        self._eval_stats += torch.stack([self.loss(batch).detach().double(), batch["loss_count"].double()])

    def _evaluation_end(self, name: str) -> None:
        loss_sum, count = self._sum_over_ranks(self._eval_stats.clone())
        count = count_over_ranks(count, self.sequence_parallel)
        if count > 0:  # token-weighted over the whole set, not a mean of batch means
            self.log(name, (loss_sum / count).float(), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._evaluation_start()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val/loss")

    def on_test_epoch_start(self) -> None:
        self._evaluation_start()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test/loss")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy completions of the prompts: ``{"prompt", "reference", "generated"}`` per conversation."""
        prompts = [row[keep.bool()].tolist() for row, keep in zip(batch["input_ids"], batch["attention_mask"])]
        answers = generate_answers(self.model, self.tokenizer, prompts, self.hparams.max_new_tokens)
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return [
            {"prompt": prompt, "reference": reference, "generated": text}
            for prompt, reference, text in zip(batch["prompt"], batch["reference"], texts)
        ]

    # -- optimisation -------------------------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the model's trained weights: ``model.optimizer`` (``auto`` resolved for the weights'
        dtype and the strategy), ``learning_rate`` and ``weight_decay``. To override for another optimizer; the
        schedule is :meth:`configure_optimizers`'."""
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        return self.optimizer_options.build(self.model, hp.learning_rate, hp.weight_decay, strategy)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self.build_optimizer()
        total = self.total_optimizer_steps()
        scheduler = build_schedule(optimizer, hp.schedule, warmup_steps_of(total, hp.warmup), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        """``max_steps`` if set, else epochs times optimizer steps per epoch (counted from the data plan: Lightning's
        ``estimated_stepping_batches`` would drop a restored data-loader state)."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        if trainer.datamodule is None:
            return int(trainer.estimated_stepping_batches)
        batches = len(trainer.datamodule.train_dataloader())
        if isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
        return math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs or 1, 1)
