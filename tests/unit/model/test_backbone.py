"""The truncated forward against HF's own output_hidden_states, and loading / freezing behaviour."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import load_backbone, resolve_model_source
from amax_lightning.model.targets import HOOKS, Target


def _inputs(d_model: int, batch: int = 4, tokens: int = 5) -> torch.Tensor:
    return torch.randn(batch, tokens, d_model, generator=torch.Generator().manual_seed(0)) * 0.1


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_residual_equals_hf_hidden_states_at_every_layer(model_fixture, request):
    folder = request.getfixturevalue(model_fixture)
    backbone = load_backbone(str(folder))
    reference = AutoModel.from_pretrained(folder).eval()
    x = _inputs(backbone.d_model)
    with torch.no_grad():
        hidden = reference(inputs_embeds=x, output_hidden_states=True).hidden_states
        for layer in range(backbone.n_layer):
            torch.testing.assert_close(backbone.residual(x, layer), hidden[layer], rtol=1e-5, atol=1e-5)
            target = Target(layer=layer, hook="hook_resid_pre", unit=(7,))
            torch.testing.assert_close(backbone(x, target), hidden[layer][..., 7], rtol=1e-5, atol=1e-5)


def test_gpt2_forward_runs_only_the_blocks_the_target_needs(tiny_gpt2_dir):
    backbone = load_backbone(str(tiny_gpt2_dir))
    assert backbone.is_gpt2
    called = []
    for i, block in enumerate(backbone.model.h):
        block.register_forward_pre_hook(lambda *_, i=i: called.append(("block", i)))
        for sub in (block.ln_1, block.mlp):
            sub.register_forward_pre_hook(lambda *_, i=i: called.append(("sub", i)))
    backbone.model.ln_f.register_forward_pre_hook(lambda *_: called.append(("ln_f", None)))
    backbone(_inputs(backbone.d_model), Target(layer=2, hook="hook_resid_pre", unit=(0,)))
    assert {i for _, i in called} == {0, 1}
    assert ("ln_f", None) not in called


def test_backbone_is_frozen_and_stays_in_eval_mode(tiny_gpt2_dir):
    backbone = load_backbone(str(tiny_gpt2_dir))
    assert backbone.model.config.resid_pdrop > 0  # dropout exists, so eval mode matters
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    x = _inputs(backbone.d_model)
    target = Target(layer=2, hook="hook_resid_pre", unit=(3,))
    torch.testing.assert_close(backbone(x, target), backbone(x, target), rtol=0, atol=0)


def test_vocab_embeddings_and_token_strings(tiny_gpt2_dir):
    backbone = load_backbone(str(tiny_gpt2_dir))
    assert backbone.vocab_embeddings.shape == (50257, 64)
    assert backbone.token_strings([995, 50256]) == [" world", "<|endoftext|>"]
    assert backbone.max_positions == 32


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_source(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_source("./no-such-model")
    assert resolve_model_source("gpt2") == "gpt2"
    assert resolve_model_source("openai-community/gpt2") == "openai-community/gpt2"


def test_folder_without_weights_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load model from folder"):
        load_backbone(str(tmp_path))


def hf_hook_values(model, x: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Every hook of block ``layer``, as forward hooks on the HF modules see it in HF's own full forward."""
    block, seen = model.h[layer], {}
    d_model = model.config.hidden_size

    def keep(name, from_input=False):
        def hook(module, inputs, output=None):
            seen[name] = (inputs[0] if from_input else output).detach().clone()
        return hook

    handles = [
        block.register_forward_pre_hook(keep("hook_resid_pre", from_input=True)),
        block.ln_2.register_forward_pre_hook(keep("hook_resid_mid", from_input=True)),
        block.mlp.act.register_forward_hook(keep("mlp.hook_post")),
        block.register_forward_hook(keep("hook_resid_post")),
        block.attn.c_attn.register_forward_hook(keep("qkv")),
    ]
    try:
        with torch.no_grad():
            model(inputs_embeds=x)
    finally:
        for handle in handles:
            handle.remove()
    q, k, v = seen.pop("qkv").split(d_model, dim=-1)
    post = seen["hook_resid_post"]
    seen["hook_resid_post"] = post[0] if isinstance(post, tuple) else post
    return {**seen, "attn.hook_q": q, "attn.hook_k": k, "attn.hook_v": v}


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_equals_what_hf_forward_hooks_see(tiny_gpt2_dir, layer, hook):
    backbone = load_backbone(str(tiny_gpt2_dir))
    reference = AutoModel.from_pretrained(tiny_gpt2_dir).eval()
    x = _inputs(backbone.d_model)
    expected_all = hf_hook_values(reference, x, layer)[hook]
    unit = (3, 5) if hook.startswith("attn.") else (37,)
    target = Target(layer=layer, hook=hook, unit=unit)
    d_head = backbone.shape.d_head
    expected = expected_all[..., 3 * d_head + 5] if hook.startswith("attn.") else expected_all[..., 37]
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, target), expected, rtol=1e-5, atol=1e-5)


def test_lm_logits_equal_hf_lm_head(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    backbone = load_backbone(str(tiny_gpt2_dir))
    reference = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    x = _inputs(backbone.d_model)
    with torch.no_grad():
        torch.testing.assert_close(backbone.lm_logits(x), reference(inputs_embeds=x).logits, rtol=1e-4, atol=1e-4)
