"""File writing that never leaves a half-written file where a reader will look."""
