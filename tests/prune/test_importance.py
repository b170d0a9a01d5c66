from __future__ import annotations

import torch

from slimline.prune.gradients import default_loss, gradient_statistics
from slimline.prune.importance import fisher_score, obd_score, taylor_score


def test_taylor_predicts_loss_change_of_small_perturbation(tiny_mlp) -> None:
    tiny_mlp.double()
    x, y = torch.randn(32, 32, dtype=torch.float64), torch.randint(0, 4, (32,))
    batch = {"x": x, "labels": y}
    layers = {"fc2": tiny_mlp.fc2}
    stats = gradient_statistics(tiny_mlp, layers, [batch], loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["labels"]))
    g = stats.grad_mean["fc2"]
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(tiny_mlp(x), y)
        delta = 1e-6 * torch.randn_like(tiny_mlp.fc2.weight)
        tiny_mlp.fc2.weight += delta
        moved = torch.nn.functional.cross_entropy(tiny_mlp(x), y)
        tiny_mlp.fc2.weight -= delta
    torch.testing.assert_close(moved - base, (g.double() * delta).sum(), rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(taylor_score(tiny_mlp.fc2.weight, g), (tiny_mlp.fc2.weight.detach().float() * g).abs())


def test_fisher_is_mean_of_squared_batch_gradients(tiny_llama, token_batches) -> None:
    layer = tiny_llama.model.layers[0].mlp.up_proj
    stats = gradient_statistics(tiny_llama, {"up": layer}, token_batches)
    per_batch = []
    for b in token_batches:
        tiny_llama.zero_grad()
        default_loss(tiny_llama, b).backward()
        per_batch.append(layer.weight.grad.clone())
    ref_sq = torch.stack(per_batch).pow(2).mean(0)
    torch.testing.assert_close(stats.grad_sq_mean["up"], ref_sq, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fisher_score(layer.weight, ref_sq), 0.5 * layer.weight.detach() ** 2 * ref_sq)
    # the hook-free accumulation leaves the model's grad flags as they were
    assert layer.weight.requires_grad


def test_hutchinson_diag_on_quadratic_is_exact_in_expectation() -> None:
    """For a loss ½ Σ a_ij w_ij² the Hessian is diagonal (a): z ⊙ Hz = a for every z."""
    layer = torch.nn.Linear(6, 3, bias=False)
    a = torch.rand(3, 6) + 0.5

    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * (a * model.weight**2).sum()

    stats = gradient_statistics(layer, {"w": layer}, [torch.zeros(1)], loss_fn=loss, hutchinson_samples=2)
    torch.testing.assert_close(stats.hessian_diag["w"], a)
    torch.testing.assert_close(obd_score(layer.weight, a), 0.5 * a * layer.weight.detach() ** 2)
