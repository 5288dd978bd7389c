"""Safe resumption of an autointerp output folder: the run fingerprint, crash-safe result files, overwrite.

`run.json` holds the settings the results depend on; a run into a folder holding results of other settings is
refused (naming each difference) instead of mixing old scores with new ones. `explanations.jsonl` and
`scores.jsonl` are append-only while a run works, so a killed run loses at most the line being written, and are
read last-row-wins; at its start and end a run rewrites each (temp file, fsync, rename) to one merged row per
latent, dropping a line cut short by a killed run so that new lines never join it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from activation_store.storage import atomic_write_text, temporaries_of

RUN_FILE = "run.json"
EXPLANATIONS_FILE = "explanations.jsonl"
SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
DASHBOARD_FILE = "dashboard.html"
RESULT_FILES = (RUN_FILE, EXPLANATIONS_FILE, SCORES_FILE, SUMMARY_FILE, DASHBOARD_FILE)
"""What overwrite deletes: records/ and llm_cache/ stay, as each checks its own key before being reused."""

_ABSENT = object()


def sae_digest(sae: Any) -> str:
    """sha256 of the SAE's config and weights as loaded (the content of its cfg.json and weights file)."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    state = sae.inference_state_dict() if hasattr(sae, "inference_state_dict") else sae.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes of any dtype, bf16 included, without a copy
    return h.hexdigest()


# -- the run fingerprint --------------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v: Any) -> str:
    if v is _ABSENT:
        return "(not set)"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return f"sha256 {v[:12]}…"  # the SAE digest: a prefix tells them apart
    return repr(v)


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field: was X, now Y' for each differing setting; scorers count only where both runs used them."""
    old_s, new_s = old.get("scorers", {}), new.get("scorers", {})
    shared = [k for k in new_s if k in old_s]  # adding or leaving out a scorer keeps the others' results valid
    a = _flatten({**old, "scorers": {k: old_s[k] for k in shared}})
    b = _flatten({**new, "scorers": {k: new_s[k] for k in shared}})
    keys = list(dict.fromkeys([*b, *a]))
    return [f"{k}: was {_show(a.get(k, _ABSENT))}, now {_show(b.get(k, _ABSENT))}"
            for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _has_rows(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def delete_results(out: Path) -> None:
    """Delete the result files a run writes into `out` (and temp files a killed rewrite left), nothing else."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
        for tmp in temporaries_of(out / name):
            tmp.unlink(missing_ok=True)


def prepare_out(out: Path, fingerprint: dict[str, Any], *, overwrite: bool = False, **info: Any) -> None:
    """Check `out` holds no results or this run's, then record the fingerprint (plus `info`) in run.json.

    Raises ValueError naming every differing setting when `out` holds results of other settings, unless
    `overwrite`, which deletes the earlier results first. The stored scorers are the union over the runs.
    """
    if overwrite:
        delete_results(out)
    if any(_has_rows(out / name) for name in (EXPLANATIONS_FILE, SCORES_FILE)):
        hint = "use another --out, or pass --overwrite to delete these results and start over"
        try:
            stored = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["fingerprint"]
            if not isinstance(stored, dict) or not isinstance(stored.get("scorers", {}), dict):
                raise TypeError("no fingerprint object")
        except FileNotFoundError:
            raise ValueError(f"{out} holds results but no {RUN_FILE} saying which settings made them (an older "
                             f"sae-kit wrote them?), so they cannot be resumed safely; {hint}") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{out / RUN_FILE} is unreadable ({err}); {hint}") from None
        diffs = fingerprint_differences(stored, fingerprint)
        if diffs:
            raise ValueError(f"{out} holds results of a run with other settings ({'; '.join(diffs)}); {hint}")
        fingerprint = {**fingerprint, "scorers": {**stored.get("scorers", {}), **fingerprint["scorers"]}}
    # Without results a stale run.json (say, of a run that died building records) is simply replaced.
    atomic_write_text(out / RUN_FILE, json.dumps({"fingerprint": fingerprint, **info}, indent=2) + "\n")


# -- crash-safe result files ----------------------------------------------------------------------------------
def json_default(v: Any) -> Any:
    """Numbers numpy / torch hand back, as floats."""
    return float(v)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file with a latent each, skipping lines a killed run cut short."""
    return _parse_jsonl(path.read_text(encoding="utf-8")) if path.exists() else []


def _parse_jsonl(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("latent"), int):
            rows.append(row)
    return rows


def append_jsonl(handle: Any, row: dict[str, Any]) -> None:
    """Append one row and flush it, so it survives the process being killed."""
    handle.write(json.dumps(row, default=json_default) + "\n")
    handle.flush()


def last_rows(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """latent → its last row (explanations: a redone latent's new row replaces the old)."""
    return {r["latent"]: r for r in rows}


def merge_score_rows(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """latent → one row whose scores merge its rows in order (later results win), restarting whenever the
    explanation changed: scores of an explanation that was since redone are stale."""
    merged: dict[int, dict[str, Any]] = {}
    for r in rows:
        lat, prev = r["latent"], merged.get(r["latent"])
        if prev is None or prev["explanation"] != r.get("explanation"):
            merged[lat] = {"latent": lat, "explanation": r.get("explanation"), "scores": dict(r.get("scores", {}))}
        else:
            prev["scores"].update(r.get("scores", {}))
    return merged


Rows = dict[int, dict[str, Any]]


def compact(path: Path, merge: Callable[[list[dict[str, Any]]], Rows]) -> Rows:
    """Rewrite a results file atomically as one merged row per latent (sorted) and return those rows."""
    if not path.exists():
        return {}
    old = path.read_text(encoding="utf-8")
    rows = merge(_parse_jsonl(old))
    text = "".join(json.dumps(rows[lat], default=json_default) + "\n" for lat in sorted(rows))
    if text != old:
        atomic_write_text(path, text)
    return rows
