"""Token search (GCG / EPO) without a Trainer: exact against brute force and HF, batch-invariant, monotone."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY_TARGET, save_model
from transformers import GPT2Config, GPT2LMHeadModel

from amax_lightning.base.errors import UserError
from amax_lightning.optimize.pareto import pareto_merge
from amax_lightning.optimize.search import restart_penalty, step_generator
from amax_lightning.optimize.search_space import parse_exclude_tokens

BRUTE_TARGET = "blocks.1.hook_resid_pre:3"


@pytest.fixture(scope="module")
def brute_dir(tmp_path_factory):
    """A 2-block GPT-2 with a 64-token vocabulary: 64**2 = 4,096 sequences of 2 tokens, all scored by brute force."""
    torch.manual_seed(7)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=8, vocab_size=64)
    return save_model(GPT2LMHeadModel(config), tmp_path_factory.mktemp("brute_gpt2"))


BACKBONES: dict = {}


def make(folder, **options):
    """An ActMaxModule on ``folder``'s model, loaded once per folder (frozen, so modules can share it)."""
    from amax_lightning.lightning.module import ActMaxModule
    from amax_lightning.model.backbone import load_backbone

    if str(folder) not in BACKBONES:
        BACKBONES[str(folder)] = load_backbone(str(folder))
    return ActMaxModule(model_name_or_path=str(folder), backbone=BACKBONES[str(folder)], **options)


def run_steps(module, steps: int, record=None):
    """``steps`` search steps of all rows in one chunk (no Trainer); the state after each step via ``record``."""
    state = module.search_state()
    rows = [slice(0, module.n_rows)]
    for step in range(steps):
        state, evaluated = module.search.step(state, rows, step)
        if record is not None:
            record(state, evaluated)
    return state


def hf_objective(folder, token_ids: torch.Tensor, layer: int, unit: int) -> torch.Tensor:
    """Mean over positions of HF ``hidden_states[layer][..., unit]`` for token ids (n, T): the independent reference."""
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(input_ids=token_ids, output_hidden_states=True).hidden_states[layer]
    return hidden[..., unit].mean(dim=-1)


def test_gcg_reaches_coordinatewise_optima_and_the_global_maximum(brute_dir):
    module = make(brute_dir, target=BRUTE_TARGET, n_tokens=2, seeds="0-9", method="gcg", top_k=64, candidates=128,
                  retokenize=False)
    final = run_steps(module, 25).tokens[:, 0]
    every = torch.tensor(list(itertools.product(range(64), repeat=2)))
    scores = hf_objective(brute_dir, every, layer=1, unit=3).view(64, 64)
    for ids in final.tolist():
        here = scores[ids[0], ids[1]]
        assert scores[:, ids[1]].max() <= here and scores[ids[0], :].max() <= here  # no single swap improves
    at_global = sum(bool(scores[i, j] == scores.max()) for i, j in final.tolist())
    assert at_global >= 5, f"{at_global} of 10 seeds at the global maximum"


def test_one_hot_gradient_ranks_tokens_like_an_independent_one_hot_autograd(tiny_gpt2_dir):
    module = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0, 1], method="gcg", top_k=20, retokenize=False)
    tokens = module.search_state().tokens  # (2, 1, 5)
    top = module.search.top_tokens(tokens, [slice(0, 2)])
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    vocab = model.get_input_embeddings().weight
    one_hot = torch.nn.functional.one_hot(tokens[:, 0], vocab.shape[0]).float().requires_grad_()
    hidden = model(inputs_embeds=one_hot @ vocab, output_hidden_states=True).hidden_states[2]
    (gain,) = torch.autograd.grad(hidden[..., 5].mean(dim=-1).sum(), one_hot)
    gain[..., 50256] = -torch.inf  # <|endoftext|> is never allowed
    expected = gain.topk(20, dim=-1)
    picked = gain.gather(-1, top[:, 0])
    torch.testing.assert_close(picked, expected.values, rtol=1e-4, atol=1e-6)


def test_batched_candidate_scores_equal_hf_hidden_states(tiny_gpt2_dir):
    module = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0, 1, 2], method="gcg", retokenize=False)
    tokens = torch.randint(50256, (3, 7, 5), generator=torch.Generator().manual_seed(0))
    activation, _ = module.search.score(tokens, slice(0, 3))
    expected = hf_objective(tiny_gpt2_dir, tokens.flatten(0, 1), layer=2, unit=5).view(3, 7)
    torch.testing.assert_close(activation, expected, rtol=1e-5, atol=1e-6)


