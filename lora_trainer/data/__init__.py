"""Training data: image folders, captions, buckets, the dataset the trainer reads."""
