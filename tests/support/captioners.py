"""Tiny randomly initialised captioner models written to disk in the real on-disk layouts, for the tests and
the benchmark. Built offline in a second or two; their captions are gibberish but well-formed."""

from __future__ import annotations

import json
import os
from typing import Sequence, Tuple

# A small word list for the tiny BLIP tokenizer; special tokens first, as BERT vocabularies have them.
_BLIP_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
_BLIP_WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "of",
    "cat",
    "dog",
    "city",
    "street",
    "night",
    "red",
    "blue",
    "green",
    "with",
    "on",
    "in",
    "at",
    "woman",
    "man",
    "car",
    "tree",
    "sky",
    "building",
    "lights",
    "and",
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_blip(
    folder: str, *, hidden: int = 32, layers: int = 1, image_size: int = 32, patch_size: int = 16, seed: int = 0
) -> str:
    """A BLIP captioning model + processor saved with ``save_pretrained`` into ``folder``; returns ``folder``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    os.makedirs(folder, exist_ok=True)
    vocab = list(_BLIP_SPECIAL + _BLIP_WORDS)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=vocab_file)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    heads = max(1, hidden // 16)
    config = BlipConfig(
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "encoder_hidden_size": hidden,
            "max_position_embeddings": 64,
            "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": 0,
            "sep_token_id": vocab.index("[SEP]"),
            "eos_token_id": vocab.index("[SEP]"),
        },
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_clip(
    folder: str,
    *,
    width: int = 32,
    layers: int = 1,
    image_size: int = 32,
    patch_size: int = 16,
    embed_dim: int = 16,
    seed: int = 0,
) -> str:
    """An open_clip model in the ``local-dir`` layout (open_clip_config.json + open_clip_model.safetensors).

    It uses open_clip's default tokenizer, whose BPE vocabulary ships inside the package.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 16,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": width,
            "heads": max(1, width // 16),
            "layers": layers,
        },
    }
    with open(os.path.join(folder, "open_clip_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}, fh, indent=2)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "open_clip_model.safetensors")
    )
    return folder


# (tag, category, bias): the tiny tagger outputs roughly sigmoid(bias) for each tag, whatever the image.
TINY_TAGS: Tuple[Tuple[str, int, float], ...] = (
    ("general", 9, 6.0),  # a rating: never written
    ("1girl", 0, 6.0),
    ("long_hair", 0, 4.0),
    ("^_^", 0, 3.0),
    ("hatsune_miku", 4, 1.0),  # ~0.73: over the general threshold, under a character threshold of 0.85
    ("unlikely_tag", 0, -6.0),
)


def build_tiny_wd14(
    folder: str,
    *,
    tags: Sequence[Tuple[str, int, float]] = TINY_TAGS,
    image_size: int = 32,
    channels: int = 8,
    seed: int = 0,
) -> str:
    """A WD14-layout tagger (model.onnx, NHWC 0-255 BGR input, sigmoid outputs) plus its selected_tags.csv."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    count = len(tags)
    initializers = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, (channels, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(np.zeros(channels, dtype=np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.05, (channels, count)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.array([bias for _, _, bias in tags], dtype=np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "scale"], ["scaled"]),
        helper.make_node(
            "Conv", ["scaled", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", count])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    with open(os.path.join(folder, "selected_tags.csv"), "w", encoding="utf-8", newline="") as fh:
        fh.write("tag_id,name,category,count\n")
        for index, (name, category, _) in enumerate(tags):
            fh.write(f"{index},{name},{category},{1000 - index}\n")
    return folder


def write_test_images(folder: str, count: int, size: Tuple[int, int] = (48, 40), start: int = 0) -> list:
    """``count`` small coloured PNGs named 000.png, 001.png, ... (from ``start``); returns their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = os.path.join(folder, f"{index:03d}.png")
        Image.new("RGB", size, ((index * 53) % 256, (index * 97) % 256, (index * 31) % 256)).save(path)
        paths.append(path)
    return paths
