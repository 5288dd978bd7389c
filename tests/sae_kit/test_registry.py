"""The shipped release registry is consistent: known formats, resolvable hook points, canonical ids pointing at SAEs
that the full release lists."""
from __future__ import annotations

import re

import pytest

from sae_kit.formats import FORMATS
from sae_kit.registry import releases, resolve, sae_paths


def test_every_release_is_complete_and_resolves() -> None:
    known = releases()
    for family in ("gemma-scope-2b-pt-res", "gemma-scope-2b-pt-mlp", "gemma-scope-2b-pt-att", "gemma-scope-9b-pt-res",
                   "gemma-scope-9b-pt-mlp", "gemma-scope-9b-pt-att", "gpt2-small-res-jb", "llama_scope_lxr_8x",
                   "llama_scope_lxm_32x", "eleuther-llama-3-8b-32x", "gemma-scope-2b-pt-transcoders"):
        assert family in known, family
    for name, entry in known.items():
        assert entry["format"] in FORMATS, name
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry["repo_id"]), name
        paths = sae_paths(name)
        assert paths and len(set(paths)) == len(paths)
        first = next(iter(paths))
        _, path, fields = resolve(name, first)
        assert path == paths[first]
        if entry.get("hook_point"):
            assert re.fullmatch(r"blocks\.\d+\.[\w.]+", fields["hook_point"]), (name, fields)
            assert str(int(re.search(entry["layer_pattern"], path).group(1))) in fields["hook_point"]
        assert ("target_hook_point" in fields) == bool(entry.get("target_hook_point")), name


def test_canonical_ids_point_into_the_full_release() -> None:
    for name in releases():
        if name.endswith("-canonical"):
            full = set(sae_paths(name.removesuffix("-canonical")).values())
            missing = [p for p in sae_paths(name).values() if p not in full]
            assert not missing, (name, missing[:3])


def test_resolve_names_the_hook_point_per_layer() -> None:
    _, path, fields = resolve("gemma-scope-9b-pt-att-canonical", "layer_20/width_16k/canonical")
    assert path.startswith("layer_20/width_16k/average_l0_")
    assert fields == {"model_name": "google/gemma-2-9b", "hook_point": "blocks.20.attn.hook_z"}
    with pytest.raises(ValueError, match="close"):
        resolve("gemma-scope-9b-pt-att-canonical", "layer_20/width_16k/canonicall")


def test_transcoder_release_names_both_hook_points_per_layer() -> None:
    """Gemma Scope's 2B transcoders, as SAELens lists them (one per layer), read the pre-MLP RMSNorm's output before
    its gain (folded into the MLP by Gemma Scope) and predict the MLP's output after the post-MLP norm."""
    assert len(sae_paths("gemma-scope-2b-pt-transcoders")) == 26
    _, path, fields = resolve("gemma-scope-2b-pt-transcoders", "layer_11/width_16k/average_l0_5")
    assert path == "layer_11/width_16k/average_l0_5"
    assert fields == {"model_name": "google/gemma-2-2b", "hook_point": "blocks.11.ln2.hook_normalized",
                      "target_hook_point": "blocks.11.hook_mlp_out"}


def test_a_format_other_than_the_releases_is_refused_before_any_download(monkeypatch):
    """`format=` with a release id named the format twice (a TypeError inside the loader, after the download); another
    format than the registry's is now refused up front, and the registry's own is accepted."""
    from sae_kit import hub
    from sae_kit.registry import from_pretrained

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(hub, "download", no_download)
    with pytest.raises(ValueError, match="gemma-scope.*format=.sparsify."):
        from_pretrained("gemma-scope-2b-pt-transcoders", "layer_11/width_16k/average_l0_5", format="sparsify")
    with pytest.raises(AssertionError, match="downloaded"):  # the same format goes on to the download
        from_pretrained("gemma-scope-2b-pt-transcoders", "layer_11/width_16k/average_l0_5", format="gemma-scope")
