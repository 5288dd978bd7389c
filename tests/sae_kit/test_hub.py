"""Hub access offline: loads from a huggingface_hub cache laid out like downloaded snapshots, release:sae_id from the
registry, and push_to_hub with HfApi's upload intercepted (no network anywhere)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from foreign_files import gemma_scope_forward, inputs, sparsify_forward, write_gemma_scope, write_sparsify
from huggingface_hub import constants as hf_constants

from sae_kit import SAE
from sae_kit.cli import main
from sae_kit.sae import SAEConfig, SparseCoder

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh HF_HUB_CACHE; snapshot(repo_id) returns the folder to fill for its `main` revision."""
    root = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    assert hf_constants.HF_HUB_OFFLINE  # tests/conftest.py: nothing reaches the network

    def snapshot(repo_id: str) -> Path:
        repo = root / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(REV)
        folder = repo / "snapshots" / REV
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    return snapshot


def test_load_hub_repo_and_subfolder(hub_cache) -> None:
    snap = hub_cache("someone/sparsify-run")
    _, w = write_sparsify(snap / "layers.2", d_in=16, d_sae=48, k=5, model="someone/model")
    x = inputs(10, 16)
    z, out = sparsify_forward(w, 5, x)
    for sae in (SAE.load("someone/sparsify-run", subfolder="layers.2"), SAE.load("someone/sparsify-run/layers.2")):
        torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-6, rtol=0)
        assert (sae.cfg.hook_point, sae.cfg.model_name) == ("blocks.2.hook_resid_post", "someone/model")
    with pytest.raises(FileNotFoundError, match=r"has no folder 'layers.9' \(top level holds \['config.json', 'layers.2'\]\)"):
        SAE.load("someone/sparsify-run", subfolder="layers.9")
    with pytest.raises(FileNotFoundError, match="no local path 'someone/absent', and as a hub id: hub repo "
                                                "'someone/absent' .* is not in the local cache"):
        SAE.load("someone/absent")


