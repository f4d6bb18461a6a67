"""Shared test helpers.

Every test process (and each process or notebook kernel a test starts, which inherit the
environment) runs torch on one thread unless OMP_NUM_THREADS says otherwise: the nets are
tiny, so more threads buy little, and on a machine shared with other jobs OpenMP threads
that wait for each other's cores can make a test many times slower. The verdicts do not
depend on it; the tests that compare floats across processes pin the threads themselves.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch is imported (by the line below)

import pytest  # noqa: E402

import contsup.train as train_module  # noqa: E402


def arm_second_evaluation_interrupt(monkeypatch) -> callable:
    """Make train.train raise KeyboardInterrupt in its second evaluation (through
    `monkeypatch`): epoch 0 is checkpointed, epoch 1 trained but not yet. Returns `restore()`,
    which puts the real evaluate back (monkeypatch does so when it is undone anyway)."""
    real_evaluate, calls = train_module.evaluate, []

    def dying_evaluate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(train_module, "evaluate", dying_evaluate)
    return lambda: monkeypatch.setattr(train_module, "evaluate", real_evaluate)


@pytest.fixture(scope="session")
def second_evaluation_interrupt():
    """`arm_second_evaluation_interrupt`, for fixtures wider than a test (they bring their own
    `pytest.MonkeyPatch.context()`)."""
    return arm_second_evaluation_interrupt


@pytest.fixture
def interrupt_in_second_evaluation(monkeypatch):
    """`arm()` makes train.train raise KeyboardInterrupt in its second evaluation: epoch 0
    is checkpointed, epoch 1 trained but not yet. It returns `restore()`, which puts the real
    evaluate back (monkeypatch does so at the test's end anyway)."""
    return lambda: arm_second_evaluation_interrupt(monkeypatch)
