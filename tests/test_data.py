"""Tests of corpora/ (preparing) and data.py (reading) on small made-up corpora: round trips, the split, the batches,
damaged inputs, memory, names, interruptions and errors. Errors are checked by their type, exit status and the flag
or file they name, never by their wording."""
import gzip
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import corpora.__main__
import corpora.prepare
import corpora.tokenizer
import data
import runs
from corpora.prepare import prepare
from data import Corpus, DataError, StreamBatcher, load_corpus

REPO = Path(data.__file__).resolve().parent
BEFORE = "fe33a0073e39c77dd856130ddae186c683d937d0"  # the data.py that prepared the published corpora
PREP, TOK = corpora.prepare, corpora.tokenizer  # where preparation's constants and helpers are looked up

DOCS = {
    "a.txt": "def f(x):\n    return x + 1\n" * 30,
    "sub/b.txt": "Grüße, 世界! Unicode survives the round trip. " * 40,
    "sub/deeper/c.md": "# heading\n\nsome text\n" * 50,
    "d.txt": "short",
    "e.txt": "".join(chr(ord("a") + i % 26) for i in range(3000)),
}


def write_folder(root, docs=DOCS):
    for name, text in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    return root


def decoded_documents(corpus, split):
    """The documents of a split, decoded back to text (they are separated by end-of-text tokens)."""
    tokens = corpus.tokens(split).astype(np.int64)
    enc, ends = corpus.tokenizer(), np.flatnonzero(tokens == corpus.meta["eot_token"])
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]


def all_documents(corpus):
    return sorted(decoded_documents(corpus, "train") + decoded_documents(corpus, "val"))


