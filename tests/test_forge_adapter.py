"""``ForgeHostAdapter`` on the Forge stand-in (``forge_standin.py``, written from Forge Neo's code): it matches the
standalone engine's own adapter number for number and name for name, trains, and leaves Forge's model as it was.

Each trap of the real host has a test that shows the stand-in reproduces it (the run fails without the
adapter's handling) and that the handling removes it: inference-tensor weights, in-place residuals, sigma-based
``apply_model``, Forge's own Linear, inference-mode conditioning, LoRAs merged by a generation, SageAttention.
"""

from __future__ import annotations

import os

import forge_standin as standin
import pytest
import torch
from safetensors.torch import load_file
from support.image_fixtures import StopAfter, image_config, tiny_checkpoint
from support.tiny_models import make_image_folder

from lora_trainer.hosts import forge_adapter
from lora_trainer.hosts.forge_adapter import ForgeHostAdapter
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.models.adapter import SizeCondition
from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.image_trainer import train_image
from lora_trainer.train.runtime import LocalRuntime

CPU = torch.device("cpu")
CAPTIONS = ["a red square", "a blue circle, style"]
SIZES = [SizeCondition((64, 64), (0, 0), (64, 64)), SizeCondition((80, 64), (8, 0), (64, 64))]
PYTORCH_ATTENTION = [(standin, "attention_function", standin.attention_pytorch)]


@pytest.fixture(autouse=True)
def sage_attention_as_loaded(monkeypatch):
    """Each test starts with the attention Forge picked, whatever a failed test left behind."""
    monkeypatch.setattr(standin, "attention_function", standin.attention_sage)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forge_checkpoints")
    return {arch: tiny_checkpoint(folder, arch) for arch in ("sd1", "sdxl")}


def small_config(folder, checkpoint: str, **overrides):
    """Two 64 px images, batch 2: the least a run needs."""
    make_image_folder(os.path.join(str(folder), "data"), count=2)
    return image_config(folder, checkpoint, **overrides)


def adapter_for(engine, memory=None, attention=PYTORCH_ATTENTION) -> ForgeHostAdapter:
    memory = memory or standin.MemoryManagement()
    return ForgeHostAdapter(engine, load_models=memory.load_models_gpu, attention_overrides=attention)


def snapshot(engine) -> dict:
    """Everything training could leave changed on Forge's model (weights compared by value)."""
    original = engine.forge_objects_original
    roots = {"unet": original.unet.model.diffusion_model, "clip": original.clip.cond_stage_model}
    return {
        name: {
            "state": {k: v.detach().clone() for k, v in root.state_dict().items()},
            "requires_grad": {k: p.requires_grad for k, p in root.named_parameters(remove_duplicate=False)},
            "training": {k: m.training for k, m in root.named_modules()},
            "forward": sorted(k for k, m in root.named_modules() if "forward" in vars(m)),
        }
        for name, root in roots.items()
    }


def assert_restored(engine, before: dict) -> None:
    after = snapshot(engine)
    for name in before:
        changed = [k for k, v in before[name]["state"].items() if not torch.equal(v, after[name]["state"][k])]
        assert not changed, (name, changed[:5])
        for key in ("requires_grad", "training", "forward"):
            assert after[name][key] == before[name][key], (name, key)
    assert standin.attention_function is standin.attention_sage


def standalone_names(checkpoint: str) -> set:
    """The kohya module names the standalone engine trains on the same file (UNet and text encoders)."""
    reference = DiffusersAdapter(checkpoint, device=CPU)
    reference.load(unet=True, vae=False, text_encoders=True)
    return {name for name, _ in reference.lora_targets(train_text_encoder=True)}


def one_step_loss(adapter, train_text_encoder: bool = True) -> LoRANetwork:
    """A LoRA on the adapter's targets (up-projections non-zero) and one loss through text encoder and UNet."""
    network = LoRANetwork(adapter.lora_targets(train_text_encoder=train_text_encoder), 4, 4.0)
    with torch.no_grad():
        for layer in network.layers.values():
            layer.lora_up.weight.normal_(0, 0.1)
    with network.attached():
        cond = adapter.encode_text(CAPTIONS, clip_skip=1)
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        prediction = adapter.predict(noisy, torch.tensor([10, 700]), cond, SIZES)
        prediction.square().mean().backward()
    return network


