"""`imgrec predict INPUTS --out results.{jsonl,csv,parquet}`: prediction for millions of files.

Why a module of its own: `--json` holds every result until the end; this streams. The inputs
are expanded lazily in sorted order (`predict.expand_inputs`), decoded and scored in the
inference lanes (`predict.in_lanes`: one single-threaded ONNX Runtime session per core, each
decoding and running its own batches, a few batches in flight), and written in input order in
committed chunks, so memory stays flat however many files there are.

Resume, robust to kill -9 at any instant: rows go out in chunks of CHUNK_ROWS. A chunk is
written and fsync'ed first (jsonl/csv: appended to the file; parquet: a new part file in the
`results.parquet/` folder, written under a temporary name and renamed), and only then is the
progress record (`results.jsonl.progress.json`, or `_progress.json` inside the parquet folder)
replaced atomically (write, fsync, rename) with the new row count, byte length or part count,
and a running SHA-256 of the inputs done. Whatever a kill leaves after the last record (a
partial line, a whole chunk whose record was not yet renamed, a temporary part) is cut off on
`--resume`, which then re-expands the inputs, checks that the first rows' inputs hash the same,
and carries on from the next input. So no row is ever missing or written twice.

Formats (the same fields as `--json`): jsonl is one `--json` record per line. csv and parquet
are flat: input, label, index, probability (the top-1), top_k (the whole top-k list as JSON:
[{"label", "index", "probability"}, ...]) and error (empty/null when predicted).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImgrecError, InputError
from .predict import (
    Predictor,
    as_record,
    expand_inputs,
    in_lanes,
    is_url,
    lane_count,
    lane_predictors,
    sample_photos,
)

#: rows per commit (an fsync and a progress record; a parquet part file)
CHUNK_ROWS = 1024
#: images a lane decodes and runs at once (the batch `imgrec benchmark` reports as batch 32)
BATCH = 32
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
COLUMNS = ("input", "label", "index", "probability", "top_k", "error")
#: bumped when the progress record's meaning changes (an old record is then refused)
PROGRESS_VERSION = 1
PARQUET_PROGRESS = "_progress.json"  # pyarrow and pandas skip names starting with _ or .

Scorer = Callable[[Predictor, Iterator[str], int, "str | None"], Iterator[dict]]


@dataclass
class BatchSummary:
    out: str
    format: str
    rows: int  # rows in the output now
    new_rows: int  # rows this run wrote
    errors: int  # of the new rows, inputs that could not be read
    resumed_from: int  # rows already there when the run started
    seconds: float
    images_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_format(out: str | Path) -> str:
    """jsonl, csv or parquet from --out's suffix; anything else is one clear line."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise InputError(f"--out {out}: unknown format",
                         "name it results.jsonl, results.csv or results.parquet")
    return fmt


# -- scoring ---------------------------------------------------------------------------------
def predict_chunk(predictor: Predictor, sources: list[str], top_k: int,
                  invert: str | None) -> list[dict]:
    """--json records of a few inputs, decoded one after another in this thread (a lane or a
    Ray actor owns a core) and run as one batch. An unreadable input is an error record."""
    decoded: list[Any] = []
    for s in sources:
        try:
            decoded.append(predictor.prepare(s, invert))
        except InputError as e:
            decoded.append(e)
        except OSError as e:  # vanished or unreadable after listing
            decoded.append(InputError(f"{s}: cannot read ({e.strerror or e})"))
    good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
    if good:
        probs = predictor.probabilities(np.stack([decoded[i] for i in good]), len(good))
        for i, preds in zip(good, predictor.top_k(probs, top_k), strict=True):
            decoded[i] = preds
    return [as_record(s, d) for s, d in zip(sources, decoded, strict=True)]


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def local_records(predictor: Predictor, sources: Iterator[str], top_k: int,
                  invert: str | None) -> Iterator[dict]:
    """Records in input order from the inference lanes (every core), a few batches ahead."""
    lanes = lane_predictors(predictor)

    def work(lane: Predictor, chunk: list[str]) -> list[dict]:
        return predict_chunk(lane, chunk, top_k, invert)

    for records in in_lanes(lanes, work, batched(sources, BATCH)):
        yield from records


