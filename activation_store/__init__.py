"""Activations: load a causal LM behind named hook points, stream tokens, capture and store activations."""
from activation_store.model import LoadedModel, load_model, reference_model_path
from activation_store.store import ActivationStore, CacheConfig, NormStats, cache_activations
from activation_store.streaming import StreamingActivations
from activation_store.tokens import DatasetConfig, TokenBatch, iter_token_batches

__all__ = [
    "ActivationStore", "CacheConfig", "DatasetConfig", "LoadedModel", "NormStats", "StreamingActivations",
    "TokenBatch", "cache_activations", "iter_token_batches", "load_model", "reference_model_path",
]
