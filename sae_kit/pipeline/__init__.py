"""`sae-kit run`: the whole pipeline from one config, each stage skipped when its outputs are complete and match.

    from sae_kit.pipeline import load_config, run_pipeline
    result = run_pipeline(load_config("my.yaml"))      # load_config() alone reads the embedded default

Like the CLI, a face over all four packages: evals and autointerp are imported inside the functions that use them.
"""
from sae_kit.pipeline.config import DEFAULT_CONFIG, EXAMPLES, STAGES, RunConfig
from sae_kit.pipeline.run import RunResult, run_pipeline
from sae_kit.pipeline.validate import ConfigError, load_config

__all__ = ["DEFAULT_CONFIG", "EXAMPLES", "STAGES", "ConfigError", "RunConfig", "RunResult", "load_config",
           "run_pipeline"]
