"""One reader per input format, each turning a source into its documents, as pieces of text.

A plain text file is one document, read a block at a time; a JSON lines, CSV or Parquet file is one
document per record (the `--text-field` column), read a block or batch of records at a time (JSON
lines parsed by pyarrow, CSV by Python's csv module, Parquet by pyarrow a row group at a time); a
Hugging Face dataset is one document per row. Compressed files are decompressed as they are read.
No reader holds more than a block or a batch of records, so memory does not grow with the corpus.

A document longer than `PIECE_CHARS` is cut into pieces, always just before a space or newline that
follows a non-space character. GPT-2's pre-tokenizer never joins across such a point (its patterns
match a run of non-space characters, or a run that starts with the space), so tokenising the pieces
one by one gives exactly the tokens of the whole document; character tokens never cross a cut anyway.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import io
import json
import lzma
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import IO, NamedTuple

import pyarrow as pa

from gptlab.errors import EnvironmentProblem, GptlabError
from gptlab.fileio import describe_os_error

from .inputs import FileSource, HFSource, Source, hub_errors

BLOCK_BYTES = 1 << 20  # what a text file is read in, and about what pyarrow parses at a time
PIECE_CHARS = 1 << 20  # a longer document is cut into pieces of about this many characters
RECORD_BLOCK_BYTES = 16 << 20  # JSON lines and CSV are parsed this much at a time (see _json_line_columns)
csv.field_size_limit(sys.maxsize)  # a CSV document may be of any length (the module's default: 128 KiB)


class Piece(NamedTuple):
    """Some text of one document; `first` marks a document's first piece. `consumed` is how many bytes
    of the source on disk were read since the previous piece, for the progress bar."""

    text: str
    first: bool
    consumed: int = 0


class NotText(GptlabError):
    """A plain text input that is not UTF-8 text (what `--skip-binary` skips)."""


class Corpus:
    """The documents of every source, in order, as one stream of pieces."""

    def __init__(self, sources: list[Source], text_field: str = "text", skip_binary: bool = False) -> None:
        self.sources = sources
        self.text_field = text_field
        self.skip_binary = skip_binary
        self.skipped: dict[str, None] = {}  # the labels of skipped sources, in order, each once

    @property
    def total_bytes(self) -> int | None:
        """Bytes of all sources on disk, or None when a source's size is unknown (a streamed dataset)."""
        sizes = [source.size for source in self.sources]
        return None if any(size is None for size in sizes) else sum(sizes)  # type: ignore[misc]

    def pieces(self) -> Iterator[Piece]:
        for source in self.sources:
            read_any = False
            try:
                for piece in read(source, self.text_field):
                    read_any = read_any or bool(piece.text)
                    yield piece
            except NotText as exc:
                if not self.skip_binary:
                    raise GptlabError(f"{exc}; --skip-binary skips such files") from None
                if read_any:
                    raise GptlabError(f"{exc}, after its start was read as text (--skip-binary skips only files "
                                      "that are not text from their start)") from None
                self.skipped[source.label] = None
                yield Piece("", False, source.size or 0)


def read(source: Source, text_field: str) -> Iterator[Piece]:
    """The pieces of one source's documents."""
    if isinstance(source, HFSource):
        return _hf_pieces(source, text_field)
    readers: dict[str, Callable[[FileSource, str], Iterator[Piece]]] = {
        "text": lambda s, _: _text_pieces(s), "json": _json_pieces, "csv": _csv_pieces, "tsv": _csv_pieces,
        "parquet": _parquet_pieces,
    }
    return readers[source.format](source, text_field)