def corpus_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def run_cli(argv, capsys=None):
    """corpora's command line in this process, as `python -m corpora` runs it (runs.one_line): the exit status and
    the one line of an error (None when it succeeds)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        corpora.__main__.main([str(a) for a in argv])
        return 0, None
    except SystemExit as exit:
        return (1, exit.code) if isinstance(exit.code, str) else (exit.code, None)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def gpt2_or_skip():
    try:
        return TOK.get_tokenizer("gpt2")
    except DataError:
        if os.environ.get("TIKTOKEN_CACHE_DIR"):
            raise  # a cache was provided, so the vocabulary must load
        pytest.skip("the gpt2 vocabulary is neither cached nor downloadable here")


def jsonl_texts(n):
    return [f"document {i}: " + "some words " * (i % 37) for i in range(n)]


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


# --- Round trips and the split ------------------------------------------------------------------------------------

def test_round_trip_and_disjoint_split(tmp_path):
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), name="toy", data_dir=tmp_path / "data", val_fraction=0.4))
    train, val = decoded_documents(corpus, "train"), decoded_documents(corpus, "val")
    assert sorted(train + val) == sorted(DOCS.values())
    assert train and val and not set(train) & set(val)
    meta = corpus.meta
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["val"]["tokens"] == len(corpus.tokens("val")) and meta["input"]["documents"] == len(DOCS)
    assert meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
    assert set(val) == {DOCS[k] for k in DOCS if PREP.is_validation(k, 0.4)}  # the name alone decides


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_threads_and_pieces_change_nothing(tmp_path, monkeypatch, tokenizer):
    if tokenizer == "gpt2":
        gpt2_or_skip()
    source = write_folder(tmp_path / "in")
    a = prepare(source, name="a", tokenizer=tokenizer, data_dir=tmp_path, workers=1, val_fraction=0.4)
    monkeypatch.setattr(PREP, "PIECE", 101)  # many batches of many pieces, each document cut where it may be
    b = prepare(source, name="b", tokenizer=tokenizer, data_dir=tmp_path, workers=3, val_fraction=0.4)
    for split in ("train.bin", "val.bin"):
        assert (a / split).read_bytes() == (b / split).read_bytes()


def before_module(tmp_path):
    """data.py as it was before this rewrite, from git, imported under another name."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE}:data.py"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the git history of data.py is not here")
    (tmp_path / "data_before.py").write_text(source)
    spec = importlib.util.spec_from_file_location("data_before", tmp_path / "data_before.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_corpora_are_byte_identical_to_those_prepared_before(tmp_path, monkeypatch, tokenizer):
    """Published results stay valid: the same tokens, in the same split, as the data.py that prepared them."""
    if tokenizer == "gpt2":
        gpt2_or_skip()
    before = before_module(tmp_path)
    rng = random.Random(7)
    words = ["def", "x", "  ", "\n", "\n\n", " \n", "it's", "42", "1234567", "Grüße", "世界", ".", "!\n", "\t", "\r\n",
             "\r", "don't", " ", "  \n  ", "a.b", "::", "😀", "\u2028"]
    docs = {f"doc{i}.txt": "".join(rng.choice(words) for _ in range(rng.randint(0, 1500))) for i in range(9)}
    texts = [{"text": "".join(rng.choice(words) for _ in range(rng.randint(0, 700)))} for _ in range(23)]
    lines = [json.dumps(t) for t in texts] + ["not json", json.dumps({"no_text": 1}), '{"text": "half \\udc80 a"}']
    docs.update({"sub/bad.txt": b"fine\n" * 3001 + b"\xff", "d.jsonl": "\n".join(lines) + "\n", ".hidden": "x",
                 "sub/e.jsonl.gz": gzip.compress("\r\n".join(lines[::-1]).encode())})
    if tokenizer == "bytes":  # no place to cut: cut anyway, which changes no byte token
        docs["no_newline.txt"] = "y" * 5003
    source = write_folder(tmp_path / "in", docs)
    (tmp_path / "book.txt").write_bytes((source / "doc3.txt").read_bytes() * 7)
    monkeypatch.setattr(PREP, "PIECE", 333)  # documents cut into many pieces
    monkeypatch.setattr(PREP, "MAX_PIECE", 1501)
    for given in (source, tmp_path / "book.txt"):
        old = before.prepare(given, name="before", tokenizer=tokenizer, data_dir=tmp_path / "d", val_fraction=0.3)
        new = prepare(given, name="after", tokenizer=tokenizer, data_dir=tmp_path / "d", val_fraction=0.3)
        for split in ("train.bin", "val.bin"):
            assert (old / split).read_bytes() == (new / split).read_bytes(), (given, split)
        assert json.loads((old / "meta.json").read_text())["splits"] == Corpus(new).meta["splits"]


def test_jsonl_and_gzip_inputs(tmp_path):
    texts = jsonl_texts(31)
    lines = jsonl_bytes(texts) + b'not json\n{"no_text": 1}\n{"text": 5}\n[1, 2]\n'
    (tmp_path / "docs.jsonl").write_bytes(lines)
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    for name in ("docs.jsonl", "docs.jsonl.gz"):
        corpus = Corpus(prepare(tmp_path / name, name=name.replace(".", "_"), data_dir=tmp_path / "data"))
        assert all_documents(corpus) == sorted(texts)
        assert corpus.meta["input"] == {"documents": 31, "bad_lines": 1, "lines_without_text": 3,
                                        "unreadable_files": 0, "truncated_files": 0, "invalid_utf8_replaced": 0}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_one_bad_byte_loses_one_line_only(tmp_path, suffix):
    texts = jsonl_texts(3000)
    raw = jsonl_bytes(texts[:1499]) + b'{"text": "caf\xe9"}\n' + jsonl_bytes(texts[1499:])  # 3,001 lines
    (tmp_path / f"docs{suffix}").write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    corpus = Corpus(prepare(tmp_path / f"docs{suffix}", data_dir=tmp_path / "data"))
    assert corpus.meta["input"]["documents"] == 3000 and corpus.meta["input"]["bad_lines"] == 1
    assert corpus.meta["input"]["unreadable_files"] == 0 and all_documents(corpus) == sorted(texts)


def test_compressed_files_cut_short_keep_what_was_read_and_say_so(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    texts = jsonl_texts(3000)
    raw = jsonl_bytes(texts)
    compressor = zstandard.ZstdCompressor()
    frames = compressor.compress(raw[:len(raw) // 3]) + compressor.compress(raw[len(raw) // 3:])  # written in parts
    files = {"whole.jsonl.zst": frames, "cut.jsonl.zst": frames[:len(frames) * 2 // 3],  # inside the second frame
             "cut.jsonl.gz": gzip.compress(raw)[:len(gzip.compress(raw)) // 2]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        corpus = Corpus(prepare(tmp_path / name, name=name.replace(".", "_"), data_dir=tmp_path / "data"))
        used, report = all_documents(corpus), corpus.meta["input"]
        assert report["documents"] == len(used) and set(used) <= set(texts)
        assert report["unreadable_files"] == 0 and report["bad_lines"] == 0
        if name.startswith("whole"):
            assert used == sorted(texts) and report["truncated_files"] == 0
        else:
            assert 100 < len(used) < 3000 and report["truncated_files"] == 1
            out = capsys.readouterr().out
            assert f"{len(used):,}" in out and "truncated" in out  # prepare says what it used and what was cut


def test_single_text_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(2001))
    (tmp_path / "book.txt").write_text(text)
    corpus = Corpus(prepare(tmp_path / "book.txt", data_dir=tmp_path / "data"))
    assert corpus.name == "book" and "single document" in corpus.meta["split_rule"]
    tokens = np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).astype(np.int64)
    assert corpus.tokenizer().decode(tokens[:-1].tolist()) == text
    assert len(corpus.tokens("val")) == max(1, int(len(tokens) * 0.1))


def test_files_of_a_folder_that_are_not_text_are_skipped_whole_counted_and_named(tmp_path, monkeypatch, capsys):
    source = write_folder(tmp_path / "in")
    (source / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (source / "late.txt").write_bytes(b"fine text\n" * 1997 + b"\xff")  # not UTF-8 only after many pieces
    (source / "zeros.dat").write_bytes(b"header\n" * 300 + b"\0" * 64)  # valid UTF-8, but binary
    (source / ".hidden.txt").write_text("hidden files are not documents")
    monkeypatch.setattr(PREP, "PIECE", 100)
    monkeypatch.setattr(PREP, "MAX_PIECE", 400)
    corpus = Corpus(prepare(source, data_dir=tmp_path / "data", val_fraction=0.4))
    assert corpus.meta["input"]["unreadable_files"] == 3 and corpus.meta["input"]["documents"] == len(DOCS)
    assert all_documents(corpus) == sorted(DOCS.values())
    size = sum(len(corpus.tokens(split)) for split in ("train", "val"))
    assert size == sum(len(text.encode()) + 1 for text in DOCS.values())  # nothing of late.txt, whose start was written
    warning = capsys.readouterr().err
    assert all(name in warning for name in ("latin1.txt", "late.txt", "zeros.dat"))


def test_a_text_file_given_alone_keeps_its_text_despite_a_stray_byte_and_is_refused_when_binary(tmp_path, monkeypatch):
    """A single file is the whole corpus: a few invalid bytes become U+FFFD (and are counted), where skipping it
    left nothing and ended in a negative seek; a binary file, or one in another encoding, is refused in one line."""
    text = (b"a" * (PREP.BLOCK - 1) + "é, cut in two by the end of a block\n".encode() +  # valid all the same
            "".join(f"line {i} of a book, and a real \ufffd\n" for i in range(300)).encode())  # 74 KB in all
    (tmp_path / "book.txt").write_bytes(text[:70_000] + b"\xff" + text[70_000:] + "世".encode()[:2])  # 2 invalid
    corpus = Corpus(prepare(tmp_path / "book.txt", data_dir=tmp_path / "data"))
    tokens = np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).astype(np.int64)
    replaced = (text[:70_000] + "\ufffd".encode() + text[70_000:]).decode() + "\ufffd"  # they, and only they
    assert corpus.tokenizer().decode(tokens[:-1].tolist()) == replaced
    assert corpus.meta["input"]["invalid_utf8_replaced"] == 2 and corpus.meta["input"]["unreadable_files"] == 0
    refused = {"binary.dat": bytes(range(256)) * 300, "utf16.txt": "text".encode("utf-16"),
               "latin1.txt": "Grüße aus Köln, ça va? ".encode("latin-1") * 100, "empty.txt": b""}
    for name, content in refused.items():
        (tmp_path / name).write_bytes(content)
        status, message = run_cli(["--input", tmp_path / name, "--data_dir", tmp_path / "new"])
        assert status == 1 and name in message and "\n" not in message and not (tmp_path / "new").exists()
    monkeypatch.setattr(PREP, "check_text_file", lambda f: 0)  # a file that turns out unreadable while it is read
    status, message = run_cli(["--input", tmp_path / "latin1.txt", "--data_dir", tmp_path / "new"])
    assert status == 1 and str(tmp_path / "latin1.txt") in message and not (tmp_path / "new").exists()


def test_rewriting_a_corpus_replaces_it_whole(tmp_path):
    source = write_folder(tmp_path / "in")
    folder = prepare(source, name="x", data_dir=tmp_path, val_fraction=0.4)
    (source / "extra.txt").write_text("more text " * 100)
    prepare(source, name="x", data_dir=tmp_path, val_fraction=0.4)
    assert Corpus(folder).meta["input"]["documents"] == len(DOCS) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "x"]  # no work folders left behind


def test_hidden_folders_and_the_corpora_themselves_are_not_documents(tmp_path):
    source = write_folder(tmp_path / "project", {**DOCS, ".git/HEAD": "ref: main\n", ".git/objects/ab/cd": "x"})
    prepare(write_folder(tmp_path / "other"), name="earlier", data_dir=source / "data", val_fraction=0.4)
    corpus = Corpus(prepare(source, data_dir=source / "data", val_fraction=0.4))  # --input . in the repository
    assert all_documents(corpus) == sorted(DOCS.values()) and corpus.meta["input"]["unreadable_files"] == 0


def test_names_made_from_the_input_are_plain_folder_names(tmp_path):
    (tmp_path / ".hidden.txt").write_text("x" * 100)
    assert prepare(tmp_path / ".hidden.txt", data_dir=tmp_path / "data").name == "corpus"


def test_wide_vocabularies_use_32_bit_tokens():
    assert PREP.token_dtype(257) == np.uint16 and PREP.token_dtype(100_277) == np.uint32


def test_gpt2_round_trip(tmp_path):
    gpt2_or_skip()
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer="gpt2", data_dir=tmp_path / "data",
                            val_fraction=0.4))
    assert corpus.name == "in-gpt2" and corpus.meta["vocab_size"] == 50257
    assert all_documents(corpus) == sorted(DOCS.values())


def test_load_corpus_prepares_the_default_and_names_missing_ones(tmp_path):
    corpus = load_corpus("stdlib", data_dir=tmp_path)
    # the default corpus is large enough for eval.py's default: 8 sequences of 131072 tokens
    assert corpus.eval_sequences(length=131072, num_seqs=8)[0].shape == (8, 131073)
    with pytest.raises(DataError, match="mine"):
        load_corpus("mine", data_dir=tmp_path)


# --- Memory -------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures memory through /proc")
def test_memory_stays_bounded_whatever_a_documents_size(tmp_path):
    """A 70 MB text file and a 3 KB .jsonl.zst holding a 30 MB document, prepared with 250 MB of address space to
    spare: the data.py before needed about 27 times a document's size (and died of the second in Rust)."""
    zstandard = pytest.importorskip("zstandard")
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(1_700):
            f.write("Some words on a line, and more of them.\n" * 1000)
    texts = [f"small document {i}" for i in range(7)] + ["abcdefghij" * 3_000_000]
    (tmp_path / "big.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(texts)))
    script = ("import resource\nfrom corpora.prepare import prepare\n"
              "size = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize')][0]\n"
              "resource.setrlimit(resource.RLIMIT_AS, (size + 250 * 2 ** 20,) * 2)\n"
              "for name in ('big.txt', 'big.jsonl.zst'):\n"
              "    prepare(name, name=name.replace('.', '_'), data_dir='data', workers=1, val_fraction=0.5)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    big = Corpus(tmp_path / "data" / "big_txt")
    assert len(big.tokens("train")) + len(big.tokens("val")) == (tmp_path / "big.txt").stat().st_size + 1
    zst = Corpus(tmp_path / "data" / "big_jsonl_zst")
    assert zst.meta["input"]["documents"] == 8 and zst.meta["splits"]["train"]["tokens"] + \
        zst.meta["splits"]["val"]["tokens"] == sum(len(t) + 1 for t in texts)


# --- Batches ------------------------------------------------------------------------------------------------------

def stream_corpus(tmp_path, n_tokens=5001):
    """One text file of n_tokens distinct-looking bytes (split by position: 90% train)."""
    path = tmp_path / "stream.txt"
    path.write_text("".join(chr(33 + (i * 7) % 90) for i in range(n_tokens)))
    return Corpus(prepare(path, data_dir=tmp_path / "data"))


def test_stream_batches_continue_exactly(tmp_path):
    corpus = stream_corpus(tmp_path)
    tokens = torch.from_numpy(corpus.tokens("train").astype(np.int64))
    batcher = StreamBatcher(corpus, "train", batch_size=3, length=16, seed=1)
    first, restarted = batcher.next()
    assert restarted.all()
    for _ in range(20):
        second, restarted = batcher.next()
        for i in range(3):
            if not restarted[i]:
                start = int(np.flatnonzero((tokens.unfold(0, 17, 1) == first[i]).all(1))[0])
                assert torch.equal(second[i], tokens[start + 16:start + 33])  # the next 16 inputs, exactly
                assert second[i, 0] == first[i, -1]
        first = second


def test_stream_lanes_wrap_and_report_it(tmp_path):
    corpus = stream_corpus(tmp_path, n_tokens=1000)
    batcher = StreamBatcher(corpus, "train", batch_size=2, length=50)
    restarts = [batcher.next()[1] for _ in range(40)]
    assert any(r.any() for r in restarts[1:])  # lanes of ~450 tokens run out within 40 windows of 50
    saved = batcher.state_dict()
    expected, _ = batcher.next()
    other = StreamBatcher(corpus, "train", batch_size=2, length=50)
    other.load_state_dict(saved)
    assert torch.equal(other.next()[0], expected)


def test_streams_of_different_ranks_are_disjoint(tmp_path):
    corpus = stream_corpus(tmp_path)
    a = StreamBatcher(corpus, "train", 2, 16, rank=0, world_size=2)
    b = StreamBatcher(corpus, "train", 2, 16, rank=1, world_size=2)
    assert set(a.lane_starts).isdisjoint(b.lane_starts)


def test_random_windows_shape_and_range(tmp_path):
    corpus = stream_corpus(tmp_path)
    windows = corpus.random_windows("train", 4, 32, torch.Generator().manual_seed(0))
    assert windows.shape == (4, 33) and windows.dtype == torch.int64
    assert windows.max() < corpus.vocab_size


def test_eval_sequences_are_fixed_disjoint_and_start_at_documents(tmp_path):
    docs = {f"doc{i:03d}.txt": f"document {i}: " + "x" * (200 + 37 * i) for i in range(61)}
    corpus = Corpus(prepare(write_folder(tmp_path / "in", docs), data_dir=tmp_path / "data", val_fraction=0.5))
    seqs, starts = corpus.eval_sequences(length=300, num_seqs=4)
    again, _ = corpus.eval_sequences(length=300, num_seqs=4)
    assert seqs.shape == (4, 301) and torch.equal(seqs, again)
    assert all(b - a >= 301 for a, b in zip(starts, starts[1:]))
    val = corpus.tokens("val")
    assert all(s == 0 or val[s - 1] == corpus.meta["eot_token"] for s in starts)


def test_too_little_text_names_the_options_to_lower(tmp_path):
    corpus = stream_corpus(tmp_path)
    with pytest.raises(DataError, match="--num_seqs") as error:
        corpus.eval_sequences(length=131072, num_seqs=8)
    assert f"{len(corpus.tokens('val')):,}" in str(error.value)  # how much there is
    with pytest.raises(DataError, match="--seq_len"):
        corpus.random_windows("val", 2, 100_000)
    with pytest.raises(DataError, match="--batch_size"):
        StreamBatcher(corpus, "val", 64, 100)


# --- Errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["--bogus"], "--bogus"),
    (["--val_fraction", "0"], "--val_fraction"),
    (["--val_fraction", "1"], "--val_fraction"),
    (["--val_fraction", "-0.5"], "--val_fraction"),
    (["--val_fraction", "nan"], "--val_fraction"),
    (["--workers", "0"], "--workers"),
    (["--workers", "-3"], "--workers"),
    (["--workers", "100000"], "--workers"),
    (["--input", ""], "--input"),
    (["--input", " "], "--input"),
    (["--data_dir", ""], "--data_dir"),
    (["--tokenizer", ""], "--tokenizer"),
    (["--input", "nowhere"], "nowhere"),
    (["--input", "empty"], "empty"),
    (["--data_dir", "file"], "--data_dir"),
    (["--tokenizer", "nope"], "nope"),
    (["--tokenizer", "no/such/tokenizer.json"], "no/such/tokenizer.json"),
])
def test_usage_errors_are_one_line_that_names_the_flag_or_file(tmp_path, monkeypatch, capsys, argv, named):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "in")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    defaults = {"--input": "in", "--data_dir": "data"}
    status, message = run_cli(argv + [x for flag, value in defaults.items() if flag not in argv for x in (flag, value)])
    assert status == 1 and named in message and "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # checked before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "in"]
    assert user_files(tmp_path / "in") == {name: text.encode() for name, text in DOCS.items()}


def test_options_are_checked_in_the_library_too(tmp_path):
    for options in ({"workers": 0}, {"val_fraction": 1.0}, {"val_fraction": 0.0}):
        with pytest.raises(runs.UsageError, match=f"--{next(iter(options))}"):
            prepare(write_folder(tmp_path / "in"), data_dir=tmp_path / "data", **options)
    assert issubclass(DataError, runs.UsageError) and not (tmp_path / "data").exists()


def test_a_missing_input_is_named_before_any_tokenizer_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(PREP, "get_tokenizer", lambda spec: pytest.fail("the tokenizer came first"))
    with pytest.raises(DataError, match="nowhere"):
        prepare(tmp_path / "nowhere", tokenizer="EleutherAI/gpt-neox-20b", data_dir=tmp_path / "data")


def test_inputs_without_text(tmp_path):
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\xff\xfe\x00\x81" * 11)
    (tmp_path / "one.txt").write_text("")
    (tmp_path / "empty.jsonl").write_bytes(jsonl_bytes([""] * 50))  # documents, but not a character of text
    (tmp_path / "data").mkdir()
    for given in ("binary", "one.txt", "empty.jsonl"):
        with pytest.raises(DataError, match=given):
            prepare(tmp_path / given, data_dir=tmp_path / "data")
        status, _ = run_cli(["--input", tmp_path / given, "--data_dir", tmp_path / "new" / "data"])
        assert status == 1 and not (tmp_path / "new").exists()  # the folders it made for the corpus are gone too
    assert list((tmp_path / "data").iterdir()) == []  # nothing half-written left behind


def test_tokenizer_that_cannot_be_downloaded(monkeypatch, tmp_path):
    import tiktoken.load

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        TOK.get_tokenizer("cl100k_base")


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / "val.bin").unlink(), "val.bin"),
    (lambda f: (f / "train.bin").write_bytes(b""), "train.bin"),
    (lambda f: (f / "train.bin").write_bytes(b"\x01\x00\x02"), "train.bin"),
    (lambda f: (f / "meta.json").write_text(json.dumps({k: v for k, v in json.loads(
        (f / "meta.json").read_text()).items() if k != "vocab_size"})), "vocab_size"),
    (lambda f: (f / "meta.json").write_text("[1, 2]"), "meta.json"),
])
def test_damaged_corpora_are_refused_in_one_line(tmp_path, damage, named):
    folder = prepare(write_folder(tmp_path / "in"), data_dir=tmp_path / "data", val_fraction=0.4)
    damage(folder)
    with pytest.raises(DataError, match=named) as error:
        load_corpus(str(folder))
    assert "\n" not in str(error.value)


