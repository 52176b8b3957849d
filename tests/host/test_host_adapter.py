"""The host model adapter on real ldm models (the classes the WebUI loads for SD1.x/SD2.x), under the WebUI's
pins: it trains through the engine, writes the standalone engine's keys, and leaves the host model exactly as
it found it after success, cancel and error."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from ldm_tiny import PromptWrapper, build_ldm
from safetensors.torch import load_file
from sgm_standin import build_sdxl
from support.image_fixtures import StopAfter, image_config

from lora_trainer.errors import ConfigError
from lora_trainer.hosts.ldm_adapter import LdmHostAdapter
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.image_trainer import train_image
from lora_trainer.train.runtime import LocalRuntime

CPU = torch.device("cpu")


def snapshot(model: torch.nn.Module) -> dict:
    """Everything training could leave changed on a host model."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "attributes": {
            n: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))}
            for n, m in model.named_modules()
        },
        "instance_forward": sorted(n for n, m in model.named_modules() if "forward" in vars(m)),
    }


def assert_restored(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, changed[:5]
    for key in ("requires_grad", "training", "types", "attributes", "instance_forward"):
        assert after[key] == before[key], key
    assert all(p.grad is None for p in model.parameters())


def fixed_prediction(model: torch.nn.Module) -> torch.Tensor:
    """The UNet's output on fixed inputs: what a txt2img step computes."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sdxl = hasattr(model, "conditioner")
    context = torch.randn(1, 77, 128 if sdxl else 64, generator=g)
    cond = {"crossattn": context, "vector": torch.randn(1, 80, generator=g)} if sdxl else context
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500]), cond)


def host_model(arch: str, work_dir: str, reference_dir: str) -> torch.nn.Module:
    """The tiny checkpoint loaded into the host's classes, text encoders behind WebUI-style prompt wrappers."""
    checkpoint = os.path.join(reference_dir, f"tiny_{arch}.safetensors")
    if arch == "sdxl":
        model = build_sdxl(work_dir, checkpoint)
        for i in range(2):
            model.conditioner.embedders[i] = PromptWrapper(model.conditioner.embedders[i])
        return model
    model = build_ldm(arch, work_dir, checkpoint)
    model.cond_stage_model = PromptWrapper(model.cond_stage_model)
    return model


def run(cfg, adapter, callbacks=None):
    torch.set_num_threads(2)
    return train_image(cfg, callbacks=callbacks, runtime=LocalRuntime(CPU), adapter=adapter, log=lambda *a: None)


def lora_names(path: str) -> set:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in load_file(path)}


