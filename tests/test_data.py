"""Tests of data.py on small made-up corpora: round trips, the split, the batches, the inputs and the errors."""
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
from data import Corpus, DataError, StreamBatcher, load_corpus, prepare

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
        path.write_text(text, encoding="utf-8")
    return root


def decoded_documents(corpus, split):
    """The documents of a split, decoded back to text (they are separated by end-of-text tokens)."""
    tokens = corpus.tokens(split).astype(np.int64)
    enc = corpus.tokenizer()
    eot = corpus.meta["eot_token"]
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def test_round_trip_and_disjoint_split(tmp_path):
    folder = prepare(write_folder(tmp_path / "in"), name="toy", data_dir=tmp_path / "data", val_fraction=0.4)
    corpus = Corpus(folder)
    train, val = decoded_documents(corpus, "train"), decoded_documents(corpus, "val")
    assert sorted(train + val) == sorted(DOCS.values())
    assert train and val and not set(train) & set(val)
    meta = corpus.meta
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["val"]["tokens"] == len(corpus.tokens("val"))
    assert meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
    # which split a document lands in depends on its name only
    expected_val = {DOCS[k] for k in DOCS if data.is_validation(k, 0.4)}
    assert set(val) == expected_val


def test_prepare_is_deterministic_and_parallel_matches_serial(tmp_path):
    source = write_folder(tmp_path / "in")
    a = prepare(source, name="a", data_dir=tmp_path, workers=1, val_fraction=0.4)
    b = prepare(source, name="b", data_dir=tmp_path, workers=2, val_fraction=0.4)
    for split in ("train.bin", "val.bin"):
        assert (a / split).read_bytes() == (b / split).read_bytes()


def test_jsonl_and_gzip_inputs(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " * 20}) for i in range(30)]
    lines += ["not json", json.dumps({"no_text": 1}), json.dumps({"text": 5})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    for name in ("docs.jsonl", "docs.jsonl.gz"):
        corpus = Corpus(prepare(tmp_path / name, name=name.replace(".", "_"), data_dir=tmp_path / "data"))
        docs = decoded_documents(corpus, "train") + decoded_documents(corpus, "val")
        assert sorted(docs) == sorted(f"document number {i} " * 20 for i in range(30))
        assert corpus.meta["skipped"]["lines"] == 3


def test_single_text_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(2000))
    (tmp_path / "book.txt").write_text(text)
    corpus = Corpus(prepare(tmp_path / "book.txt", data_dir=tmp_path / "data"))
    assert corpus.name == "book"
    tokens = np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).astype(np.int64)
    assert corpus.tokenizer().decode(tokens[:-1].tolist()) == text
    assert abs(len(corpus.tokens("val")) / len(tokens) - 0.1) < 0.01
    assert "single document" in corpus.meta["split_rule"]


def test_non_utf8_files_are_skipped_and_counted(tmp_path):
    source = write_folder(tmp_path / "in")
    (source / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (source / ".hidden.txt").write_text("hidden files are not documents")
    corpus = Corpus(prepare(source, data_dir=tmp_path / "data", val_fraction=0.4))
    assert corpus.meta["skipped"]["files"] == 1
    docs = decoded_documents(corpus, "train") + decoded_documents(corpus, "val")
    assert len(docs) == len(DOCS)


def test_rewriting_a_corpus_replaces_it_whole(tmp_path):
    source = write_folder(tmp_path / "in")
    folder = prepare(source, name="x", data_dir=tmp_path, val_fraction=0.4)
    (source / "extra.txt").write_text("more text " * 100)
    prepare(source, name="x", data_dir=tmp_path, val_fraction=0.4)
    assert Corpus(folder).meta["splits"]["train"]["documents"] + Corpus(folder).meta["splits"]["val"]["documents"] \
        == len(DOCS) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "x"]  # no temporary folders left behind


