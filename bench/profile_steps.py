"""Where the time of a few training steps goes: a Lightning callback for `bench/speed.py ours --profile FILE`.

It profiles ``steps`` optimizer steps from ``first_step`` (torch.profiler, CPU and CUDA), then writes to ``out``: the
wall time of those steps, the GPU's busy time, the GPU time by kind of kernel (matrix products, attention, Liger's
kernels, optimizer, ...), the host's waits on the GPU (synchronisations and blocking copies: each one drains the
launch queue and leaves the GPU idle while the host catches up) and the 40 kernels that took longest.
"""

import json
import re
import time

import lightning as L
import torch

KINDS = [  # first match wins
    ("attention (varlen flash)", r"flash|fmha|attn"),
    ("Liger fused linear cross-entropy", r"cross_entropy|element_mul"),
    ("Liger RMSNorm / SwiGLU / RoPE", r"rms_norm|swiglu|rope"),
    ("matrix products", r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|splitk"),
    ("optimizer (fused AdamW)", r"adam"),
    ("gradient norm and clipping", r"norm|multi_tensor"),
    ("embedding", r"embedding|index|scatter|gather"),
    ("copies and casts", r"copy|cast|fill|memset|memcpy"),
    ("other elementwise and reductions", r"elementwise|reduce|vectorized|triton"),
]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def is_kernel(event) -> bool:
    """A GPU kernel's own record (not the CPU op that launched it, nor a named range such as ``Optimizer.step``)."""
    on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
    return on_gpu and not getattr(event, "is_user_annotation", False) and event.self_device_time_total > 0


def is_host_wait(event) -> bool:
    """A CUDA runtime call on the host that blocks until the GPU catches up (a sync, or a copy to the host)."""
    on_host = event.device_type == torch.autograd.DeviceType.CPU
    return on_host and bool(re.search(r"Synchronize|cudaMemcpy(?!.*Async)|_local_scalar_dense", event.key))


def kind_of(kernel: str) -> str:
    lowered = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame of the model, Liger, the optimizer, Lightning or this project that made an allocation."""
    wanted = ("lt_posttrain", "transformers", "liger_kernel", "torch/optim", "optimi", "lightning", "torch/utils/checkpoint")
    for frame in frames:
        if any(part in frame["filename"] for part in wanted):
            return f"{frame['filename'].split('site-packages/')[-1]}:{frame['line']} {frame['name']}"
    return "other (allocated before the profiled steps, or outside Python)"


def memory_at_peak(snapshot: dict) -> list[str]:
    """Replay the recorded allocations; at the highest total, sum what is live by allocation site."""
    live, total, peak, at_peak = {}, 0, 0, {}
    existing = sum(block["size"] for segment in snapshot["segments"] for block in segment["blocks"]
                   if block["state"] == "active_allocated")  # fmt: skip
    for trace in snapshot["device_traces"]:
        for event in trace:
            if event["action"] == "alloc":
                live[event["addr"]] = (event["size"], allocation_site(event.get("frames", [])))
                total += event["size"]
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])[0]
            if total > peak:
                peak, at_peak = total, dict(live)
    sites: dict[str, int] = {}
    for size, site in at_peak.values():
        sites[site] = sites.get(site, 0) + size
    lines = [f"GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB at the peak of these steps; allocated "
             f"within them and live at their highest point: {peak / 2**30:.2f} GiB; allocated now: {existing / 2**30:.2f}"
             " GiB", "", "| allocated by | GiB live at the peak |", "|---|---|"]  # fmt: skip
    for site, size in sorted(sites.items(), key=lambda item: -item[1])[:25]:
        lines.append(f"| `{site}` | {size / 2**30:.3f} |")
    return lines


class ProfileSteps(L.Callback):
    def __init__(self, out: str, first_step: int = 10, steps: int = 3):
        self.out, self.first_step, self.steps = out, first_step, steps
        self.profiler, self.started = None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first_step and self.profiler is None:
            synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None or trainer.global_step != self.first_step + self.steps or not self.started:
            return
        synchronize()
        wall_ms = (time.perf_counter() - self.started) * 1e3
        self.profiler.__exit__(None, None, None)
        self.started = 0.0
        kernels = [(event.key, event.self_device_time_total / 1e3, event.count)
                   for event in self.profiler.key_averages() if is_kernel(event)]  # fmt: skip
        busy_ms = sum(ms for _, ms, _ in kernels)
        by_kind: dict[str, float] = {}
        for name, ms, _ in kernels:
            by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
        lines = [f"{self.steps} steps from step {self.first_step}: wall {wall_ms / self.steps:.1f} ms a step, GPU busy "
                 f"{busy_ms / self.steps:.1f} ms a step ({100 * busy_ms / wall_ms:.1f}% of the wall time)", "",
                 "| kind of kernel | ms a step | share of GPU time |", "|---|---|---|"]  # fmt: skip
        for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
            lines.append(f"| {kind} | {ms / self.steps:.1f} | {100 * ms / busy_ms:.1f}% |")
        waits = [(event.key, event.cpu_time_total / 1e3, event.count)
                 for event in self.profiler.key_averages() if is_host_wait(event)]  # fmt: skip
        lines += ["", "| host waits on the GPU | ms a step | calls a step |", "|---|---|---|"]
        lines += [f"| `{name}` | {ms / self.steps:.2f} | {count / self.steps:.1f} |" for name, ms, count in waits]
        lines += ["", "| kernel | kind | ms a step | calls a step |", "|---|---|---|---|"]
        for name, ms, count in sorted(kernels, key=lambda item: -item[1])[:40]:
            lines.append(f"| `{name[:90]}` | {kind_of(name)} | {ms / self.steps:.2f} | {count // self.steps} |")
        if torch.cuda.is_available():
            lines += ["", *memory_at_peak(torch.cuda.memory._snapshot())]
            torch.cuda.memory._record_memory_history(enabled=None)
        with open(self.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        summary = {"wall_ms_per_step": round(wall_ms / self.steps, 1), "gpu_busy_ms_per_step": round(busy_ms / self.steps, 1),
                   "by_kind_ms_per_step": {kind: round(ms / self.steps, 1) for kind, ms in by_kind.items()}}  # fmt: skip
        print("PROFILE " + json.dumps(summary), flush=True)
