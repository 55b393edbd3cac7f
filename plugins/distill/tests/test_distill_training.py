"""Distillation training: the student moves towards the teacher; the step's gradient is the token-weighted mean over
its loss tokens whatever the batching; the teacher stays out of the optimizer and the checkpoint; a recipe picks the
trainer by its short name."""

import csv
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from distill_rows import chat_data, gsm8k_chats, write_jsonl
from lt_posttrain_distill import DistillModule

from lt_posttrain import InstructDataModule

SHORT_CHATS = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
               for question, answer in (("2+2?", "4"), ("Is 7 prime?", "Yes."))]


def distill(student_dir, teacher_dir, **options) -> DistillModule:
    module = DistillModule(str(student_dir), teacher_name_or_path=str(teacher_dir), **options)
    module.configure_model()
    return module


def test_a_step_moves_the_student_towards_the_teacher(student_dir, teacher_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(4))
    batch = next(iter(chat_data(tokenizer, path, batch_size=4, packing=True).train_dataloader()))
    module = distill(student_dir, teacher_dir, divergence="reverse_kl")
    assert distill(student_dir, student_dir).loss(batch).abs() < 1e-3  # a student is its own perfect teacher
    before = module.token_divergences(batch)
    optimizer = torch.optim.SGD(module.model.parameters(), lr=1.0)
    loss = module.loss(batch)
    assert loss.item() == pytest.approx(before.sum().item(), rel=1e-5)  # the tiled sum of the same divergences
    (loss / batch["loss_count"]).backward()
    optimizer.step()
    after = module.token_divergences(batch)
    assert after.sum() < before.sum()
    loss_tokens = batch["targets"] != -100
    assert (before[~loss_tokens] == 0).all() and (before[loss_tokens] > 0).all()


class FirstGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


def test_gradient_is_the_mean_over_the_steps_loss_tokens(student_dir, teacher_dir, tokenizer, tmp_path):
    """Four chats of very different lengths: one micro-batch of 4, 4 accumulated micro-batches of 1, or 2 of up to 2
    packed rows each all give the gradient of the sum of the divergences over the step's loss tokens divided by
    their number, computed by hand."""
    path = write_jsonl(tmp_path / "chats.jsonl", [*gsm8k_chats(2), *SHORT_CHATS])
    module = distill(student_dir, teacher_dir, divergence="jsd", beta=0.3, temperature=1.5)
    batch = next(iter(chat_data(tokenizer, path, batch_size=4).train_dataloader()))
    (module.loss(batch) / (batch["targets"] != -100).sum()).backward()
    expected = {name: p.grad for name, p in module.model.named_parameters()}
    for batch_size, accumulate, packing in [(4, 1, False), (1, 4, False), (2, 2, True)]:
        capture = FirstGradients()
        trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                            callbacks=[capture], enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        data = InstructDataModule([str(path)], max_length=512, batch_size=batch_size, packing=packing, shuffle=False)
        trainer.fit(DistillModule(str(student_dir), teacher_name_or_path=str(teacher_dir), divergence="jsd", beta=0.3,
                                  temperature=1.5, learning_rate=1e-3), data)  # fmt: skip
        for name, grad in expected.items():
            # A wrong normaliser weighs the chats by other ratios of their loss-token counts (2 to over 100 here);
            # float32 sums of the same terms in another order differ by about 1e-5 of the largest element.
            error = (capture.grads[name] - grad).abs().max() / grad.abs().max()
            assert error < 1e-4, f"{batch_size=} {accumulate=} {packing=} {name}: relative difference {error:.1e}"
        teacher = {id(p) for p in trainer.lightning_module.teacher_model.parameters()}
        assert not any(id(p) in teacher for group in trainer.optimizers[0].param_groups for p in group["params"])


def test_teacher_is_kept_out_of_the_checkpoint_and_moves_with_the_module(student_dir, teacher_dir, tmp_path):
    module = distill(student_dir, teacher_dir)
    assert not any(p.requires_grad for p in module.teacher_model.parameters())
    assert all(name.startswith("model.") for name in module.state_dict())
    assert not module.teacher_model.training
    module.train()
    assert not module.teacher_model.training  # no dropout in the teacher, ever
    module.to(torch.bfloat16)
    assert {p.dtype for p in module.teacher_model.parameters()} == {torch.bfloat16}


def test_a_teacher_of_another_vocabulary_is_refused(student_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lt_posttrain import UserError

    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match=r"the teacher's vocabulary has 300 tokens, the student's 49152"):
        distill(student_dir, tmp_path / "other")


def test_recipe_with_short_name(student_dir, teacher_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(4))
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"class_path": "distill", "init_args": {
            "name_or_path": str(student_dir), "teacher_name_or_path": str(teacher_dir), "divergence": "forward_kl",
            "temperature": 2.0}},
        "data": {"sources": [str(chats)], "batch_size": 2, "packing": True, "max_length": 256},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1, "enable_checkpointing": False,
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "checkpoint": {"save_end_of_training": False},
    }))  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "lt_posttrain.cli", "fit", "--config", str(recipe)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(row["train/loss"]) for row in csv.DictReader(next(tmp_path.rglob("metrics.csv")).open())
              if row["train/loss"]]  # fmt: skip
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "lt_posttrain_distill.trainer.DistillModule"