# ---------------------------------------------------------------- the same model as the standalone engine's


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_encodings_and_prediction_match_the_standalone_adapter(arch, checkpoints):
    """Against diffusers' UNet/VAE and transformers' CLIP loaded from the same file by the engine's own loader:
    the text conditioning (clip skip counted alike), the VAE posterior mean and the eps prediction that Forge's
    sigma-based apply_model gives once the adapter converts to and from it."""
    engine = standin.load_forge_engine(checkpoints[arch], arch)
    forge = adapter_for(engine)
    reference = DiffusersAdapter(checkpoints[arch], device=CPU)
    reference.load(unet=True, vae=True, text_encoders=True)
    forge.load(unet=True, vae=True, text_encoders=True)
    with torch.no_grad():
        for clip_skip in (1, 2):
            ours, theirs = forge.encode_text(CAPTIONS, clip_skip), reference.encode_text(CAPTIONS, clip_skip)
            assert ours.keys() == theirs.keys()
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=f"{key} {clip_skip}")
        pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.testing.assert_close(forge.encode_pixels(pixels), reference.encode_pixels(pixels))
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        timesteps = torch.tensor([3, 900])
        cond = reference.encode_text(CAPTIONS, 1)
        expected = reference.predict(noisy, timesteps, cond, SIZES)
        torch.testing.assert_close(forge.predict(noisy, timesteps, cond, SIZES), expected, rtol=1e-4, atol=1e-4)
        # The trap: apply_model runs as well with a timestep where sigma belongs, and is wrong.
        kmodel = engine.forge_objects_original.unet.model
        extra = {"y": forge._sdxl_vector(cond["pooled"], SIZES)} if arch == "sdxl" else {}
        wrong = kmodel.apply_model(noisy, timesteps.float(), c_crossattn=cond["crossattn"], **extra)
        assert not torch.allclose(wrong, expected, atol=1e-2)
    torch.testing.assert_close(forge.alphas_cumprod, reference.alphas_cumprod)
    assert forge.prediction_type == reference.prediction_type == "epsilon"


def test_vae_latents_are_the_mean_where_forge_samples(checkpoints):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    forge = adapter_for(engine)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(forge.encode_pixels(pixels), forge.encode_pixels(pixels))
    assert not torch.equal(engine.encode_first_stage(pixels), engine.encode_first_stage(pixels))


def test_sd1_trains_in_place_to_the_standalone_keys_and_leaves_forge_as_it_was(checkpoints, tmp_path):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    memory = standin.MemoryManagement()
    before = snapshot(engine)
    image_before = engine.sample(memory, "a cat")
    cfg = small_config(
        tmp_path,
        checkpoints["sd1"],
        train_text_encoder=True,
        gradient_checkpointing=True,
        max_train_steps=1,
        output_name="forge_sd1",
    )
    torch.set_num_threads(2)
    with adapter_for(engine, memory) as adapter:
        result = train_image(cfg, runtime=LocalRuntime(CPU), adapter=adapter, log=lambda *a: None)
        targets = dict(adapter.lora_targets(train_text_encoder=True))
    assert result.status == "finished", result.message
    # Forge's Linear is not an nn.Linear, and it was trained all the same.
    forge_linear = targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert isinstance(forge_linear, standin.Linear) and not isinstance(forge_linear, torch.nn.Linear)
    ours = load_file(os.path.join(cfg.output_dir, "forge_sd1.safetensors"))
    assert {k.split(".")[0] for k in ours} == standalone_names(checkpoints["sd1"])
    untrained = [k for k, v in ours.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0]
    assert not untrained, untrained[:5]
    assert_restored(engine, before)
    assert torch.equal(engine.sample(memory, "a cat"), image_before)
    assert memory.outside_inference_mode == 0  # Forge's loader called as Forge calls it