def cut_pieces(text: str, final: bool, limit: int | None = None) -> tuple[list[str], str]:
    """Cut `text` into pieces of about `limit` (default PIECE_CHARS) characters at points that tokenise
    as if uncut; returns the pieces and, unless `final`, the rest to prepend to the text that follows."""
    limit = limit or PIECE_CHARS
    no_cut = 8 * limit  # text with no space or newline for this long is cut where it stands
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = _last_cut(text, start + 1, start + limit)
        if cut is None:
            cut = _last_cut(text, start + limit, min(len(text) - 1, start + no_cut))
        if cut is None:
            if len(text) - start <= no_cut and not final:
                break  # a space may still come
            cut = min(len(text), start + no_cut)
        pieces.append(text[start:cut])
        start = cut
    if final:
        if start < len(text):
            pieces.append(text[start:])
        return pieces, ""
    return pieces, text[start:]


def _last_cut(text: str, lo: int, hi: int) -> int | None:
    """The last position p in lo..hi where a space or newline follows a non-space character."""
    end = hi + 1
    while True:
        p = max(text.rfind(" ", lo, end), text.rfind("\n", lo, end))
        if p < lo:
            return None
        if not text[p - 1].isspace():
            return p
        end = p


def _document(text: str) -> list[str]:
    return cut_pieces(text, final=True)[0]


@contextlib.contextmanager
def _opened(source: FileSource) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """(the file on disk, its decompressed bytes); decompression failures become one line."""
    with open(source.path, "rb") as raw:
        if source.compression is None:
            stream: IO[bytes] = raw
        elif source.compression == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif source.compression == "xz":
            stream = lzma.LZMAFile(raw)
        elif source.compression == "bz2":
            stream = bz2.BZ2File(raw)
        else:  # pyarrow's zstd reads every frame and, unlike zstandard's stream reader, notices a truncated one
            stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")
        try:
            yield raw, stream
        except GptlabError:
            damage = _damage_after(stream) if source.compression else None
            if damage is not None:  # garbage decompressed before the codec's check failed: name the cause
                raise _read_error(source, damage) from None
            raise
        except _DECOMPRESSION_ERRORS as exc:
            raise _read_error(source, exc) from None
        finally:
            stream.close()


# What a codec raises for a damaged stream: gzip zlib.error (a corrupt deflate body), BadGzipFile or
# EOFError; bz2 OSError; lzma LZMAError; pyarrow's zstd ArrowInvalid or ArrowIOError.
_DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, pa.ArrowException)


def _damage_after(stream: IO[bytes]) -> BaseException | None:
    """The codec's error in the rest of a compressed stream, if any. A corrupt body can decompress to
    bytes that are not UTF-8 (or not CSV) before the codec reaches its checksum; the user must hear
    that the file is damaged, not that it is binary (which --skip-binary would then silently skip)."""
    try:
        while stream.read(BLOCK_BYTES):
            pass
    except _DECOMPRESSION_ERRORS as exc:
        return exc
    return None


def _read_error(source: FileSource, exc: BaseException) -> GptlabError:
    if isinstance(exc, OSError) and exc.errno is not None:
        return EnvironmentProblem(f"cannot read input {describe_os_error(exc, source.path)}")
    what = f"{source.compression} file" if source.compression else "file"
    return GptlabError(f"{source.path}: cannot read it as a {what} ({' '.join(str(exc).split())})")


