"""Get token shards for train_gpt.py: download the challenge's SP8192 FineWeb shards, or make shards from
your own text or from the documents of existing shards.

  python data/prepare.py download                         # 128 train shards + val + tokenizer into ./data/
  python data/prepare.py download --train-shards 10       # a prefix of the train shards (val is always whole)
  python data/prepare.py download --mirror /path/to/copy  # from a local folder laid out like the HF repo

  # the shared proxy corpus (train_gpt.py then runs with DATA_DIR=./data_corpus):
  python data/prepare.py text --input ../shared/corpus/docs_train.jsonl.xz \\
      --val-input ../shared/corpus/docs_val.jsonl.xz \\
      --tokenizer ../shared/corpus/tokenizer/sp8192.model --out ./data_corpus

  # the same with case operators (data/README.md), using the committed case-op tokenizer:
  python data/prepare.py text --input ../shared/corpus/docs_train.jsonl.xz \\
      --val-input ../shared/corpus/docs_val.jsonl.xz \\
      --tokenizer data/case_ops/fineweb_8192_bpe.model --case-ops --out ./data_case

  # FineWeb with case operators: its documents come only as SP8192 shards, so decode them and make new ones
  # (a case-op tokenizer trained on the train documents; val keeps the same documents in the same order):
  python data/prepare.py download
  python data/prepare.py text --input-shards ./data/datasets/fineweb10B_sp8192 \\
      --input-tokenizer ./data/tokenizers/fineweb_8192_bpe.model --train-tokenizer --case-ops --out ./data_case

  # your own text, with a tokenizer trained here with the challenge's SentencePiece settings:
  python data/prepare.py text --input my_docs/ --val-docs 1000 --train-tokenizer --out ./data_mine
  python data/prepare.py text --input my_docs/ --val-frac 0.03 --train-tokenizer --out ./data_mine  # the first 3 %

Inputs of `text`: `.jsonl`, `.jsonl.gz`, `.jsonl.xz` (one JSON object per line with a "text" field; an
optional "source" field can be selected with --source) and `.txt` (each file is one document). A folder
stands for the supported files under it, in sorted order. Documents are written in input order, each as
[BOS=1] + ids (no EOS); documents with no visible characters are skipped and counted. Or `--input-shards DIR`:
the documents of the challenge shards in DIR (val from fineweb_val_*.bin, train from fineweb_train_*.bin, each
stream cut at BOS), decoded with `--input-tokenizer MODEL`, the model they were made with; none is skipped.

Output: OUT/datasets/fineweb10B_sp{V}/fineweb_{val,train}_NNNNNN.bin (challenge shard format),
OUT/datasets/fineweb10B_sp{V}/manifest.json (counts, tokenizer hash and settings, the command) and
OUT/tokenizers/fineweb_{V}_bpe.model. Errors print `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import struct
import sys
import time
import unicodedata
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import sentencepiece as spm

# The shard format lives in train_gpt.py: one definition for the writer and the reader.
REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))
from train_gpt import (BOS_ID, CASE_MARKERS, SHARD_HEADER_BYTES, DataError, atomic_write_bytes,  # noqa: E402
                       read_shard_header, write_shard)

DEFAULT_REPO_ID = "kevclark/parameter-golf"
MAX_VOCAB = 65536  # shards store uint16 ids

# The challenge's SP8192 tokenizer settings (SPEC section 2); everything else is a SentencePiece default.
CHALLENGE_TOKENIZER = {
    "model_type": "bpe",
    "vocab_size": 8192,
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
MAX_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length; longer lines are left out of training


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
    except AttributeError:
        return os.cpu_count() or 1


class Progress:
    """One status line on stderr: redrawn in place on a terminal, a plain line every 10 s otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 10.0
        self.last = time.monotonic()

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            sys.stderr.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        self.update(text, force=True)
        if self.tty:
            sys.stderr.write("\n")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent handles it


def ordered_map(fn: Callable, items: Iterable, workers: int, processes: bool = False) -> Iterator:
    """fn(item) for each item on a pool of `workers` threads (or processes, for work that holds the GIL), yielded
    in input order. Items are pulled only to keep 2 * workers jobs in flight, so a long input streams; closing the
    generator cancels the jobs not started and waits for the running ones, so no worker outlives it.

    Processes are forked: they inherit the loaded modules (fn and its items travel by pickle, fn by name) without
    importing anything again. They are all started before the first item is pulled, so before that pull starts
    the threads of earlier stages: a fork while other threads hold locks can deadlock the child."""
    items = iter(items)
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_sigint)
            if processes else ThreadPoolExecutor(workers))
    with pool:
        if processes:
            pool.submit(int).result()  # forks every worker now (the first job does that), before any item is pulled
        in_flight: deque = deque()
        try:
            for item in items:
                in_flight.append(pool.submit(fn, item))
                if len(in_flight) >= 2 * workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for job in in_flight:
                job.cancel()


def batches(items: Iterable, size: Callable, limit: int) -> Iterator[list]:
    """items in consecutive lists whose size(item) adds up to at least limit (the last one less)."""
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= limit:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


# ================================================================================================
# Tokenizer: load, train, read its settings
# ================================================================================================


@dataclass
class Tokenizer:
    proto: bytes  # the .model file's bytes
    sp: spm.SentencePieceProcessor
    source: str  # where it came from, for messages and the manifest

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()


def tokenizer_from_proto(proto: bytes, source: str) -> Tokenizer:
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError, TypeError) as e:
        raise DataError(f"{source} is not a SentencePiece model: {e}") from None
    return Tokenizer(proto, sp, source)


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        proto = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the tokenizer {path}: {e.strerror}") from None
    return tokenizer_from_proto(proto, str(path))


