"""Datasets in: one reader over folders and globs of images, .npy/.npz shards, manifests
(CSV or JSON lines) and Parquet tables.

A dataset is a list of entries, each naming where one sample lives (an image file, or a
row of an array file) with its id and optional target; `load` turns an entry into the
sample's model inputs (batch axis of one) through `onnxplain.io`'s preprocessing. Entries
are small and picklable, so the dataset engine decodes them in worker threads (or Ray
tasks) while onnxruntime runs. Ids are unique within a dataset: the engine's index and its
resumption are keyed by them.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError, OptionError
from .io import ARRAY_SUFFIXES, IMAGE_SUFFIXES, Preprocess, _checked, load_array, prepare_images

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")

__all__ = ["Entry", "Item", "Dataset", "open_dataset", "preprocess_for"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one sample lives: an image file, or row `row` of an array file (the whole
    file, one sample, when `row` is None). `target` is the class it is explained for, when
    the dataset says so; `name` what outputs made from it are called (the file's stem,
    its path under the folder without the suffix, a manifest's id, `stem_row` for rows)."""

    id: str
    kind: str  # "image" or "array"
    path: str
    row: int | None = None
    target: int | None = None
    name: str | None = dataclasses.field(default=None, compare=False)

    @property
    def label(self) -> str:
        return self.name if self.name is not None else self.id

    def digest(self, pre: Preprocess | None) -> dict:
        """What identifies this sample's input for a run key: the file's bytes, the row,
        and for images the preprocessing that turns them into the input."""
        from .runkey import file_digest

        try:
            ident = file_digest(self.path)
        except OSError as exc:
            ident = f"unreadable: {exc.strerror}"  # loading reports it as this entry's error
        out = {"file": ident, "row": self.row}
        if self.kind == "image":
            out["preprocess"] = dataclasses.asdict(pre) if pre is not None else None
        return out


@dataclasses.dataclass
class Item:
    """A loaded sample: `inputs` an array with a batch axis of one (or a dict name ->
    array for a multi-input model), or `error` when the input could not be read."""

    entry: Entry
    inputs: np.ndarray | dict | None
    error: str | None = None
    image: np.ndarray | None = None  # uint8 HxWx3 at model resolution, when asked for (pictures)

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def target(self):
        return self.entry.target


class Dataset:
    """Entries and the preprocessing their images get. Iterating loads the items in order."""

    def __init__(self, entries, preprocess: Preprocess | None = None, rank: int | None = None, source: str = ""):
        self.entries = list(entries)
        self.preprocess = preprocess
        self.rank = rank  # the model input's rank: a single-sample array file gets its batch axis
        self.source = source
        seen = {}
        for i, e in enumerate(self.entries):
            if e.id in seen:
                raise InputError(f"{source or 'the dataset'}: id '{e.id}' appears twice (entries {seen[e.id]} "
                                 f"and {i}); give every sample its own id (an id column in a manifest)")
            seen[e.id] = i

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return (self.load(e) for e in self.entries)

    def with_preprocess(self, pre: Preprocess | None, rank: int | None = None) -> "Dataset":
        return Dataset(self.entries, pre, rank if rank is not None else self.rank, self.source)

    def load(self, entry: Entry, display: bool = False) -> Item:
        """The item of one entry; a file that cannot be read gives an item with its error.
        With `display`, an image's item also holds the picture the model sees."""
        try:
            inputs, image = _load(entry, self.preprocess, self.rank)
        except InputError as exc:
            return Item(entry, None, str(exc))
        return Item(entry, inputs, image=image if display else None)

    def missing(self) -> list[Entry]:
        """Entries whose file is not there (a stat each: checked before any work)."""
        return [e for e in self.entries if not os.path.isfile(e.path)]


def load_entry(entry: Entry, pre: Preprocess | None, rank: int | None = None):
    """An entry's model inputs with a batch axis of one (InputError when unreadable)."""
    return _load(entry, pre, rank)[0]


