"""Run every onnxplain benchmark and write the results to benchmarks/RESULTS.md.

    python benchmarks/run.py                  # full size: VGG-16 and ResNet-50 at 224x224, batch 1 and 16
    python benchmarks/run.py --quick          # smoke version: narrow models at 64x64, few repeats
    python benchmarks/run.py --models resnet50 --batch 1,16 --only gradients
    python benchmarks/run.py --only transformers   # MiniLM-L6 (seq 128) and ViT-B/16: its own --transformers-* options

Every module ``benchmarks/bench_*.py`` is discovered and run in name order. A module
takes part by exposing ``main(args)``, where ``args`` is the argparse namespace built
here (the common options below plus whatever the module adds through an optional
``add_arguments(parser)``). ``main`` returns its section as markdown text (or returns
None and prints it: its stdout is then the section). An optional module-level ``TITLE``
names the section, an optional ``SECTION`` its block (default NAME). Each module's section
replaces only its own generated block in RESULTS.md, between ``<!-- bench:NAME:begin -->``
and ``<!-- bench:NAME:end -->``;
text outside those blocks is kept.

The helpers here (``time_call``, ``machine_info``, ``configure_threads``,
``markdown_table``) are shared by the bench modules so that every peer is timed the
same way: warm-up runs excluded, median of several repeats, the same thread count for
torch and onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"

for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)


# ----------------------------------------------------------------------------- options


def _int_list(s: str) -> list[int]:
    return [int(v) for v in str(s).replace(" ", "").split(",") if v]


def _str_list(s: str) -> list[str]:
    return [v for v in str(s).replace(" ", "").split(",") if v]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke version: width 0.25, 64x64 inputs, 3 repeats (shapes and ratios only indicative)")
    p.add_argument("--models", type=_str_list, default=None,
                   help="comma list of models: vgg16, resnet50, mlp (default: vgg16,resnet50)")
    p.add_argument("--batch", type=_int_list, default=None, help="comma list of batch sizes (default: 1,16)")
    p.add_argument("--width", type=float, default=None, help="channel width multiplier (default 1.0; --quick 0.25)")
    p.add_argument("--resolution", type=int, default=None, help="input side in pixels (default 224; --quick 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement, median reported (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per measurement, at least (default 1; fast calls are warmed "
                        "for 2 s, at most 10 calls)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds one measurement may spend on repeats; at least one timed repeat always runs "
                        "(default 120; --quick 20)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for torch and onnxruntime alike (default: the CPUs this process may use)")
    p.add_argument("--only", type=_str_list, default=None,
                   help="comma list of bench modules to run, e.g. gradients,blackbox,transformers (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results file (default benchmarks/RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    q = args.quick
    if args.models is None:
        args.models = ["vgg16", "resnet50"]
    if args.batch is None:
        args.batch = [1, 16]
    if args.width is None:
        args.width = 0.25 if q else 1.0
    if args.resolution is None:
        args.resolution = 64 if q else 224
    if args.repeats is None:
        args.repeats = 3 if q else 5
    if args.budget is None:
        args.budget = 20.0 if q else 120.0
    if args.threads is None:
        args.threads = default_threads()
    return args


# ----------------------------------------------------------------------------- shared helpers


def configure_threads(threads: int) -> None:
    """The same number of intra-op threads for torch and for every onnxruntime session,
    onnxplain's included (it reads ONNXPLAIN_THREADS)."""
    os.environ["ONNXPLAIN_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def ort_session(path_or_bytes, threads: int, profile_prefix: str | None = None):
    """An onnxruntime CPU session configured like onnxplain's own: `threads` intra-op
    threads, default (full) graph optimisation, sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class Timing:
    def __init__(self, times: list[float], result=None):
        self.times = times
        self.result = result

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def n(self) -> int:
        return len(self.times)

    def __repr__(self):
        return f"Timing(median={self.median * 1e3:.2f} ms, n={self.n})"


def time_call(fn, repeats: int = 5, warmup: int = 1, budget: float = 120.0, warm_seconds: float = 2.0) -> Timing:
    """Median wall time of fn() over up to `repeats` timed calls after at least `warmup`
    untimed ones (more, up to 10, while they have taken less than `warm_seconds`); stops early once the timed calls have taken `budget` seconds (at least one
    timed call always runs). The last call's return value is kept in `.result`."""
    result = None
    spent = 0.0
    calls = 0
    # torch (oneDNN primitive caches, allocator) and onnxruntime (arena, thread pool) need a
    # few calls per new shape to reach their steady state: warm up `warmup` calls, then
    # keep warming while the warm-up has taken less than `warm_seconds` (at most 10 calls).
    while calls < warmup or (spent < warm_seconds and calls < 10):
        t0 = time.perf_counter()
        result = fn()
        spent += time.perf_counter() - t0
        calls += 1
    times = []
    spent = 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent >= budget:
            break
    return Timing(times, result)


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "—"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x" if r < 100 else f"{r:.0f}x"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args) -> str:
    lines = [
        f"- command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- CPU: {_cpu_name()}; {os.cpu_count()} logical CPUs, {default_threads()} usable by this process",
        f"- threads: {args.threads} intra-op threads for torch (`torch.set_num_threads`) and for every "
        f"onnxruntime session (`intra_op_num_threads`, onnxplain's through `ONNXPLAIN_THREADS`)",
        f"- python {platform.python_version()} on {platform.system()} {platform.release()}",
    ]
    vers = []
    for mod in ("onnxplain", "onnxruntime", "onnx", "torch", "captum", "numpy"):
        try:
            m = importlib.import_module(mod)
            vers.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:
            pass
    lines.append("- versions: " + ", ".join(vers))
    try:
        import onnxruntime as ort

        lines.append(f"- onnxruntime providers available: {', '.join(ort.get_available_providers())}; "
                     "all timings here use CPUExecutionProvider")
    except ImportError:
        pass
    try:
        import torch

        info = torch.__config__.parallel_info()
        backend = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "parallel backend" in ln), "?")
        lines.append(f"- torch: {torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} "
                     f"inter-op threads, ATen parallel backend {backend}")
    except Exception:
        pass
    mode = "quick (smoke: narrow models, small inputs)" if args.quick else "full size"
    lines.append(f"- mode: {mode}; width {args.width:g}, input {args.resolution}x{args.resolution}, "
                 f"batches {','.join(map(str, args.batch))}, median of up to {args.repeats} repeats after "
                 f"at least {args.warmup} warm-up call(s) (fast calls: 2 s of warm-up, at most 10 calls), at most {args.budget:g} s of repeats per measurement")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- discovery and RESULTS.md


