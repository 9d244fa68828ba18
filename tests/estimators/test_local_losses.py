"""Local losses: blocks with heads and detached inputs; each block's forward-gradient estimate
is the one computed on that block alone; activity perturbation, local backprop and local
guesses on the same wrapper; bad blocks and bad closures."""

import pytest
import torch
import torch.nn.functional as F
from exact import expected_output_gradients, output_gradients
from helpers import Doubling
from torch import nn

import forwardgrad as fg
from forwardgrad import tangents as tg

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
BATCH = 5


def sequential():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 8),
        nn.Tanh(),
        nn.Linear(8, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    ).double()


def wrapped(**options):
    return fg.LocalLosses(sequential(), input_shape=(3, 4), num_classes=3, **options)


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (BATCH,), generator=generator)


def block_alone(local, l, x, y):
    """Block l with its head as a model of its own, on its input computed beforehand."""
    with torch.no_grad():
        h = x
        for block in local.blocks[:l]:
            h = block(h)
    last = l == len(local.blocks) - 1
    alone = local.blocks[l] if last else nn.Sequential(local.blocks[l], local.heads[l])
    return alone, lambda: F.cross_entropy(alone(h), y)


# --------------------------------------------------------------------------- the wrapper


def test_blocks_start_at_each_trained_child_and_heads_fit_their_blocks():
    local = wrapped()
    kinds = [[type(m).__name__ for m in block] for block in local.blocks]
    assert kinds == [["Flatten", "Linear", "Tanh"], ["Linear", "ReLU"], ["Linear"]]
    assert [head[1].in_features for head in local.heads] == [8, 7]
    x, y = data()
    assert local.losses(x, y).shape == (3, BATCH)
    torch.testing.assert_close(local.loss(x, y), local.losses(x, y).mean(1).sum())


def test_it_predicts_with_the_models_own_output():
    local = wrapped()
    x, _ = data()
    model = nn.Sequential(*(m for block in local.blocks for m in block))
    torch.testing.assert_close(local(x), model(x))
    x, y = data()
    torch.testing.assert_close(
        local.losses(x, y)[-1], F.cross_entropy(model(x), y, reduction="none")
    )


def test_pool_heads_and_image_blocks_leave_running_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    local = fg.LocalLosses(
        model, input_shape=(1, 6, 6), num_classes=3, blocks=[[0, 1, 2], [3, 4, 5], [6, 7]]
    )
    assert int(model[1].num_batches_tracked) == 0 and model[1].training
    local = fg.LocalLosses(
        model,
        input_shape=(1, 6, 6),
        num_classes=3,
        blocks=[[0, 1, 2], [3, 4, 5], [6, 7]],
        head="pool",
    )
    assert [head[2].in_features for head in local.heads] == [4 * 2 * 2, 4 * 2 * 2]
    assert local.losses(torch.randn(2, 1, 6, 6), torch.tensor([0, 2])).shape == (3, 2)


def test_local_backprop_is_each_blocks_own_gradient():
    local = wrapped()
    x, y = data()
    fg.Backprop().estimate(local, lambda: local.loss(x, y))
    for l in range(len(local.blocks)):
        alone, closure = block_alone(local, l, x, y)
        expected = torch.autograd.grad(closure(), list(alone.parameters()))
        for p, g in zip(alone.parameters(), expected):
            torch.testing.assert_close(p.grad, g)


# --------------------------------------------------------------------------- forward gradients


@PATHS
@pytest.mark.parametrize(("count", "combine"), [(1, "mean"), (3, "mean"), (3, "projection")])
def test_each_blocks_estimate_is_the_one_on_the_block_alone(fast, count, combine):
    local = wrapped()
    x, y = data()
    params = list(local.parameters())
    estimator = fg.ForwardGradient(count, combine=combine, seed=6, fast=fast)
    loss = estimator.estimate(local, lambda: local.losses(x, y))
    assert estimator.last_path == ("fast" if fast else "general"), estimator.last_fallback
    torch.testing.assert_close(loss, local.loss(x, y))
    grads = {id(p): p.grad.clone() for p in params}
    # The same tangents again (a new estimator with the same seed draws the same ones).
    source = fg.ForwardGradient(count, combine=combine, seed=6).source(params)
    tangents = {id(p): source(i).clone() for i, p in enumerate(params)}
    for l in range(len(local.blocks)):
        alone, closure = block_alone(local, l, x, y)
        own = [tangents[id(p)] for p in alone.parameters()]
        d = fg.directional_derivatives(alone, closure, tg.GivenTangents(own_params(alone), own))
        n = sum(p.numel() for p in alone.parameters())
        expected = tg.combine(d.derivatives, own, combine) if combine == "mean" else None
        if expected is None:
            c = tg.projection_coefficients(d.derivatives, tg.gram_matrix(own), n)
            expected = tg.combine_tangents(c, own)
        for p, g in zip(alone.parameters(), expected):
            torch.testing.assert_close(grads[id(p)], g, rtol=1e-9, atol=1e-12)


