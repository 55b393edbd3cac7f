"""``model.compile``: compiled decoder layers train with the losses of uncompiled ones, are compiled once for every
layer and step whatever the sample boundaries, and are off (one line) where they cannot apply.

The fits compile with the ``aot_eager`` backend (``LT_POSTTRAIN_COMPILE_BACKEND``): the graphs torch.compile
captures and differentiates, run without generated kernels, since inductor builds C++ for a minute and more on a
small CPU. ``test_inductor_compiles_a_layer_on_the_cpu`` runs inductor itself once, on one layer.
"""

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.debugging import aot_eager

from cli_runs import failing_here
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import SFTModule, run
from lt_posttrain.training import compile as compile_module
from lt_posttrain.training.compile import BACKEND_VARIABLE, check_static_shapes, why_not_compiled

GRAPHS = []


@torch._dynamo.register_backend
def lt_posttrain_counting(graph, example_inputs):
    """aot_eager, counting the graphs it is given (one per compilation)."""
    GRAPHS.append(graph)
    return aot_eager(graph, example_inputs)


def fit(tmp_path, model_dir, chats, name: str, **model) -> list[float]:
    recipe = {
        "seed_everything": 0,
        "model": {"name_or_path": str(model_dir), "learning_rate": 1e-3, **model},
        "data": {"sources": [str(chats)], "batch_size": 2, "max_length": 512, "packing": True, "static_shapes": True},
        "trainer": {"accelerator": "cpu", "max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "enable_checkpointing": False, "default_root_dir": str(tmp_path / name),
                    "callbacks": [{"class_path": "batch_shapes.BatchShapes"}]},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"enabled": False},
    }  # fmt: skip
    cli = run(recipe, "fit")
    [shapes] = [callback for callback in cli.trainer.callbacks if type(callback).__name__ == "BatchShapes"]
    assert len(set(shapes.shapes)) == 1  # one shape, the sample boundaries differ
    return shapes.losses


@pytest.mark.parametrize(
    "model",
    [{"gradient_checkpointing": False},
     {"gradient_checkpointing": {"save": ["attention"]}, "lora": {"r": 4, "dropout": 0.0}}],  # fmt: skip
    ids=["plain", "selective-checkpointing-lora"],
)
def test_compiled_layers_train_as_uncompiled_ones_and_compile_once(tmp_path, tiny_model_dir, monkeypatch, model):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(40))
    plain = fit(tmp_path, tiny_model_dir, chats, "plain", **model)
    monkeypatch.setenv(BACKEND_VARIABLE, "lt_posttrain_counting")
    torch._dynamo.reset()
    GRAPHS.clear()
    compiled = fit(tmp_path, tiny_model_dir, chats, "compiled", compile="layers", **model)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-6, atol=1e-6)
    assert len(GRAPHS) == 1  # one graph for both layers and the three steps


def test_without_static_shapes_it_is_one_line(tmp_path, tiny_model_dir, capsys):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(4))
    result = failing_here(capsys, "fit", "--model.name_or_path", tiny_model_dir, "--model.compile", "layers",
                          "--data.sources", f"[{chats}]", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                          "--trainer.default_root_dir", tmp_path)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0] == ("lt-posttrain: error: model.compile needs data.static_shapes: true (else each new set of "
                        "sample lengths compiles the layers again); add --data.static_shapes true")  # fmt: skip


class PlainData:
    static_shapes = False


def test_off_where_it_cannot_apply(monkeypatch):
    cpu = torch.device("cpu")
    check_static_shapes(object())  # a data module without the key is left to its shapes
    with pytest.raises(Exception, match="needs data.static_shapes"):
        check_static_shapes(PlainData())
    assert "DeepSpeed" in why_not_compiled("deepspeed_stage_2", cpu)
    assert "FSDP" in why_not_compiled("fsdp", cpu)
    assert why_not_compiled("ddp", torch.device("mps")) == "not on mps (CPU or CUDA only)"
    monkeypatch.delenv(BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    assert "needs a C++ compiler" in why_not_compiled(None, cpu)
    monkeypatch.setenv(BACKEND_VARIABLE, "aot_eager")  # builds nothing: needs no compiler
    assert why_not_compiled(None, cpu) is None


def test_long_context_s_layer_wrappers_leave_the_layers_uncompiled(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(BACKEND_VARIABLE, "aot_eager")
    module = SFTModule(str(tiny_model_dir), compile="layers", long_context={"tiled_mlp": True})
    with pytest.warns(UserWarning, match="model.compile: the layers run uncompiled: not with model.long_context"):
        module.configure_model()
    assert all(layer._compiled_call_impl is None for layer in module.model.model.layers)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor builds C++ on the CPU")
def test_inductor_compiles_a_layer_on_the_cpu(tiny_model_dir):
    """Inductor's own kernels, on the packed layout with the per-sample attention operator inside the graph."""
    from transformers import AutoModelForCausalLM

    from lt_posttrain.model.attention import register_varlen_attention

    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="varlen")
    layer = model.model.layers[0]
    hidden = torch.randn(1, 12, 64)
    bounds = torch.tensor([0, 5, 12, 12], dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    rope = model.model.rotary_emb(hidden, positions)
    kwargs = {"position_embeddings": rope, "position_ids": positions, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
              "max_length_q": 7, "max_length_k": 7}  # fmt: skip
    expected = layer(hidden, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", dynamic=False)
    torch.testing.assert_close(compiled(hidden, **kwargs), expected, rtol=1e-5, atol=1e-5)