def no_partial_files(folder: str) -> bool:
    return not [
        p
        for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
        if p.endswith(".tmp") or os.path.basename(p).startswith(".tmp")
    ]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ldm"))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_trains_on_the_live_model_with_the_standalone_keys(arch, reference_dir, work_dir, tmp_path):
    """SD1/SD2: real ldm models. SDXL: the sgm stand-in (``sgm_standin.py``; no wheel ships sgm)."""
    model = host_model(arch, work_dir, reference_dir)
    before, prediction = snapshot(model), fixed_prediction(model)
    cfg = image_config(
        tmp_path,
        "host",
        train_text_encoder=True,
        gradient_checkpointing=True,
        max_train_steps=2,
        output_name=f"host_{arch}",
    )
    with LdmHostAdapter(model, device=CPU, model_name=f"tiny_{arch}") as adapter:
        assert adapter.arch == arch
        assert adapter.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
        result = run(cfg, adapter)
    assert result.status == "finished", result.message
    host_file = os.path.join(cfg.output_dir, f"host_{arch}.safetensors")
    standalone = os.path.join(reference_dir, f"standalone_{arch}", f"standalone_{arch}.safetensors")
    assert load_file(host_file).keys() == load_file(standalone).keys()
    names = lora_names(host_file)
    prefixes = ["lora_te1_", "lora_te2_"] if arch == "sdxl" else ["lora_te_"]
    for prefix in prefixes:
        assert f"{prefix}text_model_encoder_layers_1_self_attn_q_proj" in names
    # Every LoRA learned something: gradients reached the UNet and the text encoder through the host's paths.
    tensors = load_file(host_file)
    untrained = [
        k
        for k, v in tensors.items()
        if k.endswith("lora_up.weight")
        and not v.abs().sum() > 0
        # SDXL conditions on CLIP-L's penultimate layer: its last layer has LoRA (as in the standalone
        # engine and sd-scripts) but no gradient.
        and not (arch == "sdxl" and k.startswith("lora_te1_text_model_encoder_layers_1_"))
    ]
    assert not untrained, untrained[:5]
    assert_restored(model, before)
    assert torch.equal(fixed_prediction(model), prediction)
    assert no_partial_files(cfg.output_dir)


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_every_network_type_trains_on_the_live_model_and_restores_it(kind, reference_dir, work_dir, tmp_path):
    """SD2: ldm's UNet and open_clip's fused attention (split into q/k/v views, which LoHa, LoKr and DoRA must
    read the weight of). Each type trains through the host's own modules, then the model is bit-exact again."""
    model = host_model("sd2", work_dir, reference_dir)
    before, prediction = snapshot(model), fixed_prediction(model)
    cfg = image_config(
        tmp_path,
        "host",
        network_type=kind,
        train_text_encoder=kind != "locon",
        gradient_checkpointing=True,
        max_train_steps=2,
        learning_rate=1e-2,
        lora_alpha=2.0,
        output_name=f"host_{kind}",
    )
    with LdmHostAdapter(model, device=CPU, model_name="tiny_sd2") as adapter:
        result = run(cfg, adapter)
    assert result.status == "finished", result.message
    tensors = load_file(os.path.join(cfg.output_dir, f"host_{kind}.safetensors"))
    if kind == "locon":
        reference = os.path.join(reference_dir, "standalone_sd2_locon", "standalone_sd2_locon.safetensors")
        assert tensors.keys() == load_file(reference).keys()
    # What starts at zero (LoRA up, LoHa w2_a, LoKr w2_b) moved: gradients reached every layer family.
    zero_initialised = ("lora_up.weight", "hada_w2_a", "lokr_w2_b", "lokr_w2")
    started_at_zero = {k: v for k, v in tensors.items() if k.endswith(zero_initialised)}
    assert started_at_zero and [k for k, v in started_at_zero.items() if not v.abs().sum() > 0] == []
    assert_restored(model, before)
    assert torch.equal(fixed_prediction(model), prediction)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_locon_on_the_live_model_writes_the_standalone_keys(arch, reference_dir, work_dir, tmp_path):
    model = host_model(arch, work_dir, reference_dir)
    before = snapshot(model)
    cfg = image_config(tmp_path, "host", network_type="locon", max_train_steps=1, output_name=f"host_{arch}_locon")
    with LdmHostAdapter(model, device=CPU) as adapter:
        result = run(cfg, adapter)
    assert result.status == "finished", result.message
    reference = os.path.join(reference_dir, f"standalone_{arch}_locon", f"standalone_{arch}_locon.safetensors")
    keys = load_file(os.path.join(cfg.output_dir, f"host_{arch}_locon.safetensors")).keys()
    assert keys == load_file(reference).keys()
    assert any("_in_layers_2." in k or "_resnets_0_conv1." in k for k in keys)
    assert_restored(model, before)


def test_sd2_text_targets_skip_the_unused_last_layer(work_dir):
    model = build_ldm("sd2", work_dir)
    adapter = LdmHostAdapter(model, device=CPU)
    names = [name for name, _ in adapter.lora_targets(train_text_encoder=True)]
    adapter.restore()
    text = sorted({n.split("_layers_")[1].split("_")[0] for n in names if n.startswith("lora_te_")})
    assert text == ["0", "1"]  # three open_clip blocks; the penultimate-layer encoder runs two
    for part in (
        "self_attn_q_proj",
        "self_attn_k_proj",
        "self_attn_v_proj",
        "self_attn_out_proj",
        "mlp_fc1",
        "mlp_fc2",
    ):
        assert f"lora_te_text_model_encoder_layers_1_{part}" in names


class FailAt(TrainingCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, info):
        if info.step >= self.step:
            raise RuntimeError("boom")


