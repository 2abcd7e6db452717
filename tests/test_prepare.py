"""Tests of data/prepare.py: shards, splits, tokenizer training, errors, download, the bundled sample.

python -m pytest -q tests/test_prepare.py    (CPU, a few seconds)
"""
import gzip
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

sys.dont_write_bytecode = True  # tests never write into the repository

import numpy as np
import pytest
import sentencepiece as spm

from conftest import load_prepare, sample_stream, write_split

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402

prepare = load_prepare()

SAMPLE = REPO / "data" / "sample"
SAMPLE_TOKENIZER = SAMPLE / "tokenizers" / "fineweb_8192_bpe.model"

WORDS = ("the of and to in a is was that for it with as his on be at by had not are but from or have an "
         "they which one you were her all she there would their we him been has when who will more no if out "
         "river stone garden letter morning window summer 1887 42 café naïve").split()


def make_docs(n, seed=0, words=(20, 120)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "."
            for _ in range(n)]


def write_jsonl(path, texts, sources=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            record = {"text": text} if sources is None else {"text": text, "source": sources[i]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def run(argv):
    """main() in-process; returns its exit status."""
    return prepare.main([str(a) for a in argv])


def shards_of(out, split, vocab=8192):
    folder = Path(out) / "datasets" / f"fineweb10B_sp{vocab}"
    return sorted(folder.glob(f"fineweb_{split}_*.bin"))


def split_tokens(out, split, vocab=8192):
    return np.concatenate([train_gpt.read_shard(p) for p in shards_of(out, split, vocab)]).astype(np.int64)


def expected_tokens(sp, texts):
    return np.array([t for text in texts if text.strip() for t in [1] + sp.encode(text)], dtype=np.int64)


def documents_of(tokens):
    """Split a token stream back into documents at each BOS."""
    starts = np.flatnonzero(tokens == 1).tolist() + [tokens.size]
    return [tuple(tokens[a:b].tolist()) for a, b in zip(starts, starts[1:])]


def all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))


# ================================================================================================
# Shards and splits
# ================================================================================================