def own_params(module):
    return list(module.parameters())


@PATHS
@pytest.mark.parametrize("layerwise", [False, True], ids=["shared", "layerwise"])
def test_activity_perturbation_uses_each_layers_own_block(fast, layerwise):
    local = wrapped()
    x, y = data()
    estimator = fg.ActivityPerturbation(tangents=2, seed=8, layerwise=layerwise, fast=fast)
    loss, calls = estimator.output_gradients(local, lambda: local.losses(x, y))
    assert estimator.last_path == ("fast" if fast else "general")
    torch.testing.assert_close(loss, local.loss(x, y))
    linears = [m for m in local.modules() if isinstance(m, nn.Linear)]
    exact = output_gradients(lambda: local.losses(x, y), linears)
    assert [c.layer.group for c in calls] == [0, 0, 1, 1, 2]  # block, head, block, head, last
    # Layerwise, a block's layer and its head take slots 0 and 1; blocks share slots.
    assert [c.layer.slot for c in calls] == ([0, 1, 0, 1, 0] if layerwise else [0] * 5)
    expected = expected_output_gradients(
        exact, [c.u for c in calls], [c.layer.group for c in calls], alone=layerwise
    )
    for call, reference in zip(calls, expected):
        torch.testing.assert_close(call.output_gradient, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "table"),
    [
        (lambda: fg.ForwardGradient(tangents=4, seed=0), True),
        (lambda: fg.ActivityPerturbation(tangents=2, seed=0), True),
        (lambda: fg.ForwardGradient(guess="local"), True),
        (fg.Backprop, False),
    ],
    ids=["forward", "activity", "local-guess", "local-backprop"],
)
def test_every_estimator_trains_the_blocks(make, table):
    x, y = data()
    local, estimator = wrapped(), make()
    optimizer = torch.optim.Adam(local.parameters(), lr=2e-2)
    first = local.loss(x, y).item()
    closure = (lambda: local.losses(x, y)) if table else (lambda: local.loss(x, y))
    for _ in range(30):
        estimator.estimate(local, closure)
        optimizer.step()
    assert local.loss(x, y).item() < 0.7 * first


def test_a_data_parallel_job_sums_each_blocks_loss_and_derivatives():
    local = wrapped()
    x, y = data()
    single = fg.ForwardGradient(tangents=2, seed=3)
    loss = single.estimate(local, lambda: local.losses(x, y))
    grads = [p.grad.clone() for p in local.parameters()]
    ranked = fg.ForwardGradient(tangents=2, seed=3)
    ranked.reducer = Doubling()
    total = ranked.estimate(local, lambda: local.losses(x, y))
    assert ranked.reducer.sizes == [3 * (2 + 1)]  # each block's loss and its K derivatives
    assert ranked.bytes_per_step(local) == 8 * 3 * (2 + 1)
    torch.testing.assert_close(total, 2 * loss)
    for p, g in zip(local.parameters(), grads):
        torch.testing.assert_close(p.grad, 2 * g)


# --------------------------------------------------------------------------- local guesses


