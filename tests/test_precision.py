"""bf16 weights without lost updates: plain bf16 AdamW leaves most weights untouched at a small learning rate, the
Kahan-compensated default tracks the fp32-master run."""

import pytest
import torch

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import run
from lt_posttrain.errors import UserError
from lt_posttrain.training.optimizer import lost_update_warning, resolve_optimizer
from lt_posttrain.training.precision import rounding_step

STEPS, LEARNING_RATE = 50, 1e-5


def fit(tmp_path, model_dir, chats, precision: str, dtype: str, optimizer: str, steps: int = STEPS, model=None,
        trainer=None):  # fmt: skip
    """``steps`` of a fit at the small learning rate; ``model`` and ``trainer`` add to those sections."""
    folder = tmp_path / optimizer / precision / str(len(list((tmp_path / optimizer / precision).glob("*"))))
    recipe = {
        "seed_everything": 0,
        "model": {"name_or_path": str(model_dir), "dtype": dtype, "optimizer": optimizer,
                  "learning_rate": LEARNING_RATE, "schedule": "constant", **(model or {})},
        "data": {"sources": [str(chats)], "batch_size": 1, "max_length": 128, "shuffle": False},
        "trainer": {"accelerator": "cpu", "precision": precision, "max_steps": steps, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "default_root_dir": str(folder), **(trainer or {}),
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(folder)}}},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"enabled": False},
    }  # fmt: skip
    cli = run(recipe, "fit")
    import csv

    with open(f"{cli.trainer.logger.log_dir}/metrics.csv") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    return cli, losses


def drift(start: dict, master, trained) -> tuple[float, float]:
    """How far ``trained``'s weight matrices ended from the fp32-master run's, relative to how far those moved from
    ``start``; and the share of them still equal to their start."""
    names = [name for name, value in trained.model.model.named_parameters() if value.ndim >= 2]  # tied weights once
    weights = {"master": master.model.model.state_dict(), "trained": trained.model.model.state_dict()}
    moved = sum(((weights["master"][n].float() - start[n]) ** 2).sum() for n in names).sqrt()
    distance = sum(((weights["trained"][n].float() - weights["master"][n].float()) ** 2).sum() for n in names).sqrt()
    untouched = sum(int((weights["trained"][n].float() == start[n]).sum()) for n in names)
    return float(distance / moved), untouched / sum(start[n].numel() for n in names)


def test_compensated_bf16_tracks_fp32_master_weights_and_plain_bf16_does_not(tmp_path, bf16_exact_model, recwarn):
    from transformers import AutoModelForCausalLM

    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2 * STEPS))
    start = AutoModelForCausalLM.from_pretrained(bf16_exact_model).state_dict()
    master, master_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-mixed", "float32", "auto")
    plain, plain_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-true", "float32", "adamw")
    kahan, kahan_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-true", "float32", "auto")
    assert type(master.model.optimizers().optimizer).__module__.startswith("torch.optim")  # fp32 weights: plain AdamW
    assert type(kahan.model.optimizers().optimizer).__module__.startswith("optimi")  # bf16 weights: compensated
    assert any("rounding step" in str(warning.message) for warning in recwarn)  # plain bf16 AdamW was asked: warned

    names = [name for name, value in kahan.model.model.named_parameters() if value.ndim >= 2]  # tied weights once
    trained = {name: run.model.model.state_dict() for name, run in (("master", master), ("plain", plain), ("kahan", kahan))}
    moved = sum(((trained["master"][n].float() - start[n]) ** 2).sum() for n in names).sqrt()
    assert moved > 0
    untouched = sum(int((trained["plain"][n].float() == start[n]).sum()) for n in names) / sum(start[n].numel() for n in names)
    assert untouched > 0.5  # the defect: most bf16 weights never moved

    optimizer = kahan.model.optimizers().optimizer
    compensation = {id(p): optimizer.state[p]["kahan_comp"] for group in optimizer.param_groups for p in group["params"]}
    by_name = dict(kahan.model.model.named_parameters())

    def distance(values) -> float:
        return float(sum(((values(n) - trained["master"][n].float()) ** 2).sum() for n in names).sqrt() / moved)

    plain_distance = distance(lambda n: trained["plain"][n].float())
    kahan_distance = distance(lambda n: by_name[n].detach().float() + compensation[id(by_name[n])].float())
    print(f"relative distance to the fp32-master run: plain bf16 {plain_distance:.3f}, compensated {kahan_distance:.4f}")
    assert kahan_distance < 0.05 and plain_distance > 0.5
    assert len(kahan_losses) == len(master_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(kahan_losses, master_losses)) < 1e-2