def test_sdxl_trains_in_place_under_the_standalone_names(checkpoints, tmp_path):
    engine = standin.load_forge_engine(checkpoints["sdxl"], "sdxl")
    before = snapshot(engine)
    cfg = small_config(tmp_path, checkpoints["sdxl"], train_text_encoder=True, max_train_steps=1, output_name="xl")
    torch.set_num_threads(2)
    with adapter_for(engine) as adapter:
        result = train_image(cfg, runtime=LocalRuntime(CPU), adapter=adapter, log=lambda *a: None)
    assert result.status == "finished", result.message
    ours = load_file(os.path.join(cfg.output_dir, "xl.safetensors"))
    assert {k.split(".")[0] for k in ours} == standalone_names(checkpoints["sdxl"])
    assert_restored(engine, before)


# ---------------------------------------------------------------- each trap, with and without its handling


def test_inference_tensor_weights_are_replaced_by_tied_clones(checkpoints, monkeypatch):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    embeddings = standin.text_model(engine.text_processing_engine.text_encoder.transformer).embeddings
    assert embeddings.token_embedding.weight is embeddings.token_embedding.wrapped.weight  # one tensor, two names
    with monkeypatch.context() as patch:
        patch.setattr(forge_adapter, "replace_inference_tensors", lambda roots: 0)
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            one_step_loss(adapter_for(engine))
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")  # a fresh one: that run left it half-frozen
    embeddings = standin.text_model(engine.text_processing_engine.text_encoder.transformer).embeddings
    values = {k: v.clone() for k, v in engine.forge_objects_original.unet.model.diffusion_model.state_dict().items()}
    adapter = adapter_for(engine)
    network = one_step_loss(adapter)
    adapter.restore()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    unet = engine.forge_objects_original.unet.model.diffusion_model
    assert not any(p.is_inference() for p in unet.parameters())
    assert all(torch.equal(v, values[k]) for k, v in unet.state_dict().items())
    assert embeddings.token_embedding.weight is embeddings.token_embedding.wrapped.weight  # still tied


def test_inplace_residuals_are_guarded(checkpoints, monkeypatch):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    with monkeypatch.context() as patch:
        patch.setattr(forge_adapter, "guard_inplace_residuals", lambda root, changes: 0)
        adapter = adapter_for(engine)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            one_step_loss(adapter, train_text_encoder=False)
        adapter.restore()
    adapter = adapter_for(engine)
    network = one_step_loss(adapter, train_text_encoder=False)
    adapter.restore()
    assert all(p.grad is not None for p in network.parameters())


def test_text_encoder_gets_gradients_where_forges_conditioning_has_none(checkpoints):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    adapter = adapter_for(engine)
    network = one_step_loss(adapter)
    adapter.restore()
    te_grads = [p.grad for n, p in network.named_parameters() if n.startswith("layers.lora_te_")]
    assert te_grads and all(g is not None and g.abs().sum() > 0 for g in te_grads)
    host_cond = engine.get_learned_conditioning(CAPTIONS)  # Forge's own path: inference mode, no graph
    assert host_cond.is_inference() and host_cond.grad_fn is None


def test_text_encoder_flags_come_back_exactly(checkpoints):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    te = engine.text_processing_engine.text_encoder.transformer
    assert all(p.requires_grad for p in te.parameters())  # as Forge loads its text encoders
    adapter = adapter_for(engine)
    adapter.lora_targets(train_text_encoder=True)
    assert not any(p.requires_grad for p in te.parameters())
    adapter.restore()
    assert all(p.requires_grad for p in te.parameters())
    assert not any(p.requires_grad for p in engine.forge_objects_original.unet.model.diffusion_model.parameters())


