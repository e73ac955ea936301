"""The unit tier's rule, checked: no Ray, no servers. A test here that asks for the session's Ray
or a server is a collection error naming it; one that started Ray anyway fails at teardown."""

import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent

# The fixtures that start or join something long-lived: they belong to tests/e2e.
SERVERS = {"ray_local", "moto_server", "s3", "mlflow_server"}


def pytest_collection_modifyitems(items):
    wrong = [f"{item.nodeid} uses {', '.join(sorted(SERVERS & set(item.fixturenames)))}" for item in items
             if UNIT in Path(item.path).parents and SERVERS & set(getattr(item, "fixturenames", ()))]
    if wrong:
        raise pytest.UsageError("tests/unit starts no Ray and no server; move these to tests/e2e:\n  " + "\n  ".join(wrong))


@pytest.fixture(autouse=True)
def no_ray_started():
    yield
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "a unit test started Ray: it belongs to tests/e2e"