# -- rows and files --------------------------------------------------------------------------
def flat_row(record: dict) -> dict[str, Any]:
    """A --json record as one csv/parquet row (see the module docstring)."""
    preds = record.get("predictions")
    if preds is None:
        return {"input": record["input"], "label": None, "index": None, "probability": None,
                "top_k": None, "error": record["error"]}
    top = preds[0]
    return {"input": record["input"], "label": top["label"], "index": top["index"],
            "probability": top["probability"], "top_k": json.dumps(preds), "error": None}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows); the rename itself is atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_json(path: Path, data: dict) -> None:
    """Replace `path` by `data` so that a kill leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def chain_hash(digest: str, source: str) -> str:
    """The running hash of the inputs done: resume re-expands the inputs and compares."""
    return hashlib.sha256(bytes.fromhex(digest) + source.encode("utf-8", "surrogateescape")
                          ).hexdigest()


EMPTY_HASH = hashlib.sha256(b"").hexdigest()


class Sink:
    """Committed, in-order output of one format. Subclasses write the rows of one chunk and
    say where the output ends (`mark`); `commit` makes it durable, then records progress."""

    fmt = ""

    def __init__(self, out: Path, progress: Path, job: dict):
        self.out, self.progress_path, self.job = out, progress, job
        self.rows, self.digest, self.complete = 0, EMPTY_HASH, False
        self.buffer: list[dict] = []
        self.lock_fd: int | None = None

    # subclasses ------------------------------------------------------------------------
    def create(self) -> None: ...
    def restore(self, state: dict) -> None: ...
    def write(self, records: list[dict]) -> None: ...
    def mark(self) -> dict: return {}

    # the protocol ------------------------------------------------------------------------
    def add(self, record: dict) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= CHUNK_ROWS:
            self.commit()

    def commit(self, complete: bool = False) -> None:
        if self.buffer:
            self.write(self.buffer)  # durable (fsync'ed) before the record says so
            for r in self.buffer:
                self.digest = chain_hash(self.digest, r["input"])
            self.rows += len(self.buffer)
            self.buffer = []
        self.complete = complete
        atomic_json(self.progress_path, {
            "imgrec_batch_predict": PROGRESS_VERSION, "format": self.fmt, "job": self.job,
            "rows": self.rows, "inputs_sha256": self.digest, "complete": complete,
            **self.mark()})

    def skip_done(self, sources: Iterator[str]) -> Iterator[str]:
        """The inputs after the rows already written, checking the written ones are the
        same inputs (same names, same order) as this run's first ones. (The count is taken
        now: the generator is read while new rows are committed.)"""
        done, expected = self.rows, self.digest

        def rest() -> Iterator[str]:
            digest, n = EMPTY_HASH, 0
            for source in sources:
                if n < done:
                    digest = chain_hash(digest, source)
                    n += 1
                    if n == done and digest != expected:
                        raise _changed(self.out)
                    continue
                yield source
            if n < done:
                raise _changed(self.out, f"it holds {done} rows, the inputs are {n} files")

        return rest()

    def lock(self) -> None:
        """flock the output, so two runs never append to one file (the kernel drops the lock
        when the holder dies, even by kill -9)."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ImgrecError(f"--out {self.out} is being written by another imgrec run",
                              "wait for it to finish, or choose another --out") from None
        self.lock_fd = fd

    @property
    def lock_path(self) -> Path:
        return self.out.with_name(f".{self.out.name}.lock")

    def close(self) -> None:
        if self.lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = None


def _changed(out: Path, detail: str = "") -> InputError:
    why = f" ({detail})" if detail else ""
    return InputError(f"--resume: the inputs are not the ones {out} was made from{why}",
                      "give the same inputs, or start again with --overwrite")