@PATHS
def test_local_guesses_project_the_models_gradient_onto_each_blocks_local_gradient(fast):
    local = wrapped()
    x, y = data()
    estimator = fg.ForwardGradient(guess="local", fast=fast)
    loss = estimator.estimate(local, lambda: local.losses(x, y))
    assert estimator.last_path == ("fast" if fast else "general")
    torch.testing.assert_close(loss, F.cross_entropy(local(x), y))
    exact = torch.autograd.grad(F.cross_entropy(local(x), y), list(local.blocks.parameters()))
    exact = dict(zip(map(id, local.blocks.parameters()), exact))
    cosines = []
    for l, block in enumerate(local.blocks):
        alone, closure = block_alone(local, l, x, y)
        guess = dict(
            zip(
                map(id, alone.parameters()),
                torch.autograd.grad(closure(), list(alone.parameters())),
            )
        )
        body = list(block.parameters())
        v = torch.cat([guess[id(p)].flatten() for p in body])
        g = torch.cat([exact[id(p)].flatten() for p in body])
        estimate = torch.cat([p.grad.flatten() for p in body])
        torch.testing.assert_close(estimate, (v @ g) / (v @ v) * v, rtol=1e-9, atol=1e-12)
        cosines.append(float(F.cosine_similarity(estimate, g, 0)))
        if l < len(local.heads):  # heads take their exact local gradient
            for p in local.heads[l].parameters():
                torch.testing.assert_close(p.grad, guess[id(p)])
    # Biased: the earlier blocks lose the part of ∇L orthogonal to their guess; the last is exact.
    assert all(c < 0.999 for c in cosines[:-1]) and cosines[-1] == pytest.approx(1.0)
    assert all(c > 0 for c in cosines)  # ...but each is a descent direction


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("blocks", "words"),
    [
        ([["0", "1"], ["3", "4", "5"]], "do not partition the model"),
        ([[0, 1, 2], [4, 3], [5]], "do not partition the model"),
        ([[0, 1, 2], [2, 3, 4], [5]], "do not partition the model"),
        ([[0, 1, 2], [], [3, 4, 5]], "non-empty list"),
        ([["0", "1", "fc"], ["3", "4", "5"]], "'fc', which is not a child"),
        ([[0, 1, 2], [3, 4, 9]], "position 9"),
        ("0,1", "list of lists"),
    ],
    ids=["missing", "out-of-order", "overlapping", "empty", "unknown", "position", "string"],
)
def test_blocks_that_do_not_partition_the_model(blocks, words):
    with pytest.raises(fg.ConfigurationError, match=words):
        wrapped(blocks=blocks)


def test_other_bad_wrappers():
    with pytest.raises(fg.ConfigurationError, match="needs an nn.Sequential"):
        fg.LocalLosses(nn.Linear(2, 2), input_shape=(2,), num_classes=2)
    with pytest.raises(fg.ConfigurationError, match="unknown head"):
        wrapped(head="mlp")
    local = wrapped(loss=lambda out, y: F.cross_entropy(out, y))
    with pytest.raises(fg.ConfigurationError, match="one loss per example"):
        local.losses(*data())


@pytest.mark.parametrize(
    ("make", "closure", "words"),
    [
        (fg.ForwardGradient, lambda local, x, y: local.losses(x, y)[:2], r"shape \(2, 5\)"),
        (fg.ForwardGradient, lambda local, x, y: local(x), r"shape \(5, 3\)"),
        (fg.ActivityPerturbation, lambda local, x, y: local.losses(x, y).mean(1), r"shape \(3,\)"),
        (fg.ActivityPerturbation, lambda local, x, y: local.loss(x, y), "no per-example"),
        (lambda: fg.ForwardGradient(guess="local"), lambda local, x, y: local.loss(x, y), "3 rows"),
    ],
    ids=["fg-rows", "fg-logits", "activity-no-examples", "activity-scalar", "guess-scalar"],
)
def test_a_closure_of_the_wrong_shape(make, closure, words):
    local = wrapped()
    x, y = data()
    with pytest.raises(fg.ConfigurationError, match=words):
        make().estimate(local, lambda: closure(local, x, y))


def test_a_scalar_closure_takes_the_one_derivative_for_every_block():
    local = wrapped()
    x, y = data()
    fg.ForwardGradient(tangents=2, seed=1).estimate(local, lambda: local.loss(x, y))
    grads = [p.grad.clone() for p in local.parameters()]
    params = list(local.parameters())
    source = fg.ForwardGradient(tangents=2, seed=1).source(params)
    d = fg.directional_derivatives(local, lambda: local.loss(x, y), source).derivatives
    for g, expected in zip(grads, tg.combine(d, source.dense())):
        torch.testing.assert_close(g, expected)


def test_parameters_outside_every_block_and_guesses_without_blocks():
    local = wrapped()
    local.extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    x, y = data()
    with pytest.raises(fg.ConfigurationError, match="extra belong to none of them"):
        fg.ForwardGradient(seed=0).estimate(local, lambda: local.losses(x, y))
    model = sequential()
    with pytest.raises(fg.ConfigurationError, match="needs a model with local losses"):
        fg.ForwardGradient(guess="local").estimate(model, lambda: F.cross_entropy(model(x), y))
    with pytest.raises(fg.ConfigurationError, match="leave tangents at 1"):
        fg.ForwardGradient(tangents=2, guess="local")
    with pytest.raises(fg.ConfigurationError, match="leave rank unset"):
        fg.ForwardGradient(guess="local", rank=2)
    with pytest.raises(fg.ConfigurationError, match="unknown guess"):
        fg.ForwardGradient(guess="global")
    guessing = fg.ForwardGradient(guess="local")
    guessing.reducer = Doubling()
    with pytest.raises(fg.ConfigurationError, match="does not run data-parallel"):
        guessing.estimate(wrapped(), lambda: local.losses(x, y))


