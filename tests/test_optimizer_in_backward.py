"""The optimizer step in the backward pass: the same weights as Kahan-compensated AdamW stepping after the backward,
no gradient held when the step would come, an exact resume, and one line for what it cannot do."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from cli_runs import failing_here, fit_args, write_recipe
from conftest import gsm8k_chats, write_jsonl
from grad_capture import GradCapture
from lt_posttrain.cli import main
from lt_posttrain.errors import UserError
from lt_posttrain.training.optimizer import torchao_adamw
from lt_posttrain.training.optimizer_in_backward import AdamWInBackward, check_optimizer_in_backward
from test_cli import assert_one_line_error
from test_precision import STEPS as PRECISION_STEPS
from test_precision import drift, fit

STEPS = 8
IN_BACKWARD = {"optimizer_in_backward": True}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(2 * STEPS))


def test_in_backward_gives_the_weights_of_the_step_after_it_and_holds_no_gradient(tmp_path, tiny_model_dir, chats):
    captured = {"callbacks": [{"class_path": "grad_capture.GradCapture"}]}
    after, after_losses = fit(tmp_path, tiny_model_dir, chats, "bf16-true", "float32", "adamw_kahan", STEPS,
                              trainer=captured)  # fmt: skip
    inside, inside_losses = fit(tmp_path, tiny_model_dir, chats, "bf16-true", "float32", "adamw_kahan", STEPS,
                                model=IN_BACKWARD, trainer=captured)  # fmt: skip
    assert inside.model.optimizers().optimizer.steps_in_backward
    assert inside_losses == after_losses and len(inside_losses) == STEPS
    weights = {name: p for name, p in after.model.model.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in weights.values())
    assert all(torch.equal(p, weights[name]) for name, p in inside.model.model.named_parameters())

    def grads_at_each_step(cli) -> list[int]:
        [capture] = [callback for callback in cli.trainer.callbacks if isinstance(callback, GradCapture)]
        return [len(grads) for grads in capture.grads]

    assert grads_at_each_step(after) == [len(weights)] * STEPS  # every gradient held until the step
    assert grads_at_each_step(inside) == [0] * STEPS  # each freed as soon as its weight moved


def test_its_state_holds_only_each_weights_own_buffers(tiny_model_dir):
    """Lightning moves the optimizer state to the CPU when a fit ends: a link from a weight's state to its group
    would copy every weight of the group once for each weight (on a GPU, hundreds of GiB of host memory)."""
    from lightning.fabric.utilities.optimizer import _optimizer_to_device
    from transformers import AutoModelForCausalLM

    from lt_posttrain.training.optimizer import decay_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = AdamWInBackward([g for g in decay_groups(model, 0.1) if g["params"]], 1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())  # stepped in the backward
    _optimizer_to_device(optimizer, torch.device("cpu"))
    for param, state in optimizer.state.items():
        assert set(state) == {"exp_avg", "exp_avg_sq", "kahan_comp", "step"}
        assert all(value is None or value.shape == param.shape for key, value in state.items() if key != "step")


@pytest.mark.parametrize("optimizer", ["adamw_kahan", "adamw_stochastic"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_model_dir, chats, optimizer):
    if optimizer == "adamw_stochastic":
        pytest.importorskip("torchao")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, model={**IN_BACKWARD, "optimizer": optimizer},
                          trainer={"max_steps": 6, "accumulate_grad_batches": 1, "precision": "bf16-true"},
                          training_state={"every_n_steps": 3, "keep_last": -1})  # fmt: skip
    main(fit_args(recipe, tmp_path / "straight", "run"))
    resume = ("--ckpt_path", tmp_path / "straight" / "checkpoints" / "step-3.ckpt")
    main(fit_args(recipe, tmp_path / "resumed", "run", *resume))
    straight, resumed = (torch.load(tmp_path / run / "checkpoints" / "step-6.ckpt", weights_only=True)
                         for run in ("straight", "resumed"))  # fmt: skip
    assert all(torch.equal(resumed["state_dict"][name], value) for name, value in straight["state_dict"].items())
    [state] = straight["optimizer_states"]
    assert all("group" not in each for each in state["state"].values())  # no link back into the groups saved
    assert {"exp_avg", "exp_avg_sq"} <= set(state["state"][0])
    assert ("kahan_comp" in state["state"][0]) == (optimizer == "adamw_kahan")  # stochastic rounding: no buffer


def test_stochastic_rounding_in_backward_tracks_the_fp32_run_and_holds_no_gradient(tmp_path, bf16_exact_model):
    """torchao's stochastically rounding AdamW stepped in the backward pass: bf16 weights and states only, no
    gradient left when the step would come, and the weights move as the fp32-master run's do (noisier, unbiased)."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2 * PRECISION_STEPS))
    captured = {"callbacks": [{"class_path": "grad_capture.GradCapture"}]}
    start = AutoModelForCausalLM.from_pretrained(bf16_exact_model).state_dict()
    master, master_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-mixed", "float32", "auto")
    rounded, rounded_losses = fit(tmp_path, bf16_exact_model, chats, "bf16-true", "float32", "adamw_stochastic",
                                  model=IN_BACKWARD, trainer=captured)  # fmt: skip
    optimizer = rounded.model.optimizers().optimizer
    assert optimizer.steps_in_backward and isinstance(optimizer, torchao_adamw())
    assert all(set(state) == {"step", "exp_avg", "exp_avg_sq"} for state in optimizer.state.values())
    assert all(p.dtype == torch.bfloat16 for p in rounded.model.model.parameters())
    [capture] = [callback for callback in rounded.trainer.callbacks if isinstance(callback, GradCapture)]
    assert [len(grads) for grads in capture.grads] == [0] * PRECISION_STEPS

    distance, untouched = drift(start, master, rounded)
    print(f"stochastic rounding in the backward: distance to the fp32-master run {distance:.3f}, untouched {untouched:.2f}")
    assert untouched < 0.5 and distance < 0.7  # plain bf16 AdamW ends 0.93 away with most weights untouched
    assert max(abs(a - b) for a, b in zip(rounded_losses, master_losses)) < 1e-2


