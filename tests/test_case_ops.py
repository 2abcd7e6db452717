"""Case operators (data/prepare.py --case-ops): the transform is exactly reversible, train_gpt.py counts the
marker pieces as 0 bytes so that a document's counted bytes do not change, and prepare.py applies it to both
splits with a tokenizer trained on the train documents only.

python -m pytest -q tests/test_case_ops.py    (CPU, a few seconds; the real-corpus tests skip without it)
"""
import json
import multiprocessing
import random
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # tests never write into the repository

import numpy as np
import pytest
import sentencepiece as spm

from conftest import SP8192, corpus_texts, load_prepare, sample_stream, sample_texts, write_split

import train_gpt as tg

REPO = Path(__file__).resolve().parent.parent
prepare = load_prepare()

CAP, UPPER = tg.CASE_MARKERS
encode, decode = prepare.case_encode, prepare.case_decode


# ================================================================================================
# The transform
# ================================================================================================


@pytest.mark.parametrize("text, expected", [
    ("Hello", CAP + "hello"),
    ("Hello World", CAP + "hello" + CAP + " world"),  # the marker goes before the space: "▁world" stays a piece
    ("said  HELLO", "said" + UPPER + "  hello"),  # before the whole whitespace run
    ("end.\n\nThe", "end." + CAP + "\n\nthe"),
    ("  Hello", "  " + CAP + "hello"),  # at the start after the whitespace (the normalizer drops it)
    ("(Hello), [NASA]; x-Ray", "(" + CAP + "hello), [" + UPPER + "nasa]; x-" + CAP + "ray"),
    ("ABC123DEF x2Y", UPPER + "abc123" + UPPER + "def x2" + CAP + "y"),  # digits end a word
    ("DON'T O'Brien", UPPER + "don'" + CAP + "t" + CAP + " o'" + CAP + "brien"),
    ("I am A", CAP + "i am" + CAP + " a"),  # a single capital is Capitalized
    ("iPhone McDonald NaSa", "iPhone McDonald NaSa"),  # mixed case stays
    ("École ÉCOLE", CAP + "école" + UPPER + " école"),
    ("Αθήνα ΟΔΟΣ", CAP + "αθήνα" + UPPER + " οδος"),  # final sigma: 'ς' upper-cases back to 'Σ'
    ("STRASSE straße STRAßE", UPPER + "strasse straße STRAßE"),  # 'ß'.upper() is 'SS': not reversible
    ("İstanbul İZMİR", "İstanbul İZMİR"),  # 'İ'.lower() is two characters
    ("\u212aelvin \u212aELVIN O\u212a", "\u212aelvin \u212aELVIN O\u212a"),  # Kelvin sign: lower() is 1 byte, not 3
    ("ＡＢＣ Ｈello", "ＡＢＣ Ｈello"),  # full-width letters: NFKC changes them
    ("ǅemal", "ǅemal"),  # title-case letter: lower().upper() is 'Ǆ'
    ("I²C", CAP + "i²" + CAP + "c"),  # '²' is a numeral (NFKC makes it '2'), not a letter
    ("東京 Tokyo 🎉", "東京" + CAP + " tokyo 🎉"),
    ("", ""),
])
def test_encode_examples_and_round_trip(text, expected):
    assert encode(text) == expected
    assert decode(expected) == text


def test_lowered_letters_keep_their_utf8_length():
    for text in ("École ÉCOLE Αθήνα ΟΔΟΣ Москва МОСКВА Ärger ÆØÅ", "Ǆemal ǄEMAL"):
        out = encode(text)
        assert len(out.replace(CAP, "").replace(UPPER, "").encode()) == len(text.encode())


