"""SAE latent and direction targets through a whole fit: results record them, sweeps equal solo runs, baseline."""

from __future__ import annotations

import numpy as np
import torch
from conftest import write_sae


def test_sae_latent_fit_records_the_sae_and_its_baseline_reads_the_latent(fit_tiny, tiny_module, tmp_path):
    folder = write_sae(tmp_path / "sae", "6.x")
    module, results = fit_tiny(target=f"sae:{folder}:5", lr=1e-2, steps=10, writer_options={"baseline_top_k": 4})
    assert results["target"] == f"sae:{folder}:5"
    sae = results["sae"]
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


def test_direction_fit_records_the_direction(fit_tiny, tmp_path):
    np.save(tmp_path / "d.npy", np.arange(64, dtype=np.float32))
    _, results = fit_tiny(target=f"blocks.1.hook_resid_pre@{tmp_path / 'd.npy'}", steps=5)
    assert results["direction"]["norm"] > 0 and results["direction"]["index"] is None and "sae" not in results


def test_sae_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(fit_tiny, tmp_path):
    folder = write_sae(tmp_path / "sae", "pre-5")  # centred residual
    options = {"target": f"sae:{folder}:1,2", "seeds": [0, 1], "lr": 1e-2}
    _, whole = fit_tiny("whole", steps=12, **options)
    first, _ = fit_tiny("first", steps=6, trainer_options={"enable_checkpointing": True}, **options)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    resumed, again = fit_tiny("resumed", steps=12, trainer_options={"enable_checkpointing": False},
                              fit_options={"ckpt_path": str(checkpoint), "weights_only": True}, **options)
    assert again["units"] == whole["units"] and again["units"][0]["sae"]["center_residual"] is True
