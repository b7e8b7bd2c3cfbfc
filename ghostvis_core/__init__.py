"""GhostVis core library: train and serve small vision-language models fast."""

__version__ = "0.1.0"
