"""Prompt templates, loaded with importlib.resources (a package so they ship in wheels)."""
