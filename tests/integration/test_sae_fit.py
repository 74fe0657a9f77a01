"""SAE latent and direction targets through a whole fit: results record them, sweeps equal solo runs, baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_sae
from safetensors.torch import load_file
from transformers import AutoModel

SEARCH = {"method": "gcg", "candidates": 16, "top_k": 32, "seeds": [0, 1]}


@pytest.fixture(scope="module")
def hf(tiny_gpt2_dir):
    return AutoModel.from_pretrained(tiny_gpt2_dir).eval()


def hidden(hf, token_ids: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """HF hidden_states[1] (the SAEs' hook, blocks.1.hook_resid_pre) of the token ids (batch, T), centred over
    d_model when ``centre`` (TransformerLens's centred residual)."""
    with torch.no_grad():
        h = hf(input_ids=token_ids, output_hidden_states=True).hidden_states[1]
    return h - h.mean(-1, keepdim=True) if centre else h


def test_sae_latent_fit_records_the_sae_and_its_baseline_reads_the_latent(fit_tiny, tiny_module, tmp_path):
    folder = write_sae(tmp_path / "sae", "6.x", tensors={"scaling_factor": torch.full((32,), 2.0)})
    module, results = fit_tiny(target=f"sae:{folder}:5", lr=1e-2, steps=10, writer_options={"baseline_top_k": 4})
    assert results["target"] == f"sae:{folder}:5"
    sae = results["sae"]
    assert sae["scaling_factor"].startswith("ignored")  # the file holds one; a latent target does not use it
    assert (sae["latent"], sae["d_sae"], sae["activation"], sae["hook_point"]) == (5, 32, "pre", "hook_sae_acts_pre")
    assert sae["neuronpedia"] == "https://www.neuronpedia.org/tiny/1-res/5" and sae["center_residual"] is False
    assert "direction" not in results
    read = module.objective.unit_reader(0)
    ids = torch.arange(module.backbone.vocab_embeddings.shape[0])
    with torch.no_grad():
        one_token = read(module.backbone.embed_tokens(ids[:, None]))[:, 0]
    top = results["data_baseline"]["top_tokens"]
    assert top["token_ids"][0] == int(one_token.argmax())
    assert top["activations"][0] == float(one_token.max())


def test_sae_sweep_equals_latents_run_alone(fit_tiny, tmp_path):
    folder = write_sae(tmp_path / "sae", "5.x")
    sweep, results = fit_tiny("sweep", target=f"sae:{folder}:3,9", seeds=[0, 4], lr=1e-2, steps=10)
    alone, alone_results = fit_tiny("alone", target=f"sae:{folder}:9", seeds=[0, 4], lr=1e-2, steps=10)
    torch.testing.assert_close(sweep.parameter[2:].detach(), alone.parameter.detach(), rtol=1e-5, atol=1e-6)
    assert results["atlas"][1]["target"] == f"sae:{folder}:9"
    assert [r["token_ids"] for r in results["units"][1]["runs"]] == [r["token_ids"] for r in alone_results["runs"]]
    assert results["units"][1]["sae"]["latent"] == 9


def test_direction_fit_records_the_direction_and_its_baseline_reads_the_projection(fit_tiny, hf, tmp_path):
    direction = np.random.default_rng(3).normal(size=64).astype(np.float32) * 4
    np.save(tmp_path / "d.npy", direction)
    _, results = fit_tiny(target=f"blocks.1.hook_resid_pre@{tmp_path / 'd.npy'}", steps=5,
                          writer_options={"baseline_top_k": 4})
    assert results["direction"]["norm"] == pytest.approx(float(np.linalg.norm(direction)), rel=1e-6)
    assert results["direction"]["index"] is None and "sae" not in results
    unit = torch.from_numpy(direction / np.linalg.norm(direction))
    with torch.no_grad():  # every token alone at position 0 through HF's block 0: hidden_states[1], cheaply
        out = hf.h[0]((hf.wte.weight + hf.wpe.weight[0])[:, None])
        one_token = (out[0] if isinstance(out, tuple) else out)[:, 0] @ unit
    assert torch.allclose(hidden(hf, torch.tensor([[11], [2000]]))[:, 0] @ unit, one_token[[11, 2000]], atol=1e-5)
    top = results["data_baseline"]["top_tokens"]
    assert top["token_ids"] == one_token.topk(4).indices.tolist()
    assert top["activations"] == pytest.approx(one_token.topk(4).values.tolist(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("kind", ["sae", "direction"])
def test_token_search_on_sae_and_direction_targets_reads_the_formula(fit_tiny, hf, tmp_path, kind):
    """GCG on an SAE latent (pre-5: centred residual) and on a direction; each seed's searched tokens, run through
    HF, give the activation the results report."""
    if kind == "sae":
        folder = write_sae(tmp_path / "sae", "pre-5")
        w = load_file(str(folder / "sae_weights.safetensors"))
        target, centre = f"sae:{folder}:4", True
        read = lambda h: ((h - w["b_dec"]) @ w["W_enc"] + w["b_enc"])[..., 4]  # noqa: E731
    else:
        direction = np.random.default_rng(5).normal(size=64) * 3
        np.save(tmp_path / "d.npy", direction)
        target, centre = f"blocks.1.hook_resid_pre@{tmp_path / 'd.npy'}", False
        unit = torch.tensor(direction / np.linalg.norm(direction), dtype=torch.float32)
        read = lambda h: h @ unit  # noqa: E731
    _, results = fit_tiny(target=target, steps=3, **SEARCH)
    assert results["method"] == "gcg" and len(results["runs"]) == 2
    assert (results.get("sae") or {}).get("center_residual", False) is centre
    for run in results["runs"]:
        expected = float(read(hidden(hf, torch.tensor([run["token_ids"]]), centre)).mean())  # aggregate: mean
        assert run["final_activation"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert run["decoded_activation"] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_sae_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(fit_tiny, tmp_path):
    folder = write_sae(tmp_path / "sae", "pre-5")  # centred residual
    options = {"target": f"sae:{folder}:1,2", "seeds": [0, 1], "lr": 1e-2}
    _, whole = fit_tiny("whole", steps=12, **options)
    first, _ = fit_tiny("first", steps=6, trainer_options={"enable_checkpointing": True}, **options)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    resumed, again = fit_tiny("resumed", steps=12, trainer_options={"enable_checkpointing": False},
                              fit_options={"ckpt_path": str(checkpoint), "weights_only": True}, **options)
    assert again["units"] == whole["units"] and again["units"][0]["sae"]["center_residual"] is True