class LinesSink(Sink):
    """jsonl and csv: one file, appended a chunk at a time; the progress record holds the
    byte length committed, and resume truncates anything after it."""

    def __init__(self, out: Path, progress: Path, job: dict, fmt: str):
        super().__init__(out, progress, job)
        self.fmt = fmt

    def create(self) -> None:
        with open(self.out, "wb"):
            pass

    def restore(self, state: dict) -> None:
        size = int(state["bytes"])
        if not self.out.is_file() or self.out.stat().st_size < size:
            raise InputError(f"--resume: {self.out} is shorter than its progress record says",
                             "it was changed outside imgrec; start again with --overwrite")
        os.truncate(self.out, size)  # a partial line or an unrecorded chunk goes

    def mark(self) -> dict:
        return {"bytes": self.out.stat().st_size}

    def write(self, records: list[dict]) -> None:
        data = self.encode(records).encode("utf-8", "surrogateescape")
        with open(self.out, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def encode(self, records: list[dict]) -> str:
        if self.fmt == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        if self.out.stat().st_size == 0:
            writer.writeheader()
        writer.writerows(flat_row(r) for r in records)
        return buf.getvalue()


class ParquetSink(Sink):
    """parquet: a folder `results.parquet/` of part files (one per chunk, one row group each,
    named in order: `pandas.read_parquet` / `pyarrow.parquet.read_table` read the folder as
    one table), each written whole under a temporary name and renamed into place."""

    fmt = "parquet"

    def __init__(self, out: Path, progress: Path, job: dict):
        super().__init__(out, progress, job)
        self.parts = 0
        self.pa, self.pq = _pyarrow()
        self.schema = self.pa.schema([
            ("input", self.pa.string()), ("label", self.pa.string()),
            ("index", self.pa.int32()), ("probability", self.pa.float64()),
            ("top_k", self.pa.string()), ("error", self.pa.string())])

    def create(self) -> None:
        self.out.mkdir(parents=True)

    def part(self, k: int) -> Path:
        return self.out / f"part-{k:06d}.parquet"

    def restore(self, state: dict) -> None:
        self.parts = int(state["parts"])
        for k in range(self.parts):
            if not self.part(k).is_file():
                raise InputError(f"--resume: {self.part(k)} is missing",
                                 "it was changed outside imgrec; start again with --overwrite")
        for p in self.out.iterdir():  # parts written after the record, temporary files
            late = p.name.startswith("part-") and p.name >= self.part(self.parts).name
            if late or (p.name.startswith(".part-") and p.name.endswith(".tmp")):
                p.unlink()

    def mark(self) -> dict:
        return {"parts": self.parts}

    def write(self, records: list[dict]) -> None:
        table = self.pa.Table.from_pylist([flat_row(r) for r in records], schema=self.schema)
        final = self.part(self.parts)
        tmp = self.out / f".{final.name}.tmp"
        with self.pq.ParquetWriter(tmp, self.schema) as writer:
            writer.write_table(table, row_group_size=CHUNK_ROWS)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.out)
        self.parts += 1


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise InputError("--out *.parquet needs pyarrow, which is not installed",
                         "pip install 'imgrec[batch]'; or write .jsonl or .csv") from None
    return pa, pq


def open_sink(out: str | Path, job: dict, resume: bool, overwrite: bool) -> Sink:
    """The output to write: new, resumed (its progress record checked against this job), or
    replaced (--overwrite). Checked before any prediction runs."""
    out = Path(out).expanduser()
    fmt = output_format(out)
    progress = (out / PARQUET_PROGRESS if fmt == "parquet"
                else out.with_name(out.name + ".progress.json"))
    sink = (ParquetSink(out, progress, job) if fmt == "parquet"
            else LinesSink(out, progress, job, fmt))
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: the folder {out.parent} does not exist")
    exists = out.exists() or progress.exists()
    if exists and not (resume or overwrite):
        raise InputError(f"--out {out} already exists",
                         "add --resume to continue it, or --overwrite to replace it")
    sink.lock()
    try:
        if exists and overwrite:
            _remove_output(out, progress, fmt)
        if exists and resume and not overwrite:
            state = _read_progress(out, progress, fmt, job)
            sink.restore(state)
            sink.rows, sink.digest = int(state["rows"]), state["inputs_sha256"]
            sink.complete = bool(state.get("complete"))
        else:
            sink.create()
            sink.commit()  # an empty progress record: a kill before the first chunk resumes
    except BaseException:
        sink.close()
        raise
    return sink


