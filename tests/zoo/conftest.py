"""The zoo's tests run their small models on one thread: on a busy 2-core machine two OpenMP
threads per tiny operation cost 10-30x more than one (they wait for each other)."""

import pytest

from forwardgrad.zoo.harness import threads


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):
        yield
