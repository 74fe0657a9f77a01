"""SAE latents and directions as targets, against the formula computed independently from HF hidden_states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_sae
from safetensors.torch import load_file
from transformers import AutoModel

from amax_lightning.base.errors import UserError
from amax_lightning.model.sae import load_sae

LAYER = 1


@pytest.fixture(scope="module")
def hf(tiny_gpt2_dir):
    return AutoModel.from_pretrained(tiny_gpt2_dir).eval()


def residual(hf, x: torch.Tensor, centre: bool) -> torch.Tensor:
    """HF hidden_states[LAYER], minus its mean over d_model when ``centre`` (TransformerLens's centred residual)."""
    with torch.no_grad():
        h = hf(inputs_embeds=x, output_hidden_states=True).hidden_states[LAYER]
    return h - h.mean(-1, keepdim=True) if centre else h


def formula(folder, h: torch.Tensor, latents, post: bool = False) -> torch.Tensor:
    """sae-lens's standard encoder: (x - b_dec) @ W_enc + b_enc, one column per latent; (rows, T) in row order."""
    w = load_file(str(folder / "sae_weights.safetensors"))
    pre = (h - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    return torch.relu(pre) if post else pre


# generation, extra config, centred by auto, why
AUTO = [("pre-5", {}, True, "pre-5"), ("5.x", {}, False, "does not ask"),
        ("6.x", {}, False, "does not ask"),
        ("6.x", {"metadata": {"hook_name": "blocks.1.hook_resid_pre", "neuronpedia_id": "tiny/1-res",
                              "model_from_pretrained_kwargs": {"center_writing_weights": True}}}, True, "says"),
        ("5.x", {"model_from_pretrained_kwargs": {"center_writing_weights": False}}, False, "says")]


@pytest.mark.parametrize("generation, config, centred, why", AUTO)
def test_latent_equals_the_formula_on_the_residual_the_sae_saw(tiny_module, hf, tmp_path, generation, config,
                                                                 centred, why):
    folder = write_sae(tmp_path / "sae", generation, config=config)
    module = tiny_module(target=f"sae:{folder}:5", seeds=[0, 1])
    values = module.objective(module.parameter, slice(0, 2))
    h = residual(hf, module.parameter.detach(), centred)
    if centred:
        assert h.mean(-1).abs().max() < 1e-5  # the centred residual has zero mean at every position
    torch.testing.assert_close(values.activations.detach(), formula(folder, h, [5])[..., 5], rtol=1e-5, atol=1e-5)
    record = module.unit_records[0]
    assert record["center_residual"] is centred and why in record["center_reason"]
    assert record["config_generation"] == generation and record["d_sae"] == 32 and record["latent"] == 5
    # 5.x names its Neuronpedia id at the top level, 6.x under metadata, pre-5 not at all
    assert record["neuronpedia"] == (None if generation == "pre-5" else "https://www.neuronpedia.org/tiny/1-res/5")


@pytest.mark.parametrize("config, tensors, b_dec_applied, scaling", [
    ({"apply_b_dec_to_input": False}, {}, False, None),
    ({}, {"scaling_factor": torch.linspace(0.5, 3.0, 32)}, True, "ignored"),
])
def test_b_dec_switch_and_scaling_factor(tiny_module, hf, tmp_path, config, tensors, b_dec_applied, scaling):
    """apply_b_dec_to_input false reads x @ W_enc + b_enc; scaling_factor (decoder side only) changes no latent."""
    folder = write_sae(tmp_path / "sae", "5.x", config=config, tensors=tensors)
    module = tiny_module(target=f"sae:{folder}:0-31", seeds=[0])
    values = module.objective(module.parameter, slice(0, 32)).activations.detach()  # (32 latents, T)
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert ("scaling_factor" in w) is (scaling is not None)
    h = residual(hf, module.parameter.detach()[:1], False)[0]  # (T, d_in)
    x = h - w["b_dec"] if b_dec_applied else h
    torch.testing.assert_close(values, (x @ w["W_enc"] + w["b_enc"]).T, rtol=1e-5, atol=1e-5)
    assert (w["b_dec"] @ w["W_enc"]).abs().min() > 1e-4  # subtracting b_dec or not changes every latent
    record = module.unit_records[0]
    assert record["apply_b_dec_to_input"] is b_dec_applied
    if scaling is None:
        assert record["scaling_factor"] is None
    else:
        assert record["scaling_factor"].startswith("ignored")


@pytest.mark.parametrize("generation, centred", [("6.x", False), ("pre-5", True)])
def test_sweep_and_post_relu_equal_the_formula(tiny_module, hf, tmp_path, generation, centred):
    folder = write_sae(tmp_path / "sae", generation)
    seeds = [0, 1]
    for post in (False, True):
        module = tiny_module(target=f"sae:{folder}:*", seeds=seeds, sae_activation="post" if post else "pre")
        assert len(module.targets) == 32 and module.targets[7].spec == f"sae:{folder}:7"
        assert all(r["center_residual"] is centred for r in module.unit_records)
        values = module.objective(module.parameter, slice(0, 64)).activations.detach()
        x = module.parameter.detach()[:2]  # every unit starts from the same two seeds
        expected = formula(folder, residual(hf, x, centred), None, post)  # (2, T, 32), centred HF when pre-5
        torch.testing.assert_close(values.view(32, 2, -1), expected.permute(2, 0, 1), rtol=1e-5, atol=1e-5)
    if not centred:
        assert module.unit_records[3]["neuronpedia"] == "https://www.neuronpedia.org/tiny/1-res/3"


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
def test_input_normalizations(tiny_module, hf, tmp_path, normalize):
    folder = write_sae(tmp_path / "sae", "5.x", config={"normalize_activations": normalize})
    module = tiny_module(target=f"sae:{folder}:2", seeds=[0])
    h = residual(hf, module.parameter.detach(), False)
    if normalize == "layer_norm":
        h = h - h.mean(-1, keepdim=True)
        h = h / (h.std(-1, keepdim=True) + 1e-5)
    else:
        h = h * 64**0.5 / h.norm(dim=-1, keepdim=True)
    expected = formula(folder, h, [2])[..., 2]
    torch.testing.assert_close(module.objective(module.parameter, slice(0, 1)).activations.detach(), expected,
                               rtol=1e-5, atol=1e-5)


def test_center_residual_can_be_forced_and_never_touches_mlp_hooks(tiny_module, hf, tmp_path):
    folder = write_sae(tmp_path / "sae", "5.x")
    forced = tiny_module(target=f"sae:{folder}:1", seeds=[0], center_residual="true")
    h = residual(hf, forced.parameter.detach(), True)
    torch.testing.assert_close(forced.objective(forced.parameter, slice(0, 1)).activations.detach(),
                               formula(folder, h, [1])[..., 1], rtol=1e-5, atol=1e-5)
    mlp = write_sae(tmp_path / "mlp_sae", "5.x", hook="blocks.1.mlp.hook_post", d_in=256)
    module = tiny_module(target=f"sae:{mlp}:0", seeds=[0], center_residual="true")
    assert module.unit_records[0]["center_residual"] is False


def test_direction_targets_are_dot_products_with_the_normalized_direction(tiny_module, hf, tmp_path):
    directions = np.random.default_rng(0).normal(size=(3, 64)) * 5
    np.save(tmp_path / "one.npy", directions[0])
    np.save(tmp_path / "three.npy", directions)
    one = tiny_module(target=f"blocks.{LAYER}.hook_resid_pre@{tmp_path / 'one.npy'}", seeds=[0, 1])
    h = residual(hf, one.parameter.detach(), False)
    unit = torch.tensor(directions / np.linalg.norm(directions, axis=-1, keepdims=True), dtype=torch.float32)
    torch.testing.assert_close(one.objective(one.parameter, slice(0, 2)).activations.detach(), h @ unit[0],
                               rtol=1e-5, atol=1e-5)
    assert one.unit_records[0]["norm"] == pytest.approx(float(np.linalg.norm(directions[0])))
    np.save(tmp_path / "complex.npy", directions[0] * 1j)
    with pytest.raises(UserError, match="needs real numbers"):
        tiny_module(target=f"blocks.{LAYER}.hook_resid_pre@{tmp_path / 'complex.npy'}", seeds=[0])
    sweep = tiny_module(target=f"blocks.{LAYER}.hook_resid_pre@{tmp_path / 'three.npy'}", seeds=[0, 1])
    assert [t.spec.endswith(f"[{i}]") for i, t in enumerate(sweep.targets)] == [True] * 3
    values = sweep.objective(sweep.parameter, slice(0, 6)).activations.detach().view(3, 2, -1)
    torch.testing.assert_close(values, torch.einsum("std,ud->ust", h, unit), rtol=1e-5, atol=1e-5)


def test_reader_reads_one_unit_for_the_baseline(tiny_module, tmp_path):
    folder = write_sae(tmp_path / "sae", "6.x")
    module = tiny_module(target=f"sae:{folder}:3,9", seeds=[0, 1])
    x = module.parameter.detach()
    read = module.objective.unit_reader(1)  # latent 9
    torch.testing.assert_close(read(x[2:]), module.objective(module.parameter, slice(0, 4)).activations.detach()[2:])


BAD = [
    ({"tensors": {"W_enc": torch.zeros(60, 32), "b_dec": torch.zeros(60), "W_dec": torch.zeros(32, 60)},
      "config": {"d_in": 60}},
     "has d_in 60 but blocks.1.hook_resid_pre is 64 wide"),
    ({"tensors": {"b_enc": torch.zeros(7)}}, "do not fit"),
    ({"hook": "blocks.9.hook_resid_pre"}, "reads layer 9"),
    ({"hook": "blocks.1.attn.hook_z"}, "supported: blocks.<layer>.<hook>"),
    ({"config": {"architecture": "gated"}}, "architecture 'gated'; supported: standard"),
    ({"config": {"normalize_activations": "expected_average_only_in"}}, "needs statistics"),
    ({"tensors": {"W_enc": torch.full((64, 32), float("nan"))}}, "NaN or infinite values in W_enc"),
    ({"tensors": {"W_dec": torch.full((32, 64), float("inf"))}}, "NaN or infinite values in W_dec"),
    ({"config": {"d_sae": 99}}, "says d_sae 99"),
    ({"config": {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}}}, "activation 'topk'; supported: relu"),
    ({"tensors": {"W_dec": torch.zeros(64, 32)}}, r"W_dec has shape \(64, 32\)"),
    ({"config": {"apply_b_dec_to_input": "false"}}, "must be true or false"),
    ({"config": {"normalize_activations": ["none"]}}, "must be a string"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m[:30] for _, m in BAD])
def test_unusable_saes_are_one_line_user_errors(tiny_module, tmp_path, change, message):
    folder = write_sae(tmp_path / "sae", "6.x", **change)
    with pytest.raises(UserError, match=message):
        tiny_module(target=f"sae:{folder}:0", seeds=[0])


def test_damaged_files_are_user_errors(tiny_module, tmp_path):
    folder = write_sae(tmp_path / "sae", "6.x")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        load_sae(str(folder))
    torch.save({"W_enc": torch.zeros(64, 32)}, weights)  # a pickle where safetensors belongs
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        load_sae(str(folder))
    (folder / "cfg.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sae(str(folder))
    with pytest.raises(UserError, match="latent 32 is out of range"):
        tiny_module(target=f"sae:{write_sae(tmp_path / 'ok')}:32", seeds=[0])
    with pytest.raises(UserError, match="cannot load SAE"):
        load_sae("nobody/no-such-sae-repo/blocks.8.hook_resid_pre")  # HF_HUB_OFFLINE=1 in the tests


def test_aligned_latents_are_the_decoder_rows_closest_to_the_dim(tiny_module, tmp_path):
    folder = write_sae(tmp_path / "sae", "6.x")
    w_dec = load_file(str(folder / "sae_weights.safetensors"))["W_dec"]
    cosine = w_dec[:, 7] / w_dec.norm(dim=-1)
    module = tiny_module(target=f"sae:{folder}:top3@7", seeds=[0])
    assert [t.unit[0] for t in module.targets] == cosine.argsort(descending=True)[:3].tolist()
    with pytest.raises(UserError, match="top99@7 is out of range"):
        tiny_module(target=f"sae:{folder}:top99@7", seeds=[0])