def stream_corpus(tmp_path, n_tokens=5000):
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
    docs = {f"doc{i:03d}.txt": f"document {i}: " + "x" * (200 + 37 * i) for i in range(60)}
    corpus = Corpus(prepare(write_folder(tmp_path / "in", docs), data_dir=tmp_path / "data", val_fraction=0.5))
    seqs, starts = corpus.eval_sequences(length=300, num_seqs=4)
    again, _ = corpus.eval_sequences(length=300, num_seqs=4)
    assert seqs.shape == (4, 301) and torch.equal(seqs, again)
    assert all(b - a >= 301 for a, b in zip(starts, starts[1:]))
    val = corpus.tokens("val")
    assert all(s == 0 or val[s - 1] == corpus.meta["eot_token"] for s in starts)


def test_too_little_validation_text_says_how_much_there_is(tmp_path):
    corpus = stream_corpus(tmp_path)
    with pytest.raises(DataError, match=r"has [\d,]+ tokens, but 8 sequences of 131,073 tokens need 1,048,584"):
        corpus.eval_sequences(length=131072, num_seqs=8)
    with pytest.raises(DataError, match="fewer than one window"):
        corpus.random_windows("val", 2, 100_000)


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", data_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        prepare(tmp_path / "empty", data_dir=tmp_path)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match=r"no documents found .* \(1 files skipped"):
        prepare(tmp_path / "binary", data_dir=tmp_path)
    assert not list(tmp_path.glob(".binary*"))  # nothing half-written left behind
    with pytest.raises(DataError, match="unknown tokenizer 'nope'"):
        prepare(tmp_path / "binary", tokenizer="nope", data_dir=tmp_path)


def test_tokenizer_that_cannot_be_downloaded(monkeypatch, tmp_path):
    import tiktoken.load

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataError, match="set TIKTOKEN_CACHE_DIR .* or use --tokenizer bytes"):
        data.get_tokenizer("cl100k_base")


def test_gpt2_round_trip_when_its_vocabulary_is_available(tmp_path):
    try:
        data.get_tokenizer("gpt2")
    except DataError:
        if os.environ.get("TIKTOKEN_CACHE_DIR"):
            raise  # a cache was provided, so the vocabulary must load
        pytest.skip("the gpt2 vocabulary is neither cached nor downloadable here")
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer="gpt2", data_dir=tmp_path / "data",
                            val_fraction=0.4))
    assert corpus.name == "in-gpt2" and corpus.meta["vocab_size"] == 50257
    docs = decoded_documents(corpus, "train") + decoded_documents(corpus, "val")
    assert sorted(docs) == sorted(DOCS.values())


def test_wide_vocabularies_use_32_bit_tokens():
    assert data.token_dtype(257) == np.uint16 and data.token_dtype(100_277) == np.uint32


def test_load_corpus_prepares_the_default_and_names_missing_ones(tmp_path):
    corpus = load_corpus("stdlib", data_dir=tmp_path)
    # the default corpus is large enough for eval.py's default: 8 sequences of 131072 tokens
    assert corpus.eval_sequences(length=131072, num_seqs=8)[0].shape == (8, 131073)
    with pytest.raises(DataError, match="python data.py --input PATH --name mine"):
        load_corpus("mine", data_dir=tmp_path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--input", str(tmp_path / "nowhere"), "--data_dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("data.py: error:") and "\n" not in message


# ----------------------------------------------------------------------------------------------------------------
# Names, replacement, interruption and damaged corpora
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "./../somedir", "", ".hidden", "a\\b"])
def test_names_that_are_not_one_plain_folder_are_refused_before_anything_is_written(tmp_path, capsys, name):
    source = write_folder(tmp_path / "in")
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "keep.txt").write_text("not a corpus")
    with pytest.raises(DataError, match="is not a plain folder name"):
        prepare(source, name=name, data_dir=tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--input", str(source), "--name", name, "--data_dir", str(tmp_path / "data")])
    assert str(exit_info.value.code).startswith("data.py: error: corpus name") and "\n" not in exit_info.value.code
    assert not (tmp_path / "data").exists() and (tmp_path / "somedir" / "keep.txt").read_text() == "not a corpus"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "somedir"]


def test_names_made_from_the_input_are_plain_folder_names(tmp_path):
    (tmp_path / ".hidden.txt").write_text("x" * 100)
    assert prepare(tmp_path / ".hidden.txt", data_dir=tmp_path / "data").name == "corpus"


