"""sae-kit: sparse autoencoders and transcoders for finding the features inside language models."""

__version__ = "0.1.0"
