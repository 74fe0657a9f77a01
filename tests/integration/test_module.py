"""The Lightning run against an independent plain-PyTorch loop, batching honesty, eval mode, slim checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TARGET
from lightning.pytorch import Callback
from transformers import AutoModel

from amax_lightning.lightning.module import ActMaxModule

LAYER, UNIT, N_TOKENS, LR, STEPS = 2, 5, 5, 1e-2, 30


def reference_study(folder, seeds, steps=STEPS, l2=0.0):
    """The protocol as a course notebook writes it: one seed at a time, batch 1, full HF forward, Adam."""
    model = AutoModel.from_pretrained(folder).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wte = model.get_input_embeddings().weight
    out = {}
    for seed in seeds:
        x = (torch.randn(N_TOKENS, wte.shape[1], generator=torch.Generator().manual_seed(seed)) * wte.std()).requires_grad_()
        opt = torch.optim.Adam([x], lr=LR)
        for _ in range(steps):
            act = model(inputs_embeds=x[None], output_hidden_states=True).hidden_states[LAYER][0, :, UNIT]
            loss = -act.mean() + l2 * x.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = model(inputs_embeds=x[None], output_hidden_states=True).hidden_states[LAYER][0, :, UNIT]
            tokens = (F.normalize(x, dim=-1) @ F.normalize(wte, dim=-1).T).argmax(-1)
        out[seed] = (x.detach(), tokens.tolist(), final.tolist())
    return out


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_lightning_run_equals_plain_pytorch_reference(tiny_gpt2_dir, fit_tiny, l2):
    seeds = [0, 3]
    module, results = fit_tiny(seeds=seeds, steps=STEPS, lr=LR, l2=l2, n_tokens=N_TOKENS)
    reference = reference_study(tiny_gpt2_dir, seeds, l2=l2)
    for i, run in enumerate(results["runs"]):
        x_ref, tokens_ref, final_ref = reference[run["seed"]]
        torch.testing.assert_close(module.parameter[i].detach(), x_ref, rtol=1e-4, atol=1e-5)
        assert run["token_ids"] == tokens_ref
        torch.testing.assert_close(torch.tensor(run["position_activations"]), torch.tensor(final_ref), rtol=1e-4, atol=1e-5)
    assert results["steps"] == STEPS
    assert list(results) == ["model", "target", "aggregate", "priors", "n_tokens", "steps", "partial", "lr", "l2",
                             "seeds", "init_scale", "vocab_norm", "numerics", "runs", "uniqueness", "reproducibility",
                             "null_model", "method", "logit_effects", "convergence"]  # the schema users read, in order
    assert list(results["convergence"]) == ["snapshots", "stable_since", "stopped_at", "stop_reason", "verdict"]
    assert list(results["convergence"]["snapshots"][0]) == ["step", "n_unique", "changed_fraction", "mean_objective"]
    assert list(results["runs"][0]) == ["seed", "token_ids", "tokens", "cosine", "final_activation",
                                        "position_activations", "decoded_activation", "decoded_position_activations",
                                        "decoded_gap", "embedding_norm", "nearest"]
    for run in results["runs"]:  # the 5 nearest tokens per position, best first; the first is the decoded token
        assert [near[0]["token_id"] for near in run["nearest"]] == run["token_ids"]
        assert [near[0]["cosine"] for near in run["nearest"]] == pytest.approx(run["cosine"], abs=1e-6)
        for near in run["nearest"]:
            cosines = [n["cosine"] for n in near]
            assert len(near) == 5 and cosines == sorted(cosines, reverse=True)
    moved = (module.parameter[0].detach() - reference_study(tiny_gpt2_dir, [0], steps=0)[0][0]).abs().max()
    assert moved > 0.05  # the optimizer really moved the embedding


class AssertEvalMode(Callback):
    """Fails the run if any backbone module is in training mode when a step starts."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        assert not any(m.training for m in module.backbone.modules())


def test_seed_in_batch_equals_seed_alone(fit_tiny):
    batched, batched_results = fit_tiny("batch", seeds=[4, 1, 9], steps=STEPS, lr=LR, callbacks=[AssertEvalMode()])
    alone, alone_results = fit_tiny("alone", seeds=[1], steps=STEPS, lr=LR)
    torch.testing.assert_close(batched.parameter[1].detach(), alone.parameter[0].detach(), rtol=1e-5, atol=1e-6)
    run_in_batch = next(r for r in batched_results["runs"] if r["seed"] == 1)
    assert run_in_batch["token_ids"] == alone_results["runs"][0]["token_ids"]
    assert [r["seed"] for r in batched_results["runs"]] == [1, 4, 9]  # runs sorted by seed


def test_initial_embedding_is_the_protocols(tiny_gpt2_dir):
    module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=TINY_TARGET, seeds=[5, 2])
    wte = module.backbone.model.get_input_embeddings().weight
    expected = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)) * wte.std()
    torch.testing.assert_close(module.parameter[1].detach(), expected, rtol=0, atol=0)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["parameter"]


def test_checkpoint_holds_the_embedding_not_the_backbone(fit_tiny, tmp_path):
    fit_tiny(seeds=[0], steps=3, trainer_options={"enable_checkpointing": True})
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert list(state) == ["parameter"]