def test_each_preparation_gets_its_own_fingerprint(tmp_path):
    source = write_folder(tmp_path / "in")
    a = Corpus(prepare(source, name="a", data_dir=tmp_path, val_fraction=0.4))
    b = Corpus(prepare(source, name="a", data_dir=tmp_path, val_fraction=0.4))
    assert a.fingerprint == a.meta["created"] and b.fingerprint == b.meta["created"] and a.fingerprint != b.fingerprint
    meta = dict(b.meta)
    del meta["created"]  # a corpus prepared before the stamp existed
    (b.folder / "meta.json").write_text(json.dumps(meta))
    sizes = f"sizes-{(b.folder / 'train.bin').stat().st_size}-{(b.folder / 'val.bin').stat().st_size}"
    assert Corpus(b.folder).fingerprint == Corpus(b.folder).fingerprint == sizes


# --- Threads ------------------------------------------------------------------------------------------------------

def pool_threads_started(monkeypatch):
    started, real_start = [], threading.Thread.start

    def start(thread):
        if thread.name.startswith("ThreadPoolExecutor"):
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    return started


def test_never_more_threads_than_there_is_work(tmp_path, monkeypatch):
    started = pool_threads_started(monkeypatch)
    source = write_folder(tmp_path / "in")
    prepare(source, name="bytes", data_dir=tmp_path / "data", workers=48, val_fraction=0.4)
    assert started == []  # byte tokens need no tokenising at all
    gpt2_or_skip()
    prepare(source, name="gpt2", tokenizer="gpt2", data_dir=tmp_path / "data", workers=48, val_fraction=0.4)
    assert 1 <= len(started) <= len(DOCS)


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_an_interrupt_while_tokenising_keeps_the_old_corpus_and_ends_every_thread(tmp_path, monkeypatch, tokenizer):
    if tokenizer == "gpt2":
        gpt2_or_skip()
    source = write_folder(tmp_path / "in", {f"doc{i:03d}.txt": f"document {i} " * 50 for i in range(301)})
    folder = prepare(source, name="x", tokenizer=tokenizer, data_dir=tmp_path / "data")
    before = corpus_files(folder)
    calls = []

    def interrupt_on_the_100th(key, val_fraction):
        calls.append(key)
        if len(calls) == 100:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(PREP, "is_validation", interrupt_on_the_100th)
    monkeypatch.setattr(PREP, "PIECE", 1000)  # many batches
    with pytest.raises(KeyboardInterrupt):
        prepare(source, name="x", tokenizer=tokenizer, data_dir=tmp_path / "data", workers=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["x"] and corpus_files(folder) == before


# --- Names, replacement, interruption and killed runs -------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "./../somedir", "", ".hidden", "a\\b", " ", " x", "x\n",
                                  "a\tb", "n" * 101])