def test_sage_attention_is_swapped_for_the_run_and_back(checkpoints, monkeypatch):
    from lora_trainer.hosts.webui.forge import sage_attention_overrides

    standin.install_backend(monkeypatch)
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    adapter = adapter_for(engine, attention=[])
    with pytest.raises(RuntimeError, match="no backward"):
        one_step_loss(adapter, train_text_encoder=False)
    adapter.restore()
    overrides = sage_attention_overrides(engine)
    assert overrides == PYTORCH_ATTENTION
    adapter = adapter_for(engine, attention=overrides)
    one_step_loss(adapter, train_text_encoder=False)
    assert standin.attention_function is standin.attention_pytorch
    adapter.restore()
    assert standin.attention_function is standin.attention_sage


def test_loras_merged_by_a_generation_are_undone_through_forges_loader(checkpoints, monkeypatch):
    """A ``<lora:>`` generation leaves merged weights that are new inference tensors; the glue's prepare loads
    the originals through Forge's loader (clean weights back), training works, and Forge can merge again."""
    from lora_trainer.hosts.webui.forge import ForgeHost

    memory = standin.install_backend(monkeypatch)
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    unet = engine.forge_objects_original.unet.model.diffusion_model
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    clean = unet.state_dict()[key].clone()
    clean_image = engine.sample(memory, "a cat")
    lora = {f"diffusion_model.{key}": torch.full_like(clean, 0.05)}
    engine.apply_loras(lora)
    engine.sample(memory, "a cat <lora:x:1>")
    merged = unet.get_parameter(key)
    assert merged.is_inference() and not torch.equal(merged, clean)
    ForgeHost().prepare(engine)
    assert torch.equal(unet.get_parameter(key), clean) and engine.current_lora_hash == str([])
    adapter = adapter_for(engine, memory)
    one_step_loss(adapter, train_text_encoder=False)
    adapter.restore()
    assert torch.equal(engine.sample(memory, "a cat"), clean_image)
    engine.apply_loras(lora)
    engine.sample(memory, "a cat <lora:x:1>")
    assert torch.allclose(unet.get_parameter(key), clean + 0.05) and unet.get_parameter(key).is_inference()


def test_refuses_training_the_text_encoder_across_devices(checkpoints):
    from lora_trainer.hosts.live_weights import HostModelNotTrainable

    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    adapter = adapter_for(engine)
    adapter.device = torch.device("meta")  # Forge kept the text encoder elsewhere than the UNet
    with pytest.raises(HostModelNotTrainable, match="one device"):
        adapter.lora_targets(train_text_encoder=True)


def test_weights_patched_on_the_fly_are_not_trained_through(checkpoints):
    """Forge's online LoRA / low-VRAM mode computes layers through ``weight_function`` patches: refused in place
    (the glue then trains from the file)."""
    from lora_trainer.hosts.live_weights import HostModelNotTrainable

    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    unet = engine.forge_objects_original.unet.model.diffusion_model
    unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight_function = [lambda weight: weight * 2]
    with pytest.raises(HostModelNotTrainable, match="on the fly"):
        adapter_for(engine).load(unet=True, vae=False, text_encoders=False)


class FailAt(TrainingCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, info):
        if info.step >= self.step:
            raise RuntimeError("boom")


@pytest.mark.parametrize("ending", ["cancel", "error"])
def test_a_cancelled_or_failed_run_leaves_forge_as_it_was(ending, checkpoints, tmp_path):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    before = snapshot(engine)
    cfg = small_config(tmp_path, checkpoints["sd1"], max_train_steps=3, output_name="stop")
    torch.set_num_threads(2)
    with adapter_for(engine) as adapter:
        if ending == "cancel":
            result = train_image(cfg, [StopAfter(1)], runtime=LocalRuntime(CPU), adapter=adapter, log=lambda *a: None)
            assert result.status == "cancelled"
        else:
            with pytest.raises(RuntimeError, match="boom"):
                train_image(cfg, [FailAt(1)], runtime=LocalRuntime(CPU), adapter=adapter, log=lambda *a: None)
    assert not os.path.exists(os.path.join(cfg.output_dir, "stop.safetensors"))
    assert_restored(engine, before)


