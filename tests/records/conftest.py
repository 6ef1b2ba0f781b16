"""Fixtures of the records tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture()
def server_identity() -> Iterator[None]:
    """What Flower's ServerApp runner sets before a strategy builds messages (the tests run
    ``run_study`` on an in-process grid, outside that runner); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
