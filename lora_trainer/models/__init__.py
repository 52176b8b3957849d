"""Models: architecture detection, name maps, loading from disk, and the adapters the trainer drives."""
