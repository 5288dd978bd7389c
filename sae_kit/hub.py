"""The Hugging Face hub: fetch an SAE folder of a repo (through huggingface_hub's cache, so HF_HUB_OFFLINE=1 reads
what is cached) and push a coder with a generated model card."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

RUN_CONFIG = "config.json"
"""A sparsify run's config, one level above its hook-point folders: it names the model."""
CARD_METRICS = ("l0", "fvu", "explained_variance", "mse", "cosine_similarity", "dead_fraction", "ce_loss_recovered",
                "kl_score", "ce_clean", "ce_sae", "n_tokens")


def download(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """Local path of `subfolder` (or the whole repo) of a hub model repo, downloading what the cache lacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    sub = subfolder.strip("/") if subfolder else None
    # The SAE's folder, and a sparsify run's config one level up (it names the model).
    patterns = [f"{sub}/*", f"{Path(sub).parent.as_posix()}/{RUN_CONFIG}".removeprefix("./")] if sub else None
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(f"hub repo {repo_id!r} (revision {revision or 'main'}) is not in the local cache and "
                                f"cannot be downloaded ({err}); unset HF_HUB_OFFLINE or download it where there is "
                                f"network") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise FileNotFoundError(f"could not fetch hub repo {repo_id!r} (revision {revision or 'main'}): {err}") from None
    folder = root / sub if sub else root
    if not folder.exists():
        held = sorted(p.name for p in root.iterdir())[:20]
        raise FileNotFoundError(f"hub repo {repo_id!r} has no folder {sub!r} (top level holds {held})")
    return folder


def _metrics(coder: Any, metrics: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
    """The eval record for this coder: a dict, a metrics.json path, or metrics.json beside its source folder."""
    if isinstance(metrics, dict):
        return metrics
    path = Path(metrics) if metrics is not None else None
    source = getattr(coder, "source_path", None)
    if path is None and source is not None:
        folder = Path(source) if Path(source).is_dir() else Path(source).parent
        path = folder / "metrics.json" if (folder / "metrics.json").is_file() else None
    if path is None:
        return None
    records = json.loads(path.read_text())
    if isinstance(records, dict) and "core" in records:  # `sae-kit eval` writes one section per suite
        records = records["core"]
    records = records if isinstance(records, list) else [records]
    if not records:
        return None
    if source is not None:  # several SAEs evaluated together: the record of this one
        mine = [r for r in records if Path(str(r.get("sae_path", ""))).resolve() == Path(source).resolve()]
        records = mine or records
    return records[0]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def model_card(coder: Any, repo_id: str, format: str = "sae-kit", path_in_repo: str | None = None,
               metrics: dict[str, Any] | None = None) -> str:
    """README.md text: what the coder is, its eval metrics when given, and how to load it with sae-kit and SAELens."""
    cfg, meta = coder.cfg, coder.cfg.metadata or {}
    model = cfg.model_name or meta.get("model") or "unknown"
    kind = "transcoder" if cfg.transcoder else "sparse autoencoder"
    rows = [("model", model), ("hook point (input)", cfg.hook_point or "unknown")]
    if cfg.transcoder:
        rows.append(("hook point (target)", cfg.target_hook_point or "unknown"))
    rows += [("architecture", cfg.architecture + (" + skip connection" if cfg.skip_connection else "")),
             ("d_in", cfg.d_in), ("d_sae", cfg.d_sae), ("k", cfg.k if cfg.k is not None else "n/a"),
             ("tokens trained", meta.get("tokens_seen", "unknown")),
             ("input normalisation", cfg.normalize_activations), ("dtype", cfg.dtype), ("format", format)]
    base_model = f"base_model: {model}\n" if "/" in model else ""
    lines = ["---", "library_name: sae-kit", f"{base_model}tags:", "- sparse-autoencoder", "- sae-kit",
             *(["- transcoder"] if cfg.transcoder else []), "---", "",
             f"# {repo_id}{'/' + path_in_repo if path_in_repo else ''}", "",
             f"A {cfg.architecture} {kind} with {cfg.d_sae} latents on `{cfg.hook_point}` of {model}, "
             f"written by sae-kit in the {format} format.", "",
             "| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows), ""]
    if metrics:
        shown = [(k, metrics[k]) for k in CARD_METRICS if k in metrics]
        lines += ["## Evaluation", "", f"From `sae-kit eval` (`metrics.json`, dataset {metrics.get('dataset', 'n/a')}).",
                  "", "| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in shown), ""]
    sub = f', subfolder="{path_in_repo}"' if path_in_repo else ""
    lines += ["## Load it", "", "With sae-kit:", "", "```python", "from sae_kit import SAE", "",
              f'sae = SAE.load("{repo_id}"{sub})', "z = sae.encode(x)          # (N, d_sae)",
              "x_hat = sae.decode(z, x)   # (N, d_out)", "```", "", "With SAELens:", ""]
    if format == "saelens" and path_in_repo:
        lines += ["```python", "from sae_lens import SAE", "",
                  f'sae = SAE.from_pretrained(release="{repo_id}", sae_id="{path_in_repo}")', "```", ""]
    elif format == "saelens":
        lines += ["```python", "from huggingface_hub import snapshot_download", "from sae_lens import SAE", "",
                  f'sae = SAE.load_from_disk(snapshot_download("{repo_id}"))', "```", ""]
    else:
        lines += ["SAELens reads its own layout; convert first (`sae-kit convert` writes a folder that "
                  "`sae_lens.SAE.load_from_disk` loads with the same outputs):", "", "```",
                  f"sae-kit convert {repo_id}{'/' + path_in_repo if path_in_repo else ''} sae_saelens --to saelens",
                  "```", "", "```python", "from sae_lens import SAE", "", 'sae = SAE.load_from_disk("sae_saelens")',
                  "```", ""]
    return "\n".join(lines)


class PushError(RuntimeError):
    """The hub refused or could not be reached; the message says which repo and what to check."""


def push_to_hub(coder: Any, repo_id: str, format: str = "sae-kit", path_in_repo: str | None = None,
                metrics: str | Path | dict[str, Any] | None = None, private: bool | None = None,
                token: str | None = None, revision: str | None = None, commit_message: str | None = None) -> str:
    """Save the coder in `format`, add README.md (and metrics.json when known), upload it; returns the commit URL."""
    from huggingface_hub import HfApi

    record = _metrics(coder, metrics)
    with tempfile.TemporaryDirectory(prefix="sae-kit-push-") as tmp:
        folder = Path(tmp)
        coder.save(folder, format=format)
        if record is not None:
            (folder / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(coder, repo_id, format, path_in_repo, record))
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, path_in_repo=path_in_repo,
                                     revision=revision, repo_type="model", commit_message=commit_message
                                     or f"Upload {coder.cfg.architecture} SAE with sae-kit")
        except Exception as err:  # noqa: BLE001  (the transport's errors differ across huggingface_hub versions)
            raise PushError(f"could not upload to hub repo {repo_id!r}: {type(err).__name__}: {err}. Check the "
                            f"network, and log in (`hf auth login`) or pass a token with write access") from err
    return str(getattr(info, "commit_url", info))
