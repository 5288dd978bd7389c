"""Sparse coder architectures; importing this package registers every one of them."""
from sae_kit.sae.abstopk import AbsTopKSAE
from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, SparseCoder, fvu
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.jumprelu import JumpReLUSAE
from sae_kit.sae.relu import ReLUSAE
from sae_kit.sae.topk import TopKSAE

__all__ = [
    "AbsTopKSAE", "BatchTopKSAE", "EncoderOutput", "ForwardOutput", "JumpReLUSAE", "ReLUSAE", "SAEConfig",
    "SparseCoder", "TopKSAE", "fvu",
]
