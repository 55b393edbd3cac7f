"""Per-sample attention for packed rows: the ``varlen`` implementation gives each sample the logits it gets alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import gsm8k_chats
from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.model.attention import register_varlen_attention


def samples_of(tokenizer, count=3):
    return [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(count)]


def logits_alone(model, samples, device="cpu"):
    return [model(input_ids=torch.tensor([s["input_ids"]], device=device), use_cache=False).logits[0] for s in samples]


def packed_logits(model, samples, device="cpu"):
    batch = collate_packed(samples)
    keys = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
    inputs = {k: batch[k].to(device) for k in keys} | {k: batch[k] for k in ("max_length_q", "max_length_k")}
    logits = model(input_ids=batch["input_ids"].to(device), use_cache=False, **inputs).logits[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    return [logits[start:end] for start, end in zip(bounds, bounds[1:])]


def test_varlen_packed_and_padded_match_each_sample_alone_on_cpu(tiny_model_dir, tokenizer):
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="varlen")
    samples = samples_of(tokenizer)
    with torch.no_grad():
        alone = logits_alone(model, samples)
        packed = packed_logits(model, samples)
        padded = model(**{k: v for k, v in collate_padded(samples, 0).items() if k in ("input_ids",)}, use_cache=False).logits
    for index, expected in enumerate(alone):
        torch.testing.assert_close(packed[index], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[index, : len(expected)], expected, atol=1e-5, rtol=1e-5)


def test_varlen_without_boundaries_would_mix_samples(tiny_model_dir, tokenizer):
    """Control: the same packed row without ``cu_seq_lens`` lets samples attend to each other."""
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="varlen")
    samples = samples_of(tokenizer, 2)
    batch = collate_packed(samples)
    with torch.no_grad():
        mixed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = logits_alone(model, samples)
    second = mixed[len(samples[0]["input_ids"]) :]
    assert not torch.allclose(second, alone[1], atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_kernel_on_gpu_matches_sdpa_per_sample(tiny_model_dir, tokenizer):
    register_varlen_attention()
    samples = samples_of(tokenizer)
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="varlen").cuda()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    with torch.no_grad():
        packed = packed_logits(varlen, samples, "cuda")
        alone = logits_alone(sdpa, samples, "cuda")
    for got, expected in zip(packed, alone):
        torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_kernel_gradients_on_gpu_match_sdpa_per_sample(tiny_model_dir, tokenizer):
    """The tiny model has 4 query heads over 2 key/value heads: the kernel's own grouped-query backward (k and v not
    expanded) must give the key and value projections the gradients per-sample SDPA gives them."""
    register_varlen_attention()
    samples = samples_of(tokenizer)
    gradients = {}
    for implementation in ("varlen", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation=implementation)
        model = model.cuda()
        logits = packed_logits(model, samples, "cuda") if implementation == "varlen" else logits_alone(model, samples, "cuda")
        loss = sum(torch.nn.functional.cross_entropy(out[:-1].float(), torch.tensor(s["input_ids"][1:], device="cuda"))
                   for out, s in zip(logits, samples))  # fmt: skip
        loss.backward()
        gradients[implementation] = {name: p.grad.float() for name, p in model.named_parameters() if "_proj" in name}
    for name, expected in gradients["sdpa"].items():
        error = (gradients["varlen"][name] - expected).norm() / expected.norm()
        assert error < 2e-2, f"{name}: relative gradient error {error:.3g}"


@pytest.mark.parametrize("implementation", ["varlen", "sdpa"])
def test_changing_one_packed_sample_leaves_the_others_alone(tiny_model_dir, tokenizer, implementation):
    """Through SFTModule.forward, as training runs it: ``varlen`` and the ``sdpa`` switch (a block mask from the
    restarting position ids) keep packed samples apart."""
    from lt_posttrain import SFTModule

    module = SFTModule(str(tiny_model_dir), attn_implementation=implementation)
    module.configure_model()
    samples = samples_of(tokenizer, 3)
    changed = [samples[0], {**samples[1], "input_ids": samples[1]["input_ids"][:5] + [42] * 20}, samples[2]]
    with torch.no_grad():
        before, after = (module(collate_packed(rows))[0] for rows in (samples, changed))
    first, second = len(samples[0]["input_ids"]), len(samples[0]["input_ids"]) + 25
    torch.testing.assert_close(after[:first], before[:first], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[second:], before[second + len(samples[1]["input_ids"]) - 25 :], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[first + 5 : second], before[first + 5 : second], atol=1e-3)