def test_names_that_are_not_one_plain_folder_are_refused_before_anything_is_written(tmp_path, name):
    source = write_folder(tmp_path / "in")
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "keep.txt").write_text("not a corpus")
    with pytest.raises(DataError):
        prepare(source, name=name, data_dir=tmp_path / "data")
    status, message = run_cli(["--input", source, "--name", name, "--data_dir", tmp_path / "data"])
    assert status == 1 and repr(name) in message and "\n" not in message
    assert not (tmp_path / "data").exists() and (tmp_path / "somedir" / "keep.txt").read_text() == "not a corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "somedir"]


def user_files(folder):
    """Every file under folder, with its content: what must still be there after a refusal."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_a_corpus_written_here_or_an_empty_folder_is_replaced(tmp_path):
    source, data_dir = write_folder(tmp_path / "in"), tmp_path / "data"
    write_folder(data_dir / "mine", {"notes.txt": "my own notes", "sub/more.txt": "and more"})
    (data_dir / "a_file").write_text("not a folder")
    write_folder(data_dir / "nano", {"train.bin": b"\1\0", "val.bin": b"\2\0", "meta.pkl": b"another project's"})
    (data_dir / "link").symlink_to(prepare(source, name="corpus", data_dir=tmp_path / "elsewhere", val_fraction=0.4))
    write_folder(data_dir / ".x.old", {"keep.txt": "where a replaced corpus would wait"})
    before = user_files(data_dir)
    for name, in_the_way in (("mine", "mine"), ("a_file", "a_file"), ("nano", "nano"), ("link", "link"),
                             ("x", ".x.old")):
        status, message = run_cli(["--input", source, "--name", name, "--data_dir", data_dir, "--val_fraction", 0.4])
        assert status == 1 and str(data_dir / in_the_way) in message and "\n" not in message
        assert user_files(data_dir) == before and sorted(p.name for p in data_dir.iterdir()) == sorted(
            ["mine", "a_file", "nano", "link", ".x.old"])  # nothing created, renamed or deleted
    (data_dir / "empty").mkdir()
    for name in ("empty", "empty", "fresh"):  # an empty folder, then the corpus written there: both replaced
        assert Corpus(prepare(source, name=name, data_dir=data_dir, val_fraction=0.4)).meta["input"]["documents"] == 5
    assert {k: v for k, v in user_files(data_dir).items() if k in before} == before


def test_clean_up_removes_only_what_preparing_left(tmp_path):
    """A killed preparation leaves a work folder .NAME.RANDOM.PID@HOST or .NAME.old; a folder of someone else's by
    such a name, holding anything but a corpus's files, is neither removed nor renamed, by load_corpus or prepare."""
    source, data_dir = write_folder(tmp_path / "in"), tmp_path / "data"
    prepare(source, name="x", data_dir=data_dir, val_fraction=0.4)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    host = socket.gethostname()
    write_folder(data_dir / f".mine.abcdefgh.{dead}@{host}", {"notes.txt": "named like a work folder"})
    write_folder(data_dir / f".w.abcdefgh.{dead}@{host}", {"train.bin": b"\1\0"})  # a killed run's: removed
    write_folder(data_dir / ".x.old", {"keep.txt": "named like a replaced corpus"})
    write_folder(data_dir / ".y.old", {"keep.txt": "named like a replaced corpus, with no corpus y"})
    before = user_files(data_dir)
    assert load_corpus("x", data_dir=data_dir).meta["input"]["documents"] == len(DOCS)
    with pytest.raises(DataError, match="'y'"):
        load_corpus("y", data_dir=data_dir)
    prepare(source, name="z", data_dir=data_dir, val_fraction=0.4)
    assert not (data_dir / f".w.abcdefgh.{dead}@{host}").exists()
    assert {k: v for k, v in user_files(data_dir).items() if k in before} == {
        k: v for k, v in before.items() if not k.startswith(".w.")}
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        [f".mine.abcdefgh.{dead}@{host}", ".x.old", ".y.old", "x", "z"])


