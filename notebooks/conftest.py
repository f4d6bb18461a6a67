"""nbval runs the stored notebooks top to bottom (`make test`); the cells it skips say why."""
import pytest

INJECTED = ("papermill's injected parameters, the values `make demo` ran this notebook with: "
            "the tests run the parameters cell's smoke defaults instead")


def pytest_collection_modifyitems(items):
    for item in items:
        tags = getattr(getattr(item, "cell", None), "metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "nbval-skip" in tags:
            item.add_marker(pytest.mark.skip(reason=INJECTED))
