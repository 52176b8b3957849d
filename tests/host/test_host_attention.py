"""Host attention during training: ldm's einsum CrossAttention (and the WebUI's other non-fused replacements)
run through torch's SDPA for the run, with the same outputs and gradients, and the host's own choice is back
afterwards; hosts that already run a fused kernel are left alone."""

from __future__ import annotations

import pytest
import torch
from ldm.modules.attention import CrossAttention
from ldm_tiny import build_ldm
from test_host_adapter import CPU, assert_restored, fixed_prediction, snapshot

from lora_trainer.hosts.host_attention import runs_fused_attention, sdpa_forward, slow_attention_layers
from lora_trainer.hosts.ldm_adapter import LdmHostAdapter


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ldm_attention"))


def attention_layers(model):
    return [m for m in model.model.diffusion_model.modules() if isinstance(m, CrossAttention)]


@pytest.mark.parametrize("cross", [False, True])
def test_sdpa_forward_equals_ldm_attention_with_gradients(cross):
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=64, context_dim=32 if cross else None, heads=4, dim_head=16)
    x = torch.randn(2, 10, 64, requires_grad=True)
    context = torch.randn(2, 7, 32, requires_grad=True) if cross else None
    results = []
    for forward in (layer.forward, sdpa_forward(layer, layer.forward)):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = forward(x, context)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), layer.to_q.weight.grad.clone(), layer.to_v.weight.grad.clone()))
    for host, ours in zip(*results):
        torch.testing.assert_close(ours, host, rtol=1e-5, atol=1e-6)


def test_training_runs_ldm_attention_through_sdpa_and_restores_the_hosts(work_dir):
    model = build_ldm("sd1", work_dir)
    before, prediction = snapshot(model), fixed_prediction(model)
    layers = attention_layers(model)
    assert layers and not any(runs_fused_attention(m) for m in layers)  # ldm's own: einsum
    with LdmHostAdapter(model, device=CPU) as adapter:
        adapter.lora_targets(train_text_encoder=False)
        assert all("forward" in vars(m) and runs_fused_attention(m) for m in layers)
        torch.testing.assert_close(fixed_prediction(model), prediction, rtol=1e-4, atol=1e-5)
    assert_restored(model, before)
    assert all(type(m).forward is CrossAttention.forward for m in layers)
    assert torch.equal(fixed_prediction(model), prediction)


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    """Named as the WebUI's "sdp" optimisation names its replacement."""
    return torch.nn.functional.scaled_dot_product_attention(x, x, x)


def split_cross_attention_forward(self, x, context=None, mask=None, **kwargs):
    """Named as the WebUI's "Doggettx" optimisation names its (einsum, split) replacement."""
    return x


def test_the_hosts_fused_choice_is_kept_and_a_slow_one_replaced(work_dir, monkeypatch):
    model = build_ldm("sd1", work_dir)
    monkeypatch.setattr(CrossAttention, "forward", scaled_dot_product_attention_forward)
    assert list(slow_attention_layers(model.model.diffusion_model)) == []
    monkeypatch.setattr(CrossAttention, "forward", split_cross_attention_forward)
    slow = [m for _, m in slow_attention_layers(model.model.diffusion_model)]
    assert slow == attention_layers(model)
    adapter = LdmHostAdapter(model, device=CPU)
    adapter.lora_targets(train_text_encoder=False)
    assert all("forward" in vars(m) for m in slow)
    adapter.restore()
    assert not any("forward" in vars(m) for m in slow)
    assert all(m.forward.__func__ is split_cross_attention_forward for m in slow)


def test_fast_attention_off_leaves_the_hosts_forward_in_place(work_dir):
    model = build_ldm("sd1", work_dir)
    adapter = LdmHostAdapter(model, device=CPU, fast_attention=False)
    adapter.lora_targets(train_text_encoder=False)
    assert not any("forward" in vars(m) for m in attention_layers(model))
    adapter.restore()


def test_a_mask_goes_to_the_hosts_forward():
    layer = CrossAttention(query_dim=32, heads=2, dim_head=16)
    seen = []
    forward = sdpa_forward(layer, lambda x, context, mask, **extra: seen.append(mask) or x)
    mask = torch.ones(1, 5, dtype=torch.bool)
    x = torch.randn(1, 5, 32)
    assert forward(x, None, mask) is x and seen == [mask]