def _read_progress(out: Path, progress: Path, fmt: str, job: dict) -> dict:
    """The progress record of an output to resume; refused in one line when it is not
    imgrec's or was made from other inputs, model or options."""
    try:
        state = json.loads(progress.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"--resume: {out} has no readable progress record ({progress.name})",
                         "it was not written by `imgrec predict --out`; use --overwrite"
                         ) from None
    if state.get("imgrec_batch_predict") != PROGRESS_VERSION or state.get("format") != fmt:
        raise InputError(f"--resume: {progress} is not a progress record of this imgrec",
                         "start again with --overwrite")
    old = state.get("job", {})
    for key, what in (("inputs", "other inputs"), ("engine", "another engine"),
                      ("model", "another model"), ("top_k", "another --top-k"),
                      ("invert", "another --invert")):
        if old.get(key) != job.get(key):
            raise InputError(f"--resume: {out} was made from {what} "
                             f"({old.get(key)!r}, now {job.get(key)!r})",
                             "give the same inputs and options, or use --overwrite")
    return state


def _remove_output(out: Path, progress: Path, fmt: str) -> None:
    """--overwrite: remove an earlier output; a folder only when it is one imgrec wrote."""
    import shutil

    if fmt == "parquet" and out.is_dir():
        ours = progress.is_file() or not any(out.iterdir())
        if not ours:
            raise InputError(f"--out {out} is a folder imgrec did not write",
                             "remove it yourself, or choose another --out")
        shutil.rmtree(out)
    elif out.is_dir():
        raise InputError(f"--out {out} is a folder", "give --out a file name")
    else:
        out.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def job_record(predictor: Predictor, inputs: list[str] | None, top_k: int,
               invert: str | None) -> dict:
    """What makes two runs the same job: the inputs as given (absolute), the model file's
    SHA-256, the engine and the options. --resume refuses an output of another job."""
    engine = predictor.engine
    weights = getattr(engine, "path", None) or Path(predictor.bundle.path) / "model.safetensors"
    absolute = [s if is_url(s) else
                os.path.abspath(os.path.expanduser(s)) for s in (inputs or [])]
    return {"inputs": absolute or "bundled samples",
            "model": {"bundle": str(predictor.bundle.path), "file": Path(weights).name,
                      "sha256": file_sha256(Path(weights)) if Path(weights).is_file() else None},
            "engine": getattr(engine, "name", type(engine).__name__), "top_k": top_k,
            "invert": invert}


def run_batch(inputs: list[str] | None, out: str | Path, model: str | None = None,
              top_k: int = 5, invert: str | None = None, engine: str = "auto",
              resume: bool = False, overwrite: bool = False,
              scorer: Scorer | None = None) -> BatchSummary:
    """Predict every input into `out` (see the module docstring); `scorer` runs the model
    (default: this machine's lanes; `cluster.ray_scorer` runs it on Ray)."""
    fmt = output_format(out)
    if fmt == "parquet":
        _pyarrow()
    predictor = Predictor.load(model, engine=engine, threads=lane_count())
    job = job_record(predictor, inputs, top_k, invert)
    sink = open_sink(out, job, resume, overwrite)
    start, t0, errors = sink.rows, time.perf_counter(), 0
    try:
        # a complete output is checked the same way: its inputs re-listed, nothing left to do
        sources = expand_inputs(inputs) if inputs else iter(sample_photos())
        todo = sink.skip_done(sources)
        from tqdm import tqdm  # a count and a rate on a terminal; silent in a pipe or a log

        with tqdm(desc=f"predict -> {Path(out).name}", unit="img", initial=start,
                  disable=None, dynamic_ncols=True, leave=False) as bar:
            for record in (scorer or local_records)(predictor, todo, top_k, invert):
                errors += "error" in record
                sink.add(record)
                bar.update()
        sink.commit(complete=True)
    except BaseException:
        if start == 0 and sink.rows == 0:  # nothing done (e.g. a folder without images)
            _remove_output(sink.out, sink.progress_path, fmt)
        raise
    finally:
        sink.close()
    seconds = time.perf_counter() - t0
    new = sink.rows - start
    return BatchSummary(str(out), fmt, sink.rows, new, errors, start, round(seconds, 3),
                        round(new / seconds, 2) if seconds > 0 else 0.0)
