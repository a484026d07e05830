"""The one way per-call state reaches the modules a wrapper placed inside a model.

A wrapper (``doeify``'s :class:`~doe_ext.integrations.hf.DoEWrapper`, DMoE's experts, the residual
capture) puts its own modules inside a model it does not own and then calls that model's forward,
whose signature it cannot extend. What one call needs (the DoE knowledge step, the experts active for
each row, where to keep a captured tensor) is opened as a scope around the call, and the wrapped
modules read it::

    scope = Scope("doe_call")
    with scope(state):            # the wrapper, around the base model's forward
        out = base_model(...)
    scope.get()                   # a wrapped module, inside it: ``state`` (None outside any block)

A scope is a context variable: blocks nest (the inner state wins until it closes), each thread and
asyncio task sees its own, and the state is gone when the block ends, by an exception too.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Scope(Generic[T]):
    """Per-call state of one kind: ``with scope(state):`` opens it, ``scope.get()`` reads it."""

    def __init__(self, name: str):
        self.name = name
        self._var: contextvars.ContextVar[T | None] = contextvars.ContextVar(name, default=None)

    @contextlib.contextmanager
    def __call__(self, state: T | None) -> Iterator[T | None]:
        token = self._var.set(state)
        try:
            yield state
        finally:
            self._var.reset(token)

    def get(self) -> T | None:
        """The state of the innermost open block (None outside any)."""
        return self._var.get()

    def __repr__(self) -> str:
        return f"Scope({self.name!r})"
