"""Auto-interpretation: latent records, LLM explanations and the scorers that measure them."""