def test_a_replacement_cut_short_puts_the_old_corpus_back(tmp_path, monkeypatch):
    source = write_folder(tmp_path / "in")
    folder = prepare(source, name="x", data_dir=tmp_path / "data", val_fraction=0.4)
    before = corpus_files(folder)
    (source / "extra.txt").write_text("more text " * 100)
    renames, real_rename = [], Path.rename

    def interrupted_rename(self, target):
        renames.append(self.name)
        if len(renames) == 2:  # the old corpus is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, name="x", data_dir=tmp_path / "data", val_fraction=0.4)
    assert renames[0] == "x" and renames[1].startswith(".x.") and renames[2] == ".x.old"
    assert corpus_files(folder) == before and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["x"]


def test_a_replacement_killed_half_way_is_finished_on_next_use(tmp_path):
    source = write_folder(tmp_path / "in")
    data_dir = tmp_path / "data"
    folder = prepare(source, name="x", data_dir=data_dir, val_fraction=0.4)
    before = corpus_files(folder)
    folder.rename(data_dir / ".x.old")  # killed after moving the old corpus aside
    assert corpus_files(load_corpus("x", data_dir=data_dir).folder) == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["x"]
    shutil.copytree(folder, data_dir / ".x.old")  # killed after the new corpus was in place
    assert corpus_files(load_corpus("x", data_dir=data_dir).folder) == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["x"]
    folder.rename(data_dir / ".x.old")
    prepare(source, name="x", data_dir=data_dir, val_fraction=0.4)  # prepare finishes it too, then replaces
    assert sorted(p.name for p in data_dir.iterdir()) == ["x"]


