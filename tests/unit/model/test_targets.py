"""Target specs (TransformerLens names, sweeps): parsing, range checks and the errors users see."""

from __future__ import annotations

import pytest

from amax_lightning.base.errors import UserError
from amax_lightning.model.targets import ModelShape, Target, parse_target

GPT2_SMALL = ModelShape(n_layer=12, d_model=768, d_mlp=3072, n_head=12)


def test_parse_target():
    assert parse_target("blocks.8.hook_resid_pre:91", GPT2_SMALL) == Target(8, "hook_resid_pre", (91,))
    assert parse_target("blocks.8.hook_resid_pre:91", GPT2_SMALL).spec == "blocks.8.hook_resid_pre:91"
    q = parse_target("blocks.3.attn.hook_q:11.63", GPT2_SMALL)
    assert q == Target(3, "attn.hook_q", (11, 63)) and q.spec == "blocks.3.attn.hook_q:11.63"
    assert q.flat_index(GPT2_SMALL.d_head) == 11 * 64 + 63
    assert parse_target("blocks.11.mlp.hook_post:3071", GPT2_SMALL).unit == (3071,)


@pytest.mark.parametrize(
    "spec, message",
    [("blocks.12.hook_resid_pre:0", "layer 12 is out of range"), ("blocks.-1.hook_resid_pre:0", "layer -1"),
     ("blocks.8.hook_resid_pre:768", "unit 768 is out of range"), ("blocks.8.hook_nope:1", "hook 'hook_nope' is unknown"),
     ("blocks.8.hook_resid_pre", "malformed"), ("8:91", "malformed"), ("", "malformed"), (None, "malformed"),
     ("blocks.1.mlp.hook_post:3072", "unit 3072 is out of range"), ("blocks.1.attn.hook_k:12.0", "head 12"),
     ("blocks.1.attn.hook_v:0.64", "dim 64"), ("blocks.1.attn.hook_q:5", "must be <head>.<dim>"),
     ("blocks.1.hook_resid_mid:1.2", "must be one integer")],
)
def test_bad_targets(spec, message):
    with pytest.raises(UserError, match=message):
        parse_target(spec, GPT2_SMALL)


def test_parse_targets_sweeps():
    from amax_lightning.model.targets import parse_targets

    assert [t.unit for t in parse_targets("blocks.8.hook_resid_pre:*", GPT2_SMALL)] == [(i,) for i in range(768)]
    assert [t.unit for t in parse_targets("blocks.8.mlp.hook_post:3-5", GPT2_SMALL)] == [(3,), (4,), (5,)]
    assert [t.unit for t in parse_targets("blocks.8.hook_resid_mid:[9,2]", GPT2_SMALL)] == [(9,), (2,)]
    assert parse_targets("blocks.8.hook_resid_pre:91", GPT2_SMALL) == [Target(8, "hook_resid_pre", (91,))]
    every_q = parse_targets("blocks.3.attn.hook_q:*", GPT2_SMALL)
    assert [t.flat_index(GPT2_SMALL.d_head) for t in every_q] == list(range(768))
    assert [t.unit for t in parse_targets("blocks.3.attn.hook_k:2.*", GPT2_SMALL)] == [(2, d) for d in range(64)]
    assert [t.unit for t in parse_targets("blocks.3.attn.hook_v:11.3-5", GPT2_SMALL)] == [(11, 3), (11, 4), (11, 5)]
    assert [t.unit for t in parse_targets("blocks.3.attn.hook_q:[2.17, 0.4]", GPT2_SMALL)] == [(2, 17), (0, 4)]


@pytest.mark.parametrize(
    "spec, message",
    [("blocks.8.hook_resid_pre:5-3", "empty range"), ("blocks.8.hook_resid_pre:1,1", "repeat 1;"),
     ("blocks.8.hook_resid_pre:1,x", "malformed"), ("blocks.8.hook_resid_pre:760-770", "unit 768 is out of range"),
     ("blocks.3.hook_nope:*", "unknown"), ("blocks.3.attn.hook_q:2.17,2.17", "repeat 2.17;"),
     ("blocks.3.attn.hook_q:12.*", "head 12 is out of range"), ("blocks.3.attn.hook_q:1.60-64", "dim 64 is out"),
     ("blocks.3.attn.hook_q:1.5-2", "empty range"), ("blocks.3.attn.hook_q:3,4", "malformed; use \\*, 2"),
     ("blocks.3.mlp.hook_post:2.1,3.1", "malformed; use \\*, 0-127")],
)
def test_bad_sweeps(spec, message):
    from amax_lightning.model.targets import parse_targets

    with pytest.raises(UserError, match=message):
        parse_targets(spec, GPT2_SMALL)
