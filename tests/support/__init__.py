"""The tests' builders, in one place: tiny randomly initialised models written in real on-disk layouts, image
folders, configs and data files. Nothing is downloaded; no tests live here. Tests import them as
``from support.<module> import ...`` (``tests/`` is on ``sys.path``: pytest puts ``tests/conftest.py``'s folder
there; scripts that run outside pytest insert it themselves).

- ``tiny_models``: tiny SD-style UNet / VAE / CLIP text encoders, diffusers folders and single-file checkpoints;
- ``image_fixtures``: image configs and a one-call ``train`` on a tiny checkpoint;
- ``text_models``: a tiny LLaMA-architecture causal LM with a word-level tokenizer, JSONL data and configs;
- ``tiny_flux`` / ``tiny_zimage``: tiny Flux.1 and Z-Image transformers with their autoencoder and text
  encoders, saved as a WebUI keeps them (BFL/ComfyUI single files beside ``ae`` and text-encoder files) or
  as diffusers folders;
- ``captioners``: tiny BLIP, open_clip and WD14 captioners, and test images (also used by ``bench/``).
"""