def test_auto_picks_by_weight_dtype_and_strategy():
    model = torch.nn.Linear(4, 4)
    assert resolve_optimizer("auto", model) == "adamw"
    model.to(torch.bfloat16)
    assert resolve_optimizer("auto", model) == "adamw_kahan"

    from lightning.pytorch.strategies import DeepSpeedStrategy  # its ZeRO optimizer keeps fp32 master weights

    assert resolve_optimizer("auto", model, DeepSpeedStrategy()) == "adamw"
    assert lost_update_warning("adamw", model, 1e-5, DeepSpeedStrategy()) is None
    assert resolve_optimizer("adamw", model) == "adamw"


def test_warning_names_the_learning_rate_and_the_rounding_step():
    model = torch.nn.Linear(256, 256).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(0.02)
    message = lost_update_warning("adamw", model, 1e-5)
    assert "learning rate 1e-05" in message and "1.2e-04" in message and "adamw_kahan" in message
    assert lost_update_warning("adamw_kahan", model, 1e-5) is None
    assert rounding_step(0.02) == pytest.approx(2**-13)


def test_own_optimizer_by_import_path_and_bad_paths(tmp_path, tiny_model_dir):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(4))
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir), "optimizer": "torch.optim.SGD", "learning_rate": 0.1},
        "data": {"sources": [str(chats)], "batch_size": 2, "max_length": 256},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "checkpoint": {"save_end_of_training": False},
    }  # fmt: skip
    cli = run(recipe, "fit")
    optimizer = cli.model.optimizers().optimizer
    assert isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 2  # decay groups kept
    from lt_posttrain import SFTModule

    for path, message in [("torch.optim.NoSuch", "cannot import it"), ("torch.nn.Linear", "not a torch.optim.Optimizer"),
                          ("adamw_kahn", "not a known optimizer")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            SFTModule(str(tiny_model_dir), optimizer=path)



def test_bf16_mixed_clips_gradients_for_a_fused_optimizer(tmp_path, tiny_model_dir):
    """Lightning's MixedPrecision refuses to clip for a fused optimizer; bf16 scales no loss, so we clip."""
    from fused_adamw import FusedAdamW  # tests/

    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(4))
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir), "optimizer": "fused_adamw.FusedAdamW", "learning_rate": 1e-3},
        "data": {"sources": [str(chats)], "batch_size": 2, "max_length": 256},
        "trainer": {"accelerator": "cpu", "precision": "bf16-mixed", "gradient_clip_val": 1e-3, "max_steps": 2,
                    "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "checkpoint": {"save_end_of_training": False},
    }  # fmt: skip
    FusedAdamW.norms_at_step.clear()
    cli = run(recipe, "fit")
    assert cli.model.optimizers().optimizer.defaults["fused"]
    assert len(FusedAdamW.norms_at_step) == 2 and max(FusedAdamW.norms_at_step) <= 1e-3 * 1.001


def test_stochastic_rounding_keeps_small_updates_at_no_extra_memory(tmp_path, bf16_exact_model):
    """torchao's stochastically rounding AdamW: no extra state per weight, and the weights move as the fp32 run's do
    on average, where plain bf16 AdamW leaves them untouched."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2 * STEPS))
    start = AutoModelForCausalLM.from_pretrained(bf16_exact_model).state_dict()
    master, master_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-mixed", "float32", "auto")
    rounded, rounded_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-true", "float32", "adamw_stochastic")
    optimizer = rounded.model.optimizers().optimizer
    assert type(optimizer).__module__.startswith("torchao")
    assert all(set(state) <= {"step", "exp_avg", "exp_avg_sq"} for state in optimizer.state.values())  # no buffer

    distance, untouched = drift(start, master, rounded)
    print(f"stochastic rounding: relative distance to the fp32-master run {distance:.3f}, weights untouched {untouched:.2f}")
    assert untouched < 0.5 and distance < 0.7  # measured 0.48 (noisy but unbiased); plain bf16 AdamW ends 0.93 away
    assert max(abs(a - b) for a, b in zip(rounded_losses, master_losses)) < 1e-2


def test_stochastic_rounding_without_torchao_is_one_line(monkeypatch, tiny_model_dir):
    import sys

    from lt_posttrain import SFTModule

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(UserError, match=r"adamw_stochastic needs torchao .*pip install 'lt-posttrain\[stochastic\]'"):
        SFTModule(str(tiny_model_dir), optimizer="adamw_stochastic")
