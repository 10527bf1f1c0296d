import pytest


def pytest_collection_modifyitems(config, items):
    """Group results by case and mode, so each table compares the implementations."""
    for item in items:
        params = item.callspec.params
        item.add_marker(pytest.mark.benchmark(group=f"{params.get('case', '')}-{params.get('mode', '')}"))