def _load(entry: Entry, pre: Preprocess | None, rank: int | None = None):
    if entry.kind == "image":
        batch, display = prepare_images([entry.path], pre if pre is not None else Preprocess())
        return batch, display[0]
    path = Path(entry.path)
    try:
        st = path.stat()
    except OSError:
        raise InputError(f"array file not found: {path}; check the path") from None
    loaded = _array_file(str(path), st.st_mtime_ns, st.st_size)
    named = loaded if isinstance(loaded, dict) else {None: loaded}
    out = {}
    for k, a in named.items():
        where = f"{path}" + (f" ['{k}']" if k else "")
        if entry.row is not None:
            if a.ndim == 0 or entry.row >= a.shape[0]:
                raise InputError(f"{where} has no row {entry.row}; a shard holds samples along its first axis")
            a = a[entry.row:entry.row + 1]
        elif rank is not None and a.ndim == rank - 1:
            a = a[None]
        elif a.ndim == 0 or a.shape[0] != 1:
            raise InputError(f"{where} has shape {a.shape}: not one sample; give the row in a 'row' column "
                             "or pass the file as a shard")
        out[k] = np.ascontiguousarray(_checked(a, path, k))
    return (out[None] if None in out else out), None


@functools.lru_cache(maxsize=4)
def _array_file(path: str, mtime_ns: int, size: int):
    # The rows of a shard are read one by one by the worker threads; the file is read once
    # (the few most recent ones are kept), keyed by its mtime so a rewritten file is re-read.
    return _raw_arrays(Path(path))


def _raw_arrays(path: Path):
    """A shard's arrays as `io.load_array` reads them (never pickles), with the value checks
    left to each row: one NaN row is that row's error, not the whole shard's."""
    return load_array(path, check=False)


def _shard_entries(path: Path, base: Path | None, rank: int | None = None) -> list[Entry]:
    try:
        st = path.stat()
        loaded = _array_file(str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        raise InputError(f"array file not found: {path}; check the path") from None
    named = loaded if isinstance(loaded, dict) else {None: loaded}
    name = _rel(path, base)
    stem = _stem(name, base)
    if rank is not None and all(a.ndim == rank - 1 for a in named.values()):
        # One sample saved without its batch axis (the model input's rank less one).
        return [Entry(name, "array", str(path), None, name=stem)]
    sizes = {a.shape[0] if a.ndim else None for a in named.values()}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"{path}: a shard's arrays need one common first (batch) axis, got shapes "
                         f"{[a.shape for a in named.values()]}")
    n = sizes.pop()
    return [Entry(f"{name}:{r}", "array", str(path), r, name=stem if n == 1 else f"{stem}_{r}") for r in range(n)]


def _stem(rel: str, base: Path | None) -> str:
    """An output name: the path under the folder without its suffix, or a file's stem."""
    p = Path(rel)
    if base is None or p.is_absolute() or ".." in p.parts:
        return p.stem
    return p.with_suffix("").as_posix()


def _rel(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def _files_dataset(files, base: Path | None, source: str, rank: int | None = None) -> list[Entry]:
    files = [Path(f) for f in files]
    kinds = {"image" if f.suffix.lower() in IMAGE_SUFFIXES else "array" for f in files}
    if len(kinds) > 1:
        raise InputError(f"{source} mixes images and .npy/.npz shards; give one kind per dataset")
    if kinds == {"image"}:
        return [Entry(_rel(f, base), "image", str(f), name=_stem(_rel(f, base), base)) for f in files]
    out = []
    for f in files:
        out += _shard_entries(f, base, rank)
    return out


def _target_value(value, where: str):
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{where}: target {value!r} is not a class index")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: target {value!r} is not a class index (an integer)") from None
    if not f.is_integer() or f < 0:
        raise InputError(f"{where}: target {value!r} is not a class index (a non-negative integer)")
    return int(f)