def _proto_fields(buf: bytes) -> Iterator[tuple[int, object]]:
    """(field number, value) pairs of a serialized protobuf message: varints as int, 32-bit fields as
    float, length-delimited fields as bytes. Enough to read a SentencePiece model's specs without the
    protobuf package (which sentencepiece_model_pb2 needs and this environment may lack)."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = struct.unpack_from("<f", buf, i)[0], i + 4
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        else:
            raise DataError(f"unsupported protobuf wire type {wire} in a tokenizer model")
        yield number, value


# Field numbers and proto2 defaults from sentencepiece_model.proto. Only fields set at training time are
# serialized, so absent ones take these defaults.
_TRAINER_SPEC = {3: ("model_type", 1), 4: ("vocab_size", 8000), 10: ("character_coverage", 0.9995),
                 25: ("split_digits", False), 33: ("hard_vocab_limit", True), 35: ("byte_fallback", False),
                 40: ("unk_id", 0), 41: ("bos_id", 1), 42: ("eos_id", 2), 43: ("pad_id", -1)}
_NORMALIZER_SPEC = {1: ("normalization_rule_name", ""), 3: ("add_dummy_prefix", True)}
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def tokenizer_settings(proto: bytes) -> dict:
    """The training settings recorded in a SentencePiece model, keyed like CHALLENGE_TOKENIZER."""
    found = {}
    for number, message in _proto_fields(proto):
        spec = {2: _TRAINER_SPEC, 3: _NORMALIZER_SPEC}.get(number)
        for sub, value in _proto_fields(message) if spec else ():
            if sub in spec:
                name, default = spec[sub]
                if isinstance(default, bool):
                    value = bool(value)
                elif isinstance(value, float):
                    value = round(value, 6)  # stored as float32
                elif isinstance(value, int) and value >= 1 << 63:
                    value -= 1 << 64  # negative int32 (pad_id -1) is a 10-byte varint
                elif isinstance(value, bytes):
                    value = value.decode()
                found[name] = value
    defaults = dict([*_TRAINER_SPEC.values(), *_NORMALIZER_SPEC.values()])
    settings = {name: found.get(name, defaults[name]) for name in CHALLENGE_TOKENIZER}
    settings["model_type"] = _MODEL_TYPES.get(settings["model_type"], settings["model_type"])
    return settings


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_bytes: int, threads: int,
                    user_symbols: tuple[str, ...] = ()) -> bytes:
    """Train a BPE model with the challenge's settings, plus `user_symbols` as pieces of their own (the case
    markers); each line of a document is one sentence, as for the shared corpus's tokenizer. Returns the
    .model bytes."""
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        budget = max_bytes
        try:
            for text in texts:
                for line in text.split("\n"):
                    n = len(line.encode("utf-8"))
                    if n > MAX_SENTENCE_BYTES or not line.strip():
                        continue
                    yield line
                    budget -= n
                    if budget <= 0:
                        return
        except Exception as e:  # a bad input line: keep it for after training, SentencePiece would mask it
            failure.append(e)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model,
                                       **{**CHALLENGE_TOKENIZER, "vocab_size": vocab_size},
                                       **({"user_defined_symbols": list(user_symbols)} if user_symbols else {}),
                                       num_threads=threads, minloglevel=2)
    except RuntimeError as e:
        if not failure:
            raise DataError(f"training the tokenizer failed: {e}") from None
    if failure:
        raise failure[0]
    return model.getvalue()


# ================================================================================================
# Reading documents
# ================================================================================================

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".txt")


def input_files(paths: Iterable[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise DataError(f"the folder {path} holds no {', '.join(SUFFIXES)} files")
            files += found
        elif not path.exists():
            raise DataError(f"the input {path} does not exist")
        elif not path.name.endswith(SUFFIXES):
            raise DataError(f"the input {path} has an unsupported type; use {', '.join(SUFFIXES)}")
        else:
            files.append(path)
    return files


class Doc(NamedTuple):
    text: str | None  # None when it has no visible characters: skipped and counted
    nbytes: int  # UTF-8 bytes of text
    where: str  # "file:line", for messages


def _document(text: str, where: str) -> Doc:
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a JSON escape like "\ud800" decodes to a lone surrogate
        raise DataError(f"{where}: the text holds an unpaired surrogate (a \\udXXX escape); it is not valid Unicode") from None
    return Doc(text, nbytes, where) if text.strip() else Doc(None, 0, where)


def _read_txt(path: Path) -> Iterator[Doc]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                        "re-encode the file as UTF-8") from None
    yield _document(text, f"{path}:1")


def _read_jsonl(path: Path, sources: set[str] | None) -> Iterator[Doc]:
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                    "re-encode the file as UTF-8") from None
                if not line.strip():
                    continue  # tolerate blank lines, e.g. a trailing one
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise DataError(f'{path}:{lineno}: no "text" field; each line must be a JSON object like {{"text": "..."}}')
                if not isinstance(record["text"], str):
                    raise DataError(f'{path}:{lineno}: the "text" field is a {type(record["text"]).__name__}, not a string')
                if sources is None or record.get("source") in sources:
                    yield _document(record["text"], f"{path}:{lineno}")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise DataError(f"{path}:{lineno + 1}: cannot read the file: {e}") from None


def read_documents(files: list[Path], sources: set[str] | None = None) -> Iterator[Doc]:
    """Every document of the inputs, in order."""
    for path in files:
        if path.name.endswith(".txt"):
            yield from _read_txt(path)
        else:
            yield from _read_jsonl(path, sources)


# ================================================================================================
# Reading documents from challenge shards (--input-shards): the token stream cut at each BOS, decoded
# ================================================================================================

SHARD_CHUNK_TOKENS = 1 << 22  # tokens read from a shard at a time (8 MB): memory stays flat for 100M-token shards
DECODE_BATCH_TOKENS = 1 << 18  # tokens per decoding job, about 1 MB of text
INPUT_TOKENIZER_FIX = ("give --input-tokenizer the SentencePiece model the shards were made with (for the challenge's "
                       "FineWeb shards: ./data/tokenizers/fineweb_8192_bpe.model, which `python data/prepare.py download` fetches)")


def shard_splits(folder: str | Path) -> dict[str, list[Path]]:
    """The val and train shards of a dataset folder, each in file order."""
    folder = Path(folder)
    example = "e.g. ./data/datasets/fineweb10B_sp8192 after `python data/prepare.py download`"
    if not folder.is_dir():
        raise DataError(f"--input-shards {folder} is not a folder; give the folder that holds fineweb_train_*.bin and "
                        f"fineweb_val_*.bin, {example}")
    found = {split: sorted(folder.glob(f"fineweb_{split}_*.bin")) for split in ("val", "train")}
    for split, files in found.items():
        if not files:
            inner = sorted(folder.glob("datasets/fineweb10B_sp*"))
            raise DataError(f"--input-shards {folder} holds no fineweb_{split}_*.bin shards; give the folder that holds "
                            + (f"them: {inner[0]}?" if inner else f"both train and val shards, {example}"))
    return found


def check_input_tokenizer(folder: Path, tok: Tokenizer) -> None:
    """Refuse a tokenizer that cannot be the one the shards were made with: its size must be the one in the
    folder's name (fineweb10B_sp{V}) and its hash the one in the folder's manifest.json, where they say."""
    named = re.fullmatch(r"fineweb10B_sp(\d+)", folder.resolve().name)
    if named and int(named[1]) != tok.vocab_size:
        raise DataError(f"the shards in {folder} are for a {named[1]}-piece tokenizer (the folder's name says so) but "
                        f"--input-tokenizer {tok.source} has {tok.vocab_size} pieces; {INPUT_TOKENIZER_FIX}")
    try:
        made_with = json.loads((folder / "manifest.json").read_text())["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        made_with = None  # the challenge's download keeps no manifest in the dataset folder
    if made_with and made_with != tok.sha256:
        raise DataError(f"{folder / 'manifest.json'} says its shards were made with the tokenizer of sha256 "
                        f"{made_with[:16]}..., but --input-tokenizer {tok.source} is {tok.sha256[:16]}...; {INPUT_TOKENIZER_FIX}")
    if tok.sp.bos_id() != BOS_ID:
        raise DataError(f"--input-tokenizer {tok.source} has BOS id {tok.sp.bos_id()}; challenge shards start each "
                        f"document with BOS = {BOS_ID}; {INPUT_TOKENIZER_FIX}")


def _shard_token_documents(files: list[Path], tok: Tokenizer) -> Iterator[tuple[str, np.ndarray]]:
    """(where, ids after the BOS) of each document of a split's token stream, in order. A document may run on
    from one shard into the next; only a chunk of a shard is in memory at a time."""
    where, pending, count = None, [], 0  # the document being read: its label and its ids so far
    for path in files:
        n = read_shard_header(path)
        if not n:
            continue
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
        for start in range(0, n, SHARD_CHUNK_TOKENS):
            chunk = np.array(tokens[start:start + SHARD_CHUNK_TOKENS])  # a copy: the map closes after the shard
            if where is None and chunk[0] != BOS_ID:
                raise DataError(f"{path}: the token stream starts with id {int(chunk[0])}, not BOS = {BOS_ID}, so its first "
                                "document has no start; challenge shards hold each document as [BOS] + ids. Give the folder "
                                f"with every shard of the split from {files[0].name.rsplit('_', 1)[0]}_000000.bin on, as "
                                "`python data/prepare.py download` or `text` writes them")
            if int(chunk.max()) >= tok.vocab_size:
                pos = int(np.argmax(chunk >= tok.vocab_size))
                raise DataError(f"{path}: token {start + pos} is id {int(chunk[pos])}, outside the {tok.vocab_size} pieces "
                                f"of --input-tokenizer {tok.source}, so the shards were made with another one; {INPUT_TOKENIZER_FIX}")
            cuts = np.flatnonzero(chunk == BOS_ID).tolist()
            pending.append(chunk[:cuts[0] if cuts else chunk.size])
            for a, b in zip(cuts, cuts[1:] + [chunk.size]):
                if where is not None:
                    yield where, np.concatenate(pending)
                where, pending, count = f"{path}: document {count + 1} (token {start + a})", [chunk[a + 1:b]], count + 1
        del tokens
    if where is not None:
        yield where, np.concatenate(pending)


def _decode_job(sp: spm.SentencePieceProcessor, batch: list[tuple[str, np.ndarray]]) -> list[Doc]:
    texts = sp.decode([ids.tolist() for _, ids in batch])
    # Never skipped, even when empty: the output keeps exactly the input's documents.
    return [Doc(text, len(text.encode("utf-8")), where) for (where, _), text in zip(batch, texts)]


def shard_documents(files: list[Path], tok: Tokenizer, workers: int) -> Iterator[Doc]:
    """Every document of a split's shards, in order, decoded to text on a thread pool."""
    jobs = batches(_shard_token_documents(files, tok), lambda doc: doc[1].size + 1, DECODE_BATCH_TOKENS)
    for docs in ordered_map(functools.partial(_decode_job, tok.sp), jobs, workers):
        yield from docs