def test_forges_own_embedding_conversion_run_by_the_trainer_keeps_its_generations_working(checkpoints, monkeypatch):
    """Forge stores text encoders in fp16 and converts the embeddings to fp32 at their first use (Module.to). When
    the trainer's encoding is that first use (a run started before any generation), the conversion runs outside
    inference mode on inference tensors: unless they were cloned first, Forge's next generation fails."""
    with monkeypatch.context() as patch:
        patch.setattr(forge_adapter, "replace_inference_tensors", lambda roots: 0)
        engine = standin.load_forge_engine(checkpoints["sd1"], "sd1", text_dtype=torch.float16)
        adapter_for(engine).encode_text(CAPTIONS, clip_skip=1)
        with pytest.raises(RuntimeError, match="version counter"):
            engine.get_learned_conditioning(CAPTIONS)
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1", text_dtype=torch.float16)
    cond = adapter_for(engine).encode_text(CAPTIONS, clip_skip=1)["crossattn"]
    torch.testing.assert_close(engine.get_learned_conditioning(CAPTIONS), cond)


# ---------------------------------------------------------------- long captions (max_token_length 150/225)

LONG = "a " * 160 + "zebra"  # 161 tokens: three of Forge's 75-token chunks
LATE_COMMA = "b " * 70 + "c, " + "d " * 10  # a comma as token 72: Forge starts the second chunk after it


def test_prompt_chunks_are_cut_after_a_late_comma_as_forge_cuts_them():
    comma = 267
    assert forge_adapter.forge_prompt_chunks([], comma) == [[]]
    assert [len(c) for c in forge_adapter.forge_prompt_chunks(list(range(80)), comma)] == [75, 5]
    late = list(range(1000, 1070)) + [comma] + list(range(2000, 2010))
    assert forge_adapter.forge_prompt_chunks(late, comma) == [late[:71], late[71:]]
    early = list(range(1000, 1010)) + [comma] + list(range(2000, 2070))
    assert forge_adapter.forge_prompt_chunks(early, comma) == [early[:75], early[75:]]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_long_captions_are_forges_own_chunks_cut_or_padded_to_max_token_length(arch, checkpoints):
    """Against the host's own encoding of the same prompts (chunks chained, a batch's shorter prompts filled with
    Forge's empty chunk, SDXL pooled from the first chunk), cut to max_token_length / 75 chunks."""
    engine = standin.load_forge_engine(checkpoints[arch], arch)
    adapter = adapter_for(engine)
    captions = [LONG, LATE_COMMA, "a photo"]
    assert adapter.caption_token_counts(captions) == [161, 82, 2]
    host = engine.get_learned_conditioning(captions)  # the host's default clip skip, as clip_skip=1 here
    host_crossattn = host["crossattn"] if arch == "sdxl" else host
    with torch.no_grad():
        adapter.set_max_token_length(225)
        three = adapter.encode_text(captions, clip_skip=1)
        adapter.set_max_token_length(150)
        two = adapter.encode_text(captions, clip_skip=1)
    assert three["crossattn"].shape[:2] == (3, 231) and two["crossattn"].shape[:2] == (3, 154)
    torch.testing.assert_close(three["crossattn"], host_crossattn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two["crossattn"], host_crossattn[:, :154], rtol=1e-5, atol=1e-5)
    if arch == "sdxl":
        pooled = host["vector"][:, : three["pooled"].shape[1]]
        torch.testing.assert_close(three["pooled"], pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two["pooled"], pooled, rtol=1e-5, atol=1e-5)


def test_trains_in_place_with_long_captions(checkpoints, tmp_path):
    engine = standin.load_forge_engine(checkpoints["sd1"], "sd1")
    make_image_folder(str(tmp_path / "data"), count=2, captions=["a photo", LONG])
    cfg = image_config(tmp_path, checkpoints["sd1"], max_train_steps=1, max_token_length=150, output_name="long")
    before = snapshot(engine)
    lines = []
    with adapter_for(engine) as adapter:
        result = train_image(cfg, runtime=LocalRuntime(CPU), adapter=adapter, log=lines.append)
    assert result.status == "finished", result.message
    assert "by 11 tokens" in "\n".join(lines)
    assert load_file(result.output_files[-1])
    assert_restored(engine, before)
