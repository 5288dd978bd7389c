"""Steering: add, clamp or ablate SAE latents (or add raw directions) during forward passes and generation."""
from sae_kit.compat import check_compatible
from sae_kit.steering.interventions import MODES, DirectionIntervention, Intervention, parse_positions, position_mask
from sae_kit.steering.steer import (
    METADATA_MAX_ACTS,
    SAESteering,
    latent_max_activations,
    latent_scales,
    steer,
    steer_all,
    steer_direction,
)

__all__ = [
    "METADATA_MAX_ACTS", "MODES", "DirectionIntervention", "Intervention", "SAESteering", "check_compatible",
    "latent_max_activations", "latent_scales", "parse_positions", "position_mask", "steer", "steer_all",
    "steer_direction",
]