def test_cancel_keeps_the_last_save_and_restores(work_dir, tmp_path):
    model = build_ldm("sd1", work_dir)
    before = snapshot(model)
    cfg = image_config(tmp_path, "host", max_train_steps=6, gradient_checkpointing=True, output_name="cancelled")
    with LdmHostAdapter(model, device=CPU) as adapter:
        result = run(cfg, adapter, [StopAfter(2)])
    assert result.status == "cancelled"
    assert [os.path.basename(p) for p in result.output_files] == ["cancelled-step00000002.safetensors"]
    assert not os.path.exists(os.path.join(cfg.output_dir, "cancelled.safetensors"))
    assert no_partial_files(cfg.output_dir)
    assert_restored(model, before)


def test_an_error_mid_run_restores_and_leaves_no_partial_file(work_dir, tmp_path):
    model = build_ldm("sd2", work_dir)
    before = snapshot(model)
    cfg = image_config(
        tmp_path, "host", max_train_steps=6, train_text_encoder=True, gradient_checkpointing=True, output_name="failed"
    )
    with pytest.raises(RuntimeError, match="boom"):
        with LdmHostAdapter(model, device=CPU) as adapter:
            run(cfg, adapter, [FailAt(2)])
    assert not glob.glob(os.path.join(cfg.output_dir, "failed*.safetensors"))
    assert no_partial_files(cfg.output_dir)
    assert_restored(model, before)


def test_encode_pixels_is_the_scaled_posterior_mean(work_dir):
    model = build_ldm("sd1", work_dir)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = LdmHostAdapter(model, device=CPU).encode_pixels(pixels)
    with torch.no_grad():
        expected = model.first_stage_model.encode(pixels).mode() * 0.18215
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents, expected)


def test_text_conditioning_keeps_the_graph_for_text_encoder_training(work_dir):
    model = build_ldm("sd1", work_dir)
    adapter = LdmHostAdapter(model, device=CPU)
    targets = dict(adapter.lora_targets(train_text_encoder=True))
    q = targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    extra = torch.nn.Parameter(torch.zeros(q.out_features))
    q.forward = lambda x, base=q.forward: base(x) + extra  # a stand-in LoRA on one host Linear
    cond = adapter.encode_text(["a photo"], clip_skip=1)
    cond["crossattn"].sum().backward()
    del q.forward
    adapter.restore()
    assert cond["crossattn"].shape == (1, 77, 64)
    assert extra.grad is not None and extra.grad.abs().sum() > 0


def test_clip_skip_goes_through_the_hosts_setting(work_dir):
    model = build_ldm("sd1", work_dir)
    with pytest.raises(ConfigError, match="Clip skip"):
        LdmHostAdapter(model, device=CPU).encode_text(["a photo"], clip_skip=2)
    seen = []

    class Scope:
        def __init__(self, n):
            seen.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    LdmHostAdapter(model, device=CPU, clip_skip_scope=Scope).encode_text(["a photo"], clip_skip=2)
    assert seen == [2]


def test_refuses_what_cannot_train(work_dir):
    model = build_ldm("sd1", work_dir)
    with pytest.raises(ConfigError, match="--lowvram"):
        LdmHostAdapter(model, device=CPU, lowvram=True)
    with pytest.raises(ConfigError, match="fp8"):
        LdmHostAdapter(model, device=CPU, fp8=True)
    before = snapshot(model)
    adapter = LdmHostAdapter(model, device=CPU, medvram=True)
    with pytest.raises(ConfigError, match="--medvram"):
        adapter.lora_targets(train_text_encoder=True)
    assert adapter.lora_targets(train_text_encoder=False)  # UNet-only training works under --medvram
    adapter.restore()
    assert_restored(model, before)


def test_latents_are_encoded_during_training_only_where_the_hosts_vae_allows_it(work_dir):
    """The host's VAE is resident anyway, so latents may be encoded as training reaches them; not under
    --medvram (the host would move the UNet out to run the VAE) nor with an fp16 VAE (its overflow must stop the
    run before step 1)."""
    model = build_ldm("sd1", work_dir)
    assert LdmHostAdapter(model, device=CPU).encodes_during_training
    assert not LdmHostAdapter(model, device=CPU, medvram=True).encodes_during_training
    model.first_stage_model.half()
    try:
        assert not LdmHostAdapter(model, device=CPU).encodes_during_training
    finally:
        model.first_stage_model.float()