def _text_pieces(source: FileSource) -> Iterator[Piece]:
    """A whole file as one document, decoded as strict UTF-8 a block at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    rest, offset, reported, first = "", 0, 0, True
    with _opened(source) as (raw, stream):
        while True:
            block = stream.read(BLOCK_BYTES)
            final = not block
            if b"\x00" in block:
                raise NotText(f"{source.path} is not a text file (it contains NUL bytes)")
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final)
            except UnicodeDecodeError as exc:
                raise NotText(f"{source.path} is not UTF-8 text (invalid byte at offset "
                              f"{offset - pending + exc.start})") from None
            offset += len(block)
            pieces, rest = cut_pieces(rest + text, final)
            for piece in pieces:
                position = raw.tell()
                yield Piece(piece, first, position - reported)
                reported, first = position, False
            if final:
                return


def _json_pieces(source: FileSource, field: str) -> Iterator[Piece]:
    """JSON lines (one object per line) through pyarrow; a file that is one JSON array is read whole."""
    with _opened(source) as (_, stream):
        head = stream.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _json_array_pieces(source, field)
        return
    with _opened(source) as (raw, stream):
        yield from _record_pieces(_json_line_columns(stream, source, field), raw.tell, source.label, field)


def _json_line_columns(stream: IO[bytes], source: FileSource, field: str) -> Iterator[list]:
    """The text field of each block of whole lines, parsed by pyarrow one block at a time.

    Not pyarrow's streaming `open_json`: it reads up to 32 blocks ahead on a thread of its own, so with
    16-MB blocks it held up to half a gigabyte of the file (measured: 950 MB for a 2 GB corpus, 275 for
    plain text). A record is one line, so blocks cut after a line break hold whole records, and a
    record longer than a block only makes its block longer. The blocks are large because the parent
    then works in bursts: with 1-MB blocks, its reading interleaved with the tokenising workers on
    the same cores made them 10% slower (measured on 2 cores; 16 MB: the parent's RSS 240-270 MB, flat).
    """
    import pyarrow.json as pj

    options = pj.ParseOptions(explicit_schema=pa.schema([(field, pa.string())]), unexpected_field_behavior="ignore")
    records = 0
    for block in _line_blocks(stream, RECORD_BLOCK_BYTES):
        try:
            table = pj.read_json(pa.BufferReader(block), parse_options=options,
                                 read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1))
        except pa.ArrowInvalid as exc:
            message = re.sub(r"in row (\d+)", lambda m: f"in record {records + int(m.group(1)) + 1}", str(exc))
            raise _record_error(source, "JSON lines", ValueError(message)) from None
        records += table.num_rows
        yield table.column(0).to_pylist()


def _line_blocks(stream: IO[bytes], size: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The stream in blocks of about `size` bytes, each ending after a line break (the last one where
    the stream ends); blocks of blank lines only are left out."""
    parts: list[bytes] = []
    while chunk := stream.read(size):
        cut = chunk.rfind(b"\n") + 1
        if not cut:  # still inside one long line
            parts.append(chunk)
            continue
        block = b"".join([*parts, chunk[:cut]])
        parts = [chunk[cut:]]
        if block.strip():
            yield block
    block = b"".join(parts)
    if block.strip():
        yield block


def _json_array_pieces(source: FileSource, field: str) -> Iterator[Piece]:
    with _opened(source) as (raw, stream):
        try:
            records = json.load(stream)
        except (ValueError, RecursionError) as exc:
            raise GptlabError(f"{source.path}: not valid JSON ({exc})") from None
    if not all(isinstance(record, dict) for record in records):
        raise GptlabError(f"{source.path}: a JSON array of documents must hold objects with a {field!r} field")
    values = [record.get(field) for record in records]
    if any(value is not None and not isinstance(value, str) for value in values):
        raise GptlabError(f"{source.path}: the field {field!r} must hold strings")
    yield from _record_pieces(iter([values]), lambda: source.size, source.label, field)


def _csv_pieces(source: FileSource, field: str) -> Iterator[Piece]:
    """CSV or TSV through Python's csv module (quoted values may hold the delimiter, quotes and line
    breaks), one batch of rows at a time.

    Not pyarrow's streaming CSV reader: like its JSON reader it reads up to 32 blocks ahead, and with
    blocks big enough for long documents it held more of a 300 MB file than the file's size.
    """
    with _opened(source) as (raw, stream):
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        rows = csv.reader(text, delimiter="\t" if source.format == "tsv" else ",", strict=True)
        try:
            header = next(rows, None)
            if header is None:
                return
            if field not in header:
                raise GptlabError(f"{source.path} has no column {field!r} (its columns: {', '.join(header)}); "
                                  "choose one with --text-field")
            yield from _record_pieces(_csv_columns(rows, header.index(field), len(header), source), raw.tell,
                                      source.label, field)
        except csv.Error as exc:
            raise GptlabError(f"{source.path}: not valid CSV (line {rows.line_num}: {exc})") from None
        except UnicodeDecodeError:
            raise GptlabError(f"{source.path}: not UTF-8 text (line {rows.line_num})") from None
        finally:
            text.detach()  # _opened closes the file


def _csv_columns(rows: Iterator[list[str]], column: int, width: int, source: FileSource) -> Iterator[list]:
    """The `column` of the rows, in batches of about RECORD_BLOCK_BYTES characters; blank lines are left
    out, a row of another width is an error."""
    values: list[str] = []
    chars = 0
    for row in rows:
        if not row:
            continue
        if len(row) != width:
            raise GptlabError(f"{source.path}: not valid CSV (line {rows.line_num}: {len(row)} fields where "  # type: ignore[attr-defined]
                              f"the header has {width})")
        values.append(row[column])
        chars += len(row[column])
        if chars >= RECORD_BLOCK_BYTES:
            yield values
            values, chars = [], 0
    if values:
        yield values


def _parquet_pieces(source: FileSource, field: str) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except pa.ArrowInvalid as exc:
        raise _record_error(source, "Parquet", exc) from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise GptlabError(f"{source.path} has no column {field!r} (its columns: {', '.join(schema.names)}); "
                          "choose one with --text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise GptlabError(f"{source.path}: the column {field!r} holds {kind}, not text")
    groups = parquet.num_row_groups
    done = [0]

    def columns() -> Iterator[list]:
        for group in range(groups):
            for batch in parquet.iter_batches(batch_size=4096, row_groups=[group], columns=[field]):
                yield batch.column(0).to_pylist()
            done[0] = group + 1

    with parquet:
        yield from _record_pieces(columns(), lambda: source.size * done[0] // max(groups, 1), source.label, field)


def _hf_pieces(source: HFSource, field: str) -> Iterator[Piece]:
    dataset = source.dataset
    names = dataset.column_names
    if names is not None and field not in names:
        raise GptlabError(f"{source.label} has no column {field!r} (its columns: {', '.join(names)}); "
                          "choose one with --text-field")
    rows = getattr(dataset, "num_rows", None)
    read_rows = [0]

    def columns() -> Iterator[list]:
        for batch in dataset.select_columns([field]).iter(batch_size=1024):
            values = batch[field]
            if any(value is not None and not isinstance(value, str) for value in values):
                raise GptlabError(f"{source.label}: the column {field!r} must hold strings")
            read_rows[0] += len(values)
            yield values

    def position() -> int:
        return (source.size or 0) * read_rows[0] // rows if rows else 0

    with hub_errors(source.name):  # a streamed dataset reads the network as it goes
        yield from _record_pieces(columns(), position, source.label, field)


def _record_pieces(columns: Iterator[list], position: Callable[[], int], label: str, field: str) -> Iterator[Piece]:
    """Each non-empty text value a document; records without one (null, missing, empty) are left out."""
    records = texts = reported = 0
    for values in columns:
        records += len(values)
        for value in values:
            if not value:
                continue
            texts += 1
            if len(value) <= PIECE_CHARS:
                yield Piece(value, True)
            else:
                for i, piece in enumerate(_document(value)):
                    yield Piece(piece, i == 0)
        now = position()
        if now > reported:
            yield Piece("", False, now - reported)
            reported = now
    if records and not texts:
        raise GptlabError(f"none of the {records} records of {label} has text in the field {field!r}; "
                          "choose the field with --text-field")


def _record_error(source: FileSource, what: str, exc: Exception) -> GptlabError:
    return GptlabError(f"{source.path}: not valid {what} ({' '.join(str(exc).split())})")
