"""Shared test helpers."""
import pytest

import contsup.train as train_module


@pytest.fixture
def interrupt_in_second_evaluation(monkeypatch):
    """`arm()` makes train.train raise KeyboardInterrupt in its second evaluation: epoch 0
    is checkpointed, epoch 1 trained but not yet. It returns `restore()`, which puts the real
    evaluate back (monkeypatch does so at the test's end anyway)."""
    def arm():
        real_evaluate, calls = train_module.evaluate, []

        def dying_evaluate(*args):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_evaluate(*args)

        monkeypatch.setattr(train_module, "evaluate", dying_evaluate)
        return lambda: monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    return arm
