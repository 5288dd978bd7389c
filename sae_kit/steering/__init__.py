"""Steering with SAE latents: add, clamp or ablate features during forward passes and generation."""
from sae_kit.steering.interventions import Intervention
from sae_kit.steering.steer import check_compatible, latent_max_activations, steer

__all__ = ["Intervention", "check_compatible", "latent_max_activations", "steer"]