def test_an_interrupt_once_the_new_corpus_is_in_place_finishes_and_says_wrote(tmp_path, monkeypatch, capsys):
    source = write_folder(tmp_path / "in")
    data_dir = tmp_path / "data"
    prepare(source, name="x", data_dir=data_dir, val_fraction=0.4)
    (source / "extra.txt").write_text("more text " * 100)
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if Path(path).name == ".x.old":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the old corpus is being deleted
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    capsys.readouterr()
    status, _ = run_cli(["--input", source, "--name", "x", "--data_dir", data_dir, "--val_fraction", "0.4"])
    assert status == 130  # the interrupt is not lost, only held back until the swap is over
    assert str(data_dir / "x") in capsys.readouterr().out  # and the user is told the corpus was written
    assert sorted(p.name for p in data_dir.iterdir()) == ["x"]
    assert Corpus(data_dir / "x").meta["input"]["documents"] == len(DOCS) + 1


def test_prepare_works_outside_the_main_thread(tmp_path):
    result = []
    thread = threading.Thread(target=lambda: result.append(prepare(write_folder(tmp_path / "in"), val_fraction=0.4,
                                                                   data_dir=tmp_path / "data")))
    thread.start()
    thread.join()
    assert result and Corpus(result[0]).meta["input"]["documents"] == len(DOCS)


def start_slow_data_py(tmp_path, *argv):
    """python -m corpora in a process of its own, tokenising slowly (a pause before each batch of 1,000-character
    pieces) so that a test can stop it half-way. Its output goes to files: a pipe nobody reads could block it."""
    (tmp_path / "slow_data.py").write_text(
        "import sys, time\nimport corpora.prepare as prep\nfrom corpora.__main__ import main\n"
        "prep.PIECE, encode = 1000, prep._encode\n"
        "prep._encode = lambda *args: time.sleep(0.02) or encode(*args)\n"
        "main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        return subprocess.Popen([sys.executable, str(tmp_path / "slow_data.py"), *map(str, argv)], env=env,
                                stdout=out, stderr=err)


def wait_until_it_writes(process, data_dir):
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if any(f.stat().st_size for f in data_dir.glob(".x.*/train.bin")):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"python -m corpora never wrote: {(process.args, process.poll())}")