def test_epo_cross_entropy_is_the_models_own_next_token_loss(tiny_gpt2_dir):
    module = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0], method="epo", population=2, candidates=4,
                  retokenize=False)
    tokens = torch.randint(50256, (1, 3, 5), generator=torch.Generator().manual_seed(1))
    _, ce = module.search.score(tokens, slice(0, 1))
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        expected = torch.stack([model(input_ids=t[None], labels=t[None]).loss for t in tokens[0]])
    torch.testing.assert_close(ce[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gcg", "epo"])
def test_a_seed_in_a_batch_follows_its_trajectory_alone_and_never_decreases(tiny_gpt2_dir, method):
    options = dict(target=TINY_TARGET, method=method, candidates=16, top_k=32, population=4, restart_every=0)
    batched, alone = make(tiny_gpt2_dir, seeds=[0, 1, 2], **options), make(tiny_gpt2_dir, seeds=[1], **options)
    history = []
    run_steps(batched, 8, lambda state, _: history.append(state))
    final_alone = run_steps(alone, 8)
    assert torch.equal(history[-1].tokens[1], final_alone.tokens[0])
    assert torch.equal(history[-1].activation[1], final_alone.activation[0])
    weights = batched.search.weights(history[0].activation)
    member = [state.activation - (weights * state.cross_entropy if method == "epo" else 0) for state in history]
    for before, after in itertools.pairwise(member):
        assert (after >= before).all()  # each member's own objective never decreases
    assert (member[-1] > member[0]).any()  # and the search moves


def test_epo_restart_moves_every_member_to_the_pools_best_under_the_drawn_penalty(tiny_gpt2_dir):
    """At steps 0, 3, 6 (restart_every 3) every member of a seed is the pool's best under that seed's penalty for
    that step; in between members differ again; a seed in the batch still equals it alone."""
    options = dict(target=TINY_TARGET, method="epo", candidates=16, top_k=32, population=4, restart_every=3,
                   retokenize=False)
    module, alone = make(tiny_gpt2_dir, seeds=[0, 1], **options), make(tiny_gpt2_dir, seeds=[1], **options)
    state = module.search_state()
    rows, differ = [slice(0, 2)], False
    for step in range(7):
        before = state
        state, evaluated = module.search.step(state, rows, step)
        if step % 3:
            differ |= any(not torch.equal(state.tokens[r, 0], state.tokens[r, i]) for r in range(2) for i in range(4))
            continue
        for row, seed in enumerate([0, 1]):
            penalty = restart_penalty(seed, step)
            assert 2.0 / 3 <= penalty <= 6.0
            members = before.activation[row], before.cross_entropy[row]
            if step == 0:  # the initial members are scored inside the first step
                members = module.search.score(before.tokens[row : row + 1], slice(row, row + 1))
                members = members[0][0], members[1][0]
            ok = evaluated.valid[row]
            act = torch.cat([members[0], evaluated.activation[row][ok]])
            ce = torch.cat([members[1], evaluated.cross_entropy[row][ok]])
            best = (act - penalty * ce).max()
            chosen = state.activation[row] - penalty * state.cross_entropy[row]
            torch.testing.assert_close(chosen, best.expand(4), rtol=0, atol=1e-5)
            assert all(torch.equal(state.tokens[row, 0], state.tokens[row, i]) for i in range(4))
    assert differ  # between restarts the members go their own ways
    assert torch.equal(state.tokens[1], run_steps(alone, 7).tokens[0])
    # the penalty decides: a planted pool whose best is child 2 under penalty 1 and child 1 under penalty 2
    from amax_lightning.optimize.search import Evaluated

    planted = state.rows(slice(0, 1))._replace(activation=torch.zeros(1, 4), cross_entropy=torch.zeros(1, 4))
    length = planted.tokens.shape[-1]
    children = Evaluated(torch.stack([torch.full((length,), 7), torch.full((length,), 9)])[None],
                         torch.tensor([[1.0, 3.0]]), torch.tensor([[0.2, 1.5]]), torch.ones(1, 2, dtype=torch.bool))
    for penalty, token in ((1.0, 9), (2.0, 7)):
        picked = module.search._select(planted, children, torch.tensor([penalty]))
        assert (picked.tokens == token).all()
    assert restart_penalty(0, 3) != restart_penalty(1, 3) and restart_penalty(0, 3) == restart_penalty(0, 3)


def test_epo_reports_the_best_sequence_ever_found_even_after_a_restart(tiny_gpt2_dir):
    """Step 3 is a restart (restart_every 3): members may all move below the best point found; the reported
    sequence is the frontier's top, an old checkpoint (no restart_every) is refused, other methods ignore it."""
    from amax_lightning.optimize.search import TokenSearch

    module = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0, 1, 2], method="epo", candidates=16, top_k=32,
                  population=4, restart_every=3, retokenize=False)
    state = run_steps(module, 4)
    tokens, value = TokenSearch.best(state)
    top = state.frontier_activation.argmax(dim=1)
    rows = torch.arange(3)
    assert torch.equal(value, state.frontier_activation[rows, top])
    assert (value >= state.activation.max(dim=1).values).all()
    assert (value > state.activation.max(dim=1).values).any()  # the restart moved some seed's members below it
    found = [bool((state.frontier_tokens[r, top[r]] == tokens[r]).all()) or
             any(bool((state.tokens[r, i] == tokens[r]).all()) for i in range(4)) for r in range(3)]
    assert all(found)
    old = {"hyper_parameters": {k: v for k, v in module.hparams.items() if k != "restart_every"}}
    with pytest.raises(UserError, match="restart_every=0 but this run has restart_every=3"):
        module.check_resumable(old)
    gcg = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0, 1, 2], method="gcg", restart_every=3)
    gcg.check_resumable({"hyper_parameters": {**gcg.hparams, "restart_every": 7}})  # ignored by GCG


