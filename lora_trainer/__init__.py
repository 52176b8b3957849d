"""lora-trainer: LoRA training for Stable Diffusion (inside the WebUI or standalone) and causal LMs."""

__version__ = "0.1.0"
