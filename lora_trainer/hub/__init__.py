"""Models from the Hugging Face Hub: a reference (local path, ``owner/name[@revision]``, or
``owner/name/file.safetensors``) resolved to local files in the standard Hugging Face cache.

``reference`` parses what a user typed (no dependencies: the config reads it); ``files`` says which files of a
repository a use needs; ``cache`` reads the cache layout; ``fetch`` downloads through ``huggingface_hub`` the
first time and is offline afterwards; ``progress`` reports a download's bytes to the CLI and the tab.
Nothing here downloads at import: only ``fetch_repo_files`` does, when a run needs the files.
"""