def test_from_pretrained_registry_releases(hub_cache) -> None:
    snap = hub_cache("google/gemma-scope-2b-pt-res")
    params = write_gemma_scope(snap / "layer_3" / "width_16k" / "average_l0_59", d_in=16, d_sae=40)
    x = inputs(10, 16)
    for sae in (SAE.from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_3/width_16k/canonical"),
                SAE.load("gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonical")):
        z, out = gemma_scope_forward(params, x)
        torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-6, rtol=0)
        assert (sae.cfg.model_name, sae.cfg.hook_point) == ("google/gemma-2-2b", "blocks.3.hook_resid_post")
        assert sae.cfg.metadata["release"] == "gemma-scope-2b-pt-res-canonical"
    snap = hub_cache("EleutherAI/sae-llama-3-8b-32x")
    write_sparsify(snap / "layers.7", d_in=16, d_sae=48, k=5, model=None)
    sae = SAE.from_pretrained("eleuther-llama-3-8b-32x", "layers.7")
    assert (sae.cfg.model_name, sae.cfg.hook_point) == ("meta-llama/Meta-Llama-3-8B", "blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"release 'eleuther-llama-3-8b-32x' has no SAE 'layers.70'; close: \['layers.7'"):
        SAE.from_pretrained("eleuther-llama-3-8b-32x", "layers.70")
    with pytest.raises(ValueError, match="unknown release 'gemma-scope-2b-res'; close:"):
        SAE.from_pretrained("gemma-scope-2b-res", "x")



def as_blob(file: Path) -> None:
    """Move a snapshot file into the repo's blobs/ and leave a relative symlink, as huggingface_hub stores files."""
    repo = next(p for p in file.parents if p.name.startswith("models--"))
    blob = repo / "blobs" / f"{abs(hash(str(file))):064d}"
    blob.parent.mkdir(exist_ok=True)
    file.rename(blob)
    file.symlink_to(os.path.relpath(blob, file.parent))


def test_gemma_scope_transcoders_from_the_registry_and_a_cache_of_symlinks(hub_cache) -> None:
    """gemma-scope-2b-pt-transcoders loads as SAELens lists it: JumpReLU transcoders on gemma-2-2b from
    ln2.hook_normalized to hook_mlp_out; and a Gemma Scope hub id keeps the layer of its path although the cached
    params.npz is a symlink into blobs/ (whose target path names no layer)."""
    snap = hub_cache("google/gemma-scope-2b-pt-transcoders")
    params = write_gemma_scope(snap / "layer_12" / "width_16k" / "average_l0_6", d_in=16, d_sae=40)
    as_blob(snap / "layer_12" / "width_16k" / "average_l0_6" / "params.npz")
    x = inputs(10, 16)
    for sae in (SAE.from_pretrained("gemma-scope-2b-pt-transcoders", "layer_12/width_16k/average_l0_6"),
                SAE.load("gemma-scope-2b-pt-transcoders:layer_12/width_16k/average_l0_6"),
                SAE.load("google/gemma-scope-2b-pt-transcoders/layer_12/width_16k/average_l0_6")):
        c = sae.cfg
        assert (c.architecture, c.transcoder, c.model_name) == ("jumprelu", True, "google/gemma-2-2b")
        assert (c.hook_point, c.target_hook_point) == ("blocks.12.ln2.hook_normalized", "blocks.12.hook_mlp_out")
        torch.testing.assert_close(sae.decode(sae.encode(x), x), gemma_scope_forward(params, x)[1], atol=1e-6, rtol=0)
    snap = hub_cache("google/gemma-scope-2b-pt-res")
    write_gemma_scope(snap / "layer_5" / "width_16k" / "average_l0_68", d_in=16, d_sae=40)
    as_blob(snap / "layer_5" / "width_16k" / "average_l0_68" / "params.npz")
    c = SAE.load("google/gemma-scope-2b-pt-res", subfolder="layer_5/width_16k/average_l0_68").cfg
    assert (c.model_name, c.hook_point, c.transcoder) == ("google/gemma-2-2b", "blocks.5.hook_resid_post", False)

def test_release_spec_passes_revision_and_refuses_a_subfolder(hub_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load("release:sae_id", revision=...)` downloads that revision; a subfolder cannot apply to a release's SAE;
    a mistyped release or id through `load` names the close ones, as `from_pretrained` does."""
    from sae_kit import hub

    asked: list = []
    monkeypatch.setattr(hub, "download", lambda repo_id, sub=None, revision=None: asked.append(revision) or 1 / 0)
    spec = "gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonical"
    for revision, want in (("deadbeef", "deadbeef"), (None, None)):
        with pytest.raises(ZeroDivisionError):  # the stand-in download, reached with the revision asked for
            SAE.load(spec, revision=revision)
        assert asked.pop() == want
    with pytest.raises(ValueError, match="subfolder='layer_3' goes with a hub id or a local path"):
        SAE.load(spec, subfolder="layer_3")
    with pytest.raises(ValueError, match=r"unknown release 'gemma-scope-2b-pt-res-canonicl'; close: "
                                         r"\['gemma-scope-2b-pt-res-canonical'.*is not a local path either"):
        SAE.load("gemma-scope-2b-pt-res-canonicl:layer_3/width_16k/canonical")
    with pytest.raises(ValueError, match=r"has no SAE 'layer_3/width_16k/canonicl'; close: \['layer_3/width_16k/canonical'"):
        SAE.load("gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonicl")
    assert asked == []


def _trained_like(tmp_path: Path) -> SparseCoder:
    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4, hook_point="blocks.1.hook_resid_post",
                    model_name="reference", metadata={"tokens_seen": 2_000_000})
    sae = SparseCoder.from_config(cfg)
    sae.save(tmp_path / "sae")
    core = [{"sae_path": str(tmp_path / "other"), "fvu": 0.5, "l0": 8.0, "ce_loss_recovered": 0.1},
            {"sae_path": str(tmp_path / "sae"), "fvu": 0.0661, "l0": 32.0, "ce_loss_recovered": 0.9903}]
    # as `sae-kit eval` writes it: one section per suite, two SAEs evaluated together
    (tmp_path / "sae" / "metrics.json").write_text(json.dumps({"suites": ["core"], "core": core, "scoreboard": []}))
    return SAE.load(tmp_path / "sae")


def test_push_to_hub_uploads_the_folder_and_a_model_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(self, *, folder_path, repo_id, path_in_repo=None, **kw):
        calls["upload"] = (repo_id, path_in_repo, kw)
        shutil.copytree(folder_path, tmp_path / "uploaded")  # the temporary folder is gone after the call
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{REV}",
                                          commit_message="m", commit_description="", oid=REV)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    sae = _trained_like(tmp_path)
    url = sae.push_to_hub("me/my-sae", private=True)
    assert url.endswith(REV) and calls["create"] == ("me/my-sae", {"private": True, "exist_ok": True,
                                                                   "repo_type": "model"})
    up = tmp_path / "uploaded"
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "cfg.json", "metrics.json", "sae_weights.safetensors"]
    card = (up / "README.md").read_text()
    for fact in ("| model | reference |", "| hook point (input) | blocks.1.hook_resid_post |", "| architecture | topk |",
                 "| d_sae | 32 |", "| k | 4 |", "| tokens trained | 2000000 |", "| fvu | 0.0661 |",
                 "| ce_loss_recovered | 0.9903 |", 'SAE.load("me/my-sae")', "sae_lens", "sae-kit convert"):
        assert fact in card, fact
    back = SAE.load(up)
    x = torch.randn(6, 8)
    assert torch.equal(back.encode(x), sae.encode(x))


def test_push_cli_in_saelens_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    uploaded: dict = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)

    def upload_folder(self, *, folder_path, repo_id, path_in_repo=None, **kw):
        uploaded.update(path_in_repo=path_in_repo, files=sorted(p.name for p in Path(folder_path).iterdir()),
                        card=(Path(folder_path) / "README.md").read_text())
        return "https://huggingface.co/me/x"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    _trained_like(tmp_path)
    assert main(["push", str(tmp_path / "sae"), "me/x", "--format", "saelens", "--path-in-repo", "l1"]) == 0
    assert "pushed to https://huggingface.co/me/x" in capsys.readouterr().out
    assert uploaded["path_in_repo"] == "l1" and "sae_weights.safetensors" in uploaded["files"]
    assert 'SAE.from_pretrained(release="me/x", sae_id="l1")' in uploaded["card"]


def test_push_failure_is_one_line_naming_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """No network or no write access: `sae-kit push` prints one error line naming the repo and what to check."""
    def refused(self, repo_id, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refused)
    _trained_like(tmp_path)
    assert main(["push", str(tmp_path / "sae"), "me/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not upload to hub repo 'me/x': OSError: Name or service not known" in err
    assert "hf auth login" in err and "Traceback" not in err
