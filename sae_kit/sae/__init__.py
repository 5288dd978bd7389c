"""Sparse coder architectures; importing this package registers every one of them."""
from sae_kit.sae.abstopk import AbsTopKSAE
from sae_kit.sae.adaptivek import AdaptiveKSAE
from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, SparseCoder, fvu
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.gated import GatedSAE
from sae_kit.sae.jumprelu import JumpReLUSAE
from sae_kit.sae.kron import KronSAE
from sae_kit.sae.matching_pursuit import MatchingPursuitSAE
from sae_kit.sae.matryoshka import MatryoshkaBatchTopKSAE
from sae_kit.sae.relu import ReLUSAE
from sae_kit.sae.topk import TopKSAE

__all__ = [
    "AbsTopKSAE", "AdaptiveKSAE", "BatchTopKSAE", "EncoderOutput", "ForwardOutput", "GatedSAE", "JumpReLUSAE",
    "KronSAE", "MatchingPursuitSAE", "MatryoshkaBatchTopKSAE", "ReLUSAE", "SAEConfig", "SparseCoder", "TopKSAE",
    "fvu",
]
