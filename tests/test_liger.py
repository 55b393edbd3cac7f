"""Liger kernels: which ones an architecture gets (and one line for those it cannot), and, on a GPU, the same SFT
loss and gradients with them as without, per-token weights and LoRA included."""

import importlib.util

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from conftest import gsm8k_chats
from lt_posttrain import SFTModule
from lt_posttrain.cli import main
from lt_posttrain.data.collate import collate_packed
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import LigerKernels, choose_liger_kernels

has_liger = importlib.util.find_spec("liger_kernel") is not None
needs_liger = pytest.mark.skipif(not has_liger, reason="needs liger-kernel: pip install 'lt-posttrain[liger]'")
needs_cuda_liger = pytest.mark.skipif(
    not (has_liger and torch.cuda.is_available()), reason="needs a CUDA GPU and liger-kernel"
)


@needs_liger
def test_liger_true_picks_every_default_kernel_and_the_fused_loss():
    assert choose_liger_kernels(LlamaConfig(), True) == ["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]
    assert choose_liger_kernels(AutoConfig.for_model("gemma"), True) == ["rope", "rms_norm", "geglu",
                                                                         "fused_linear_cross_entropy"]  # fmt: skip
    granite = AutoConfig.for_model("granite", logits_scaling=8.0)  # scaled logits: no fused loss
    assert "fused_linear_cross_entropy" not in choose_liger_kernels(granite, True)
    assert choose_liger_kernels(LlamaConfig(), LigerKernels(rms_norm=True, fused_linear_cross_entropy=True)) == [
        "rms_norm", "fused_linear_cross_entropy"]  # fmt: skip


@needs_liger
def test_liger_refuses_what_it_cannot_do_in_one_line():
    with pytest.raises(UserError, match="Liger has no kernels for architecture 'gpt2'"):
        choose_liger_kernels(AutoConfig.for_model("gpt2"), True)
    with pytest.raises(UserError, match=r"model.liger.swiglu: Liger has no such kernel for 'gemma' \(it has: .*geglu"):
        choose_liger_kernels(AutoConfig.for_model("gemma"), LigerKernels(swiglu=True))
    with pytest.raises(UserError, match="model.liger.fused_linear_cross_entropy: granite scales its logits"):
        choose_liger_kernels(AutoConfig.for_model("granite", logits_scaling=8.0),
                             LigerKernels(fused_linear_cross_entropy=True))  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_liger_without_a_gpu_is_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model.name_or_path", str(tiny_model_dir), "--data.sources", f"[{tmp_path / 'unused.jsonl'}]",
              "--trainer.logger", "false", "--model.liger", "{rms_norm: true, rope: true}"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "lt-posttrain: error: model.liger: Liger kernels are Triton GPU kernels and need a CUDA GPU; none is visible"
    )


# -- on a GPU ------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_llama_module():
    """Liger patches ``transformers.models.llama.modeling_llama`` module-wide: put it back for the other tests."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


@pytest.fixture(scope="module")
def gpu_llama_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama with dimensions Liger's kernels tile like a real model's (random weights)."""
    folder = tmp_path_factory.mktemp("gpu-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def loss_and_grads(model_dir, batch, **options) -> tuple[float, dict, list]:
    torch.manual_seed(0)
    module = SFTModule(str(model_dir), dtype="bfloat16", **options)
    with torch.device("cuda"):
        module.configure_model()
    module.cuda()
    loss = module.loss(batch)
    loss.backward()
    grads = {name: p.grad.float() for name, p in module.model.named_parameters() if p.requires_grad}
    return loss.item(), grads, module.liger_kernels


def gpu_batch(tokenizer, weighted: bool) -> dict:
    samples = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(6)]
    if weighted:
        for index, sample in enumerate(samples):
            sample["weight"] = (0.5, 2.0, 1.0)[index % 3]
    return {key: value.cuda() if torch.is_tensor(value) else value for key, value in collate_packed(samples).items()}


@needs_cuda_liger
@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("lora", [None, {"r": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_liger_loss_and_gradients_equal_the_plain_ones(gpu_llama_dir, tokenizer, restore_llama_module, weighted, lora):
    batch = gpu_batch(tokenizer, weighted)
    plain, plain_grads, _ = loss_and_grads(gpu_llama_dir, batch, lora=lora)  # before Liger patches the module
    fused, fused_grads, kernels = loss_and_grads(gpu_llama_dir, batch, lora=lora, liger=True)
    assert kernels == ["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]
    assert fused == pytest.approx(plain, rel=1e-2)  # bf16 weights and activations
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        if not grad.any():  # lora_A before lora_B has moved off zero
            assert not fused_grads[name].any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), fused_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())