def test_epo_frontier_is_exactly_the_non_dominated_evaluated_points(tiny_gpt2_dir):
    module = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0, 1], method="epo", candidates=16, top_k=32,
                  population=4, retokenize=False)
    initial = module.search.score(module.search_state().tokens, slice(0, 2))
    seen = [(initial[0], initial[1])]
    state = run_steps(module, 6, lambda state, ev: seen.append((ev.activation, ev.cross_entropy)))
    act, ce = torch.cat([s[0] for s in seen], dim=1), torch.cat([s[1] for s in seen], dim=1)
    for row in range(2):
        front = torch.isfinite(state.frontier_activation[row])
        fa, fc = state.frontier_activation[row][front], state.frontier_cross_entropy[row][front]
        dominated = lambda a, c, x=act[row], y=ce[row]: bool(((x >= a) & (y <= c) & ((x > a) | (y < c))).any())  # noqa: E731
        assert not any(dominated(a, c) for a, c in zip(fa.tolist(), fc.tolist()))
        expected = {(a, c) for a, c in zip(act[row].tolist(), ce[row].tolist()) if not dominated(a, c)}
        assert set(zip(fa.tolist(), fc.tolist())) == expected
        assert fa.max() == act[row].max()  # the frontier holds the highest activation ever evaluated


def test_pareto_merge_keeps_non_dominated_points_highest_activation_first():
    empty = (torch.full((1, 3), -torch.inf), torch.full((1, 3), torch.inf), torch.zeros(1, 3, 1, dtype=torch.long))
    points = (torch.tensor([[1.0, 3.0, 2.0, 2.0, 3.0]]), torch.tensor([[1.0, 5.0, 2.0, 1.5, 5.0]]),
              torch.arange(5)[None, :, None])
    act, ce, tokens = pareto_merge(empty, points, capacity=4)
    assert act.tolist() == [[3.0, 2.0, 1.0, -torch.inf]] and ce[0, :3].tolist() == [5.0, 1.5, 1.0]
    assert tokens[0, :3, 0].tolist() == [1, 3, 0]  # the duplicate (3, 5) keeps the first; (2, 2) is dominated


def test_retokenization_filter_and_initial_tokens(tiny_gpt2_dir):
    module = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[0, 1, 2], method="gcg", exclude_tokens="13,198")
    search = module.search
    assert search.retokenizes(torch.tensor([[262, 995], [83, 258]])).tolist() == [True, False]  # " the world"; "t"+"he"
    state = module.search_state()
    assert search.retokenizes(state.tokens[:, 0]).all()
    assert not search.allowed[[13, 198, 50256]].any() and int(search.allowed.sum()) == 50257 - 3
    again = make(tiny_gpt2_dir, target=TINY_TARGET, seeds=[2], method="gcg", exclude_tokens="13,198")
    assert torch.equal(again.search_state().tokens[0], state.tokens[2])  # a seed's start is its own


