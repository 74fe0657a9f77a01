"""The one-token data baseline against HF's own forward, chunking invariance, overlap (real text: test_corpus_*)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from amax_lightning.analysis.baseline import overlap, token_activations, top_tokens
from amax_lightning.base.errors import UserError
from amax_lightning.model.backbone import load_backbone

TARGET = "blocks.2.hook_resid_pre:5"  # a spec string: parsed against the model by the baseline
UNIT = 5
SENTENCE = " the cat sat on the mat."


@pytest.fixture(scope="module")
def backbone(tiny_gpt2_dir):
    return load_backbone(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def all_token_acts(backbone):
    return token_activations(backbone, TARGET, chunk_size=4096)


def _hf_unit(model, ids: list[int], layer: int = 2, unit: int = 5) -> torch.Tensor:
    """Independent reference: HF's full forward with output_hidden_states, activation at every position."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return hidden[layer][0, :, unit]


def test_per_token_activation_equals_hf_one_token_at_a_time(tiny_gpt2_dir, backbone, all_token_acts):
    reference = AutoModel.from_pretrained(tiny_gpt2_dir).eval()
    assert all_token_acts.shape == (50257,)
    for token_id in (0, 13, 995, 3797, 50256):
        torch.testing.assert_close(all_token_acts[token_id], _hf_unit(reference, [token_id])[0], rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_the_result(backbone, all_token_acts):
    torch.testing.assert_close(token_activations(backbone, TARGET, chunk_size=777), all_token_acts, rtol=1e-6, atol=1e-6)


def test_top_tokens_are_the_highest_activations(backbone, all_token_acts):
    top = top_tokens(backbone, TARGET, k=7)
    assert top.token_ids == all_token_acts.argsort(descending=True)[:7].tolist()
    assert top.tokens == backbone.token_strings(top.token_ids)
    torch.testing.assert_close(torch.tensor(top.activations), all_token_acts[top.token_ids])
    assert top.activations == sorted(top.activations, reverse=True)


def test_overlap_by_hand():
    result = overlap(torch.tensor([[5, 9, 5], [1, 9, 9]]), [9, 2, 1, 1])
    assert (result.count, result.n_gradient, result.shared_ids) == (4, 6, [1, 9])
    assert result.fraction == pytest.approx(4 / 6)
    assert overlap([3, 4], [5]).count == 0 and overlap([3, 4], [5]).fraction == 0.0


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda b, p: top_tokens(b, TARGET, k=0), "k 0"),
        (lambda b, p: top_tokens(b, TARGET, k=50258), "k 50258"),
        (lambda b, p: token_activations(b, TARGET, chunk_size=0), "chunk_size 0"),
        (lambda b, p: token_activations(b, "blocks.9.hook_resid_pre:5"), "layer 9"),
        (lambda b, p: overlap([], [1]), "empty"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(backbone, tmp_path, call, bad):
    path = tmp_path / "text.txt"
    path.write_text(SENTENCE, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=bad) as info:
        call(backbone, path)
    assert "\n" not in str(info.value)
