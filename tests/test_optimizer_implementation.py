"""AdamW and SGD run torch's fastest implementation (fused, else foreach) and compute the same updates."""

import torch

from lora_trainer.train import optim
from lora_trainer.train.optim import build_optimizer, load_optimizer_state
from lora_trainer.train.runtime import clip_grad_norm


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(8, 16), (16, 8), (4, 4, 1, 1)]]


def _run(optimizer_factory, steps=3):
    params = _params()
    optimizer = optimizer_factory([{"params": params[:2], "lr": 1e-2}, {"params": params[2:]}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, params


def test_adamw_on_the_cpu_is_fused_and_matches_the_per_tensor_loop():
    fast, fast_params = _run(lambda groups: build_optimizer("AdamW", groups, 1e-3, 0.01))
    assert all(group["fused"] for group in fast.param_groups)
    _, loop_params = _run(lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01, foreach=False))
    for a, b in zip(fast_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fast.param_groups[0]["lr"] == 1e-2 and fast.param_groups[1]["lr"] == 1e-3  # group settings kept


def test_sgd_matches_the_per_tensor_loop():
    fast, fast_params = _run(lambda groups: build_optimizer("SGD", groups, 1e-3, 0.01))
    assert any(group.get("fused") or group.get("foreach") for group in fast.param_groups)
    _, loop_params = _run(
        lambda groups: torch.optim.SGD(groups, lr=1e-3, weight_decay=0.01, momentum=0.9, foreach=False)
    )
    for a, b in zip(fast_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_falls_back_to_foreach_where_torch_has_no_fused_kernel(monkeypatch):
    class NoFusedAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, **kwargs)

    monkeypatch.setattr(optim.torch.optim, "AdamW", NoFusedAdamW)
    groups = [{"params": _params()}]
    optimizer = build_optimizer("AdamW", groups, 1e-3, 0.0)
    assert optimizer.param_groups[0]["foreach"] is True and not optimizer.param_groups[0]["fused"]
    assert "fused" not in groups[0]  # the caller's group dicts are left as they were


def test_resume_keeps_this_runs_implementation_and_the_saved_moments():
    old, _ = _run(lambda groups: torch.optim.AdamW(groups, lr=1e-3, foreach=False))  # a state from the loop version
    saved = old.state_dict()
    resumed = build_optimizer("AdamW", [{"params": _params()[:2], "lr": 1e-2}, {"params": _params()[2:]}], 1e-3, 0.01)
    load_optimizer_state(resumed, saved)
    assert all(group["fused"] for group in resumed.param_groups)
    assert all(not group["foreach"] for group in old.param_groups)
    for key, value in saved["state"].items():
        torch.testing.assert_close(resumed.state_dict()["state"][key]["exp_avg"], value["exp_avg"])
