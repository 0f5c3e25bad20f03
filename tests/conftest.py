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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ONNXPLAIN_NO_SKIP=1 (set by .ci/run) a skipped test fails: CI installs every
    reference, so a skip there means a reference silently went missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("ONNXPLAIN_NO_SKIP") == "1" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under ONNXPLAIN_NO_SKIP=1: {report.longrepr}"
