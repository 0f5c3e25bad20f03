"""One run key: a stable hash of everything that changes a result.

A result (an attribution, a metric's values on one input) is reused only when its key is
the key of what is asked now: the model's bytes, the method and its resolved options
(defaults included, so writing a default out changes nothing), the metric and its resolved
settings, the target, the input's bytes, the preprocessing, and the onnxplain version
(whose defaults and fixes change results too). `evaluate --resume`, `validate --resume`
and the dataset engine key their records with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

_FILE_DIGESTS: dict = {}  # (path, size, mtime) -> digest: a model hashed once per process


def file_digest(path) -> str:
    """sha256 of a file's bytes."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def model_digest(model) -> str:
    """sha256 of a model given as a path, bytes or an onnx.ModelProto."""
    if isinstance(model, (str, os.PathLike)):
        return file_digest(model)
    if isinstance(model, (bytes, bytearray)):
        return hashlib.sha256(bytes(model)).hexdigest()
    if hasattr(model, "SerializeToString"):
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    raise TypeError(f"cannot hash a model given as {type(model).__name__}")


def canonical(value):
    """A JSON value that is the same for equal settings however they were written: dicts
    sorted, tuples as lists, arrays by their bytes, numpy scalars as Python numbers,
    targets by their spelling."""
    from .target import Target

    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Target):
        return {"target": value.text}
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        return {"array": hashlib.sha256(a.tobytes()).hexdigest(), "shape": list(a.shape), "dtype": str(a.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a run key cannot hold a {type(value).__name__}")


def run_key(**parts) -> str:
    """The hex sha256 of `parts` (model digest, method, options, metric, settings, target,
    input digest, ...) and the onnxplain version."""
    from . import __version__

    text = json.dumps(canonical({**parts, "onnxplain": __version__}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def target_text(target) -> str:
    """A target's spelling for a key: the same for None and 'pred', 3 and '3'."""
    from .target import as_target

    return as_target(target).text


def method_options(method: str, options: dict | None) -> dict:
    """A method's options resolved with its defaults (what the method really runs with)."""
    from .methods.base import get_method

    return get_method(method).resolve(dict(options or {}))


def metric_settings(metric: str, settings: dict | None) -> dict:
    """A metric's settings resolved with its defaults."""
    from .metrics import check_settings, settings_of

    check_settings([metric], {metric: dict(settings or {})})
    return {**settings_of(metric), **(settings or {})}
