"""A callback for tests: the shapes of the batches a fit trains on, their tokens and the loss of each step."""

import lightning as L


class BatchShapes(L.Callback):
    """Records, per training batch, ``(input_ids shape, boundaries, max_length_q)``, and the step losses (one micro-batch a step)."""

    def __init__(self):
        self.shapes, self.losses, self.tokens = [], [], 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        bounds = batch.get("cu_seq_lens_q")
        self.shapes.append((tuple(batch["input_ids"].shape), None if bounds is None else len(bounds),
                            batch.get("max_length_q")))  # fmt: skip
        self.tokens += int(batch["num_tokens"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))  # one micro-batch a step