def discover() -> list[tuple[str, Path]]:
    return [(p.stem[len("bench_"):], p) for p in sorted(HERE.glob("bench_*.py"))]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


HEADER = """# onnxplain benchmarks

Generated by `python benchmarks/run.py` (see `benchmarks/README.md` for what is measured and
how the peers are configured). Each block between `bench:NAME` markers is rewritten by the
benchmark of that name; edit outside them.
"""


def update_results(path: Path, sections: dict[str, str]) -> None:
    text = path.read_text() if path.exists() else HEADER
    for name, body in sections.items():
        begin, end = _markers(name)
        block = f"{begin}\n{body.rstrip()}\n{end}"
        if begin in text and end in text and text.index(begin) < text.index(end):
            i, j = text.index(begin), text.index(end) + len(end)
            text = text[:i] + block + text[j:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main(argv=None) -> int:
    parser = make_parser()
    found = discover()
    mods = {}
    for name, path in found:
        try:
            mods[name] = load(name, path)
        except Exception:
            mods[name] = traceback.format_exc()
            continue
        add = getattr(mods[name], "add_arguments", None)
        if add is not None:
            add(parser.add_argument_group(f"bench_{name}"))
    args = finish_args(parser.parse_args(argv))
    configure_threads(args.threads)
    wanted = args.only or [n for n, _ in found]
    unknown = [n for n in wanted if n not in mods]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; found: {', '.join(mods) or 'none'}")

    info = machine_info(args)
    print("## Machine\n\n" + info + "\n", flush=True)
    sections = {"machine": "## Machine\n\n" + info}
    failed = 0
    for name in wanted:
        mod = mods[name]
        title = getattr(mod, "TITLE", name) if not isinstance(mod, str) else name
        print(f"## {title}\n", flush=True)
        if isinstance(mod, str):
            body = f"bench_{name}.py could not be imported:\n\n```\n{mod.strip()}\n```"
            failed += 1
        elif not hasattr(mod, "main"):
            body = f"bench_{name}.py has no `main(args)`; skipped."
        else:
            buf = io.StringIO()
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
                    out = mod.main(args)
                if isinstance(out, str):
                    body = out
                    print(body, flush=True)
                else:
                    body = buf.getvalue()
            except Exception:
                failed += 1
                tb = traceback.format_exc()
                print(tb, file=sys.stderr)
                body = buf.getvalue() + f"\n\n**failed**:\n\n```\n{tb.strip()}\n```"
            body += f"\n\n_(section took {time.perf_counter() - t0:.0f} s)_"
        # A module's optional SECTION names its RESULTS.md block (default: its file's name).
        block = name if isinstance(mod, str) else getattr(mod, "SECTION", name)
        sections[block] = f"## {title}\n\n{body.strip()}"
        print(flush=True)
    if not args.no_write:
        update_results(args.out, sections)
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
