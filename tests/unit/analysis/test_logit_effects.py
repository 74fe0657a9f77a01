"""Logit effects against the formula ``W_U @ w`` on the tiny GPT-2 (W_U = the tied input embedding, no ln_f)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_sae

from amax_lightning.analysis.logit_effects import logit_effects
from amax_lightning.model.readout import build_readout


def expected(backbone, direction: torch.Tensor, k: int = 10) -> tuple[list[int], list[int]]:
    """Top and bottom k token ids of ``wte @ direction``, computed in float64 with numpy."""
    logits = backbone.model.wte.weight.detach().double().numpy() @ direction.double().numpy()
    order = np.argsort(-logits, kind="stable")
    return order[:k].tolist(), order[::-1][:k].tolist()


def effects_of(backbone, spec: str):
    built = build_readout(spec, backbone, n_seeds=1)
    width = built.readout.weights.shape[1] if built.readout.weights is not None else None
    width = width or (backbone.shape.d_mlp if "mlp" in spec else backbone.d_model)
    return built, logit_effects(backbone, built.targets, built.readout.written_directions(width))


def test_residual_coordinate_is_a_column_of_the_unembedding(tiny_backbone):
    built, effects = effects_of(tiny_backbone, "blocks.2.hook_resid_pre:5,17")
    for effect, dim in zip(effects, (5, 17)):
        top, bottom = expected(tiny_backbone, torch.nn.functional.one_hot(torch.tensor(dim), 64).float())
        assert [t.token_id for t in effect.promoted] == top
        assert [t.token_id for t in effect.suppressed] == bottom
        column = tiny_backbone.model.wte.weight[:, dim]
        assert effect.promoted[0].logit == pytest.approx(float(column.max()), rel=1e-6)
        assert effect.suppressed[0].logit == pytest.approx(float(column.min()), rel=1e-6)
        assert effect.promoted[0].token == tiny_backbone.tokenizer.decode([top[0]])
        assert effect.ln_f_scale is False


def test_mlp_neuron_writes_its_output_row(tiny_backbone):
    _, (effect,) = effects_of(tiny_backbone, "blocks.1.mlp.hook_post:40")
    w_out_row = tiny_backbone.model.h[1].mlp.c_proj.weight[40]  # Conv1D weight: (d_mlp, d_model)
    top, bottom = expected(tiny_backbone, w_out_row)
    assert [t.token_id for t in effect.promoted] == top
    assert [t.token_id for t in effect.suppressed] == bottom


def test_sae_latent_writes_its_decoder_row(tiny_backbone, tmp_path):
    folder = write_sae(tmp_path / "sae")
    _, effects = effects_of(tiny_backbone, f"sae:{folder}:3,7")
    from safetensors.torch import load_file

    w_dec = load_file(str(folder / "sae_weights.safetensors"))["W_dec"]
    for effect, latent in zip(effects, (3, 7)):
        top, bottom = expected(tiny_backbone, w_dec[latent])
        assert [t.token_id for t in effect.promoted] == top
        assert [t.token_id for t in effect.suppressed] == bottom
        assert effect.direction.startswith(f"W_dec[{latent}]")


def test_direction_file_and_no_effects_for_attention(tiny_backbone, tmp_path):
    direction = np.random.default_rng(0).normal(size=64)
    np.save(tmp_path / "d.npy", direction)
    _, (effect,) = effects_of(tiny_backbone, f"blocks.2.hook_resid_pre@{tmp_path / 'd.npy'}")
    top, _ = expected(tiny_backbone, torch.tensor(direction / np.linalg.norm(direction)))
    assert [t.token_id for t in effect.promoted] == top
    _, effects = effects_of(tiny_backbone, "blocks.1.attn.hook_q:0.3")
    assert effects == [None]


def test_untied_model_has_no_unembedding(tiny_llama_dir):
    from amax_lightning.model.backbone import load_backbone

    backbone = load_backbone(str(tiny_llama_dir))
    backbone.model.config.tie_word_embeddings = False
    _, effects = effects_of(backbone, "blocks.1.hook_resid_pre:3")
    assert effects == [None]
