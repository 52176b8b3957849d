"""Phrase lists the CLIP interrogator ranks against each image. Short on purpose: each phrase costs one text
embedding at load time, and these cover what LoRA datasets usually vary in."""

from __future__ import annotations

from typing import Dict, Tuple

MEDIUMS: Tuple[str, ...] = (
    "a photograph", "a close-up photograph", "a portrait photograph", "a digital painting", "an oil painting",
    "a watercolor painting", "a pencil sketch", "an ink drawing", "an anime illustration", "a manga panel",
    "a comic book illustration", "a 3d render", "a pixel art image", "a vector illustration", "a concept art piece",
    "a screenshot from a video game", "a film still", "a charcoal drawing", "a low poly render", "a collage",
)

STYLES: Tuple[str, ...] = (
    "realistic", "photorealistic", "hyperrealistic", "impressionist", "expressionist", "surrealist", "minimalist",
    "art nouveau", "art deco", "baroque", "ukiyo-e", "cyberpunk", "steampunk", "fantasy", "science fiction",
    "gothic", "retro", "vaporwave", "cel shaded", "studio ghibli style", "flat design", "pop art",
)

LIGHTING: Tuple[str, ...] = (
    "natural light", "soft light", "harsh sunlight", "golden hour", "blue hour", "backlit", "rim light",
    "studio lighting", "neon lighting", "candlelight", "moonlight", "dramatic lighting", "volumetric light",
    "overcast light", "low key lighting", "high key lighting",
)

FLAVOURS: Tuple[str, ...] = (
    "highly detailed", "sharp focus", "shallow depth of field", "bokeh", "wide angle", "symmetrical", "vibrant colors",
    "muted colors", "monochrome", "black and white", "pastel colors", "high contrast", "grainy", "cinematic",
    "intricate", "cluttered", "simple background", "white background", "outdoors", "indoors", "at night",
    "in the rain", "foggy", "urban", "nature", "cityscape", "landscape", "interior", "full body", "upper body",
    "looking at viewer", "from above", "from below", "crowded", "empty", "reflections", "glowing",
)

DEFAULT_PHRASE_LISTS: Dict[str, Tuple[str, ...]] = {
    "medium": MEDIUMS,
    "style": STYLES,
    "lighting": LIGHTING,
    "flavour": FLAVOURS,
}