def _table_entries(rows, base: Path, source: str, path_column: str, target_column: str | None,
                   id_column: str | None) -> list[Entry]:
    """Entries from manifest rows (dicts): paths relative to the manifest's folder."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        if path_column not in row or row[path_column] in (None, ""):
            raise InputError(f"{where} has no '{path_column}' value; every row names its input file "
                             f"(columns: {', '.join(map(str, row))})")
        rel = str(row[path_column])
        p = Path(rel)
        p = p if p.is_absolute() else base / p
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            kind = "image"
        elif suffix in ARRAY_SUFFIXES:
            kind = "array"
        else:
            raise InputError(f"{where}: '{rel}' is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a .npy/.npz file")
        r = row.get("row")
        r = None if r in (None, "") or (isinstance(r, float) and np.isnan(r)) else int(r)
        target = _target_value(row.get(target_column), where) if target_column else None
        ident = row.get(id_column) if id_column else None
        given = ident not in (None, "")
        ident = str(ident) if given else (rel if r is None else f"{rel}:{r}")
        stem = _stem(rel, base)
        name = ident if given else (stem if r is None else f"{stem}_{r}")
        out.append(Entry(ident, kind, str(p), r, target, name=name))
    return out


def _manifest_rows(path: Path):
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise InputError(f"{path} line {i + 1} is not JSON; a manifest holds one JSON object a line") \
                    from None
            if not isinstance(rows[-1], dict):
                raise InputError(f"{path} line {i + 1} is not a JSON object")
    return rows


def _parquet_rows(path: Path, columns):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OptionError(f"reading {path} needs pyarrow: pip install 'onnxplain[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's own error types
        raise InputError(f"cannot read {path} as Parquet ({exc})") from None
    names = [c for c in columns if c and c in table.column_names]
    return table.select(names).to_pylist()


def open_dataset(source, preprocess: Preprocess | None = None, rank: int | None = None,
                 path_column: str = "path", target_column: str | None = "target",
                 id_column: str | None = "id") -> Dataset:
    """The dataset at `source`: a folder (its images, or its .npy/.npz shards, found
    recursively, sorted), a glob pattern, an image or array file, a manifest (.csv,
    .jsonl: a `path_column` naming each input, optional `target_column`, `id_column` and
    `row` columns), a Parquet table of the same columns, or a list of files. Image ids are
    paths relative to the folder (or as given); shard rows are `file:row`."""
    if isinstance(source, (list, tuple)):
        files = [Path(f) for f in source]
        if not files:
            raise InputError("no input files given")
        return Dataset(_files_dataset(_checked_files(files, "the files given"), None, "the files given", rank),
                       preprocess, rank, "the files given")
    text = os.fspath(source)
    p = Path(text)
    if p.is_dir():
        found = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES),
                       key=lambda f: f.relative_to(p).as_posix())
        if not found:
            raise InputError(f"folder {p} holds no images or .npy/.npz files")
        return Dataset(_files_dataset(found, p, f"folder {p}", rank), preprocess, rank, str(p))
    if glob.has_magic(text):
        found = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
        found = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES]
        if not found:
            raise InputError(f"the pattern {text} matches no images or .npy/.npz files")
        base = Path(text.split("*")[0].split("?")[0].split("[")[0] or ".")
        base = base if base.is_dir() else base.parent
        return Dataset(_files_dataset(found, base, f"pattern {text}", rank), preprocess, rank, text)
    suffix = p.suffix.lower()
    if suffix in MANIFEST_SUFFIXES + PARQUET_SUFFIXES:
        if not p.is_file():
            raise InputError(f"manifest not found: {p}; check the path")
        rows = _manifest_rows(p) if suffix in MANIFEST_SUFFIXES else \
            _parquet_rows(p, [path_column, target_column, id_column, "row"])
        if not rows:
            raise InputError(f"{p} lists no inputs")
        return Dataset(_table_entries(rows, p.parent, str(p), path_column, target_column, id_column),
                       preprocess, rank, str(p))
    if suffix in IMAGE_SUFFIXES + ARRAY_SUFFIXES:
        return Dataset(_files_dataset(_checked_files([p], str(p)), p.parent, str(p), rank), preprocess, rank, str(p))
    raise InputError(f"{text} is not a folder, a glob, an image, a .npy/.npz shard, a manifest "
                     f"({', '.join(MANIFEST_SUFFIXES)}) or a Parquet table; check the path")


def _checked_files(files, source):
    for f in files:
        if not f.is_file():
            raise InputError(f"input file not found: {f}; check the path")
        if f.suffix.lower() not in IMAGE_SUFFIXES + ARRAY_SUFFIXES:
            raise InputError(f"{f}: unknown input type '{f.suffix}'; use an image or a .npy/.npz shard ({source})")
    return files


def preprocess_for(explainer, preset: str | None = None) -> Preprocess | None:
    """The preprocessing images get for this model, as `load_inputs` chooses it: a preset,
    else the model's metadata, else read off the input shape; fitted to the model input.
    None for a model whose inputs are not one image batch (array datasets only)."""
    shapes = list(explainer.inputs.values())
    shape = shapes[0] if len(shapes) == 1 else None
    if preset:
        base = Preprocess.preset(preset)
    else:
        meta = explainer.preprocess_metadata()
        base = Preprocess.from_metadata(meta) if meta else None
    if shape is None or not shape or len(shape) != 4:
        return base
    return base.for_input(shape) if base is not None else Preprocess.infer(shape)


def input_rank(explainer) -> int | None:
    shapes = list(explainer.inputs.values())
    return len(shapes[0]) if len(shapes) == 1 and shapes[0] is not None else None


# ----------------------------------------------------------------------------- what the commands read

SOURCE_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES + MANIFEST_SUFFIXES + PARQUET_SUFFIXES


def is_glob(p) -> bool:
    """A pattern (cat*.png, photos/**/*.jpg) rather than a file that exists."""
    return glob.has_magic(os.fspath(p)) and not Path(p).exists()


def is_source(p) -> bool:
    """Whether a command-line path names inputs (a folder, a glob, an image, a shard, a
    manifest or a Parquet table) rather than a model."""
    return Path(p).is_dir() or is_glob(p) or Path(p).suffix.lower() in SOURCE_SUFFIXES


def open_inputs(sources, preprocess: Preprocess | None = None, rank: int | None = None) -> Dataset:
    """One dataset of the inputs a command is given: any mix of what `open_dataset` reads.
    One source has the ids `open_dataset` gives it (those of `explain-dataset`); several
    files keep their paths as ids (names: their stems); with folders, globs or manifests
    among several sources every id is the input's path (`path:row` for a shard's row),
    except the ids a manifest gives."""
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise InputError("no inputs given; pass images, .npy/.npz shards, a folder, a glob or a manifest")
    plain = [not Path(s).is_dir() and not is_glob(s) and Path(s).suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES
             for s in sources]
    if len(sources) == 1:
        return open_dataset(sources[0], preprocess, rank)  # the ids explain-dataset gives it
    if all(plain):
        return open_dataset(sources, preprocess, rank)
    entries = []
    for s, is_file in zip(sources, plain):
        ds = open_dataset([s] if is_file else s, None, rank)
        table = Path(s).suffix.lower() in MANIFEST_SUFFIXES + PARQUET_SUFFIXES
        for e in ds.entries:
            if not table:
                ident = Path(e.path).as_posix() + ("" if e.row is None else f":{e.row}")
                e = dataclasses.replace(e, id=ident)
            entries.append(e)
    if len({e.kind for e in entries}) > 1:
        raise InputError("the inputs mix images and .npy/.npz arrays; give one kind per run")
    return Dataset(entries, preprocess, rank, " ".join(sources))


def fit_preprocess(pre: Preprocess | None, input_shape) -> Preprocess:
    """The preprocessing images get for a model input of this shape, as `io.load_inputs`
    fits it: read off the shape where none is given, else made to fit it."""
    if pre is None:
        return Preprocess.infer(input_shape) if input_shape is not None else Preprocess()
    return pre.for_input(input_shape) if input_shape is not None else pre


def for_model(dataset: Dataset, explainer, pre: Preprocess | None) -> Dataset:
    """The dataset with the preprocessing `pre` fitted to the model's input (images only)
    and the model input's rank (a sample saved without its batch axis gets it)."""
    shapes = list(explainer.inputs.values())
    shape = shapes[0] if len(shapes) == 1 else None
    if any(e.kind == "image" for e in dataset.entries):
        pre = fit_preprocess(pre, shape)
    else:
        pre = None
    return dataset.with_preprocess(pre, input_rank(explainer))


