"""Local learning on MNIST: weight- and activity-perturbed forward gradients, local losses, local
guesses and backprop on the paper's MLP, side by side.

Each method trains the MLP 784-1024-1024-10 (ReLU) from the same initialisation on the same
batches, at the learning rate of its grid that gives the best accuracy on a held-out 5,000
training images after a short sweep run, then for the full budget; it reports test accuracy and
the cosine similarity between its estimate and the true gradient of the loss it targets (the
end-to-end loss, or the sum of the local losses), on the training batches every few steps.

    python benchmarks/bench_local.py --steps 500 --sweep-steps 100 --threads 1   # the table
    python benchmarks/bench_local.py --optimizer momentum --lrs 0.001,0.003,0.01
    python benchmarks/bench_local.py --steps 300 --methods backprop,activity+local
    # the paper's setting (SGD, η = 2e-4 decaying as exp(-i·1e-4)), dense against rank-1 tangents;
    # --depth 0 is logistic regression
    python benchmarks/bench_local.py --optimizer sgd --lrs 2e-4 --methods forward,forward-rank1

Prints a Markdown table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import forwardgrad as fg
from forwardgrad.estimators.tables import LossGroup
from forwardgrad.experiments.batches import normalize, pixel_stats
from forwardgrad.experiments.datasets import load_dataset

HIDDEN, CLASSES = 1024, 10


@dataclass(frozen=True)
class Method:
    """How a method builds its estimator and closure, and which loss its estimate targets."""

    local: bool | int  # trains LocalLosses(mlp) (True) or GroupedLocalMLP (groups) instead
    make: Callable[[int], fg.Estimator]
    closure: str  # "mean", "per-example", "table" or "local-sum"
    lrs: tuple[float, ...]  # Adam learning rates to sweep
    target: str  # "end-to-end", "local" or "guess"


METHODS = {
    "backprop": Method(False, lambda s: fg.Backprop(), "mean", (3e-4, 1e-3, 3e-3), "end-to-end"),
    "forward": Method(
        False, lambda s: fg.ForwardGradient(seed=s), "mean", (3e-6, 1e-5, 3e-5), "end-to-end"
    ),
    "forward-rank1": Method(
        False,
        lambda s: fg.ForwardGradient(seed=s, rank=1),
        "mean",
        (3e-6, 1e-5, 3e-5),
        "end-to-end",
    ),
    "forward-rademacher": Method(
        False,
        lambda s: fg.ForwardGradient(seed=s, distribution="rademacher"),
        "mean",
        (3e-6, 1e-5, 3e-5),
        "end-to-end",
    ),
    "forward-rank1-rademacher": Method(
        False,
        lambda s: fg.ForwardGradient(seed=s, distribution="rademacher", rank=1),
        "mean",
        (3e-6, 1e-5, 3e-5),
        "end-to-end",
    ),
    "activity": Method(
        False,
        lambda s: fg.ActivityPerturbation(seed=s),
        "per-example",
        (1e-4, 3e-4, 1e-3),
        "end-to-end",
    ),
    "activity-layerwise": Method(
        False,
        lambda s: fg.ActivityPerturbation(seed=s, layerwise=True),
        "per-example",
        (1e-4, 3e-4, 1e-3),
        "end-to-end",
    ),
    "forward+local": Method(
        True, lambda s: fg.ForwardGradient(seed=s), "table", (1e-5, 3e-5, 1e-4), "local"
    ),
    "activity+local": Method(
        True, lambda s: fg.ActivityPerturbation(seed=s), "table", (1e-4, 3e-4, 1e-3), "local"
    ),
    "activity+local-layerwise": Method(
        True,
        lambda s: fg.ActivityPerturbation(seed=s, layerwise=True),
        "table",
        (1e-4, 3e-4, 1e-3),
        "local",
    ),
    "activity+grouped-layerwise": Method(
        16,
        lambda s: fg.ActivityPerturbation(seed=s, layerwise=True),
        "table",
        (1e-4, 3e-4, 1e-3),
        "local",
    ),
    "grouped-local-backprop": Method(
        16, lambda s: fg.Backprop(), "local-sum", (3e-4, 1e-3, 3e-3), "local"
    ),
    "local-guess": Method(
        True, lambda s: fg.ForwardGradient(guess="local"), "table", (3e-4, 1e-3, 3e-3), "guess"
    ),
    "local-backprop": Method(
        True, lambda s: fg.Backprop(), "local-sum", (3e-4, 1e-3, 3e-3), "local"
    ),
}


class GroupedLocalMLP(nn.Module):
    """The MLP with each hidden layer cut into ``groups`` slices of units, each slice its own
    Linear with its own head and local loss (the grouped local losses of Ren et al. 2023): a
    slice's loss sees 1024 / groups activations, not 1024. It speaks the loss-group protocol
    (``losses``, ``loss``, ``loss_groups``) that ``LocalLosses`` does."""

    def __init__(self, depth: int, groups: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        width, size = 28 * 28, HIDDEN // groups
        self.layers, self.heads = nn.ModuleList(), nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList(nn.Linear(width, size) for _ in range(groups)))
            self.heads.append(nn.ModuleList(nn.Linear(size, CLASSES) for _ in range(groups)))
            width = HIDDEN
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = torch.cat([torch.relu(m(h)) for m in layer], 1)
        return self.out(h)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, h = [], x.flatten(1)
        for layer, heads in zip(self.layers, self.heads):
            slices = [torch.relu(m(h)) for m in layer]
            rows += [F.cross_entropy(a(z), y, reduction="none") for a, z in zip(heads, slices)]
            h = torch.cat(slices, 1).detach()
        return torch.stack([*rows, F.cross_entropy(self.out(h), y, reduction="none")])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.losses(x, y).mean(1).sum()

    def loss_groups(self) -> list[LossGroup]:
        groups = [
            LossGroup(tuple(m.parameters()), tuple(a.parameters()))
            for layer, heads in zip(self.layers, self.heads)
            for m, a in zip(layer, heads)
        ]
        return [*groups, LossGroup(tuple(self.out.parameters()), ())]


def mlp(depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for _ in range(depth):
        layers += [nn.Linear(width, HIDDEN), nn.ReLU()]
        width = HIDDEN
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


def build(method: Method, depth: int, seed: int) -> nn.Module:
    if method.local is not True and method.local:
        return GroupedLocalMLP(depth, method.local, seed)
    model = mlp(depth, seed)
    if method.local:
        return fg.LocalLosses(model, input_shape=(1, 28, 28), num_classes=CLASSES)
    return model


def make_closure(method: Method, model: nn.Module, x, y) -> Callable[[], torch.Tensor]:
    if method.closure == "mean":
        return lambda: F.cross_entropy(model(x), y)
    if method.closure == "per-example":
        return lambda: F.cross_entropy(model(x), y, reduction="none")
    if method.closure == "table":
        return lambda: model.losses(x, y)
    return lambda: model.loss(x, y)


def target_gradient(method: Method, model: nn.Module, x, y) -> list[torch.Tensor]:
    """The exact gradient of the loss the method's estimate targets, by autograd."""
    params = list(model.parameters())
    with torch.enable_grad():
        if method.target == "end-to-end":
            return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))
        local = torch.autograd.grad(model.loss(x, y), params)
        if method.target == "local":
            return list(local)
        body = list(model.blocks.parameters())  # guess: ∇L for the blocks, local for heads
        exact = dict(zip(map(id, body), torch.autograd.grad(F.cross_entropy(model(x), y), body)))
        return [exact.get(id(p), g) for p, g in zip(params, local)]