# ================================================================================================
# Case operators (--case-ops): lossless lower-casing, so that "The", "the" and "THE" share pieces
# ================================================================================================

CASE_CAP, CASE_UPPER = CASE_MARKERS  # private-use characters; train_gpt.py counts their pieces as 0 bytes


def _codepoint(c: str) -> str:
    return f"U+{ord(c):04X}"


def _lowers_exactly(c: str) -> bool:
    """c is an upper-case letter whose lower-case form is one letter of the same UTF-8 length that upper-cases
    back to c, and NFKC changes neither (so 'İ', the Kelvin sign and full-width 'Ａ' stay as they are)."""
    low = c.lower()
    return (low != c and len(low) == 1 and low.upper() == c and c.isalpha() and low.isalpha()
            and len(low.encode("utf-8")) == len(c.encode("utf-8"))
            and unicodedata.normalize("NFKC", c) == c and unicodedata.normalize("NFKC", low) == low)


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class (without brackets) of chars, as ranges: Python's re scans a class holding
    characters past U+FFFF item by item, so fewer items make it much faster."""
    codes = sorted(map(ord, chars))
    items = []
    for _, run in itertools.groupby(enumerate(codes), lambda x: x[1] - x[0]):  # runs of consecutive code points
        run = [code for _, code in run]
        items.append(re.escape(chr(run[0])) + (f"-{re.escape(chr(run[-1]))}" if len(run) > 1 else ""))
    return "".join(items)


@functools.cache
def _case_tables() -> tuple[re.Pattern, re.Pattern, frozenset]:
    """(word pattern of case_encode, marker pattern of case_decode, the letters that may be lower-cased).
    A letter is a character with str.isalpha(): Python's \\w without '_', digits and other numerals like
    '²' (NFKC turns those into digits, which would split a word). A word is a maximal run of letters."""
    chars = [chr(i) for i in range(sys.maxunicode + 1) if not 0xD800 <= i < 0xE000]  # no lone surrogates
    letter = r"[^\W\d_" + _char_class(c for c in chars if c.isalnum() and not (c.isalpha() or c.isdecimal())) + "]"
    lowerable = "".join(c for c in chars if c.lower() != c and _lowers_exactly(c))
    # The whitespace before a word goes with it, so that its marker lands before that whitespace.
    word = re.compile(rf"(\s*)(?<!{letter})([{_char_class(lowerable)}]{letter}*)")
    marker = re.compile(rf"([{CASE_CAP}{CASE_UPPER}])(\s*)({letter}*)")
    return word, marker, frozenset(lowerable)


def _case_word(m: re.Match) -> str:
    space, word = m.groups()  # word starts with a letter that lowers exactly
    rest = word[1:]
    if rest.lower() == rest:  # Capitalized (or a single capital)
        mark, low = CASE_CAP, word[0].lower() + rest
    else:  # ALL-CAPS, if every changed letter lowers exactly and upper-casing restores the word; else unchanged
        mark, low = CASE_UPPER, word.lower()
        lowerable = _case_tables()[2]
        if len(low) != len(word) or low.upper() != word or any(a != b and a not in lowerable for a, b in zip(word, low)):
            return m.group(0)
    # The marker goes before the whitespace (" Hello" -> CAP + " hello"), so SentencePiece still sees "▁hello";
    # at the start of the text it goes after it, where the normalizer drops the whitespace anyway.
    return space + mark + low if m.start() == 0 else mark + space + low


def case_encode(text: str) -> str:
    """Lower-case the Capitalized and ALL-CAPS words of text, each after a marker (CASE_CAP, CASE_UPPER) placed
    before the whitespace that precedes it; other words stay. Every lower-cased letter keeps its UTF-8 length
    and NFKC form, so the bytes counted for the tokens (markers count 0) are those of the original text.
    case_decode(case_encode(t)) == t. A text that already holds a marker character is refused (ValueError)."""
    for mark in CASE_MARKERS:
        if mark in text:
            raise ValueError(f"the text holds the character {_codepoint(mark)}, which --case-ops uses as a case marker; "
                             "remove it from the input or make shards without --case-ops")
    return _case_tables()[0].sub(_case_word, text)


def _case_restore(m: re.Match) -> str:
    mark, space, word = m.groups()
    return space + (word[:1].upper() + word[1:] if mark == CASE_CAP else word.upper())


def case_decode(text: str) -> str:
    """The inverse of case_encode. A marker that no word follows (only model output can have one) is dropped."""
    return _case_tables()[1].sub(_case_restore, text)


CASE_BATCH_BYTES = 4 << 20  # text per case-op job: pickling it to a worker and back costs ~3 % of the regex work


def _case_job(batch: list[Doc]) -> list[Doc]:
    """The batch with case_encode applied to each text; a refused text raises DataError naming its document."""
    out = []
    for doc in batch:
        try:
            out.append(doc if doc.text is None else doc._replace(text=case_encode(doc.text)))
        except ValueError as e:
            raise DataError(f"{doc.where}: {e}") from None
    return out


def case_documents(docs: Iterable[Doc], workers: int = 1) -> Iterator[Doc]:
    """docs with case_encode applied, in order; nbytes stays the UTF-8 length of the original text. case_encode
    is pure Python regex work that holds the GIL, so with workers > 1 batches of documents go to that many
    processes (one core each); with 1 it runs here. The output does not depend on the number of workers."""
    jobs = batches(docs, lambda doc: doc.nbytes, CASE_BATCH_BYTES)
    if workers > 1:
        _case_tables()  # built once here, inherited by the forked workers
        jobs = ordered_map(_case_job, jobs, workers, processes=True)
    else:
        jobs = map(_case_job, jobs)
    try:
        for batch in jobs:
            yield from batch
    finally:
        if workers > 1:
            jobs.close()  # stops the pool now, not when the generator is collected


# ================================================================================================
# Text to shards
# ================================================================================================

BATCH_BYTES = 1 << 20  # text per encoding job: small enough to keep every core busy, big enough to amortize


def encode_batch(sp: spm.SentencePieceProcessor, texts: list[str]) -> list[list[int]]:
    """[BOS] + ids for each text. SentencePiece releases the GIL while encoding, so jobs on a thread pool
    use every core without pickling the text to other processes."""
    return sp.encode(texts, add_bos=True, num_threads=1)


def _encode_job(sp: spm.SentencePieceProcessor, batch: list[Doc]) -> tuple[list[Doc], np.ndarray, np.ndarray]:
    """Tokens of the batch's documents concatenated, and each document's length (0 for skipped ones)."""
    keep = [i for i, doc in enumerate(batch) if doc.text is not None]
    ids = encode_batch(sp, [batch[i].text for i in keep])
    lengths = np.zeros(len(batch), dtype=np.int64)
    lengths[keep] = [len(x) for x in ids]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return batch, lengths, flat


class ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        if self.pending_tokens < self.shard_tokens:
            return
        stream = np.concatenate(self.pending)
        start = 0
        while stream.size - start >= self.shard_tokens:
            self._write(stream[start:start + self.shard_tokens])
            start += self.shard_tokens
        self.pending = [stream[start:]]
        self.pending_tokens = stream.size - start

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"fineweb_{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.folder / name, tokens)
        self.shards.append({"file": name, "tokens": int(tokens.size)})


def convert_split(split: str, docs: Iterable[Doc], tok: Tokenizer, writer: ShardWriter, max_tokens: int,
                  workers: int, progress: Progress) -> dict:
    """Encode documents on a thread pool and write them in input order (so the output is deterministic).
    With max_tokens > 0, stop before the first document that would pass it."""
    stats = {"documents": 0, "empty_documents_skipped": 0, "tokens": 0, "text_bytes": 0}
    vocab = tok.vocab_size
    start = time.monotonic()
    jobs = ordered_map(functools.partial(_encode_job, tok.sp), batches(docs, lambda doc: doc.nbytes, BATCH_BYTES), workers)
    try:
        for batch, lengths, flat in jobs:
            if flat.size and (flat.max() >= vocab or flat.min() < 0):
                pos = int(np.argmax((flat >= vocab) | (flat < 0)))
                doc = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
                raise DataError(f"{batch[doc].where}: the tokenizer produced id {int(flat[pos])}, outside its vocabulary "
                                f"of {vocab}; the tokenizer {tok.source} is inconsistent, retrain or replace it")
            keep = len(batch)
            if max_tokens:
                keep = int(np.searchsorted(np.cumsum(lengths), max_tokens - stats["tokens"], side="right"))
            n_tokens = int(lengths[:keep].sum())
            writer.add(flat[:n_tokens].astype(np.uint16))
            written = sum(1 for doc in batch[:keep] if doc.text is not None)
            stats["documents"] += written
            stats["empty_documents_skipped"] += keep - written
            stats["tokens"] += n_tokens
            stats["text_bytes"] += sum(doc.nbytes for doc in batch[:keep])
            rate = stats["text_bytes"] / 1e6 / max(time.monotonic() - start, 1e-9)
            progress.update(f"[{split}] {stats['documents']:,} docs, {stats['text_bytes'] / 1e6:,.1f} MB of text, "
                            f"{stats['tokens']:,} tokens ({rate:.1f} MB/s)")
            if keep < len(batch):
                break  # the token cap is reached
    finally:
        jobs.close()  # stops the pool before the shards are closed
    writer.close()
    progress.done(f"[{split}] {stats['documents']:,} docs, {stats['tokens']:,} tokens in {len(writer.shards)} shard(s), "
                  f"{time.monotonic() - start:.1f} s")
    stats["bytes_per_token"] = round(stats["text_bytes"] / stats["tokens"], 4) if stats["tokens"] else None
    stats["shards"] = writer.shards
    return stats


def check_output(folder: Path, tokenizer_path: Path, tok: Tokenizer) -> None:
    """Refuse to mix shards of two tokenizers in one folder: train_gpt.py would read them as one dataset."""
    old_shards = sorted(folder.glob("fineweb_*.bin")) if folder.is_dir() else []
    manifest = folder / "manifest.json"
    if old_shards:
        if not manifest.is_file():
            raise DataError(f"{folder} already holds {len(old_shards)} shard(s) but no manifest.json, so the tokenizer that "
                            "made them is unknown; choose another --out or remove those shards")
        try:
            old_sha = json.loads(manifest.read_text())["tokenizer"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read the tokenizer hash from {manifest} ({e}); choose another --out or remove the folder") from None
        if old_sha != tok.sha256:
            raise DataError(f"{folder} already holds shards made with another tokenizer (sha256 {old_sha[:16]}..., "
                            f"this one is {tok.sha256[:16]}...); choose another --out or remove the old shards")
    if tokenizer_path.is_file() and hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != tok.sha256:
        raise DataError(f"{tokenizer_path} already exists and is another tokenizer; choose another --out or remove it")


def _remove_stale_staging(folder: Path) -> None:
    """Staging folders of runs that were killed (their process is gone)."""
    for old in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)  # signal 0: only asks whether the process exists
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _publish(staging: Path, folder: Path, tokenizer_path: Path, tok: Tokenizer, manifest: dict) -> None:
    atomic_write_bytes(tokenizer_path, tok.proto)
    folder.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first and the new one comes last, so a folder with a manifest is complete.
    (folder / "manifest.json").unlink(missing_ok=True)
    for old in folder.glob("fineweb_*.bin"):
        old.unlink()
    for new in sorted(staging.glob("fineweb_*.bin")):
        os.replace(new, folder / new.name)
    atomic_write_bytes(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def validation_split(args: argparse.Namespace, train_files: list[Path], sources: set[str] | None) -> tuple[int, int]:
    """Which documents of --input are validation, as (start, stop) in file order: the first N (--val-docs N),
    the first fraction F (--val-frac F) or the last N (--val-last N: a held-out set whose documents lie past
    the text a tokenizer trained on the first megabytes of the file has seen). Checked to leave training at
    least one document: SentencePiece and the train split both need one."""
    if args.val_frac is not None:
        if not 0 < args.val_frac < 1:
            raise DataError(f"--val-frac {args.val_frac:g} must be between 0 and 1 (e.g. 0.03 for the first 3 %)")
        total = sum(1 for _ in read_documents(train_files, sources))
        count = max(1, round(args.val_frac * total))
        given = f"--val-frac {args.val_frac:g}"
    elif args.val_last is not None:
        count = args.val_last
        total = sum(1 for _ in read_documents(train_files, sources))
        given = f"--val-last {count}"
    else:
        count = args.val_docs
        total = sum(1 for _ in itertools.islice(read_documents(train_files, sources), count + 1))
        given = f"--val-docs {count}"
    if count >= total:
        exact = args.val_docs is None
        raise DataError(f"{given} would make every document of --input validation ({total} "
                        f"document{'s' if total != 1 else ''}{'' if exact else ' or fewer'}), "
                        "leaving none for training; give fewer, e.g. --val-frac 0.03 (the first 3 %), "
                        "or separate validation files with --val-input")
    return (total - count, total) if args.val_last is not None else (0, count)


def text_command(args: argparse.Namespace, argv: list[str]) -> dict:
    shards = args.input_shards is not None
    if shards:
        given = [f"--{name.replace('_', '-')}" for name in ("val_input", "val_docs", "val_frac", "val_last", "source")
                 if getattr(args, name) is not None]
        if given:
            raise DataError(f"--input-shards takes val from the fineweb_val_*.bin shards and train from fineweb_train_*.bin, "
                            f"every document of each; drop {' and '.join(given)}")
        if args.input_tokenizer is None:
            raise DataError("--input-shards needs --input-tokenizer MODEL, the SentencePiece model the shards were made with "
                            "(for the challenge's FineWeb shards: ./data/tokenizers/fineweb_8192_bpe.model)")
    elif args.input_tokenizer is not None:
        raise DataError("--input-tokenizer is the tokenizer of --input-shards; text inputs (--input) need none")
    elif sum(x is not None for x in (args.val_input, args.val_docs, args.val_frac, args.val_last)) != 1:
        raise DataError("give the validation documents in one way: --val-input FILE, --val-docs N (the first N "
                        "documents), --val-frac F (the first fraction F of the documents) or --val-last N (the last N)")
    for name in ("shard_tokens", "workers", "vocab_size", "tokenizer_train_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("val_docs", "val_last", "max_train_tokens", "max_val_tokens"):
        if (getattr(args, name) or 0) < 0:
            raise DataError(f"--{name.replace('_', '-')} must not be negative")

    # Fresh readers each time, so that a token cap on val cannot shift where train starts.
    read: dict[str, Callable[[], Iterator[Doc]]]
    if shards:
        shard_dir = Path(args.input_shards)
        split_files = shard_splits(shard_dir)
        if shard_dir.resolve().parent == (Path(args.out) / "datasets").resolve():
            raise DataError(f"--out {args.out} is where the input shards live ({shard_dir}); the output would replace them "
                            "or their tokenizer, choose another --out (e.g. ./data_case)")
        input_tok = load_tokenizer(args.input_tokenizer)
        check_input_tokenizer(shard_dir, input_tok)
        read = {split: functools.partial(shard_documents, files, input_tok, args.workers) for split, files in split_files.items()}
        inputs = {split: f"{shard_dir / f'fineweb_{split}_*.bin'} ({len(files)} shard(s))" for split, files in split_files.items()}
        inputs["tokenizer"] = {"file": args.input_tokenizer, "sha256": input_tok.sha256}
    else:
        train_files = input_files(args.input)
        val_files = input_files(args.val_input) if args.val_input else None
        sources = set(args.source) if args.source else None
        if sources and any(f.name.endswith(".txt") for f in train_files + (val_files or [])):
            raise DataError("--source selects jsonl records by their \"source\" field; .txt inputs have none")
        if val_files is not None:
            read = {"val": lambda: read_documents(val_files, sources), "train": lambda: read_documents(train_files, sources)}
            inputs = {"train": args.input, "val": args.val_input}
        else:
            start, stop = validation_split(args, train_files, sources)
            read = {"val": lambda: itertools.islice(read_documents(train_files, sources), start, stop),
                    "train": lambda: (doc for i, doc in enumerate(read_documents(train_files, sources)) if not start <= i < stop)}
            which = f"the first {stop}" if start == 0 else f"the last {stop - start} (of {stop})"
            inputs = {"train": args.input, "val": f"{which} documents of the train inputs"}

    # Case ops apply after the split: val holds the same documents with or without them.
    transform = functools.partial(case_documents, workers=args.workers) if args.case_ops else iter

    def val_docs() -> Iterator[Doc]:
        return transform(read["val"]())

    def train_docs() -> Iterator[Doc]:
        return transform(read["train"]())

    if args.train_tokenizer:
        vocab = args.vocab_size or CHALLENGE_TOKENIZER["vocab_size"]
        if vocab > MAX_VOCAB:
            raise DataError(f"--vocab-size {vocab} does not fit the uint16 shards (at most {MAX_VOCAB})")
        print(f"training a {vocab}-piece tokenizer on up to {args.tokenizer_train_bytes / 1e6:g} MB of train text"
              + (" with case ops" if args.case_ops else ""), file=sys.stderr)
        texts = (doc.text for doc in train_docs() if doc.text is not None)
        try:
            proto = train_tokenizer(texts, vocab, args.tokenizer_train_bytes, args.workers, CASE_MARKERS if args.case_ops else ())
        finally:
            texts.close()  # training reads only a prefix: stop the readers and case-op workers now, not at exit
        tok = tokenizer_from_proto(proto, "trained by data/prepare.py")
    else:
        tok = load_tokenizer(args.tokenizer)
    marker_ids = [tok.sp.piece_to_id(m) for m in CASE_MARKERS]
    if args.case_ops and any(tok.sp.encode(m) != [i] or i == tok.sp.unk_id() for m, i in zip(CASE_MARKERS, marker_ids)):
        raise DataError(f"--case-ops needs a tokenizer with the case markers {' and '.join(map(_codepoint, CASE_MARKERS))} "
                        f"as pieces of their own; {tok.source} lacks them. Train one with --train-tokenizer --case-ops, "
                        "or use data/case_ops/fineweb_8192_bpe.model")
    vocab = tok.vocab_size
    if args.vocab_size is not None and vocab != args.vocab_size:
        raise DataError(f"the tokenizer ({tok.source}) has {vocab} pieces, not --vocab-size {args.vocab_size}"
                        + ("; the text is probably too small for that many pieces" if args.train_tokenizer else ""))
    if vocab > MAX_VOCAB:
        raise DataError(f"the tokenizer {tok.source} has {vocab} pieces; shards hold uint16 ids (at most {MAX_VOCAB})")
    if tok.sp.bos_id() != BOS_ID:
        raise DataError(f"the tokenizer {tok.source} has BOS id {tok.sp.bos_id()}; the challenge format needs BOS = {BOS_ID}")

    out = Path(args.out)
    folder = out / "datasets" / f"fineweb10B_sp{vocab}"
    tokenizer_path = out / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    check_output(folder, tokenizer_path, tok)
    _remove_stale_staging(folder)
    # Shards are written to a staging folder and moved in at the end: an error leaves nothing behind.
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        progress = Progress()
        splits = {}
        for split, docs, cap in (("val", val_docs(), args.max_val_tokens), ("train", train_docs(), args.max_train_tokens)):
            writer = ShardWriter(staging, split, args.shard_tokens)
            splits[split] = convert_split(split, docs, tok, writer, cap, args.workers, progress)
            if not splits[split]["documents"]:
                raise DataError(f"the {split} split has no documents; check the inputs, --source, --val-docs/--val-frac and the token caps")
        manifest = {
            "format": "challenge shards: 256 little-endian int32 header (20240520, 1, n_tokens) + n_tokens uint16 ids; "
                      "each document is [BOS=1] + ids, no EOS",
            "command": "python data/prepare.py " + shlex.join(argv),
            "inputs": inputs,
            "options": {"val_docs": args.val_docs, "val_frac": args.val_frac, "val_last": args.val_last, "source": sorted(set(args.source)) if args.source else None,
                        "shard_tokens": args.shard_tokens, "max_train_tokens": args.max_train_tokens,
                        "max_val_tokens": args.max_val_tokens},
            "tokenizer": {"file": str(tokenizer_path.relative_to(out)), "source": tok.source, "sha256": tok.sha256,
                          "vocab_size": vocab, "settings": tokenizer_settings(tok.proto)},
            "case_ops": {"capitalized": _codepoint(CASE_CAP), "all_caps": _codepoint(CASE_UPPER), "ids": marker_ids,
                         "decode": "data/prepare.py case_decode"} if args.case_ops else None,
            "splits": splits,
        }
        _publish(staging, folder, tokenizer_path, tok, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {folder} ({splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens) and {tokenizer_path}")
    print(f"train with: DATA_DIR={out}{'' if vocab == 8192 else f' VOCAB_SIZE={vocab}'} python train_gpt.py")
    return manifest


# ================================================================================================
# Download from the Hugging Face dataset repo
# ================================================================================================

Fetch = Callable[[str, str, Path], None]  # fetch(repo_id, path in the repo, destination file)
HF_STAGING = ".hf-download"  # huggingface_hub's folder for partial downloads; it resumes from there


def _hf_hub_download():
    try:
        from huggingface_hub import hf_hub_download  # only downloads need it
    except ImportError:
        raise DataError("downloading needs the huggingface_hub package: pip install huggingface_hub "
                        "(or copy from a local folder with --mirror DIR)") from None
    return hf_hub_download


def hf_fetch(repo_id: str, filename: str, dest: Path) -> None:
    hf_hub_download = _hf_hub_download()
    subfolder, _, name = filename.rpartition("/")
    got = Path(hf_hub_download(repo_id=repo_id, filename=name, subfolder=subfolder or None, repo_type="dataset",
                               local_dir=dest.parent / HF_STAGING))
    if got.is_symlink():  # older huggingface_hub versions link into their cache
        shutil.copyfile(got.resolve(), dest)
    else:
        os.replace(got, dest)


def mirror_fetch(mirror: str | Path) -> Fetch:
    """A fetch that copies from a local folder laid out like the HF repo (for offline use and tests)."""
    mirror = Path(mirror)

    def fetch(repo_id: str, filename: str, dest: Path) -> None:
        source = mirror / filename
        if not source.is_file():
            raise DataError(f"the mirror {mirror} has no {filename}")
        shutil.copyfile(source, dest)

    return fetch


def verify_file(path: Path, vocab: int, kind: str) -> None:
    """Raise DataError unless the file is complete and usable; kind is the suffix of its final name."""
    if kind == ".bin":
        read_shard_header(path)
    elif kind == ".model":
        tok = load_tokenizer(path)
        if tok.vocab_size != vocab:
            raise DataError(f"{path} has {tok.vocab_size} pieces, expected {vocab}")
    else:
        try:
            data = path.read_bytes().decode("utf-8")
            if kind == ".json":
                json.loads(data)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is unreadable: {e}") from None
        if not data:
            raise DataError(f"{path} is empty")


def download(data_dir: str | Path, variant: str = "sp8192", train_shards: int = 128,
             repo_id: str = DEFAULT_REPO_ID, fetch: Fetch = hf_fetch) -> list[str]:
    """Fetch the manifest, tokenizer, all val shards and the first `train_shards` train shards into the
    challenge layout; files already present and valid are kept. Returns the repo paths fetched."""
    if not re.fullmatch(r"sp\d+", variant):
        raise DataError(f"--variant {variant!r}: expected sp<vocab size>, e.g. sp8192")
    if train_shards < 0:
        raise DataError("--train-shards must not be negative")
    vocab = int(variant[2:])
    data_dir = Path(data_dir)
    dataset = f"fineweb10B_{variant}"
    fetched: list[str] = []

    def get(rel: str, label: str) -> None:
        # The repo keeps the challenge layout under datasets/: repo datasets/X is local DATA_DIR/X.
        local, remote = data_dir / rel, f"datasets/{rel}"
        if local.exists():
            try:
                verify_file(local, vocab, local.suffix)
                print(f"{label}: present and valid, skipped", flush=True)
                return
            except DataError as e:
                print(f"{label}: present but invalid ({e}), fetching again", flush=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f".{local.name}.part")  # never a half file at the final name
        start = time.monotonic()
        try:
            try:
                fetch(repo_id, remote, part)
            except DataError:
                raise
            except Exception as e:  # network, disk, missing file: all resumable by running again
                raise DataError(f"fetching {remote} from {repo_id} failed: {e}. Files already downloaded are kept; "
                                "run the same command again to resume.") from None
            verify_file(part, vocab, local.suffix)
            os.replace(part, local)
        finally:
            part.unlink(missing_ok=True)
        seconds = time.monotonic() - start
        size = local.stat().st_size / 1e6
        print(f"{label}: fetched {size:,.1f} MB in {seconds:.1f} s ({size / max(seconds, 1e-9):,.1f} MB/s)", flush=True)
        fetched.append(remote)

    get("manifest.json", "manifest.json")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    # The manifest says how many shards the repo has (fields as in the challenge's own downloader).
    entry = next((d for d in (manifest.get("datasets") or []) if isinstance(d, dict) and d.get("name") == dataset), {}) \
        if isinstance(manifest, dict) else {}
    stats = entry.get("stats") or {}
    val_shards = int(stats.get("files_val", 1))
    if stats.get("files_train") is not None and train_shards > int(stats["files_train"]):
        raise DataError(f"{repo_id} has {stats['files_train']} train shards of {dataset}; --train-shards {train_shards} is too many")
    files = [f"tokenizers/fineweb_{vocab}_bpe.model", f"tokenizers/fineweb_{vocab}_bpe.vocab"]
    files += [f"datasets/{dataset}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    files += [f"datasets/{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    for i, rel in enumerate(files, 1):
        get(rel, f"[{i:>3}/{len(files)}] {rel}")
    for folder in (data_dir, data_dir / "tokenizers", data_dir / "datasets" / dataset):
        shutil.rmtree(folder / HF_STAGING, ignore_errors=True)  # all done: no partial files left to resume
    print(f"{data_dir}: {val_shards} val and {train_shards} train shard(s) of {dataset}, tokenizer in {data_dir / 'tokenizers'}")
    return fetched


# ================================================================================================
# Command line
# ================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data/prepare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    d = commands.add_parser("download", help="fetch the challenge's FineWeb shards and tokenizer from Hugging Face")
    d.add_argument("--data-dir", default="./data/", help="where the challenge layout goes (default ./data/)")
    d.add_argument("--train-shards", type=int, default=128, help="how many train shards, from the first (default 128; val is always whole)")
    d.add_argument("--variant", default="sp8192", help="tokenizer family (default sp8192)")
    d.add_argument("--repo-id", default=DEFAULT_REPO_ID, help=f"Hugging Face dataset repo (default {DEFAULT_REPO_ID})")
    d.add_argument("--mirror", metavar="DIR", help="copy from a local folder laid out like the repo instead of the network")

    t = commands.add_parser("text", help="tokenize your own documents, or those of existing shards, into challenge shards")
    given = t.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", nargs="+", metavar="PATH", help=".jsonl[.gz|.xz] or .txt files, or folders of them")
    given.add_argument("--input-shards", metavar="DIR", help="or: the documents of the challenge shards in DIR (val from "
                       "fineweb_val_*.bin, train from fineweb_train_*.bin), decoded with --input-tokenizer")
    t.add_argument("--input-tokenizer", metavar="MODEL", help="the SentencePiece .model the --input-shards were made with")
    t.add_argument("--val-input", nargs="+", metavar="PATH", help="validation documents (all of them, in file order)")
    t.add_argument("--val-docs", type=int, metavar="N", help="or: the first N documents of --input are validation")
    t.add_argument("--val-frac", type=float, metavar="F", help="or: the first fraction F of the documents of --input (0.03 = 3 %%)")
    t.add_argument("--val-last", type=int, metavar="N", help="or: the last N documents of --input are validation (a held-out "
                   "set past the text the tokenizers were trained on; bench/gpu_holdout.sh)")
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", metavar="MODEL", help="an existing SentencePiece .model")
    which.add_argument("--train-tokenizer", action="store_true", help="train one on the train documents with the challenge's settings")
    t.add_argument("--vocab-size", type=int, help="pieces of the trained tokenizer (default 8192); with --tokenizer, a check")
    t.add_argument("--case-ops", action="store_true", help="lower-case Capitalized and ALL-CAPS words after a marker "
                   "piece (U+E000, U+E001; 0 bytes in train_gpt.py) in every document; the tokenizer must have the markers")
    t.add_argument("--tokenizer-train-bytes", type=int, default=50_000_000, help="text used to train the tokenizer (default 50 MB)")
    t.add_argument("--source", action="append", metavar="NAME", help="keep only jsonl records with this \"source\" (repeatable)")
    t.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100,000,000)")
    t.add_argument("--max-train-tokens", type=int, default=0, help="stop train before the document that would pass this (0: no cap)")
    t.add_argument("--max-val-tokens", type=int, default=0, help="the same for val (0: no cap)")
    t.add_argument("--workers", type=int, default=default_workers(), help="encoding threads, and with --case-ops as many "
                   "processes for the case transform (default: all cores)")
    t.add_argument("--out", required=True, metavar="DIR", help="output root; train_gpt.py then runs with DATA_DIR=DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            if not args.mirror:
                _hf_hub_download()  # say it is missing before anything else
            fetch = mirror_fetch(args.mirror) if args.mirror else hf_fetch
            download(args.data_dir, args.variant, args.train_shards, args.repo_id, fetch)
        else:
            text_command(args, argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left at a final name, run the command again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