def corpus_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_replacement_cut_short_puts_the_old_corpus_back(tmp_path, monkeypatch):
    source = write_folder(tmp_path / "in")
    folder = prepare(source, name="x", data_dir=tmp_path / "data", val_fraction=0.4)
    before = corpus_files(folder)
    (source / "extra.txt").write_text("more text " * 100)
    renames = []
    real_rename = type(folder).rename

    def interrupted_rename(self, target):
        renames.append(self.name)
        if len(renames) == 2:  # the old corpus is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(type(folder), "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, name="x", data_dir=tmp_path / "data", val_fraction=0.4)
    assert renames[:2] == ["x", renames[1]] and renames[1].startswith(".x.") and renames[2] == ".x.old"
    assert corpus_files(folder) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["x"]


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


def test_interrupt_while_a_pool_tokenises_leaves_nothing_behind(tmp_path, monkeypatch):
    docs = {f"doc{i:03d}.txt": f"document {i} " * 50 for i in range(400)}  # several batches of 64 documents
    source = write_folder(tmp_path / "in", docs)
    folder = prepare(source, name="x", data_dir=tmp_path / "data", workers=1)
    before = corpus_files(folder)
    calls = []

    def interrupt_on_the_100th(key, val_fraction):
        calls.append(key)
        if len(calls) == 100:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(data, "is_validation", interrupt_on_the_100th)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, name="x", data_dir=tmp_path / "data", workers=2)
    assert multiprocessing.active_children() == []  # the pool was ended, not left to the garbage collector
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["x"] and corpus_files(folder) == before


def test_ctrl_c_while_a_pool_tokenises_ends_every_process_in_one_line(tmp_path):
    """Ctrl-C reaches the workers too; a worker killed mid-batch used to leave the parent waiting forever."""
    line = (json.dumps({"text": "x = [i * i for i in range(10)]\n" * 300}) + "\n").encode()
    # 190 MB of text, far more than is tokenised before the interrupt: 20 gzip members, which gzip reads as one
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(line * 1000, compresslevel=1) * 20)
    data_dir = tmp_path / "data"
    stderr = open(tmp_path / "stderr.txt", "w")
    process = subprocess.Popen([sys.executable, data.__file__, "--input", str(tmp_path / "big.jsonl.gz"), "--workers",
                                "2", "--data_dir", str(data_dir)], start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while process.poll() is None and not any(f.stat().st_size for f in data_dir.glob(".big.*/train.bin")):
        time.sleep(0.02)  # until the pool's first results are written
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the parent and every worker
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("data.py hung after Ctrl-C")
    stderr.close()
    assert process.returncode == 130
    assert (tmp_path / "stderr.txt").read_text().rstrip().rsplit("\n", 1)[-1] == \
        "data.py: interrupted; nothing was written"
    assert list(data_dir.iterdir()) == []


def test_cli_says_interrupted_in_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "prepare", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--data_dir", str(tmp_path)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "data.py: interrupted; nothing was written\n"


def test_corpus_folders_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        folder = prepare(write_folder(tmp_path / "in"), data_dir=tmp_path / "data", val_fraction=0.4)
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o750  # what mkdir gives under this umask, not mkdtemp's 0o700


def test_usage_and_data_dir_errors_are_one_line(tmp_path, monkeypatch, capsys):
    source = write_folder(tmp_path / "in")
    (tmp_path / "file").write_text("not a folder")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "data"))

    for argv, expected in ((["--bogus"], "unrecognized arguments: --bogus (see --help)"),
                           (["--val_fraction", "2"], "--val_fraction must be between 0 and 1"),
                           (["--input", str(source), "--data_dir", str(tmp_path / "file")], "give a writable folder")):
        with pytest.raises(SystemExit) as exit_info:
            data.main(argv)
        assert str(exit_info.value.code).startswith("data.py: error:") and expected in exit_info.value.code
        assert "\n" not in exit_info.value.code and capsys.readouterr().err == ""
    monkeypatch.setattr(data.tempfile, "mkdtemp", read_only)
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--input", str(source), "--data_dir", str(tmp_path / "data")])
    assert exit_info.value.code == f"data.py: error: cannot write under {tmp_path / 'data'} (Permission denied): " \
                                   f"give a writable folder as --data_dir"


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "val.bin").unlink(), "val.bin is missing, empty or cut short"),
    (lambda f: (f / "train.bin").write_bytes(b""), "train.bin is missing, empty or cut short"),
    (lambda f: (f / "train.bin").write_bytes(b"\x01\x00\x02"), "train.bin is missing, empty or cut short"),
    (lambda f: (f / "meta.json").write_text(json.dumps({k: v for k, v in json.loads(
        (f / "meta.json").read_text()).items() if k != "vocab_size"})), "meta.json has no 'vocab_size'"),
    (lambda f: (f / "meta.json").write_text("[1, 2]"), "is not a prepared corpus"),
])
def test_damaged_corpora_are_refused_in_one_line(tmp_path, damage, expected):
    folder = prepare(write_folder(tmp_path / "in"), data_dir=tmp_path / "data", val_fraction=0.4)
    damage(folder)
    with pytest.raises(DataError, match=expected) as error:
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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers and .jsonl.zst
# ----------------------------------------------------------------------------------------------------------------