def test_shards_hold_bos_plus_ids_per_document(tmp_path, sp):
    texts = make_docs(30, seed=1)
    texts[7] = "  \n "  # empty: skipped and counted
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "out"
    assert run(["text", "--input", src, "--val-docs", 5, "--tokenizer", SAMPLE_TOKENIZER,
                "--shard-tokens", 500, "--workers", 2, "--out", out]) == 0

    val, train = split_tokens(out, "val"), split_tokens(out, "train")
    assert np.array_equal(val, expected_tokens(sp, texts[:5]))
    assert np.array_equal(train, expected_tokens(sp, texts[5:]))
    # Fixed-size shards, the last one shorter.
    sizes = [train_gpt.read_shard_header(p) for p in shards_of(out, "train")]
    assert len(sizes) > 2 and set(sizes[:-1]) == {500} and 0 < sizes[-1] <= 500

    manifest = json.loads((out / "datasets/fineweb10B_sp8192/manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] == 5
    assert manifest["splits"]["train"]["documents"] == 24
    assert manifest["splits"]["train"]["empty_documents_skipped"] == 1
    assert manifest["splits"]["train"]["tokens"] == train.size
    assert manifest["splits"]["train"]["text_bytes"] == sum(len(t.encode()) for t in texts[5:] if t.strip())
    assert [s["tokens"] for s in manifest["splits"]["train"]["shards"]] == sizes
    assert manifest["tokenizer"]["sha256"] == prepare.load_tokenizer(SAMPLE_TOKENIZER).sha256
    assert (out / "tokenizers/fineweb_8192_bpe.model").read_bytes() == SAMPLE_TOKENIZER.read_bytes()
    assert all_files(out) == sorted(["tokenizers/fineweb_8192_bpe.model", "datasets/fineweb10B_sp8192/manifest.json"]
                                    + [p.relative_to(out).as_posix() for p in shards_of(out, "val") + shards_of(out, "train")])


def test_val_frac_takes_the_leading_fraction_of_the_documents(tmp_path, sp):
    texts = make_docs(40, seed=4)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "out"
    assert run(["text", "--input", src, "--val-frac", 0.1, "--tokenizer", SAMPLE_TOKENIZER, "--out", out]) == 0
    assert np.array_equal(split_tokens(out, "val"), expected_tokens(sp, texts[:4]))
    assert np.array_equal(split_tokens(out, "train"), expected_tokens(sp, texts[4:]))


def test_val_last_holds_out_the_trailing_documents(tmp_path, sp):
    # The held-out check of bench/gpu_holdout.sh: the last N documents are validation, the rest train, in order,
    # and the manifest says which documents the val split is.
    texts = make_docs(25, seed=6)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "out"
    assert run(["text", "--input", src, "--val-last", 6, "--tokenizer", SAMPLE_TOKENIZER, "--out", out]) == 0
    assert np.array_equal(split_tokens(out, "val"), expected_tokens(sp, texts[19:]))
    assert np.array_equal(split_tokens(out, "train"), expected_tokens(sp, texts[:19]))
    manifest = json.loads((out / "datasets/fineweb10B_sp8192/manifest.json").read_text())
    assert manifest["inputs"]["val"] == "the last 6 (of 25) documents of the train inputs"
    assert manifest["options"]["val_last"] == 6


@pytest.mark.parametrize("how", [["--val-docs", 1000], ["--val-docs", 30], ["--val-frac", 0.99], ["--val-last", 30]])
def test_validation_taking_every_document_is_refused_before_tokenizer_training(tmp_path, capsys, how):
    # The README's example (--val-docs 1000) on a small corpus used to crash inside SentencePiece.
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(30, seed=5))
    assert run(["text", "--input", src, *how, "--train-tokenizer", "--vocab-size", 400, "--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "leaving none for training" in err and "--val-frac 0.03" in err
    assert not (tmp_path / "out").exists()


def test_val_input_is_a_separate_disjoint_split_in_file_order(tmp_path, sp):
    train_texts, val_texts = make_docs(12, seed=2), make_docs(6, seed=3)
    train_src = write_jsonl(tmp_path / "train.jsonl", train_texts)
    val_src = write_jsonl(tmp_path / "val.jsonl", val_texts)
    out = tmp_path / "out"
    assert run(["text", "--input", train_src, "--val-input", val_src, "--tokenizer", SAMPLE_TOKENIZER, "--out", out]) == 0
    val_docs, train_docs = documents_of(split_tokens(out, "val")), documents_of(split_tokens(out, "train"))
    assert val_docs == documents_of(expected_tokens(sp, val_texts))
    assert train_docs == documents_of(expected_tokens(sp, train_texts))
    assert not set(val_docs) & set(train_docs)


def test_compressed_and_txt_inputs(tmp_path, sp):
    texts = make_docs(8, seed=4)
    plain = write_jsonl(tmp_path / "d.jsonl", texts)
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(plain.read_bytes())
    with lzma.open(tmp_path / "d.jsonl.xz", "wb") as f:
        f.write(plain.read_bytes())
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, text in enumerate(texts):  # one document per file, read in sorted order
        (txt_dir / f"doc{i:02d}.txt").write_text(text.replace(" of ", "\n\nof "), encoding="utf-8")
    results = {}
    for name, src in [("jsonl", plain), ("gz", tmp_path / "d.jsonl.gz"), ("xz", tmp_path / "d.jsonl.xz")]:
        assert run(["text", "--input", src, "--val-docs", 2, "--tokenizer", SAMPLE_TOKENIZER, "--out", tmp_path / name]) == 0
        results[name] = split_tokens(tmp_path / name, "train")
    assert np.array_equal(results["jsonl"], expected_tokens(sp, texts[2:]))
    assert np.array_equal(results["gz"], results["jsonl"]) and np.array_equal(results["xz"], results["jsonl"])
    assert run(["text", "--input", txt_dir, "--val-docs", 2, "--tokenizer", SAMPLE_TOKENIZER, "--out", tmp_path / "t"]) == 0
    txt_texts = [(txt_dir / f"doc{i:02d}.txt").read_text() for i in range(8)]
    assert np.array_equal(split_tokens(tmp_path / "t", "val"), expected_tokens(sp, txt_texts[:2]))
    assert np.array_equal(split_tokens(tmp_path / "t", "train"), expected_tokens(sp, txt_texts[2:]))


def test_source_filter_and_token_caps_cut_at_document_boundaries(tmp_path, sp):
    texts = make_docs(40, seed=5)
    sources = ["books" if i % 3 else "news" for i in range(40)]
    src = write_jsonl(tmp_path / "d.jsonl", texts, sources)
    books = [t for t, s in zip(texts, sources) if s == "books"]
    out = tmp_path / "out"
    assert run(["text", "--input", src, "--val-docs", 3, "--source", "books", "--tokenizer", SAMPLE_TOKENIZER,
                "--max-train-tokens", 600, "--max-val-tokens", 150, "--out", out]) == 0
    lengths = [1 + len(sp.encode(t)) for t in books]
    val_keep = int(np.searchsorted(np.cumsum(lengths[:3]), 150, side="right"))
    train_keep = int(np.searchsorted(np.cumsum(lengths[3:]), 600, side="right"))
    assert 0 < val_keep < 3 and 0 < train_keep < len(books) - 3  # the caps did cut
    # The val cap does not move where train starts: train is still documents 3.. of the filtered input.
    assert np.array_equal(split_tokens(out, "val"), expected_tokens(sp, books[:val_keep]))
    assert np.array_equal(split_tokens(out, "train"), expected_tokens(sp, books[3:3 + train_keep]))


def test_output_is_deterministic_and_rerun_replaces_shards(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(50, seed=6))
    args = ["text", "--input", src, "--val-docs", 5, "--tokenizer", SAMPLE_TOKENIZER, "--shard-tokens", 400]
    assert run(args + ["--workers", 1, "--out", tmp_path / "a"]) == 0
    assert run(args + ["--workers", 3, "--out", tmp_path / "b"]) == 0
    files = all_files(tmp_path / "a")
    assert files == all_files(tmp_path / "b")
    for f in files:
        if f.endswith(".bin"):
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # Same tokenizer, larger shards: the old shards are replaced, none stays behind.
    assert run(args[:-1] + ["100000", "--out", tmp_path / "a"]) == 0
    assert [p.name for p in shards_of(tmp_path / "a", "train")] == ["fineweb_train_000000.bin"]


# ================================================================================================
# Tokenizer training
# ================================================================================================


def test_trained_tokenizer_has_the_challenge_settings(tmp_path):
    texts = make_docs(60, seed=7, words=(30, 60))  # a few KB
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    out = tmp_path / "out"
    assert run(["text", "--input", src, "--val-docs", 5, "--train-tokenizer", "--vocab-size", 400, "--out", out]) == 0
    model = out / "tokenizers/fineweb_400_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == 400
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_byte(i) for i in range(4, 4 + 256))  # byte fallback pieces <0x00>..<0xFF>
    assert sp.encode("€")[0] in range(4, 260)  # an unseen character falls back to bytes, not <unk>
    assert not sp.encode("a", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.encode("1842", out_type=str) == ["1", "8", "4", "2"]  # split_digits (the text has 1887 and 42)
    assert prepare.tokenizer_settings(model.read_bytes()) == {**prepare.CHALLENGE_TOKENIZER, "vocab_size": 400}
    manifest = json.loads((out / "datasets/fineweb10B_sp400/manifest.json").read_text())
    assert manifest["tokenizer"]["settings"]["vocab_size"] == 400
    assert np.array_equal(split_tokens(out, "train", 400), expected_tokens(sp, texts[5:]))


def test_settings_reader_matches_the_shared_tokenizer():
    assert prepare.tokenizer_settings(SAMPLE_TOKENIZER.read_bytes()) == prepare.CHALLENGE_TOKENIZER


# ================================================================================================
# Bad inputs: a message naming the place, exit status 2, nothing left behind
# ================================================================================================


def _bad_utf8_jsonl(d):
    good = json.dumps({"text": "fine"}).encode()
    (d / "in.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"text": "caf\xe9"}\n')
    return ["--input", d / "in.jsonl", "--val-docs", 1], "in.jsonl:3: invalid UTF-8"


def _bad_utf8_txt(d):
    (d / "in.txt").write_bytes(b"line one\nline \xff two\n")
    return ["--input", d / "in.txt", "--val-docs", 1], "in.txt:2: invalid UTF-8"


def _missing_text(d):
    (d / "in.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    return ["--input", d / "in.jsonl", "--val-docs", 1], 'in.jsonl:2: no "text" field'


def _bad_json(d):
    (d / "in.jsonl").write_text('{"text": "a"}\n{"text": "b",\n')
    return ["--input", d / "in.jsonl", "--val-docs", 1], "in.jsonl:2: bad JSON"


def _vocab_mismatch(d):
    write_jsonl(d / "in.jsonl", make_docs(4))
    return ["--input", d / "in.jsonl", "--val-docs", 1, "--vocab-size", 1024], "has 8192 pieces, not --vocab-size 1024"


def _other_tokenizer(d):
    write_jsonl(d / "in.jsonl", make_docs(4))
    folder = d / "out/datasets/fineweb10B_sp8192"
    folder.mkdir(parents=True)
    train_gpt.write_shard(folder / "fineweb_train_000000.bin", np.array([1, 5, 6], dtype=np.uint16))
    (folder / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "0" * 64}}))
    return ["--input", d / "in.jsonl", "--val-docs", 1], "already holds shards made with another tokenizer"


def _late_error(d):
    # Enough good text for several shards before the bad line: those shards must not survive.
    write_jsonl(d / "in.jsonl", make_docs(200, seed=8))
    with open(d / "in.jsonl", "a") as f:
        f.write("not json\n")
    return ["--input", d / "in.jsonl", "--val-docs", 2, "--shard-tokens", 300], "in.jsonl:201: bad JSON"


@pytest.mark.parametrize("case", [_bad_utf8_jsonl, _bad_utf8_txt, _missing_text, _bad_json, _vocab_mismatch,
                                  _other_tokenizer, _late_error])
def test_bad_input_names_the_place_and_leaves_nothing(tmp_path, capsys, monkeypatch, case):
    d = tmp_path / "in"
    d.mkdir()
    args, message = case(d)
    before = all_files(d / "out") if (d / "out").exists() else []
    monkeypatch.setattr(prepare, "BATCH_BYTES", 2000)  # many small batches: shards get written before a late error
    status = run(["text", *args, "--tokenizer", SAMPLE_TOKENIZER, "--out", d / "out"])
    err = capsys.readouterr().err
    assert status == 2
    assert "error: " in err and message in err, err
    after = all_files(d / "out") if (d / "out").exists() else []
    assert after == before  # no shard, no temporary file, no manifest, no tokenizer copy


def test_token_id_outside_the_vocabulary_is_refused(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", make_docs(6))
    real = prepare.encode_batch
    monkeypatch.setattr(prepare, "encode_batch", lambda sp, texts: [ids + [9000] for ids in real(sp, texts)])
    status = run(["text", "--input", tmp_path / "in.jsonl", "--val-docs", 2, "--tokenizer", SAMPLE_TOKENIZER,
                  "--out", tmp_path / "out"])
    err = capsys.readouterr().err
    assert status == 2 and "in.jsonl:1: the tokenizer produced id 9000, outside its vocabulary of 8192" in err
    assert all_files(tmp_path / "out") == []


@pytest.mark.slow  # a whole train_gpt.py (or tool) process
def test_cli_prints_error_without_traceback(tmp_path):
    (tmp_path / "in.jsonl").write_text("[1, 2]\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    script = str(REPO / "data" / "prepare.py")
    done = subprocess.run([sys.executable, script, "text", "--input", str(tmp_path / "in.jsonl"), "--val-docs", "1",
                           "--tokenizer", str(SAMPLE_TOKENIZER), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and 'in.jsonl:1: no "text" field' in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "download" in done.stdout and "text" in done.stdout


# ================================================================================================
# Documents from challenge shards (--input-shards)
# ================================================================================================


def test_input_shards_with_their_own_tokenizer_reproduce_the_shards(tmp_path, monkeypatch):
    """Decoded and encoded again with the tokenizer they were made with, shards come out byte for byte: every
    document is found (also one that runs on into the next shard or chunk, and an empty one) and none changes."""
    val, train = sample_stream("val", 27), sample_stream("train", 40)
    second = np.flatnonzero(val == 1)[1]
    val = np.concatenate([val[:second], [1], val[second:]])  # an empty document: [BOS] alone
    src = write_split(write_split(tmp_path / "in", "val", val, 7000), "train", train, 20000)
    monkeypatch.setattr(prepare, "SHARD_CHUNK_TOKENS", 1500)  # documents cut by chunks too
    monkeypatch.setattr(prepare, "DECODE_BATCH_TOKENS", 4000)
    out = tmp_path / "out"
    assert run(["text", "--input-shards", src, "--input-tokenizer", SAMPLE_TOKENIZER, "--tokenizer", SAMPLE_TOKENIZER,
                "--shard-tokens", 7000, "--workers", 2, "--out", out]) == 0
    assert [p.read_bytes() for p in shards_of(out, "val")] == [p.read_bytes() for p in sorted(src.glob("fineweb_val_*"))]
    assert np.array_equal(split_tokens(out, "train"), train)
    manifest = json.loads((out / "datasets/fineweb10B_sp8192/manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] == 28 and manifest["splits"]["train"]["documents"] == 40
    assert manifest["inputs"]["tokenizer"]["sha256"] == prepare.load_tokenizer(SAMPLE_TOKENIZER).sha256
    assert manifest["inputs"]["val"].endswith("fineweb_val_*.bin (8 shard(s))")


def _stream_without_bos(d):
    write_split(d / "fineweb10B_sp8192", "val", sample_stream("val", 3)[1:], 4000)  # the split's first BOS is missing
    write_split(d / "fineweb10B_sp8192", "train", sample_stream("train", 3), 4000)
    return d / "fineweb10B_sp8192", [], ["fineweb_val_000000.bin: the token stream starts with id", "fineweb_val_000000.bin on"]


def _tokenizer_size_mismatch(d):
    shutil.copytree(SAMPLE / "datasets/fineweb10B_sp8192", d / "fineweb10B_sp1024")
    return d / "fineweb10B_sp1024", [], ["are for a 1024-piece tokenizer (the folder's name says so)", "give --input-tokenizer the SentencePiece model the shards were made with"]


def _tokenizer_hash_mismatch(d):
    shutil.copytree(SAMPLE / "datasets/fineweb10B_sp8192", d / "shards")
    (d / "shards/manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "0" * 64}}))
    return d / "shards", [], ["says its shards were made with the tokenizer of sha256 0000000000000000...", "give --input-tokenizer the SentencePiece model the shards were made with"]


def _id_outside_the_vocabulary(d):
    write_split(d / "shards", "val", sample_stream("val", 3), 4000)
    write_split(d / "shards", "train", np.array([1, 20, 30, 1, 9000, 40], dtype=np.uint16), 4000)
    return d / "shards", [], ["fineweb_train_000000.bin: token 4 is id 9000, outside the 8192 pieces", "give --input-tokenizer the SentencePiece model the shards were made with"]


def _no_val_shards(d):
    write_split(d / "shards", "train", sample_stream("train", 3), 4000)
    return d / "shards", [], ["holds no fineweb_val_*.bin shards"]


def _val_docs_given(d):
    return SAMPLE / "datasets/fineweb10B_sp8192", ["--val-docs", 5], ["takes val from the fineweb_val_*.bin shards", "drop --val-docs"]


def _out_is_the_input(d):
    shutil.copytree(SAMPLE, d / "data")
    return d / "data/datasets/fineweb10B_sp8192", ["--out", d / "data"], ["is where the input shards live", "choose another --out"]


@pytest.mark.parametrize("case", [_stream_without_bos, _tokenizer_size_mismatch, _tokenizer_hash_mismatch,
                                  _id_outside_the_vocabulary, _no_val_shards, _val_docs_given, _out_is_the_input])
def test_bad_input_shards_say_how_to_fix_them_and_leave_nothing(tmp_path, capsys, case):
    folder, extra, messages = case(tmp_path)
    before = all_files(tmp_path)
    status = run(["text", "--input-shards", folder, "--input-tokenizer", SAMPLE_TOKENIZER, "--tokenizer", SAMPLE_TOKENIZER,
                  "--out", tmp_path / "out", *extra])
    err = capsys.readouterr().err
    assert status == 2 and "error: " in err and all(m in err for m in messages), err
    assert all_files(tmp_path) == before  # no output folder, no staging shard, input untouched


def test_input_shards_need_their_tokenizer(tmp_path, capsys):
    args = ["text", "--input-shards", SAMPLE / "datasets/fineweb10B_sp8192", "--tokenizer", SAMPLE_TOKENIZER, "--out", tmp_path]
    assert run(args) == 2
    assert "--input-shards needs --input-tokenizer MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one input or the other
        run(args + ["--input", tmp_path])
    assert "not allowed with argument" in capsys.readouterr().err


# ================================================================================================
# Download, against a local stand-in of the Hugging Face repo
# ================================================================================================


def make_repo(root, train_shards=3, val_shards=1):
    """A folder laid out like the HF dataset repo: everything under datasets/."""
    base = root / "datasets"
    folder = base / "datasets" / "fineweb10B_sp8192"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("val", val_shards), ("train", train_shards)):
        for i in range(n):
            train_gpt.write_shard(folder / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, 8192, 1000 + i, dtype=np.uint16))
    (base / "tokenizers").mkdir()
    shutil.copyfile(SAMPLE_TOKENIZER, base / "tokenizers" / "fineweb_8192_bpe.model")
    (base / "tokenizers" / "fineweb_8192_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n</s>\t0\n<unk>\t0\n", encoding="utf-8")
    (base / "manifest.json").write_text(json.dumps({
        "datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                      "stats": {"files_train": train_shards, "files_val": val_shards}}],
        "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"}]}))
    return root


EXPECTED_LAYOUT = ["datasets/fineweb10B_sp8192/fineweb_train_000000.bin", "datasets/fineweb10B_sp8192/fineweb_train_000001.bin",
                   "datasets/fineweb10B_sp8192/fineweb_val_000000.bin", "manifest.json",
                   "tokenizers/fineweb_8192_bpe.model", "tokenizers/fineweb_8192_bpe.vocab"]


def test_download_from_a_mirror_builds_the_challenge_layout(tmp_path):
    repo = make_repo(tmp_path / "repo")
    data = tmp_path / "data"
    assert run(["download", "--mirror", repo, "--data-dir", data, "--train-shards", 2]) == 0
    assert all_files(data) == EXPECTED_LAYOUT
    for f in EXPECTED_LAYOUT:
        assert (data / f).read_bytes() == (repo / "datasets" / f).read_bytes()
    # train_gpt.py finds and reads what was downloaded.
    assert train_gpt.challenge_data_present({"DATA_DIR": str(data)})
    assert train_gpt.read_shard(data / EXPECTED_LAYOUT[0]).size == 1000


def test_download_resumes_after_a_failure_and_skips_verified_files(tmp_path):
    repo = make_repo(tmp_path / "repo")
    data = tmp_path / "data"
    mirror = prepare.mirror_fetch(repo)
    calls = []

    def failing(repo_id, filename, dest):
        calls.append(filename)
        if len(calls) == 5:  # manifest, .model, .vocab, val 0, then train 0: half written, then the network drops
            dest.write_bytes((repo / filename).read_bytes()[:700])
            raise ConnectionError("connection reset")
        mirror(repo_id, filename, dest)

    with pytest.raises(train_gpt.DataError, match="run the same command again to resume"):
        prepare.download(data, train_shards=2, fetch=failing)
    failed = calls[-1]
    local = data / failed.removeprefix("datasets/")
    assert not local.exists()  # the half file never sits at the final name
    assert not any(".part" in f for f in all_files(data))
    assert all((data / c.removeprefix("datasets/")).is_file() for c in calls[:-1])

    calls.clear()
    fetched = prepare.download(data, train_shards=2, fetch=failing)
    assert calls == fetched == [failed] + [f"datasets/{f}" for f in EXPECTED_LAYOUT[1:2]]
    assert all_files(data) == EXPECTED_LAYOUT

    # A file that went bad on disk is fetched again; the others are not.
    (data / EXPECTED_LAYOUT[0]).write_bytes((data / EXPECTED_LAYOUT[0]).read_bytes()[:-2])
    calls.clear()
    assert prepare.download(data, train_shards=2, fetch=failing) == [f"datasets/{EXPECTED_LAYOUT[0]}"]
    assert train_gpt.read_shard_header(data / EXPECTED_LAYOUT[0]) == 1000


def test_download_refuses_invalid_files_and_too_many_shards(tmp_path):
    repo = make_repo(tmp_path / "repo")
    bad = repo / "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-10])  # a truncated shard in the repo
    data = tmp_path / "data"
    with pytest.raises(train_gpt.DataError, match="truncated or corrupt"):
        prepare.download(data, train_shards=2, fetch=prepare.mirror_fetch(repo))
    assert not (data / "datasets/fineweb10B_sp8192/fineweb_train_000001.bin").exists()
    assert not any(".part" in f for f in all_files(data))
    with pytest.raises(train_gpt.DataError, match="has 3 train shards"):
        prepare.download(data, train_shards=4, fetch=prepare.mirror_fetch(repo))


def test_download_through_huggingface_hub(tmp_path, monkeypatch, capsys):
    """The hf_hub_download adapter, with a stand-in module that serves the mirror."""
    repo = make_repo(tmp_path / "repo")
    seen = []

    def hf_hub_download(repo_id, filename, subfolder=None, repo_type=None, local_dir=None):
        seen.append((repo_id, subfolder, filename, repo_type))
        target = Path(local_dir) / subfolder / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / subfolder / filename, target)
        return str(target)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    data = tmp_path / "data"
    assert run(["download", "--data-dir", data, "--train-shards", 2]) == 0
    assert all_files(data) == EXPECTED_LAYOUT  # no leftover staging folder
    assert seen[0] == ("kevclark/parameter-golf", "datasets", "manifest.json", "dataset")
    assert ("kevclark/parameter-golf", "datasets/datasets/fineweb10B_sp8192", "fineweb_val_000000.bin", "dataset") in seen

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    assert run(["download", "--data-dir", tmp_path / "other"]) == 2
    assert "pip install huggingface_hub" in capsys.readouterr().err


# ================================================================================================
# The bundled sample
# ================================================================================================


def test_bundled_sample_is_small_and_valid():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 3_000_000
    folder = SAMPLE / "datasets" / "fineweb10B_sp8192"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == prepare.load_tokenizer(SAMPLE_TOKENIZER).sha256
    assert prepare.tokenizer_settings(SAMPLE_TOKENIZER.read_bytes()) == prepare.CHALLENGE_TOKENIZER
    for split, low in (("val", 40_000), ("train", 1_000_000)):
        paths = sorted(folder.glob(f"fineweb_{split}_*.bin"))
        assert [p.name for p in paths] == [s["file"] for s in manifest["splits"][split]["shards"]]
        tokens = np.concatenate([train_gpt.read_shard(p) for p in paths])
        train_gpt.check_token_range(tokens, 8192, f"the sample's {split} shards")
        assert tokens[0] == 1 and tokens.size == manifest["splits"][split]["tokens"] >= low
