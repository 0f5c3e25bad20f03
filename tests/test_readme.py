"""The README's shell examples run as written: every `onnxplain ...` line of its bash blocks
that names only bundled files (no placeholders such as MODEL or model.onnx) is executed, in
a scratch folder holding a link to models/, and must exit 0."""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxplain import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _lines():
    text = README.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M):
        current = ""
        for raw in block.splitlines():
            current += raw.rstrip("\\").strip() + " "
            if raw.rstrip().endswith("\\"):
                continue
            line, current = current.split(" # ")[0].strip(), ""
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("onnxplain"):
                    out.append(part)
    return out


def _runnable(line: str) -> bool:
    """Only bundled files, no placeholders, no pipes or shell syntax."""
    if any(c in line for c in "|[]<>$`") or re.search(r"\b[A-Z]{3,}\b", line):
        return False
    args = shlex.split(line)[1:]
    for before, a in zip([""] + args, args):
        written = before in ("-o", "--out", "--report", "--plot")  # an output the example writes
        if re.search(r"\.(onnx|png|jpe?g|npy|npz|json)$", a) and not written and not (ROOT / a).exists():
            return False
    return True


LINES = _lines()
RUNNABLE = [line for line in LINES if _runnable(line)]


def test_the_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 8, RUNNABLE


@pytest.mark.parametrize("line", RUNNABLE)
def test_a_readme_example_runs_as_written(line, tmp_path, monkeypatch):
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.main, shlex.split(line)[1:])
    assert r.exception is None or isinstance(r.exception, SystemExit), (line, r.exception)
    assert r.exit_code == 0, (line, r.output[-2000:])


def _python_blocks():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    # Those written on the bundled files only (the others show a user's model.onnx, input.npy).
    return [b for b in blocks if "models/" in b and not re.search(r"['\"](?!models/)[\w./-]+\.onnx['\"]", b)
            and "np.load(" not in b]


def test_the_readme_python_examples_on_bundled_files_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "a.png").is_file() and (tmp_path / "a.npy").is_file()