@pytest.mark.parametrize(
    "trainer,refused",
    [
        ({"accumulate_grad_batches": 2, "gradient_clip_val": None}, "set trainer.accumulate_grad_batches 1"),
        ({"accumulate_grad_batches": 1, "gradient_clip_val": 1.0}, "unset trainer.gradient_clip_val"),
    ],
)
def test_what_it_cannot_do_is_one_line(tmp_path, tiny_model_dir, chats, capsys, trainer, refused):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, model=IN_BACKWARD,
                          trainer={"max_steps": 2, **trainer})  # fmt: skip
    result = failing_here(capsys, *fit_args(recipe, tmp_path, "run"))
    assert_one_line_error(result, "model.optimizer_in_backward", refused)


def test_it_runs_on_one_device_with_a_compensated_adamw_only(tiny_model_dir):
    from lt_posttrain import SFTModule

    one = SimpleNamespace(accumulate_grad_batches=1, gradient_clip_val=None, strategy=SingleDeviceStrategy("cpu"))
    check_optimizer_in_backward(one)
    with pytest.raises(UserError, match="runs on one device.*DDPStrategy.*trainer.devices 1"):
        check_optimizer_in_backward(SimpleNamespace(**{**vars(one), "strategy": DDPStrategy()}))
    with pytest.raises(UserError, match="needs model.optimizer adamw_kahan .or auto. or adamw_stochastic, not adamw$"):
        SFTModule(str(tiny_model_dir), optimizer="adamw", optimizer_in_backward=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_triton_step_in_backward_matches_the_step_after_it(tmp_path, tiny_model_dir, chats):
    gpu = {"accelerator": "gpu", "devices": 1}
    after, after_losses = fit(tmp_path, tiny_model_dir, chats, "bf16-true", "float32", "adamw_kahan", STEPS,
                              trainer=gpu)  # fmt: skip
    inside, inside_losses = fit(tmp_path, tiny_model_dir, chats, "bf16-true", "float32", "adamw_kahan", STEPS,
                                model=IN_BACKWARD, trainer=gpu)  # fmt: skip
    assert inside.model.optimizers().optimizer.param_groups[0]["triton"]
    assert max(abs(a - b) for a, b in zip(inside_losses, after_losses)) < 1e-2
    weights = dict(after.model.model.named_parameters())
    for name, p in inside.model.model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_stochastic_rounding_steps_in_the_backward(tmp_path, tiny_model_dir, chats):
    """torchao compiles its step: on a GPU the backward runs on autograd's device thread, and the step with it."""
    pytest.importorskip("torchao")
    gpu = {"accelerator": "gpu", "devices": 1}
    after, after_losses = fit(tmp_path, tiny_model_dir, chats, "bf16-true", "float32", "adamw_stochastic", STEPS,
                              trainer=gpu)  # fmt: skip
    inside, inside_losses = fit(tmp_path, tiny_model_dir, chats, "bf16-true", "float32", "adamw_stochastic", STEPS,
                                model=IN_BACKWARD, trainer=gpu)  # fmt: skip
    assert inside.model.optimizers().optimizer.steps_in_backward
    assert len(inside_losses) == STEPS and max(abs(a - b) for a, b in zip(inside_losses, after_losses)) < 1e-2
