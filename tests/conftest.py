"""Suite-wide test settings.

One intra-op thread: the tests run many small tensor operations, and on a 2-core machine that is
busy with anything else two threads spin-wait on each other (measured here: tiny forwards 9x
slower, the sampler 20x slower). One thread is never much slower for these sizes.
"""

import pytest
import torch
from helpers import small_construction, small_standard, small_task

torch.set_num_threads(1)


# The small task and models of helpers.py, one instance per test module (a module may edit them).
@pytest.fixture(scope="module")
def task():
    return small_task()


@pytest.fixture(scope="module")
def construction(task):
    return small_construction(task)


@pytest.fixture(scope="module")
def standard():
    return small_standard()
