"""Log-probabilities tile by tile from the hidden states and the head: the values and gradients of the full logits,
for any tile size, with the head run only where a target is; code run as a module's forward; a frozen model run
part by part, then released."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lt_posttrain.training.tiled import run_as_forward
from lt_posttrain.training.tiled import tiled_token_logps as token_logps


def full_logps(hidden, head, targets, softcap=None):
    logits = head(hidden).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return logps.view(targets.shape)


# tiles of 3 tokens, one tile for all, tiles of 7 with softcapped logits
@pytest.mark.parametrize(("tile_bytes", "softcap"), [(4 * 50 * 3, None), (4 * 50 * 1000, None), (4 * 50 * 7, 3.0)])
def test_tiled_logps_and_gradients_equal_the_full_logits(tile_bytes, softcap):
    torch.manual_seed(0)
    vocab, width = 50, 16
    head = torch.nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(3, 11, width, requires_grad=True)
    targets = torch.randint(vocab, (3, 11))
    targets[0, :4] = targets[2, 7:] = -100  # a prompt, padding
    upstream = torch.randn(3, 11)  # any loss of the log-probabilities

    tiled = token_logps(hidden, head, targets, softcap, tile_bytes=tile_bytes)
    (tiled * upstream).sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    full = full_logps(hidden, head, targets, softcap)
    (full * upstream).sum().backward()

    assert tiled.detach() == pytest.approx(full.detach(), abs=1e-6)
    assert (tiled[targets == -100] == 0).all()
    assert grads[0] == pytest.approx(hidden.grad, abs=1e-6)
    assert grads[1] == pytest.approx(head.weight.grad, abs=1e-6)


def test_the_head_sees_only_positions_with_a_target_a_tile_at_a_time(monkeypatch):
    """A linear head runs once as a module (a strategy gathers its weight once), its weight applied a tile at a time;
    any other head is called a tile at a time."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40, bias=False)
    calls, rows = [], []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, *args: rows.append(x.shape[0]) or linear(x, *args))
    targets = torch.full((2, 30), -100)
    targets[1, 10:27] = 5  # 17 positions with a target
    with torch.no_grad():
        token_logps(torch.randn(2, 30, 8), head, targets, tile_bytes=4 * 40 * 5)
    assert calls == [17] and rows == [5, 5, 5, 2]

    class Scaled(torch.nn.Module):  # not a plain linear layer (as a LoRA adapter on the head)
        out_features = 40

        def forward(self, x):
            return head.weight.new_ones(()) * linear(x, head.weight)

    calls.clear()
    scaled = Scaled()
    scaled.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        token_logps(torch.randn(2, 30, 8), scaled, targets, tile_bytes=4 * 40 * 5)
    assert calls == [5, 5, 5, 2]


def test_run_as_forward_runs_inside_the_modules_hooks():
    """What a sharding strategy hooks around a module's forward (here: a pre-hook and a post-hook) runs around the
    function, which gets the module; the module's own forward is back afterwards."""
    head = torch.nn.Linear(4, 6)
    events = []
    head.register_forward_pre_hook(lambda module, args: events.append("gather"))
    head.register_forward_hook(lambda module, args, out: events.append("release"))
    hidden = torch.randn(3, 4)
    out = run_as_forward(head, lambda inner, x: events.append("run") or inner.weight.sum() * x, hidden)
    assert events == ["gather", "run", "release"]
    assert torch.equal(out, head.weight.sum() * hidden)
    assert torch.equal(head(hidden), hidden @ head.weight.T + head.bias) and "forward" not in head.__dict__


def test_a_frozen_model_runs_its_parts_and_is_released(tmp_path):
    """``FrozenModel.run`` gives the Hugging Face model to call part by part: its decoder then its head give the
    model's own logits; ``release_frozen_model`` drops it from the module."""
    from transformers import AutoTokenizer

    from lt_posttrain import SFTModule, output_head
    from lt_posttrain.testing import save_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[2] / "shared/assets/smollm2-tokenizer")
    module = SFTModule(str(save_tiny_llama(tmp_path, tokenizer)))
    module.configure_model()
    frozen = module.frozen_model()
    input_ids = torch.randint(100, (2, 7))

    def parts(model, input_ids):
        head, _ = output_head(model)
        return head(model.get_decoder()(input_ids=input_ids).last_hidden_state)

    with torch.no_grad():
        assert torch.allclose(frozen.run(parts, input_ids), frozen(input_ids=input_ids).logits, atol=1e-6)
    module.release_frozen_model(frozen)
    assert frozen.module is None
    module.to(torch.bfloat16)  # no longer moves with the module
