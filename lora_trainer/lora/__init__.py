"""LoRA layers that attach to a model by wrapping ``forward`` and detach leaving it exactly as it was."""
