"""Running the engine inside a host application (the Stable Diffusion WebUI and its forks).

``ldm_adapter`` turns AUTOMATIC1111's live ldm/sgm model into the engine's ``DiffusionAdapter``,
``forge_adapter`` does the same for Forge's engine, and ``live_weights`` makes a host's live weights trainable
(or says why they are not); ``webui`` and ``rest_api`` are the WebUI glue. Nothing here is imported by the
standalone engine, and importing this package imports nothing heavy.
"""
