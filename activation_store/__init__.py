"""Activations: load a causal LM behind named hook points, stream tokens, capture and store activations."""
from activation_store.model import LoadedModel, load_model, reference_model_path
from activation_store.tokens import DatasetConfig, TokenBatch, iter_token_batches

__all__ = ["DatasetConfig", "LoadedModel", "TokenBatch", "iter_token_batches", "load_model", "reference_model_path"]