def test_random_text_round_trips():
    alphabet = list("aAbBzZ  \n\t.'-19_") + list("éÉßẞİıſ\u212aǅǄǆΣσςÆæЖжＡａ²½東") + ["\u0301"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert decode(encode(text)) == text, repr(text)


def test_text_holding_a_marker_is_refused():
    for mark in (CAP, UPPER):
        with pytest.raises(ValueError, match=f"U\\+{ord(mark):04X}"):
            encode(f"fine text {mark}here")


def test_decode_drops_a_marker_without_a_word():
    assert decode("a" + CAP) == "a" and decode(UPPER + " 42") == " 42"


def test_real_documents_round_trip():
    texts = corpus_texts("val", 300)
    encoded = [encode(t) for t in texts]
    assert [decode(e) for e in encoded] == texts
    assert sum(e.count(CAP) for e in encoded) > 1000 and sum(e.count(UPPER) for e in encoded) > 50


# ================================================================================================
# Bytes: train_gpt.py's count on case-op tokens is the count of the original text
# ================================================================================================


def small_case_tokenizer(texts: list[str], vocab: int) -> spm.SentencePieceProcessor:
    proto = prepare.train_tokenizer((encode(t) for t in texts), vocab, 3_000_000, 2, tg.CASE_MARKERS)
    return spm.SentencePieceProcessor(model_proto=proto)


def doc_bytes(stream: np.ndarray, luts) -> list[int]:
    """Counted bytes of each document of a [BOS] + ids stream."""
    counted = tg.count_target_bytes(stream, luts)
    starts = np.flatnonzero(stream == 1).tolist() + [stream.size]
    return [int(counted[a:b].sum()) for a, b in zip(starts, starts[1:])]


def check_counted_bytes(sp: spm.SentencePieceProcessor, vocab: int, texts: list[str]) -> None:
    """Transformed documents encoded as prepare.py writes them ([BOS] + ids each, concatenated), counted by
    train_gpt.py. The challenge normalization (nmt_nfkc) merges runs of whitespace and maps compatibility
    characters, so no tokenizer's count is the raw UTF-8 length of every document; the reference is the
    SP8192 challenge tokenizer on the ORIGINAL text, which counts its normalized bytes exactly
    (tests/test_eval.py), and that is the raw UTF-8 length wherever the normalization changes nothing."""
    ids = sp.encode([encode(t) for t in texts], num_threads=2)
    stream = np.array([t for doc in ids for t in [1] + doc], dtype=np.uint16)
    counted = doc_bytes(stream, tg.build_byte_luts(sp, vocab))

    plain = spm.SentencePieceProcessor(model_file=str(SP8192))
    plain_ids = plain.encode(texts, num_threads=2)
    plain_stream = np.array([t for doc in plain_ids for t in [1] + doc], dtype=np.uint16)
    assert counted == doc_bytes(plain_stream, tg.build_byte_luts(plain, 8192))  # per document, so also in total
    stable = [k for k, t in enumerate(texts) if plain.decode(plain_ids[k]) == t]  # normalization changes nothing
    assert len(stable) > len(texts) // 20
    assert [counted[k] for k in stable] == [len(texts[k].encode()) for k in stable]
    # The markers are there and count 0: at 3 bytes each (their UTF-8 length) the count would be off.
    assert int(np.isin(stream, [sp.piece_to_id(m) for m in tg.CASE_MARKERS]).sum()) > 2 * len(texts)
    # The decoded text reads back as the challenge tokenizer's decoding of the original.
    assert [decode(sp.decode(doc)) for doc in ids] == [plain.decode(doc) for doc in plain_ids]


def test_counted_bytes_of_real_documents_equal_the_original_text():
    """A 1024-piece tokenizer trained with the markers on a few MB of transformed train text; 500 val documents."""
    if not SP8192.exists():
        pytest.skip(f"{SP8192} not available")
    check_counted_bytes(small_case_tokenizer(corpus_texts("train", 800), 1024), 1024, corpus_texts("val", 500))


@pytest.mark.slow
def test_committed_case_tokenizer_counts_every_val_document_exactly():
    """data/case_ops/fineweb_8192_bpe.model (made by prepare.py --train-tokenizer --case-ops on the proxy
    corpus) on all of its val documents."""
    if not SP8192.exists():
        pytest.skip(f"{SP8192} not available")
    sp = spm.SentencePieceProcessor(model_file=str(REPO / "data/case_ops/fineweb_8192_bpe.model"))
    assert [sp.piece_to_id(m) for m in tg.CASE_MARKERS] == [4, 5]
    check_counted_bytes(sp, 8192, corpus_texts("val", None))


# ================================================================================================
# prepare.py text --case-ops
# ================================================================================================

WORDS = "the of and to in a is was that for it with as his on be at by had not are but from or have river stone".split()


def make_texts(n, seed, extra=()):
    """Documents with Capitalized and ALL-CAPS words; single spaces, so the normalizer changes nothing."""
    rng = random.Random(seed)
    pool = WORDS + list(extra)
    texts = []
    for _ in range(n):
        words = [rng.choice(pool) for _ in range(rng.randint(20, 60))]
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w for w in words]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def split_docs(out, split, vocab):
    folder = out / "datasets" / f"fineweb10B_sp{vocab}"
    stream = np.concatenate([tg.read_shard(p) for p in sorted(folder.glob(f"fineweb_{split}_*.bin"))]).astype(np.int64)
    starts = np.flatnonzero(stream == 1).tolist() + [stream.size]
    return stream, [stream[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]


def test_prepare_case_ops_end_to_end(tmp_path):
    train_texts = make_texts(120, seed=1, extra=["wombat"] * 6)
    val_texts = make_texts(12, seed=2, extra=["quokka"] * 6)  # a word only val has, as often as wombat in train
    src = write_jsonl(tmp_path / "train.jsonl", train_texts)
    val_src = write_jsonl(tmp_path / "val.jsonl", val_texts)
    out = tmp_path / "out"
    assert prepare.main(["text", "--input", str(src), "--val-input", str(val_src), "--train-tokenizer", "--vocab-size", "400",
                         "--case-ops", "--shard-tokens", "2000", "--workers", "2", "--out", str(out)]) == 0

    manifest = json.loads((out / "datasets/fineweb10B_sp400/manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers/fineweb_400_bpe.model"))
    assert manifest["case_ops"]["ids"] == [sp.piece_to_id(m) for m in tg.CASE_MARKERS]
    assert all(sp.encode(m) == [i] for m, i in zip(tg.CASE_MARKERS, manifest["case_ops"]["ids"]))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    assert "▁wombat" in pieces and not any("quokka" in p for p in pieces)  # trained on train documents only
    assert not any(c.isupper() for p in pieces for c in p)  # the transformed text has no capital left
    assert len(list((out / "datasets/fineweb10B_sp400").glob("fineweb_train_*.bin"))) > 1

    for split, texts in (("val", val_texts), ("train", train_texts)):
        stream, docs = split_docs(out, split, 400)
        assert [decode(sp.decode(d)) for d in docs] == texts  # the same documents, in order, read back exactly
        assert [d for d in docs] == [sp.encode(encode(t)) for t in texts]
        text_bytes = sum(len(t.encode()) for t in texts)
        assert manifest["splits"][split]["text_bytes"] == text_bytes  # bytes of the original text
        assert int(tg.count_target_bytes(stream, tg.build_byte_luts(sp, 400)).sum()) == text_bytes


def test_prepare_case_ops_refuses_a_tokenizer_without_markers_and_a_text_with_them(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", make_texts(6, seed=3))
    sample_tokenizer = REPO / "data/sample/tokenizers/fineweb_8192_bpe.model"
    args = ["text", "--input", str(src), "--val-docs", "2", "--case-ops", "--out", str(tmp_path / "out")]
    assert prepare.main(args + ["--tokenizer", str(sample_tokenizer)]) == 2
    assert "--case-ops needs a tokenizer with the case markers" in capsys.readouterr().err

    texts = make_texts(6, seed=3)
    texts[4] = "Marked " + CAP + " text"
    write_jsonl(tmp_path / "d.jsonl", texts)
    assert prepare.main(args + ["--train-tokenizer", "--vocab-size", "300"]) == 2
    assert "d.jsonl:5: the text holds the character U+E000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ================================================================================================
# prepare.py text --input-shards --case-ops: the documents of challenge shards (FineWeb's only form)
# ================================================================================================

SAMPLE_TOKENIZER = REPO / "data/sample/tokenizers/fineweb_8192_bpe.model"
CASE_TOKENIZER = REPO / "data/case_ops/fineweb_8192_bpe.model"


def per_document(stream: np.ndarray, sp: spm.SentencePieceProcessor, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Each document's ids (after its BOS) and the bytes train_gpt.py counts for them."""
    counted = tg.count_target_bytes(stream, tg.build_byte_luts(sp, vocab))
    starts = np.flatnonzero(stream == 1).tolist() + [stream.size]
    return ([stream[a + 1:b].tolist() for a, b in zip(starts, starts[1:])],
            [int(counted[a:b].sum()) for a, b in zip(starts, starts[1:])])


def test_case_ops_from_shards_keep_every_val_documents_counted_bytes(tmp_path):
    """The sample's shards (documents running on across shards) through case ops with the committed case-op
    tokenizer: the same val documents in the same order, and for each one the bytes train_gpt.py counts on the
    output are the UTF-8 length of the text decoded from the input, which is also the count on the input. So
    val_bpb's denominator does not move."""
    val, train = sample_stream("val", 27), sample_stream("train", 25)
    src = write_split(write_split(tmp_path / "in" / "fineweb10B_sp8192", "val", val, 9000), "train", train, 9000)
    out = tmp_path / "out"
    assert prepare.main(["text", "--input-shards", str(src), "--input-tokenizer", str(SAMPLE_TOKENIZER), "--tokenizer",
                         str(CASE_TOKENIZER), "--case-ops", "--workers", "2", "--out", str(out)]) == 0
    plain, case = (spm.SentencePieceProcessor(model_file=str(m)) for m in (SAMPLE_TOKENIZER, CASE_TOKENIZER))
    manifest = json.loads((out / "datasets/fineweb10B_sp8192/manifest.json").read_text())
    for split, stream in (("val", val), ("train", train)):
        in_docs, in_bytes = per_document(stream.astype(np.int64), plain, 8192)
        out_stream, out_docs = split_docs(out, split, 8192)
        _, out_bytes = per_document(out_stream, case, 8192)
        texts = [plain.decode(d) for d in in_docs]
        assert [decode(case.decode(d)) for d in out_docs] == texts  # the same documents, in order
        assert out_bytes == [len(t.encode()) for t in texts] == in_bytes
        assert manifest["splits"][split]["text_bytes"] == sum(in_bytes)
    assert len(in_docs) == 25 and manifest["splits"]["val"]["documents"] == 27
    assert int(np.isin(out_stream, manifest["case_ops"]["ids"]).sum()) > 1000  # the markers are there, and count 0


def test_case_tokenizer_is_trained_on_the_train_shards_only(tmp_path):
    train_texts = make_texts(120, seed=5, extra=["wombat"] * 6)
    val_texts = make_texts(12, seed=6, extra=["quokka"] * 6)
    made = tmp_path / "made"  # challenge shards of these texts, made with the sample's tokenizer
    assert prepare.main(["text", "--input", str(write_jsonl(tmp_path / "train.jsonl", train_texts)), "--val-input",
                         str(write_jsonl(tmp_path / "val.jsonl", val_texts)), "--tokenizer", str(SAMPLE_TOKENIZER),
                         "--shard-tokens", "1500", "--out", str(made)]) == 0
    out = tmp_path / "out"
    assert prepare.main(["text", "--input-shards", str(made / "datasets/fineweb10B_sp8192"), "--input-tokenizer",
                         str(SAMPLE_TOKENIZER), "--train-tokenizer", "--vocab-size", "400", "--case-ops",
                         "--workers", "2", "--out", str(out)]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers/fineweb_400_bpe.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert "▁wombat" in pieces and not any("quokka" in p for p in pieces)
    for split, texts in (("val", val_texts), ("train", train_texts)):
        stream, docs = split_docs(out, split, 400)
        assert [decode(sp.decode(d)) for d in docs] == texts
        assert per_document(stream, sp, 400)[1] == [len(t.encode()) for t in texts]


def test_byte_luts_count_marker_pieces_as_zero_and_not_as_a_boundary():
    sp = small_case_tokenizer(make_texts(60, seed=4), 300)
    base, space, boundary = tg.build_byte_luts(sp, 300)
    for m in tg.CASE_MARKERS:
        i = sp.piece_to_id(m)
        assert (base[i], space[i], boundary[i]) == (0, False, False)
    text = "Hello THE River, the END"
    stream = np.array([1] + sp.encode(encode(text)), dtype=np.int64)
    assert int(tg.count_target_bytes(stream, (base, space, boundary)).sum()) == len(text)


# ================================================================================================
# The transform on worker processes (--workers > 1): the same output, the same errors, no worker left
# ================================================================================================


def test_case_ops_on_worker_processes_write_the_same_shards(tmp_path, monkeypatch):
    """Small case-op batches, so that 2 processes get many of them: the shards are byte for byte those of
    --workers 1, where the transform runs in the main process."""
    monkeypatch.setattr(prepare, "CASE_BATCH_BYTES", 5000)
    src = write_jsonl(tmp_path / "d.jsonl", sample_texts(40))
    made = []
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        assert prepare.main(["text", "--input", str(src), "--val-docs", "5", "--tokenizer", str(CASE_TOKENIZER), "--case-ops",
                             "--shard-tokens", "3000", "--workers", str(workers), "--out", str(out)]) == 0
        made.append({p.name: p.read_bytes() for p in (out / "datasets/fineweb10B_sp8192").glob("fineweb_*.bin")})
    assert made[0] == made[1] and len(made[0]) > 3
    assert not multiprocessing.active_children()


def test_case_documents_on_processes_name_a_refused_document_and_leave_no_worker(monkeypatch):
    monkeypatch.setattr(prepare, "CASE_BATCH_BYTES", 2000)
    docs = [prepare.Doc(t, len(t.encode()), f"d.jsonl:{i + 1}") for i, t in enumerate(make_texts(60, seed=7))]
    docs[9] = docs[9]._replace(text=None)  # a skipped document passes through
    assert list(prepare.case_documents(docs, 2)) == list(prepare.case_documents(docs, 1))

    docs[41] = docs[41]._replace(text="Marked " + UPPER + " text")  # refused in a worker, many batches in
    with pytest.raises(tg.DataError, match="^d.jsonl:42: the text holds the character U\\+E001"):
        list(prepare.case_documents(docs, 2))
    assert not multiprocessing.active_children()

    early = prepare.case_documents(docs, 2)
    next(early)
    early.close()  # a consumer that stops (an error downstream, Ctrl-C, a token cap) stops the pool
    assert not multiprocessing.active_children()
