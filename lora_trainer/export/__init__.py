"""Writing LoRA files: kohya key names, ss_* metadata, atomic safetensors with sd-scripts' model hash."""