def check_present(dataset: Dataset) -> None:
    """InputError naming the inputs whose file is not there (before any work is done)."""
    gone = dataset.missing()
    if gone:
        listed = ", ".join(f"{e.path}" + (f" (id {e.id})" if e.id != Path(e.path).as_posix() else "")
                           for e in gone[:3])
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        where = f" listed in {dataset.source}" if Path(dataset.source).suffix.lower() in \
            MANIFEST_SUFFIXES + PARQUET_SUFFIXES else ""
        raise InputError(f"input file not found: {listed}{more}{where}; check the path(s)")


@dataclasses.dataclass
class Samples:
    """Loaded entries as one batch, as `io.Inputs` holds files: `batch` (an array, or a
    dict name -> array), `images` (the pictures the model sees, for image inputs), `names`
    (what outputs are called), and the entries themselves (ids, paths, targets)."""

    entries: list
    batch: np.ndarray | dict
    images: list | None
    names: list[str]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    @property
    def targets(self) -> list:
        return [e.target for e in self.entries]

    def target(self, given=None):
        """What to explain: `given` (-t) where there is one; else the dataset's targets (a
        class per sample, None for a sample without: its predicted class, filled in by
        the caller); else None (the predicted classes)."""
        if given is not None or all(t is None for t in self.targets):
            return given
        return self.targets