def slow_run_over_a_corpus(tmp_path):
    source = write_folder(tmp_path / "in", {f"doc{i:03d}.txt": f"document {i}\n" * 97 for i in range(301)})
    data_dir = tmp_path / "data"
    before = corpus_files(prepare(write_folder(tmp_path / "old"), name="x", data_dir=data_dir, val_fraction=0.4))
    process = start_slow_data_py(tmp_path, "--input", source, "--name", "x", "--data_dir", data_dir, "--workers", 1)
    wait_until_it_writes(process, data_dir)
    return process, data_dir, before


def test_sigterm_half_way_leaves_the_old_corpus_and_nothing_else(tmp_path):
    process, data_dir, before = slow_run_over_a_corpus(tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert sorted(p.name for p in data_dir.iterdir()) == ["x"] and corpus_files(data_dir / "x") == before


def test_the_work_folder_of_a_run_killed_hard_is_removed_by_the_next(tmp_path):
    process, data_dir, before = slow_run_over_a_corpus(tmp_path)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait(timeout=120)
    assert len(list(data_dir.glob(".x.*"))) == 1
    host = socket.gethostname()
    alive = data_dir / f".y.abcdefgh.{os.getpid()}@{host}"  # a run still going on
    elsewhere = data_dir / f".y.abcdefgh.{process.pid}@another-{host}"  # a machine sharing the folder
    for folder in (alive, elsewhere):
        folder.mkdir()
    assert corpus_files(load_corpus("x", data_dir=data_dir).folder) == before
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(["x", alive.name, elsewhere.name])
    (data_dir / f".z.abcdefgh.{process.pid}@{host}").mkdir()  # prepare removes them too
    prepare(write_folder(tmp_path / "old"), name="y", data_dir=data_dir, val_fraction=0.4)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(["x", "y", alive.name, elsewhere.name])


def test_corpus_folders_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        folder = prepare(write_folder(tmp_path / "in"), data_dir=tmp_path / "data", val_fraction=0.4)
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o750  # what mkdir gives under this umask, not mkdtemp's 0o700


def test_an_unwritable_data_dir_is_named(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "data"))

    monkeypatch.setattr(PREP.tempfile, "mkdtemp", read_only)
    status, message = run_cli(["--input", write_folder(tmp_path / "in"), "--data_dir", tmp_path / "data"])
    assert status == 1 and "--data_dir" in message and str(tmp_path / "data") in message


# --- Hugging Face tokenizers and .jsonl.zst -----------------------------------------------------------------------

def train_bpe(folder, special_tokens=(TOK.EOT,), vocab_size=400):
    """A small byte-level BPE tokenizer.json, trained here on made-up text (so decoding round-trips any text)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(DOCS.values()) + [f"def f_{i}(x): return x * {i}  # note {i}" for i in
                                                         range(300)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok") / "mybpe")


def expected_tokens(tokenizer_file, docs, val_fraction):
    """Each split as every whole document's own encoding plus end-of-text, in file order: what prepare must write."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eot = tokenizer.token_to_id(TOK.EOT)
    splits = {"train": [], "val": []}
    for key in sorted(docs):
        splits["val" if PREP.is_validation(key, val_fraction) else "train"] += tokenizer.encode(docs[key]).ids + [eot]
    return splits


