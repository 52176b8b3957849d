"""The trainer's web UI: one gradio tab for the WebUI hosts and the standalone app.

Submodules import gradio; this package itself imports nothing, so ``lora_trainer`` stays usable without it.
"""