def load_samples(dataset: Dataset, entries, display: bool = False) -> Samples:
    """The entries loaded and stacked into one batch; InputError for the first that cannot
    be read (the commands without --on-error stop there, exit 2)."""
    items = [dataset.load(e, display) for e in entries]
    for it in items:
        if it.error is not None:
            raise InputError(it.error if it.id in it.error or it.entry.path in it.error
                             else f"input {it.id}: {it.error}")
    first = items[0].inputs
    try:
        if isinstance(first, dict):
            if any(not isinstance(it.inputs, dict) or set(it.inputs) != set(first) for it in items):
                raise InputError("array files hold different input names; give every file the same names")
            batch = {k: np.concatenate([it.inputs[k] for it in items]) for k in first}
        else:
            batch = np.concatenate([it.inputs for it in items])
    except ValueError:
        shapes = sorted({str(np.shape(it.inputs) if not isinstance(it.inputs, dict) else
                             {k: v.shape for k, v in it.inputs.items()}) for it in items})
        if items[0].entry.kind == "image":
            raise InputError("images have different sizes and cannot form one batch; give the preprocessing a "
                             "size (e.g. --preset imagenet or --size H,W)") from None
        raise InputError(f"inputs have shapes that do not stack into one batch: {', '.join(shapes)}") from None
    images = [it.image for it in items] if all(it.image is not None for it in items) else None
    return Samples(list(entries), batch, images, [e.label for e in entries])


def samples_per_group(explainer) -> int:
    """Inputs held at once by a command: the batch, its attribution and pictures together
    stay within a quarter of the memory budget (runs inside are chunked by the budget too)."""
    from . import runtime

    per_sample = 0
    for shape in explainer.inputs.values():
        per_sample += 4 * int(np.prod([d for d in (shape or ())[1:] if isinstance(d, int)] or [1]))
    budget = getattr(explainer, "memory_budget", None) or runtime.DEFAULT_MEMORY_BUDGET
    return max(1, budget // (4 * 4 * max(per_sample, 1)))


def batches(entries, size: int, by_file: bool = False) -> list[list]:
    """Consecutive entries in batches of at most `size`. With `by_file`, a batch holds the
    rows of one array file (an image, or a whole-file sample, alone): one record per
    input file, as the commands that log per file keep them."""
    out, current = [], []
    for e in entries:
        same_file = current and e.kind == "array" and current[-1].kind == "array" and \
            current[-1].path == e.path and current[-1].row is not None and e.row is not None
        if current and (len(current) >= size or (by_file and not same_file)):
            out.append(current)
            current = []
        current.append(e)
    if current:
        out.append(current)
    return out