def test_identity_and_name_come_from_the_hosts_checkpoint_info(work_dir):
    model = build_ldm("sd1", work_dir)

    class Info:
        name_for_extra = "my_model"
        sha256 = "abc123"

    model.sd_checkpoint_info = Info()
    adapter = LdmHostAdapter(model, device=CPU)
    assert (adapter.model_name, adapter.identity) == ("my_model", "abc123")
    del model.sd_checkpoint_info
    assert len(LdmHostAdapter(model, device=CPU).identity) == 16


def lora_gradients(adapter, network, checkpointing: bool) -> dict:
    """LoRA gradients of one fixed denoising step, text encoder included."""
    if checkpointing:
        adapter.enable_gradient_checkpointing(text_encoders=True)
    network.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(11)
    cond = adapter.encode_text(["a red square", "a blue circle"], clip_skip=1)
    prediction = adapter.predict(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), cond)
    prediction.square().mean().backward()
    return {n: p.grad.clone() for n, p in network.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(work_dir):
    """Our non-reentrant block checkpointing (UNet and open_clip blocks) changes memory, not gradients."""
    from lora_trainer.lora.network import LoRANetwork

    model = build_ldm("sd2", work_dir)
    before = snapshot(model)
    with LdmHostAdapter(model, device=CPU) as adapter:
        torch.manual_seed(0)
        network = LoRANetwork(adapter.lora_targets(train_text_encoder=True), 4, 4.0)
        with torch.no_grad():
            for layer in network.layers.values():
                layer.lora_up.weight.normal_(0, 0.1)  # non-zero, so the down-projections get gradients too
        with network.attached():
            plain = lora_gradients(adapter, network, checkpointing=False)
            checkpointed = lora_gradients(adapter, network, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert_restored(model, before)


def test_split_open_clip_attention_equals_the_fused_one(work_dir):
    from lora_trainer.hosts.fused_attention import projection_views, split_projection_forward

    attention = build_ldm("sd2", work_dir).cond_stage_model.model.transformer.resblocks[0].attn
    x = torch.randn(77, 2, 64)
    mask = torch.full((77, 77), float("-inf")).triu(1)
    with torch.no_grad():
        fused = attention(x, x, x, need_weights=False, attn_mask=mask)[0]
        split = split_projection_forward(attention, projection_views(attention))(
            x, x, x, need_weights=False, attn_mask=mask
        )[0]
    torch.testing.assert_close(split, fused, rtol=1e-5, atol=1e-6)


def test_a_failure_while_building_the_network_restores(work_dir, tmp_path):
    from safetensors.torch import save_file

    from lora_trainer.errors import ModelLoadError

    model = build_ldm("sd1", work_dir)
    before = snapshot(model)
    wrong = str(tmp_path / "other.safetensors")
    save_file(
        {
            "lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4),
        },
        wrong,
    )
    cfg = image_config(tmp_path, "host", network_weights=wrong, output_name="wrong")
    with pytest.raises(ModelLoadError):
        run(cfg, LdmHostAdapter(model, device=CPU))
    assert_restored(model, before)


def test_sdxl_vector_is_rebuilt_per_sample_as_the_host_builds_it(reference_dir, work_dir):
    """The adapter splits the host's vector into the pooled text part and re-embeds each sample's own sizes;
    with the sizes the host used, it gets the host's vector back."""
    from lora_trainer.models.adapter import SizeCondition

    model = host_model("sdxl", work_dir, reference_dir)
    adapter = LdmHostAdapter(model, device=CPU)
    captions = ["a red square", "a blue circle"]
    with torch.no_grad():
        host = model.get_learned_conditioning(captions)
        cond = adapter.encode_text(captions, clip_skip=1)
        same = adapter._sdxl_vector(cond["pooled"], [SizeCondition((1024, 1024), (0, 0), (1024, 1024))] * 2)
        other = adapter._sdxl_vector(cond["pooled"], [SizeCondition((640, 512), (8, 0), (512, 512))] * 2)
    assert cond["crossattn"].shape == (2, 77, 128) and cond["pooled"].shape == (2, 32)
    torch.testing.assert_close(same, host["vector"])
    assert not torch.allclose(other, host["vector"])
    torch.testing.assert_close(other[:, :32], host["vector"][:, :32])


LONG = "a " * 160 + "zebra"  # 161 tokens: three chunks of the host's 75


def host_chunk_ids(embedder, text: str, chunks: int) -> torch.Tensor:
    """The host's token chunks for ``text`` (start, 75 tokens, end, padding), spelled out from its rules."""
    if hasattr(embedder, "tokenizer"):  # transformers CLIP: padded with the end token
        ids = embedder.tokenizer(text, add_special_tokens=False).input_ids
        start, end, pad = embedder.tokenizer.bos_token_id, embedder.tokenizer.eos_token_id, None
    else:  # open_clip: padded with 0 after the end token
        from open_clip.tokenizer import _tokenizer

        ids, start, end, pad = _tokenizer.encode(text), 49406, 49407, 0
    rows = []
    for c in range(chunks):
        body = ids[c * 75 : (c + 1) * 75]
        rows.append([start, *body, end] + [end if pad is None else pad] * (75 - len(body)))
    return torch.tensor(rows)


def encode_chunks(embedder, ids: torch.Tensor) -> torch.Tensor:
    """Each chunk through the host's original embedder, concatenated: (1, 77 * chunks, C)."""
    if hasattr(embedder, "tokenizer"):
        states = embedder.transformer(input_ids=ids).last_hidden_state
    else:
        states = embedder.encode_with_transformer(ids)
    return states.reshape(1, -1, states.shape[-1])


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_long_captions_are_the_hosts_own_chunks_cut_or_padded_to_max_token_length(arch, reference_dir, work_dir):
    model = host_model(arch, work_dir, reference_dir)
    embedder = model.cond_stage_model.wrapped
    adapter = LdmHostAdapter(model, device=CPU)
    assert adapter.caption_token_counts([LONG, "a photo"]) == [161, 2]
    with torch.no_grad():
        adapter.set_max_token_length(225)
        three = adapter.encode_text([LONG, "a photo"], clip_skip=1)["crossattn"]
        adapter.set_max_token_length(150)
        two = adapter.encode_text([LONG], clip_skip=1)["crossattn"]
        expected_long = encode_chunks(embedder, host_chunk_ids(embedder, LONG, 3))
        short = encode_chunks(embedder, host_chunk_ids(embedder, "a photo", 1))
        empty = encode_chunks(embedder, host_chunk_ids(embedder, "", 1))
    assert three.shape == (2, 231, 64) and two.shape == (1, 154, 64)
    torch.testing.assert_close(three[0], expected_long[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(three[1], torch.cat([short, empty, empty], dim=1)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two[0], expected_long[0, :154], rtol=1e-5, atol=1e-5)


def test_sdxl_long_captions_keep_the_first_chunks_pooled_output(reference_dir, work_dir):
    model = host_model("sdxl", work_dir, reference_dir)
    adapter = LdmHostAdapter(model, device=CPU)
    adapter.set_max_token_length(225)
    with torch.no_grad():
        cond = adapter.encode_text([LONG], clip_skip=1)
        g = model.conditioner.embedders[1].wrapped
        _, first_pooled = g.encode_with_transformer(host_chunk_ids(g, LONG, 1))
    assert cond["crossattn"].shape == (1, 231, 128)
    torch.testing.assert_close(cond["pooled"], first_pooled, rtol=1e-5, atol=1e-5)


def test_trains_with_long_captions_on_the_live_model(reference_dir, work_dir, tmp_path):
    from support.tiny_models import make_image_folder

    make_image_folder(str(tmp_path / "data"), count=2, captions=["a photo", LONG])
    model = host_model("sd1", work_dir, reference_dir)
    before = snapshot(model)
    lines = []
    cfg = image_config(tmp_path, "host", max_train_steps=1, max_token_length=150, output_name="long")
    with LdmHostAdapter(model, device=CPU) as adapter:
        result = train_image(cfg, runtime=LocalRuntime(CPU), adapter=adapter, log=lines.append)
    assert result.status == "finished", result.message
    assert "001.png by 11 tokens" in "\n".join(lines)
    assert load_file(result.output_files[-1])  # written, and the host model handed back as it was
    assert_restored(model, before)
