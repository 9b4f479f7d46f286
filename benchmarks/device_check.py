"""Checks that the engine and the callback run on an accelerator and agree with the CPU.

For every registered inversion method, factors and up-influence scores on a small tanh MLP are computed on
the CPU in float64 (the reference) and on the chosen device in float64 and float32, and the relative
differences printed as a markdown table with wall times. Then the callback runs inside a real
`Trainer(accelerator=<device>)` and its top indices are compared with the functional API's. Exits non-zero
when a difference exceeds its tolerance.

    python benchmarks/device_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import Solver, TwiceDifferentiable, compute_influence_factors, compute_influences_up

OPTIONS = {
    "direct": {},
    "cg": {"rtol": 1e-8, "maxiter": 2000},
    "lissa": {},
    "arnoldi": {"rank": 50},
    "ekfac": {},
    "nystroem": {"rank": 50},
}
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-2}
LAMBDA = 1e-2


def digits_problem(n_train: int = 600, n_query: int = 20):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    optimizer = torch.optim.LBFGS(module.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(module(x[:n_train]), y[:n_train])
        loss = loss + LAMBDA / 2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return module, (x[:n_train], y[:n_train]), (x[n_train : n_train + n_query], y[n_train : n_train + n_query])


def run(module, train, query, method, device, dtype):
    module = module.to(device=device, dtype=dtype)
    model = TwiceDifferentiable(module, F.cross_entropy)
    train_loader = DataLoader(TensorDataset(train[0].to(dtype), train[1]), batch_size=200)
    query_loader = DataLoader(TensorDataset(query[0].to(dtype), query[1]), batch_size=20)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    factors = compute_influence_factors(model, train_loader, query_loader, method, hessian_perturbation=LAMBDA,
                                        **OPTIONS.get(method, {}))
    scores = compute_influences_up(model, train_loader, factors)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return scores.double().cpu(), time.perf_counter() - start


def check_methods(device: torch.device, methods: list[str]) -> bool:
    module, train, query = digits_problem()
    print(f"| method | CPU float64 s | {device.type} float64 s | rel. diff | {device.type} float32 s | rel. diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    ok = True
    for method in methods:
        reference, cpu_seconds = run(module, train, query, method, torch.device("cpu"), torch.float64)
        cells = [method, f"{cpu_seconds:.2f}"]
        for dtype in (torch.float64, torch.float32):
            scores, seconds = run(module, train, query, method, device, dtype)
            difference = float((scores - reference).norm() / reference.norm())
            ok &= difference < TOLERANCE[dtype]
            cells += [f"{seconds:.2f}", f"{difference:.1e}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    return ok


def check_callback(device: torch.device) -> bool:
    import pytorch_lightning as pl

    from lightning_influence import InfluenceCallback

    class Digits(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
            self.loss_fn = F.cross_entropy

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return self.loss_fn(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", self.loss_fn(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-3)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = TensorDataset(x[:800], y[:800])
    val = TensorDataset(x[800:900], y[800:900])
    torch.manual_seed(0)
    module = Digits()
    with tempfile.TemporaryDirectory() as folder:
        callback = InfluenceCallback(method="direct", hessian_regularization=0.1,
                                     num_queries=5, top_k=5, self_influence=True, save_dir=f"{folder}/influence")
        trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else device.type, devices=1, max_epochs=10,
                             default_root_dir=folder, callbacks=[callback], enable_progress_bar=False)
        start = time.perf_counter()
        trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=64))
        seconds = time.perf_counter() - start
        result = callback.result
        model = TwiceDifferentiable(module.net.cpu(), F.cross_entropy)
        factors = compute_influence_factors(model, DataLoader(train, batch_size=200), DataLoader(
            TensorDataset(x[800:805], y[800:805])), "direct", hessian_perturbation=0.1)
        scores = compute_influences_up(model, DataLoader(train, batch_size=200), factors)
    agree = all(
        set(result.top_helpful(q, 5).indices.tolist()) == set(scores[q].topk(5).indices.tolist())
        for q in range(5)
    )
    print(f"\ncallback on {device}: fit + influence {seconds:.1f} s; top-5 helpful agree with the CPU "
          f"functional API: {agree}")
    return agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=sorted(m.value for m in Solver.registry))
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}\n")
    ok = check_methods(device, arguments.methods)
    ok &= check_callback(device)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
