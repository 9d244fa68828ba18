"""The zoo's registry: every case builds at both sizes, deterministically, with a finite loss."""

import math
import subprocess
import sys

import pytest
import torch

from forwardgrad.zoo import CASES, SIZES, ZooCase, get_case
from forwardgrad.zoo.losses import classification_loss

EXPECTED_FAMILIES = {"transformers", "vision", "torch.nn", "recurrent"}


def _available(case):
    reason = case.unavailable()
    if reason is not None:
        pytest.skip(reason)
    return case


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_case_builds_and_its_loss_is_finite(case, size):
    instance = _available(case).instantiate(size)
    assert instance.model.training
    assert any(p.requires_grad for p in instance.model.parameters())
    with torch.no_grad():
        loss = instance.closure()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    # cross-entropy over 10 to 1000 classes of a freshly initialised model: near log(classes)
    assert math.isfinite(loss.item()) and 0 < loss.item() < 20


def test_instances_are_a_function_of_the_seed_alone():
    case = get_case("resnet18")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = case.instantiate("small", seed=3), case.instantiate("small", seed=3)
    c = case.instantiate("small", seed=4)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert torch.equal(a.batch[0], b.batch[0])
    assert not torch.equal(a.batch[0], c.batch[0])


def test_dtype_casts_the_model_and_the_floating_inputs_only():
    instance = get_case("lstm-packed").instantiate("small", torch.float64)
    assert all(p.dtype == torch.float64 for p in instance.model.parameters())
    tokens, lengths, labels = instance.batch
    assert tokens.dtype == lengths.dtype == labels.dtype == torch.int64
    images, _ = get_case("vit").instantiate("small", torch.float64).batch
    assert images.dtype == torch.float64


def test_the_zoo_covers_the_architectures_users_train():
    assert {case.family for case in CASES.values()} == EXPECTED_FAMILIES
    for name in ["gpt2", "bert", "t5", "bart", "llama", "mistral", "hf-vit"]:
        assert {f"{name}-eager", f"{name}-sdpa"} <= set(CASES)
    assert len(CASES) >= 30


def test_bad_names_and_sizes_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown zoo case 'resnet-9000'; choose one of"):
        get_case("resnet-9000")
    with pytest.raises(ValueError, match="unknown zoo size 'huge'; choose one of small, bench"):
        get_case("resnet18").instantiate("huge")


def test_a_case_with_a_missing_dependency_says_how_to_install_it():
    case = ZooCase(
        "needs-nothing-real",
        "vision",
        lambda size: (torch.nn.Linear(2, 3), (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))),
        classification_loss,
        requires=("a_module_that_is_not_installed",),
    )
    reason = case.unavailable()
    assert "a_module_that_is_not_installed" in reason and ".[zoo]" in reason
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        case.instantiate("small")


def test_the_library_core_imports_neither_the_zoo_nor_transformers():
    code = (
        "import sys, forwardgrad;"
        "assert not any(m.startswith(('forwardgrad.zoo', 'transformers')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
