"""The corpus pass without a Trainer: a planted maximum is found, and a unit's results do not depend on the batch
of windows nor on which other units were read with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from amax_lightning.analysis import corpus_pass as corpus_pass_module
from amax_lightning.analysis.corpus_pass import corpus_pass
from amax_lightning.analysis.corpus_results import corpus_result
from amax_lightning.analysis.corpus_source import corpus_spec
from amax_lightning.model.backbone import load_backbone
from amax_lightning.model.readout import build_readout

SENTENCE = " the cat sat on the mat."


@pytest.fixture()
def planted(tiny_gpt2_dir, tmp_path):
    """A fresh backbone where ' elephant' drives residual dim 5 to ~1000, and a text holding it once."""
    backbone = load_backbone(str(tiny_gpt2_dir))
    (elephant,) = backbone.tokenizer.encode(" elephant")
    with torch.no_grad():
        backbone.model.wte.weight[elephant, 5] = 1000.0
    path = tmp_path / "text.txt"
    path.write_text(SENTENCE * 30 + " the elephant" + SENTENCE * 30, encoding="utf-8")
    return backbone, elephant, path


def run(backbone, spec, units: str):
    built = build_readout(units, backbone, 1)

    def read(inputs):
        return built.readout.read_units(backbone.hook_values(inputs, built.targets[0]))

    identity = torch.tensor([t.flat_index(backbone.shape.d_head) for t in built.targets])
    return corpus_pass(spec, backbone.tokenizer, backbone.embed_tokens, read, identity, torch.device("cpu"),
                       progress=False)


def test_the_planted_maximum_is_the_top_example(planted):
    backbone, elephant, path = planted
    result = corpus_result(run(backbone, corpus_spec(str(path), tokens=2_000, window=16), "blocks.2.hook_resid_pre:5"),
                           0, backbone.token_strings)
    top = result.top_examples[0]
    assert top.token_ids[top.position] == elephant and top.tokens[top.position] == " elephant"
    assert top.max > 500 and result.max == top.max and result.top_examples[1].max < 500
    assert result.top_token_ids[0] == elephant


def test_a_unit_is_the_same_read_alone_with_other_batches_or_among_many(tiny_backbone, tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text((SENTENCE + " A dog ran. 12 + 7 = 19; <b>x</b>\n\n") * 40, encoding="utf-8")
    spec = corpus_spec(str(path), tokens=4_000, window=16)
    together = run(tiny_backbone, spec, "blocks.2.hook_resid_pre:*")
    monkeypatch.setattr(corpus_pass_module, "ACTIVATION_ELEMENTS", 16 * 3)  # 3 windows per forward
    alone = run(tiny_backbone, spec, "blocks.2.hook_resid_pre:7")
    a, b = corpus_result(together, 7, tiny_backbone.token_strings), corpus_result(alone, 0, tiny_backbone.token_strings)
    assert a.histogram == b.histogram and a.density == b.density and a.n_tokens == b.n_tokens
    assert [e.token_ids for e in a.top_examples] == [e.token_ids for e in b.top_examples]
    for x, y in zip(a.top_examples + [e for g in a.quantiles for e in g.examples],
                    b.top_examples + [e for g in b.quantiles for e in g.examples]):
        assert x.position == y.position and x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.activations), torch.tensor(y.activations), rtol=1e-5, atol=1e-6)
    assert [dataclasses.replace(g, examples=[]) for g in a.quantiles] == \
        [dataclasses.replace(g, examples=[]) for g in b.quantiles]