@pytest.mark.parametrize("count", [1, 2])
def test_structured_tangents_give_each_block_its_own_estimate_too(count):
    local = wrapped()
    x, y = data()
    params = list(local.parameters())
    fg.ForwardGradient(count, seed=4, rank=1).estimate(local, lambda: local.losses(x, y))
    grads = [p.grad.clone() for p in params]
    source = fg.ForwardGradient(count, seed=4, rank=1).source(params)
    tangents = [source(i).clone() for i in range(len(params))]
    d = fg.directional_derivatives(local, lambda: local.losses(x, y).mean(1), source, vector=True)
    index = {id(p): g for g, group in enumerate(local.loss_groups()) for p in group.params}
    for p, g, v in zip(params, grads, tangents):
        expected = torch.tensordot(d.derivatives[:, index[id(p)]] / count, v, dims=1)
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)


class WithoutStarts(nn.Module):
    """A loss-group model that cannot start at a block: local guesses evaluate every block's
    derivative at once, along G tangents."""

    def __init__(self, local):
        super().__init__()
        self.local = local

    def forward(self, x):
        return self.local(x)

    def losses(self, x, y):
        return self.local.losses(x, y)

    def loss_groups(self):
        return self.local.loss_groups()

    def end_to_end(self):
        return self.local.end_to_end()


def stochastic(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(8, 7), nn.Tanh(), nn.Dropout(0.5),
        nn.Linear(7, 3),
    ).double()  # fmt: skip
    blocks = [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    return fg.LocalLosses(model, input_shape=(3, 4), num_classes=3, blocks=blocks)


def test_local_guesses_block_by_block_equal_all_blocks_at_once():
    local, x, y = wrapped(), *data()
    fg.ForwardGradient(guess="local").estimate(local, lambda: local.losses(x, y))
    block_by_block = [p.grad.clone() for p in local.parameters()]
    other = WithoutStarts(wrapped())
    fg.ForwardGradient(guess="local").estimate(other, lambda: other.losses(x, y))
    for mine, theirs in zip(block_by_block, other.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-10, atol=1e-13)


@PATHS
def test_local_guesses_see_one_forward_of_dropout_and_batch_norm(fast):
    """Each block's derivative from its recorded input sees the masks the guesses saw, and the
    step leaves running statistics and the RNG as one forward does."""
    local, x, y = stochastic(), *data()
    one_forward = stochastic()
    torch.manual_seed(7)
    one_forward.losses(x, y)
    rng_after = torch.get_rng_state()
    reference = stochastic()
    torch.manual_seed(7)  # the local gradients, then ∇L, with the same masks
    guesses = torch.autograd.grad(reference.loss(x, y), list(reference.blocks.parameters()))
    torch.manual_seed(7)
    with reference.end_to_end():
        exact = torch.autograd.grad(
            reference.losses(x, y)[-1].mean(), list(reference.blocks.parameters())
        )
    estimator = fg.ForwardGradient(guess="local", fast=fast, seed=0)  # draws nothing from torch
    torch.manual_seed(7)
    estimator.estimate(local, lambda: local.losses(x, y))
    assert torch.equal(torch.get_rng_state(), rng_after)
    for mine, theirs in zip(local.buffers(), one_forward.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    start = 0
    for block in local.blocks:
        count = len(list(block.parameters()))
        v = torch.cat([g.flatten() for g in guesses[start : start + count]])
        g = torch.cat([g.flatten() for g in exact[start : start + count]])
        estimate = torch.cat([p.grad.flatten() for p in block.parameters()])
        torch.testing.assert_close(estimate, (v @ g) / (v @ v) * v, rtol=1e-9, atol=1e-12)
        start += count


class OwnLoop(fg.LocalLosses):
    """A subclass with its own ``losses`` loop, which records no block entries."""

    def losses(self, x, y):
        rows, h = [], x
        for i, block in enumerate(self.blocks):
            h = block(h.detach() if i > 0 and self._detach else h)
            out = self.heads[i](h) if i < len(self.heads) else h
            rows.append(F.cross_entropy(out, y, reduction="none"))
        return torch.stack(rows)


def test_a_subclass_with_its_own_losses_loop_gets_the_same_local_guesses():
    x, y = data()
    local = wrapped()
    fg.ForwardGradient(guess="local").estimate(local, lambda: local.losses(x, y))
    own = OwnLoop(sequential(), input_shape=(3, 4), num_classes=3)
    fg.ForwardGradient(guess="local").estimate(own, lambda: own.losses(x, y))
    for mine, theirs in zip(local.parameters(), own.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-13)
