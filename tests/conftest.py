import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, exporter) -> (torch model, path of its ONNX export), cached per session."""
    import zoo

    cache = {}
    folder = tmp_path_factory.mktemp("zoo")

    def get(name, exporter):
        key = (name, exporter)
        if key not in cache:
            model = zoo.build(name)
            cache[key] = (model, zoo.export(model, folder / f"{name}_{exporter}.onnx", exporter))
        return cache[key]

    return get
