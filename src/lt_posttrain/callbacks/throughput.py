"""Training speed: non-padding tokens/s, model FLOP/s and MFU, peak GPU memory; logged live and summed up at the end.

Model FLOPs are the matrix-product FLOPs a step computes, counted the same way in every mode (the convention of the
PaLM paper's MFU, extended to frozen weights), per token of a sample:

- every matmul weight (the ``nn.Linear`` layers, the LM head and LoRA's adapters included, the embedding lookup
  not) costs 2 FLOPs per parameter in the forward and 2 in the backward for the gradient of its input;
- a trained weight costs 2 more for its own gradient: ``6N`` for trained weights, ``4N`` for frozen ones (a LoRA
  run's base weights, whose products for a weight gradient are never computed);
- causal attention costs ``6 x layers x attention width x length`` per token of a sample of ``length`` tokens,
  forward and backward, over each sample alone (a packed row's samples do not attend to each other).

Gradient checkpointing's recomputation and padding are not counted: MFU measures useful work.
"""

import math
import time
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lt_posttrain.batch import sample_lengths
from lt_posttrain.training.sequence_parallel import sequence_parallel_of
from lt_posttrain.training.sharding import full_shape


FLOPS_CONVENTION = "6N for trained weights, 4N for frozen, attention per sample, recompute not counted"


def matmul_parameters(model: torch.nn.Module, trained: Optional[bool] = None) -> int:
    """Weights of every ``nn.Linear``, PEFT's included, counted whole under ZeRO-3 and FSDP (their shards' full
    shapes, see ``training/sharding.py``).

    Args:
        model: the model.
        trained: count only the weights that train (True) or only the frozen ones (False); None: all.
    """
    total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None:
            continue
        if trained is None or weight.requires_grad == trained:
            total += math.prod(full_shape(model, f"{name}.weight", weight))
    return total


def matmul_flops_per_token(model: torch.nn.Module) -> int:
    """Matrix-product FLOPs of one token's forward and backward, attention left out: ``6`` per trained matmul weight,
    ``4`` per frozen one (see the module's docstring)."""
    return 6 * matmul_parameters(model, trained=True) + 4 * matmul_parameters(model, trained=False)


def attention_width(config) -> int:
    """Query heads times head size (the hidden size where the config does not say), the width of the attention
    products."""
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    if heads and head_dim:
        return heads * head_dim
    return getattr(config, "hidden_size", 0)


def attention_flops_per_square_token(config) -> int:
    """Causal attention's FLOPs, forward and backward, per squared sample length: ``6 x layers x width``."""
    if config is None:
        return 0
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return 6 * getattr(config, "num_hidden_layers", 0) * attention_width(config)


class ThroughputMeter(L.Callback):
    """Logs ``throughput/tokens_per_s`` (non-padding input tokens, all ranks), ``throughput/tflops`` (model TFLOP/s,
    all ranks, counted as the module's docstring says), ``throughput/mfu`` and ``throughput/peak_gib`` (peak GPU memory of this rank) every
    ``log_every_n_steps`` optimizer steps, and prints a summary of the whole run after the warm-up steps.

    Args:
        warmup_steps: optimizer steps left out of the measurement (compilation, allocator growth).
        peak_tflops: the per-device TFLOP/s that MFU divides by; default: the data-sheet dense peak of the GPU for
            the training precision (Lightning's table), none on CPU.
        enabled: measure at all.
    """

    def __init__(self, warmup_steps: int = 3, peak_tflops: Optional[float] = None, enabled: bool = True):
        self.warmup_steps, self.peak_tflops, self.enabled = warmup_steps, peak_tflops, enabled
        self.summary: Optional[dict] = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled:
            return
        self._per_token = matmul_flops_per_token(module.model)
        # the ranks of a sequence-parallel group share each row (sample_lengths are the whole row's): 1/N each
        self._share = 1.0 / sequence_parallel_of(module)
        self._attention = attention_flops_per_square_token(getattr(module.model, "config", None))
        self._peak = self._peak_flops(trainer, module)
        self._counts = torch.zeros(2, dtype=torch.float64, device=module.device)  # [tokens, flops] since last log
        self._total = torch.zeros_like(self._counts)
        self._last_step, self._clock, self._window = trainer.global_step, None, None
        self._measured_steps = 0
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)

    def _peak_flops(self, trainer: L.Trainer, module: L.LightningModule) -> Optional[float]:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        if module.device.type != "cuda":
            return None
        from lightning.fabric.utilities.throughput import get_available_flops

        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
        return get_available_flops(module.device, dtype)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        lengths = sample_lengths(batch).to(torch.float64)
        flops = self._per_token * lengths.sum() + self._attention * (lengths**2).sum()
        self._counts += torch.stack([lengths.sum(), flops]) * self._share
        if trainer.global_step == self._last_step:  # inside an accumulation window
            return
        self._last_step = trainer.global_step
        if trainer.global_step < self.warmup_steps:
            self._counts.zero_()
            return
        if self._clock is None:  # the warm-up ends here: measure from now on
            self._synchronize(module)
            self._clock = self._window = time.perf_counter()
            self._counts.zero_()
            return
        self._measured_steps += 1
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._log_window(trainer, module)

    def _log_window(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._synchronize(module)
        now = time.perf_counter()
        counts = trainer.strategy.reduce(self._counts.clone(), reduce_op="sum")
        self._total += counts
        self._counts.zero_()
        elapsed, self._window = now - self._window, now
        metrics = self._rates(counts, elapsed, trainer.world_size, module)
        module.log_dict({f"throughput/{key}": value for key, value in metrics.items()}, rank_zero_only=True)

    def _rates(self, counts: torch.Tensor, elapsed: float, world_size: int, module: L.LightningModule) -> dict:
        tokens, flops = counts.tolist()
        rates = {"tokens_per_s": tokens / elapsed, "tflops": flops / elapsed / 1e12}
        if self._peak:
            rates["mfu"] = flops / elapsed / (self._peak * world_size)
        if module.device.type == "cuda":
            rates["peak_gib"] = torch.cuda.max_memory_allocated(module.device) / 2**30
        return rates

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled or self._clock is None:
            return
        self._synchronize(module)
        self._total += trainer.strategy.reduce(self._counts.clone(), reduce_op="sum")
        self._counts.zero_()
        elapsed = time.perf_counter() - self._clock
        if self._measured_steps == 0 or elapsed <= 0:
            return
        self.summary = {"steps": self._measured_steps, "seconds": elapsed,
                        **self._rates(self._total, elapsed, trainer.world_size, module)}  # fmt: skip
        parts = [f"{self.summary['tokens_per_s']:,.0f} tokens/s", f"{self.summary['tflops']:.3g} model TFLOP/s"]
        if "mfu" in self.summary:
            parts.append(f"MFU {100 * self.summary['mfu']:.1f}% of {self._peak / 1e12:.0f} TFLOP/s per device")
        if "peak_gib" in self.summary:
            parts.append(f"peak {self.summary['peak_gib']:.2f} GiB")
        rank_zero_info(f"throughput over {self._measured_steps} steps after {self.warmup_steps} warm-up: "
                       f"{', '.join(parts)} (model FLOPs: {FLOPS_CONVENTION})")

    @staticmethod
    def _synchronize(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