def train_bpe(folder, special_tokens=(data.EOT,), vocab_size=400):
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
    """Each split as every document's own encoding plus end-of-text, in file order: what prepare must write."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eot = tokenizer.token_to_id(data.EOT)
    splits = {"train": [], "val": []}
    for key in sorted(docs):
        splits["val" if data.is_validation(key, val_fraction) else "train"] += tokenizer.encode(docs[key]).ids + [eot]
    return splits


@pytest.mark.parametrize("given", ["file", "folder"])
def test_hugging_face_tokenizer_by_path(tmp_path, bpe, given):
    spec = str(bpe if given == "file" else bpe.parent)
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer=spec, data_dir=tmp_path / "data",
                            val_fraction=0.4))
    assert corpus.name == "in-mybpe"
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(bpe))
    assert corpus.meta["tokenizer"] == str(bpe.resolve())
    assert corpus.meta["tokenizer_sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert corpus.meta["vocab_size"] == reference.get_vocab_size(with_added_tokens=True) == 400
    assert corpus.meta["eot_token"] == reference.token_to_id(data.EOT) == 0
    for split, tokens in expected_tokens(bpe, DOCS, 0.4).items():
        assert corpus.tokens(split).tolist() == tokens
    assert sorted(decoded_documents(corpus, "train") + decoded_documents(corpus, "val")) == sorted(DOCS.values())


def test_hugging_face_tokenizer_in_parallel_matches_serial(tmp_path, bpe):
    source = write_folder(tmp_path / "in")
    a = prepare(source, name="a", tokenizer=str(bpe), data_dir=tmp_path, workers=1, val_fraction=0.4)
    b = prepare(source, name="b", tokenizer=str(bpe), data_dir=tmp_path, workers=2, val_fraction=0.4)
    for split in ("train.bin", "val.bin"):
        assert (a / split).read_bytes() == (b / split).read_bytes()


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
def test_hub_tokenizer_that_cannot_be_downloaded(tmp_path, monkeypatch, capsys, error):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.errors

    def offline(*args, **kwargs):
        exception = getattr(huggingface_hub.errors, error, OSError)
        raise exception.__new__(exception, "no network")  # their constructors want more than a message

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--input", str(write_folder(tmp_path / "in")), "--tokenizer", "EleutherAI/gpt-neox-20b",
                   "--data_dir", str(tmp_path / "data")])
    assert exit_info.value.code == (
        f"data.py: error: could not get tokenizer.json of 'EleutherAI/gpt-neox-20b' from the Hugging Face hub "
        f"({error}; offline, misspelt or gated?): download it elsewhere and pass its path instead (data.py --tokenizer PATH; "
        f"for a model, put it beside the model's config.json and pass that folder)")
    assert not (tmp_path / "data").exists()


def test_missing_packages_are_named(tmp_path, monkeypatch, bpe):
    source = write_folder(tmp_path / "in")
    (tmp_path / "docs.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what an import of a missing package meets
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    for kwargs, expected in (({"tokenizer": "EleutherAI/gpt-neox-20b"}, "pip install huggingface_hub"),
                             ({"tokenizer": str(bpe)}, "pip install tokenizers"),
                             ({"input": tmp_path / "docs.jsonl.zst"}, "pip install zstandard")):
        with pytest.raises(DataError, match=expected):
            prepare(**{"input": source, **kwargs}, data_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_tokenizer_path_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    no_eot = train_bpe(tmp_path / "no_eot", special_tokens=["<pad>"], vocab_size=300)
    for spec, expected in ((tmp_path / "empty", "holds no tokenizer.json"),
                           (tmp_path / "nowhere" / "tokenizer.json", "does not exist"),
                           (tmp_path / "broken.json", "is not a readable tokenizer.json"),
                           (no_eot, r"has no end-of-text token \(<\|endoftext\|>, </s>, <eos>\)")):
        with pytest.raises(DataError, match=expected) as error:
            data.get_tokenizer(str(spec))
        assert "\n" not in str(error.value)


def test_a_changed_tokenizer_file_is_refused_when_decoding(tmp_path):
    tokenizer_file = train_bpe(tmp_path / "tok")
    corpus = Corpus(prepare(write_folder(tmp_path / "in"), tokenizer=str(tokenizer_file), data_dir=tmp_path / "data",
                            val_fraction=0.4))
    train_bpe(tmp_path / "tok", vocab_size=350)  # the same path, now another vocabulary
    with pytest.raises(DataError, match="is not the tokenizer.json that prepared corpus .in-tok."):
        corpus.tokenizer()


def test_tokenizer_identity_and_mismatch(tmp_path, bpe):
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest()
    identity = data.tokenizer_identity(str(bpe.parent))
    assert identity == {"tokenizer": str(bpe.resolve()), "tokenizer_sha256": sha}
    assert data.tokenizer_identity("bytes") == {"tokenizer": "bytes", "tokenizer_sha256": None}
    assert data.tokenizer_identity({"tokenizer": "gpt2", "vocab_size": 50257}) == {"tokenizer": "gpt2",
                                                                                   "tokenizer_sha256": None}
    hub = {"tokenizer": "EleutherAI/gpt-neox-20b", "tokenizer_sha256": sha}
    other = {"tokenizer": "EleutherAI/gpt-neox-20b", "tokenizer_sha256": "f" * 64}
    assert data.tokenizer_mismatch(hub, identity) is None  # same file, by hub name and by local path
    assert data.tokenizer_mismatch(hub, other) == (
        f"the corpus was tokenised by EleutherAI/gpt-neox-20b (tokenizer.json sha256 {sha[:12]}), the model by "
        f"EleutherAI/gpt-neox-20b (sha256 ffffffffffff)")
    assert data.tokenizer_mismatch(hub, {"tokenizer": "EleutherAI/gpt-neox-20b"}) is None  # no sha: names decide
    assert data.tokenizer_mismatch(hub, {"tokenizer": "eleutherai/gpt-neox-20b"}) is not None
    assert data.tokenizer_mismatch({"tokenizer": "bytes"}, {"tokenizer": "gpt2", "tokenizer_sha256": None}) == \
        "the corpus was tokenised by bytes, the model by gpt2"
    assert data.tokenizer_mismatch({"tokenizer": "gpt2"}, {"tokenizer": "gpt2"}) is None
    assert data.tokenizer_mismatch({"tokenizer": "bytes"}, {"tokenizer": None, "tokenizer_sha256": None}) is None
    assert data.tokenizer_mismatch({"tokenizer": "bytes"}, None) is None


def test_jsonl_zst_gives_the_same_documents_as_jsonl(tmp_path, bpe):
    zstandard = pytest.importorskip("zstandard")
    lines = [json.dumps({"text": f"document number {i}, ü " * (5 + i)}) for i in range(40)]
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

    assert documents(corpora[0]) == documents(corpora[1]) and len(documents(corpora[0])) == 40
    assert corpora[1].meta["skipped"] == {"files": 1, "lines": 2} and corpora[0].meta["skipped"]["lines"] == 2