def end_to_end_gradient(model: nn.Module, x, y) -> list[torch.Tensor]:
    """∇ of the model's own loss w.r.t. the wrapped model's parameters (heads excluded)."""
    if hasattr(model, "blocks"):
        body = list(model.blocks.parameters())
    elif hasattr(model, "heads"):
        body = [*model.layers.parameters(), *model.out.parameters()]
    else:
        body = list(model.parameters())
    with torch.enable_grad():
        return list(torch.autograd.grad(F.cross_entropy(model(x), y), body)), body


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a = torch.cat([t.flatten() for t in a]).double()
    b = torch.cat([t.flatten() for t in b]).double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        correct = sum(
            int((model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(labels), 1000)
        )
    return correct / len(labels)


def train(method, data, args, lr, steps, measure):
    """Train from the common initialisation; return the model, cosines and ms per step."""
    images, labels = data
    model = build(method, args.depth, args.seed)
    estimator = method.make(args.seed)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:  # SGD with momentum 0.9, or the paper's plain SGD
        momentum = 0.9 if args.optimizer == "momentum" else 0.0
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    decay = 1e-4 if args.optimizer == "sgd" else 0.0  # the paper's η₀·exp(−i·10⁻⁴)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: math.exp(-i * decay))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    cos_target, cos_global, times = [], [], []
    for step in range(steps):
        start = (step * args.batch) % (len(labels) - args.batch)
        batch = order[start : start + args.batch]
        x, y = images[batch], labels[batch]
        began = time.perf_counter()
        try:
            estimator.estimate(model, make_closure(method, model, x, y))
        except fg.NonFiniteLoss:  # diverged: evaluated as it stands
            break
        times.append(time.perf_counter() - began)
        if measure and step % args.cos_every == 0:
            grads = [p.grad.clone() for p in model.parameters()]
            cos_target.append(cosine(grads, target_gradient(method, model, x, y)))
            exact, body = end_to_end_gradient(model, x, y)
            cos_global.append(cosine([p.grad for p in body], exact))
        optimizer.step()
        schedule.step()
    return model, cos_target, cos_global, 1e3 * statistics.median(times[1:] or times or [0])


def sweep(method, train_data, held_out, args) -> tuple[float, dict[float, float]]:
    """The learning rate of the grid with the best held-out accuracy after a short run."""
    found = {}
    for lr in [float(v) for v in args.lrs.split(",")] if args.lrs else method.lrs:
        began = time.perf_counter()
        model, *_ = train(method, train_data, args, lr, args.sweep_steps, measure=False)
        found[lr] = accuracy(model, *held_out)
        print(
            f"  sweep lr {lr:g}: {found[lr]:.3f} ({time.perf_counter() - began:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return max(found, key=lambda lr: (found[lr], -lr)), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--depth", type=int, default=2, help="hidden layers of 1024")
    parser.add_argument("--steps", type=int, default=938, help="938 = one epoch at batch 64")
    parser.add_argument("--sweep-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cos-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=("adam", "momentum", "sgd"), default="adam")
    parser.add_argument("--lrs", help="comma-separated learning rates for every method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset("mnist", args.data_dir, download=False)
    mean, std = pixel_stats(dataset.train_images[:-5000])
    images = normalize(dataset.train_images, mean, std)
    train_data = (images[:-5000], dataset.train_labels[:-5000])
    held_out = (images[-5000:], dataset.train_labels[-5000:])
    test = (normalize(dataset.test_images, mean, std), dataset.test_labels)
    print(
        f"MLP 784-{'-'.join(['1024'] * args.depth)}-10, batch {args.batch}, {args.optimizer}, "
        f"{args.steps} steps, sweep {args.sweep_steps} steps, seed {args.seed}\n"
    )
    print(
        "| method | lr (sweep: held-out acc) | test acc | cos to its target | "
        "cos to ∇L end-to-end | ms/step |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        method = METHODS[name]
        lr, found = sweep(method, train_data, held_out, args)
        model, cos_t, cos_g, ms = train(method, train_data, args, lr, args.steps, measure=True)
        grid = ", ".join(f"{k:g}: {v:.3f}" for k, v in found.items())
        print(
            f"| {name} | {lr:g} ({grid}) | {accuracy(model, *test):.4f} | "
            f"{_mean(cos_t)} | {_mean(cos_g)} | {ms:.1f} |",
            flush=True,
        )


def _mean(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{statistics.mean(finite):.3f}" if finite else "n/a"


if __name__ == "__main__":
    main()
