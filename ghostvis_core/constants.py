"""Constants shared by the data pipeline, the model and the trainer (no imports: anyone may import this)."""

IGNORE_INDEX = -100
"""Target id of a token that carries no loss (padding, prompts, document boundaries): PyTorch's default."""
