"""An SAE named by hub id, a folder inside a hub repo, resolved from the HF cache offline (as a user's cache holds it)."""

from __future__ import annotations

import pytest
from conftest import write_sae
from huggingface_hub import constants

from amax_lightning.base.errors import UserError

REPO_ID = "jbloom/GPT2-Small-SAEs-Reformatted"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF hub cache holding the jb release's repo with one SAE folder (5.x cfg.json, no centring stated)."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_sae(repo / "snapshots" / commit / "blocks.1.hook_resid_pre", "5.x")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # the suite runs offline: only the cache can answer
    return cache


def test_a_folder_inside_a_cached_hub_repo_is_found_offline_and_the_jb_release_is_centred(tiny_module, hub_cache):
    module = tiny_module(target=f"sae:{REPO_ID}/blocks.1.hook_resid_pre:4", seeds=[0])
    record = module.unit_records[0]
    assert record["source"] == f"{REPO_ID}/blocks.1.hook_resid_pre" and record["latent"] == 4
    assert record["center_residual"] is True and REPO_ID in record["center_reason"]


def test_a_missing_folder_in_a_cached_repo_is_a_user_error(tiny_module, hub_cache):
    with pytest.raises(UserError, match="has no folder 'blocks.5.hook_resid_pre'"):
        tiny_module(target=f"sae:{REPO_ID}/blocks.5.hook_resid_pre:4", seeds=[0])
