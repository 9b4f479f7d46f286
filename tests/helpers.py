"""Small models, data and the exact float64 reference that every test compares with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import TwiceDifferentiable


def classification_data(n: int, features: int = 5, classes: int = 3, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=dtype)
    weights = torch.randn(features, classes, generator=generator, dtype=dtype)
    logits = x @ weights + 0.5 * torch.randn(n, classes, generator=generator, dtype=dtype)
    return x, logits.argmax(1)


def loader(x: Tensor, y: Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def linear_model(features: int = 5, classes: int = 3, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(features, classes).to(dtype)


def mlp_model(features: int = 5, hidden: int = 8, classes: int = 3, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def fitted(module: nn.Module, x: Tensor, y: Tensor, steps: int = 200, weight_decay: float = 1e-2) -> nn.Module:
    """A few full-batch L-BFGS steps so the model sits near a minimum, as after training."""
    optimizer = torch.optim.LBFGS(module.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(module(x), y) + weight_decay / 2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return module


class ExactReference:
    """Influence by definition, in float64, independent of the engine: explicit Hessian by
    torch.func.hessian of the mean training loss and torch.linalg.solve."""

    def __init__(self, module: nn.Module, x: Tensor, y: Tensor, regularization: float, names=None) -> None:
        self.module = module.double()
        named = dict(self.module.named_parameters())
        self.names = list(names) if names is not None else list(named)
        self.shapes = [named[n].shape for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.hessian = hessian(self._loss)(self.theta, x.double(), y)
        self.matrix = self.hessian + regularization * torch.eye(self.theta.numel(), dtype=torch.float64)

    def _loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        state = {n: p.detach() for n, p in self.module.named_parameters()}
        state.update(self.module.named_buffers())
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            state[name] = theta[offset : offset + size].view(shape)
            offset += size
        return F.cross_entropy(functional_call(self.module, state, (x,)), y)

    def grads(self, x: Tensor, y: Tensor) -> Tensor:
        one = lambda theta, xi, yi: self._loss(theta, xi[None], yi[None])  # noqa: E731
        return vmap(grad(one), in_dims=(None, 0, 0))(self.theta, x.double(), y)

    def factors(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.linalg.solve(self.matrix, self.grads(x, y).T).T

    def up(self, x_test: Tensor, y_test: Tensor, x_train: Tensor, y_train: Tensor) -> Tensor:
        return self.factors(x_test, y_test) @ self.grads(x_train, y_train).T


def reference_ggn(module: nn.Module, x: Tensor, y: Tensor, loss: str = "cross_entropy") -> Tensor:
    """The Gauss–Newton matrix (1/N) Σᵢ Jᵢᵀ Hᵢ Jᵢ by definition, in the flat parameter order: Jᵢ the Jacobian of
    example i's (flattened) outputs by `jacrev`, Hᵢ the loss's Hessian in them written out (softmax diagonal minus
    its outer product for cross-entropy, 2/K · I for the mean squared error over K outputs)."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def outputs(t: Tensor, xi: Tensor) -> Tensor:
        state, offset = {}, 0
        for name, shape in zip(names, shapes):
            state[name] = t[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return functional_call(module, state, (xi[None],))[0].reshape(-1)

    jacobians = vmap(jacrev(outputs), in_dims=(None, 0))(theta, x)  # [N, K, p]
    logits = vmap(outputs, in_dims=(None, 0))(theta, x).detach()
    if loss == "cross_entropy":
        probabilities = logits.softmax(-1)
        curvature = torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
    else:
        k = logits.shape[1]
        curvature = 2.0 / k * torch.eye(k, dtype=x.dtype).expand(len(x), k, k)
    return torch.einsum("nkp,nkl,nlq->pq", jacobians, curvature, jacobians) / len(x)
