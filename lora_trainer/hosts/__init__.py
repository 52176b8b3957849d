"""Running the engine inside a host application (the Stable Diffusion WebUI and its forks).

``ldm_adapter`` turns the host's live ldm/sgm model into the engine's ``DiffusionAdapter``; ``webui`` and
``rest_api`` are the WebUI glue. Nothing here is imported by the standalone engine, and importing this package
imports nothing heavy.
"""
