"""Sparse coder architectures; importing this package registers every one of them."""
from sae_kit.sae.abstopk import AbsTopKSAE
from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, SparseCoder, fvu
from sae_kit.sae.topk import TopKSAE

__all__ = ["AbsTopKSAE", "EncoderOutput", "ForwardOutput", "SAEConfig", "SparseCoder", "TopKSAE", "fvu"]