def test_step_generators_are_distinct_and_reproducible():
    draw = lambda seed, step: torch.randint(1000, (4,), generator=step_generator(seed, step)).tolist()  # noqa: E731
    assert draw(0, 0) == draw(0, 0) and draw(0, 0) != draw(0, 1) and draw(0, 1) != draw(1, 0)


def test_exclude_tokens_spec(tmp_path):
    assert parse_exclude_tokens("", 100) == [] and parse_exclude_tokens("3, 7", 100) == [3, 7]
    path = tmp_path / "ids.txt"
    path.write_text("1 2\n3,4\n")
    assert parse_exclude_tokens(str(path), 100) == [1, 2, 3, 4]
    with pytest.raises(UserError, match="'100' is not a token id; allowed: integers 0..99"):
        parse_exclude_tokens("100", 100)
    with pytest.raises(UserError, match="neither comma-separated token ids nor a file"):
        parse_exclude_tokens("nope.txt", 100)


@pytest.mark.parametrize("options, message", [
    ({"method": "gcg", "priors": "clamp"}, "priors clamp act on continuous embeddings"),
    ({"method": "epo", "l2": 0.1}, "drop --model.priors and --model.l2"),
    ({"method": "gcg", "compile_mode": "default"}, "compile_mode 'default' applies to method continuous"),
    ({"method": "beam"}, "method 'beam'"),
    ({"method": "gcg", "top_k": 0}, "top_k"),
    ({"method": "epo", "population": 200, "candidates": 8}, "population"),
    ({"method": "epo", "fluency_weights": []}, "fluency_weights is empty"),
    ({"method": "epo", "fluency_weights": [1.0, -1.0]}, "fluency_weights"),
    ({"method": "epo", "restart_every": -1}, "restart_every -1 is out of range"),
    ({"method": "epo", "fluency_weights": [1e300]}, "fluency_weights"),
    ({"method": "gcg", "exclude_tokens": "\u00b2"}, "is not a token id"),
])
def test_bad_search_options_are_one_line_errors(tiny_gpt2_dir, options, message):
    with pytest.raises(UserError, match=message):
        make(tiny_gpt2_dir, target=TINY_TARGET, **options)


def test_epo_needs_gpt2(tiny_llama_dir):
    with pytest.raises(UserError, match="method 'epo' needs a GPT-2 model"):
        make(tiny_llama_dir, target="blocks.1.hook_resid_pre:3", method="epo")


@pytest.mark.parametrize("target, method", [
    (TINY_TARGET, "gcg"), ("blocks.1.mlp.hook_post:7", "gcg"), ("blocks.2.hook_resid_post:3", "epo"),
    ("blocks.1.attn.hook_v:2.5", "gcg"), ("blocks.0.hook_resid_mid:1", "epo")])
def test_prefix_cached_child_scores_equal_full_scores(tiny_gpt2_dir, target, method):
    """Children scored from their swap position on (the members' keys and values as a prefix) equal full scoring."""
    module = make(tiny_gpt2_dir, target=target, seeds=[0, 1, 2], method=method, candidates=24, top_k=40,
                  population=3, retokenize=False)
    state = module.search_state()
    top = module.search.top_tokens(state.tokens, [slice(0, 3)])
    children, position = module.search.children(state.tokens, top, slice(0, 3), step=0)
    assert set(position.flatten().tolist()) == set(range(5))  # every swap position occurs
    cached = module.search.score_children(state.tokens, children, position, slice(0, 3))
    full = module.search.score(children, slice(0, 3))
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)


def test_token_search_refuses_16_mixed(tiny_gpt2_dir):
    from types import SimpleNamespace

    module = make(tiny_gpt2_dir, target=TINY_TARGET, method="gcg")
    with pytest.raises(UserError, match="precision 16-mixed cannot run method gcg"):
        module.check_trainer(SimpleNamespace(precision="16-mixed", world_size=1))
    module.check_trainer(SimpleNamespace(precision="bf16-mixed", world_size=1))