@pytest.mark.parametrize("given", ["file", "folder"])
def test_hugging_face_tokenizer_by_path(tmp_path, monkeypatch, bpe, given):
    monkeypatch.setattr(PREP, "PIECE", 200)  # a.txt and c.md are cut in pieces, and get the tokens of the whole
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer=str(bpe if given == "file" else bpe.parent),
                            data_dir=tmp_path / "data", val_fraction=0.4, workers=2))
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(bpe))
    assert corpus.name == "in-mybpe" and corpus.meta["tokenizer"] == str(bpe.resolve())
    assert corpus.meta["tokenizer_sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert corpus.meta["vocab_size"] == reference.get_vocab_size(with_added_tokens=True) == 400
    assert corpus.meta["eot_token"] == reference.token_to_id(TOK.EOT) == 0
    for split, tokens in expected_tokens(bpe, DOCS, 0.4).items():
        assert corpus.tokens(split).tolist() == tokens
    assert all_documents(corpus) == sorted(DOCS.values())


def test_hugging_face_tokenizer_from_the_hub(tmp_path, bpe, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []

    def cached(repo, filename, **kwargs):
        asked.append((repo, filename))
        return str(bpe)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer="SomeOrg/Some-Model.v2",
                            data_dir=tmp_path / "data", val_fraction=0.4))
    assert asked == [("SomeOrg/Some-Model.v2", "tokenizer.json")]
    assert corpus.name == "in-Some-Model.v2" and corpus.meta["tokenizer"] == "SomeOrg/Some-Model.v2"
    assert corpus.meta["tokenizer_sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert corpus.tokens("val").tolist() == expected_tokens(bpe, DOCS, 0.4)["val"]


@pytest.mark.parametrize("error", ["LocalEntryNotFoundError", "OSError", "RepositoryNotFoundError"])
def test_hub_tokenizer_that_cannot_be_downloaded(tmp_path, monkeypatch, error):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.errors

    def offline(*args, **kwargs):
        exception = getattr(huggingface_hub.errors, error, OSError)
        raise exception.__new__(exception, "no network")  # their constructors want more than a message

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    status, message = run_cli(["--input", write_folder(tmp_path / "in"), "--tokenizer", "EleutherAI/gpt-neox-20b",
                               "--data_dir", tmp_path / "data"])
    assert status == 1 and "EleutherAI/gpt-neox-20b" in message and error in message
    assert "HF_HUB_OFFLINE=1" in message and "--tokenizer" in message  # what to do offline: set it, or give a path
    assert not (tmp_path / "data").exists()


def test_hub_names_do_not_wait_for_the_network_with_hf_hub_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    began = time.time()
    result = subprocess.run([sys.executable, "-m", "corpora", "--input", str(write_folder(tmp_path / "in")),
                             "--tokenizer", "SomeOrg/not-cached", "--data_dir", str(tmp_path / "data")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "SomeOrg/not-cached" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "data").exists()
    assert time.time() - began < 20  # without it, huggingface_hub retried an unreachable hub for 25 s


def test_missing_packages_are_named(tmp_path, monkeypatch, bpe):
    source = write_folder(tmp_path / "in")
    (tmp_path / "docs.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what an import of a missing package meets
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setattr(PREP, "zstandard", None)
    for kwargs, package in (({"tokenizer": "EleutherAI/gpt-neox-20b"}, "huggingface_hub"),
                            ({"tokenizer": str(bpe)}, "tokenizers"),
                            ({"input": tmp_path / "docs.jsonl.zst"}, "zstandard")):
        with pytest.raises(DataError, match=f"pip install {package}"):
            prepare(**{"input": source, **kwargs}, data_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_tokenizer_path_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    no_eot = train_bpe(tmp_path / "no_eot", special_tokens=["<pad>"], vocab_size=300)
    for spec, named in ((tmp_path / "empty", "empty"), (tmp_path / "nowhere" / "tokenizer.json", "nowhere"),
                        (tmp_path / "broken.json", "broken.json"), (no_eot, TOK.EOT)):
        with pytest.raises(DataError, match=str(named).replace("|", r"\|")) as error:
            TOK.get_tokenizer(str(spec))
        assert "\n" not in str(error.value)


def test_a_changed_tokenizer_file_is_refused_when_decoding(tmp_path):
    tokenizer_file = train_bpe(tmp_path / "tok")
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer=str(tokenizer_file), data_dir=tmp_path / "data",
                            val_fraction=0.4))
    train_bpe(tmp_path / "tok", vocab_size=350)  # the same path, now another vocabulary
    with pytest.raises(DataError, match="in-tok"):
        corpus.tokenizer()


def test_tokenizer_mismatch(tmp_path, bpe):
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest()
    enc = TOK.get_tokenizer(str(bpe.parent))  # what a corpus prepared with it records
    identity = {"tokenizer": enc.name, "tokenizer_sha256": enc.sha256}
    assert identity == {"tokenizer": str(bpe.resolve()), "tokenizer_sha256": sha}
    gpt2_meta = {"tokenizer": "gpt2", "vocab_size": 50257, "tokenizer_sha256": None}  # keys besides are ignored
    assert data.tokenizer_mismatch(gpt2_meta, {"tokenizer": "gpt2", "vocab_size": 50257}) is None
    assert data.tokenizer_mismatch(gpt2_meta, {"tokenizer": "bytes", "vocab_size": 257}) is not None
    hub = {"tokenizer": "EleutherAI/gpt-neox-20b", "tokenizer_sha256": sha}
    other = {"tokenizer": "EleutherAI/gpt-neox-20b", "tokenizer_sha256": "f" * 64}
    assert data.tokenizer_mismatch(hub, identity) is None  # same file, by hub name and by local path
    assert sha[:12] in data.tokenizer_mismatch(hub, other) and "ffffffffffff" in data.tokenizer_mismatch(hub, other)
    assert data.tokenizer_mismatch(hub, {"tokenizer": "EleutherAI/gpt-neox-20b"}) is None  # no sha: names decide
    assert data.tokenizer_mismatch(hub, {"tokenizer": "eleutherai/gpt-neox-20b"}) is not None
    mismatch = data.tokenizer_mismatch({"tokenizer": "bytes"}, {"tokenizer": "gpt2", "tokenizer_sha256": None})
    assert "bytes" in mismatch and "gpt2" in mismatch
    assert data.tokenizer_mismatch({"tokenizer": "gpt2"}, {"tokenizer": "gpt2"}) is None
    assert data.tokenizer_mismatch({"tokenizer": "bytes"}, {"tokenizer": None, "tokenizer_sha256": None}) is None
    assert data.tokenizer_mismatch({"tokenizer": "bytes"}, None) is None


def test_jsonl_zst_gives_the_same_documents_as_jsonl(tmp_path, bpe):
    zstandard = pytest.importorskip("zstandard")
    lines = [json.dumps({"text": f"document number {i}, ü " * (5 + i)}) for i in range(41)]
    lines += ["not json", json.dumps({"no_text": 1})]
    text = ("\n".join(lines) + "\n").encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "docs.jsonl").write_bytes(text)
    (tmp_path / "zst").mkdir()
    half = len(text) // 2  # two frames, as a file written in pieces has
    compressor = zstandard.ZstdCompressor()
    (tmp_path / "zst" / "docs.jsonl.zst").write_bytes(compressor.compress(text[:half]) +
                                                      compressor.compress(text[half:]))
    (tmp_path / "zst" / "damaged.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not really zstandard")
    corpora = [Corpus(prepare(tmp_path / folder, data_dir=tmp_path / "data", tokenizer=str(bpe), val_fraction=0.3))
               for folder in ("plain", "zst")]

    def documents(corpus):  # each document's tokens, in an order that does not depend on the split
        tokens = np.concatenate([corpus.tokens("train"), corpus.tokens("val")])
        ends = np.flatnonzero(tokens == corpus.meta["eot_token"]) + 1
        return sorted(tuple(d.tolist()) for d in np.split(tokens, ends[:-1]))

    assert documents(corpora[0]) == documents(corpora[1]) and len(documents(corpora[0])) == 41
    assert corpora[1].meta["input"] == {"documents": 41, "bad_lines": 1, "lines_without_text": 1,
                                        "unreadable_files": 1, "truncated_files": 0, "invalid_utf8_replaced": 0}
