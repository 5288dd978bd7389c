"""sae-kit: sparse autoencoders and transcoders for finding the features inside language models."""

__version__ = "0.1.0"

__all__ = ["SAE"]


def __getattr__(name: str):
    # `from sae_kit import SAE` without importing torch on `import sae_kit` (the CLI's --help stays fast).
    if name == "SAE":
        from sae_kit.sae.base import SparseCoder

        return SparseCoder
    raise AttributeError(f"module 'sae_kit' has no attribute {name!r}")
