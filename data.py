"""data.py: corpora as flat token files, and the batches that training and evaluation read from them.

    python data.py                                the default corpus, in byte tokens, into data/stdlib/
    python data.py --input PATH [--name NAME] [--tokenizer gpt2]
                                                  a text file, a folder of text files (recursive), or .jsonl /
                                                  .jsonl.gz / .jsonl.zst with a "text" field, a document a line

train.py and eval.py read corpora through load_corpus(), which prepares the default corpus on first use: the Python
standard library's own .py files (site-packages excluded, about 30 MB), real text with long-range structure that every
Python installation carries, so that everything works offline. tasks.py and eval.py turn text into tokens and back
with get_tokenizer(spec), where spec (--tokenizer) is: bytes (the default: the UTF-8 bytes as 256 tokens, plus an
end-of-text token, so that a small model trains fast on a CPU), a tiktoken encoding (gpt2, cl100k_base, ...), a
Hugging Face tokenizer.json (or its folder), or a hub model ORG/NAME such as EleutherAI/gpt-neox-20b, the official
Mamba-2 checkpoints' (through huggingface_hub's cache; with HF_HUB_OFFLINE=1 it never waits for the network).

A corpus is data/NAME/train.bin and val.bin, every document's tokens followed by end-of-text (uint16, or uint32 for a
larger vocabulary), and meta.json: the tokenizer (and the sha256 of a tokenizer.json, for tokenizer_mismatch()), the
counts, what could not be used, and "created", a stamp per preparation (Corpus.fingerprint). A document goes to train
or val by the md5 of its name, the same on every machine; a single text file is one document, whose last
--val_fraction of tokens is val. It is written into a work folder data/.NAME.RANDOM.PID@HOST, renamed into place
when complete; a corpus being replaced waits as data/.NAME.old and comes back if anything fails, even after a hard
kill. The next run removes the work folders of dead processes.

Memory stays bounded whatever a document's size: files are read in blocks, and documents are tokenised in pieces of
256 K characters (4 M at most), cut where the tokenizer splits the text anyway, so that the tokens are the whole
document's. That is some tens of MB per tokenising thread, plus a few times the longest line of a .jsonl file, which
is parsed whole.

Batches (torch int64 tensors):
    Corpus.random_windows(split, B, T)   (B, T + 1) windows at random offsets: inputs [:, :-1], targets [:, 1:]
    StreamBatcher(corpus, split, B, T)   (B, T + 1) windows, row i going on exactly where it stopped in the previous
                                         batch: truncated backpropagation through time
    Corpus.eval_sequences(length, n)     (n, length + 1) fixed, evenly spaced sequences of the validation split
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

from cli import OneLineParser, UsageError, add_options, check, given, option, run

try:
    import zstandard
except ImportError:  # needed for .zst files only
    zstandard = None

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CORPUS = "stdlib"
EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "</s>", "<eos>")  # what Hugging Face tokenizers call their end-of-text token, in order of trust
JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
VAL_FRACTION = 0.1
BLOCK = 2 ** 16  # bytes read from a file at a time
PIECE, MAX_PIECE = 2 ** 18, 2 ** 22  # characters of a piece of a document; a batch holds about a piece per thread
# A newline between two non-spaces: tiktoken's encodings and byte-level BPE tokenizers (GPT-2's, GPT-NeoX's) start
# a new pre-token right after it, so text cut there gets the tokens of the whole.
SAFE_CUT = re.compile(r"\S\n(?=\S)")
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape for half a character, which UTF-8 cannot hold
WORK_FOLDER = re.compile(r"\..+\.(\d{1,7})@([^@]+)")  # .NAME.RANDOM.PID@HOST


class DataError(UsageError):
    """A problem with the user's data or options, told in one line that says what to do."""


@dataclasses.dataclass
class DataOptions:
    input: str = option(None, "a text file, a folder of text files, or .jsonl/.jsonl.gz/.jsonl.zst with a 'text' "
                              "field (default: the Python standard library's source)")
    name: str = option(None, "corpus name, one folder name under --data_dir (default: from input and tokenizer)")
    tokenizer: str = option("bytes", "bytes (the default), a tiktoken encoding (gpt2), a Hugging Face tokenizer.json "
                                     "(or its folder) or a hub name (EleutherAI/gpt-neox-20b)")
    val_fraction: float = option(VAL_FRACTION, "share of documents (of a single file's tokens) for validation",
                                 below=1)
    workers: int = option(None, "tokenising threads (default: all cores, at most 8)")
    data_dir: str = option(str(DATA_DIR), "where corpora live (default: data/ beside data.py)")


def check_name(name):
    """A corpus name is one plain folder name under data_dir, so that no name can reach (and replace) a folder
    elsewhere; a leading dot is kept for the work and replaced folders."""
    _require(name and not name.startswith(".") and Path(name).name == name and not any(c in name for c in "\\\0"),
             f"corpus name {name!r} is not a plain folder name: use letters, digits, '-', '_' or '.', without '/' "
             f"and not starting with '.'")
    return name


# --- Tokenizers ---------------------------------------------------------------------------------------------------

def bytes_encoding():
    """256 byte tokens plus an end-of-text token (256), as a tiktoken Encoding built in code: fully offline."""
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256})


class HFTokenizer:
    """A Hugging Face tokenizer.json behind the part of tiktoken's Encoding that this code uses: encode_ordinary,
    decode, n_vocab, eot_token and name (a hub name, or the file's absolute path), plus the file's sha256."""

    def __init__(self, path, name):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"tokenizer {name!r} is a Hugging Face tokenizer: pip install tokenizers") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - the Rust side reports a bad file as a plain Exception
            raise DataError(f"{path} is not a readable tokenizer.json ({str(error)[:80]})") from None
        self.path, self.name = Path(path), name
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [i for i in map(self._tokenizer.token_to_id, EOT_NAMES) if i is not None]
        _require(ids, f"tokenizer {name!r} has no end-of-text token ({', '.join(EOT_NAMES)}) to separate documents")
        self.eot_token = ids[0]

    def encode_ordinary(self, text):
        # unlike tiktoken's, a special token spelled out in the text (say <|endoftext|>) still becomes that token
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, threads):
        # Rust tokenises the texts of one call in parallel: `threads` texts a call keeps it to that many threads.
        # encode_batch_fast, where there is one, skips the offsets of every token: much less memory.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for i in range(0, len(texts), threads)
                for e in encode(texts[i:i + threads], add_special_tokens=False)]

    def decode(self, ids):
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _is_builtin(spec):
    """bytes or a tiktoken encoding: the name alone says which tokenizer it is."""
    return spec == "bytes" or spec in tiktoken.list_encoding_names()


def get_tokenizer(spec):
    """The tokenizer a --tokenizer spec names (see the top of the file); DataError, saying what to do, if it cannot
    be had."""
    if spec == "bytes":
        return bytes_encoding()
    if _is_builtin(spec):
        try:
            return tiktoken.get_encoding(spec)
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"could not load the {spec} vocabulary ({type(error).__name__}; offline?): set "
                            f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, or use --tokenizer bytes")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        _require(path.is_file(), f"{spec} holds no tokenizer.json: give a tokenizer.json or a folder holding one")
    if path.is_file():
        return HFTokenizer(path.resolve(), str(path.resolve()))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not spec.endswith(".json"):
        return HFTokenizer(_download_tokenizer(spec), spec)
    _require("/" not in spec and not spec.endswith(".json"),
             f"{spec} does not exist: give a tokenizer.json or a folder holding one")
    raise DataError(f"unknown tokenizer {spec!r}: use bytes, a tiktoken encoding "
                    f"({', '.join(tiktoken.list_encoding_names())}), a tokenizer.json or a hub name (ORG/NAME)")


def _download_tokenizer(repo):
    """The tokenizer.json of a hub model, from huggingface_hub's cache or downloaded into it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(f"tokenizer {repo!r} is on the Hugging Face hub: pip install huggingface_hub, or give the "
                        f"path of its tokenizer.json") from None
    try:
        return Path(hf_hub_download(repo, "tokenizer.json"))
    except Exception as error:  # noqa: BLE001 - offline, unknown, gated and missing files raise unrelated types
        raise DataError(f"could not get the tokenizer.json of {repo!r} from the Hugging Face hub "
                        f"({type(error).__name__}; offline, misspelt or gated?): download it elsewhere and give its "
                        f"path (--tokenizer PATH, or the folder of a model with it beside its config.json); offline, "
                        f"set HF_HUB_OFFLINE=1 not to wait for the network") from None


def tokenizer_identity(meta_or_spec):
    """{"tokenizer": name, "tokenizer_sha256": sha256 of its tokenizer.json, or None for bytes and tiktoken}, from
    a corpus's meta.json (or any dict with those keys; missing keys are None) or from a --tokenizer spec."""
    if isinstance(meta_or_spec, str):
        enc = None if _is_builtin(meta_or_spec) else get_tokenizer(meta_or_spec)
        return {"tokenizer": enc.name if enc else meta_or_spec, "tokenizer_sha256": enc and enc.sha256}
    meta = meta_or_spec or {}
    return {"tokenizer": meta.get("tokenizer"), "tokenizer_sha256": meta.get("tokenizer_sha256")}


def tokenizer_mismatch(corpus_meta, model_tokenizer):
    """None when a corpus (its meta.json) and a model (tokenizer_identity() of what it was trained with) use the
    same tokenizer, else why not, in a few words. The tokenizer.json's sha256 decides when both sides have one (a hub
    name and a local copy of its file agree); otherwise the names do. A model whose tokenizer is unknown matches."""
    corpus, model = tokenizer_identity(corpus_meta), tokenizer_identity(model_tokenizer)
    if corpus["tokenizer_sha256"] and model["tokenizer_sha256"]:
        if corpus["tokenizer_sha256"] == model["tokenizer_sha256"]:
            return None
        return (f"the corpus was tokenised by {corpus['tokenizer']} (tokenizer.json sha256 "
                f"{corpus['tokenizer_sha256'][:12]}), the model by {model['tokenizer']} (sha256 "
                f"{model['tokenizer_sha256'][:12]})")
    if model["tokenizer"] is None or corpus["tokenizer"] == model["tokenizer"]:
        return None
    return f"the corpus was tokenised by {corpus['tokenizer']}, the model by {model['tokenizer']}"


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def _encode(enc, texts, workers):
    """The tokens of each text, by at most `workers` threads, and never more threads than texts."""
    threads = max(1, min(workers, len(texts)))
    if enc.name == "bytes":  # byte tokens are the UTF-8 bytes themselves: there is no BPE to run
        return [np.frombuffer(text.encode(), np.uint8) for text in texts]
    if isinstance(enc, HFTokenizer):
        return enc.encode_batch(texts, threads)
    return enc.encode_ordinary_batch(texts, num_threads=threads)  # tiktoken lets go of the GIL while it works


# --- Reading documents --------------------------------------------------------------------------------------------

def read_documents(files, root, report):
    """Yield (key, piece, last) for every document: key names it (for the split), piece is the next part of its
    text, last marks its end. A piece None takes the document back: its file turned out to be unreadable part-way.
    What cannot be used is counted in report."""
    for f in files:
        key = f.relative_to(root).as_posix() if root.is_dir() else f.name
        if f.name.endswith(JSONL):
            yield from _jsonl_documents(f, key, report)
            continue
        try:
            with open(f, encoding="utf-8") as text:  # as text: \r\n and \r become \n
                yield from ((key, *piece) for piece in _pieces(iter(lambda: text.read(MAX_PIECE), "")))
        except (OSError, UnicodeDecodeError):
            report["unreadable_files"] += 1
            yield key, None, True


def _jsonl_documents(f, key, report):
    """The "text" of every line, a document named KEY:LINE_NUMBER; lines that are not UTF-8 JSON (bad lines) or have
    no "text" string are counted and skipped. A file that breaks off keeps its lines before."""
    damaged = (OSError, zlib.error, zstandard.ZstdError if zstandard else OSError)
    try:
        for number, line in enumerate(_lines(_blocks(f))):
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
                report["bad_lines"] += 1
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                report["lines_without_text"] += 1
                continue
            if LONE_SURROGATE.search(line):  # becomes U+FFFD, as tiktoken makes it
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            yield from ((f"{key}:{number}", *piece) for piece in _pieces([text]))
    except EOFError:
        report["truncated_files"] += 1
    except damaged:
        report["unreadable_files"] += 1


def _pieces(chunks):
    """(piece, last) for a text given in chunks of any size: pieces of PIECE to MAX_PIECE characters, cut at a
    SAFE_CUT so that they get the tokens of the whole text (or at MAX_PIECE when there is none)."""
    text, start = "", 0
    for chunk in chunks:
        text, start = text[start:] + chunk, 0
        while True:
            found = SAFE_CUT.search(text, start + PIECE, start + MAX_PIECE)
            if not found and len(text) - start <= MAX_PIECE:
                break  # for more text, where a place to cut may come
            end = found.end() if found else start + MAX_PIECE
            yield text[start:end], False
            start = end
    yield text[start:], True


def _lines(blocks):
    """The lines (bytes, without b"\\n") of a stream given in blocks."""
    partial = []  # the start of a line that goes on in the next block
    for block in blocks:
        lines = block.split(b"\n")
        for line in lines[:-1]:
            yield b"".join(partial + [line])
            partial = []
        partial.append(lines[-1])
    if any(partial):
        yield b"".join(partial)


def _blocks(f):
    """The bytes of a file in blocks, decompressed if it ends in .gz or .zst; EOFError if it ends before its
    compressed stream does (a file cut short)."""
    if not f.name.endswith(".zst"):
        with (gzip.open if f.name.endswith(".gz") else open)(f, "rb") as stream:
            yield from iter(lambda: stream.read(BLOCK), b"")
        return
    decompressor, frame = zstandard.ZstdDecompressor(), None
    with open(f, "rb") as stream:
        for block in iter(lambda: stream.read(BLOCK), b""):
            while block:  # frame by frame (a file written in parts has several), to see one that never ends
                frame = decompressor.decompressobj() if frame is None or frame.eof else frame
                yield frame.decompress(block)
                block = frame.unused_data if frame.eof else b""
    if frame is not None and not frame.eof:
        raise EOFError(f"{f} ends inside a zstd frame")


def is_validation(key, val_fraction):
    """A stable, machine-independent coin flip per document name."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 10_000 < val_fraction * 10_000


# --- Preparing a corpus -------------------------------------------------------------------------------------------

def prepare(input=None, name=None, tokenizer="bytes", data_dir=DATA_DIR, val_fraction=VAL_FRACTION, workers=None):
    """Tokenise a corpus into data_dir/NAME/{train.bin, val.bin, meta.json}, say what was read, return the folder.
    input None: the default corpus; name None: one made from the input's and the tokenizer's names. Every option is
    checked (DataError, UsageError) before anything is written."""
    check(DataOptions, {"val_fraction": val_fraction, "workers": workers})
    if name is not None:
        check_name(name)
    root, files, source = _input(input)  # before the tokenizer, which may wait for a download
    enc = get_tokenizer(tokenizer)
    name = check_name(name if name is not None else _default_name(DEFAULT_CORPUS if input is None else root, enc))
    _require(zstandard or not any(f.name.endswith(".zst") for f in files), "reading .zst files needs the zstandard "
             "package: pip install zstandard")
    single_document = root.is_file() and not root.name.endswith(JSONL)
    report = dict.fromkeys(("documents", "bad_lines", "lines_without_text", "unreadable_files", "truncated_files"), 0)
    final, old = Path(data_dir) / name, Path(data_dir) / f".{name}.old"
    work = _make_work_folder(Path(data_dir), name)
    try:
        with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenising") as bar:
            splits = _write_splits(read_documents(files, root, report), enc, workers or min(os.cpu_count() or 1, 8),
                                   work, single_document, val_fraction, report, bar)
        _require(report["documents"], f"no documents found in {root} ({_summary(report)})")
        for split, counts in splits.items():
            _require(counts["tokens"], f"the {split} split of {root} is empty: give more documents or change "
                                       f"--val_fraction")
        meta = dict(name=name, source=source, tokenizer=enc.name, tokenizer_sha256=getattr(enc, "sha256", None),
                    vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype=np.dtype(token_dtype(enc.n_vocab)).name,
                    splits=splits, input=report, val_fraction=val_fraction, split_rule=(
                        f"single document: the last {val_fraction:.0%} of its tokens are validation" if single_document
                        else f"by document: md5(document name) decides, {val_fraction:.0%} validation"),
                    created=f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}-{uuid.uuid4().hex[:16]}")
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        with _signals_held():  # once the new corpus is in place, the old one goes, and the user is told
            if final.exists():
                final.rename(old)  # until the new corpus is in place: if anything fails, _clean_up puts it back
            work.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            for split, counts in splits.items():
                print(f"{split:5s} {counts['documents']:9,} documents {counts['tokens']:15,} tokens")
            print(f"read {_summary(report)}\nwrote {final}")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        _clean_up(Path(data_dir), name)
        raise
    return final


def _input(input):
    """(root, files, source) of an --input path; None is the default corpus, the Python standard library."""
    if input is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
        return root, files, f"Python {sys.version.split()[0]} standard library ({root}), *.py, without site-packages"
    root = Path(input).resolve()
    _require(root.exists(), f"--input {root} does not exist: give a text file, a folder of text files or .jsonl file")
    files = [root] if root.is_file() else [f for f in sorted(root.rglob("*")) if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(root).parts)]  # hidden files are not documents
    _require(files, f"--input {root} holds no files")
    return root, files, str(root)


def _default_name(base, enc):
    """The input's name and the tokenizer's (none for bytes): stdlib-gpt2, book, pile-gpt-neox-20b."""
    label = "" if enc.name == "bytes" else enc.name
    if isinstance(enc, HFTokenizer):
        path = Path(enc.name)
        label = path.parent.name if path.name == "tokenizer.json" else path.name.removesuffix(".json")
        label = re.sub(r"[^\w.-]", "_", label).lstrip(".") or "tokenizer"
    return "-".join(filter(None, (Path(base).name.split(".")[0] or "corpus", label)))


def _summary(report):
    return ", ".join(f"{n:,} {what.replace('_', ' ')}" for what, n in report.items() if n or what == "documents")


def _write_splits(documents, enc, workers, work, single_document, val_fraction, report, bar):
    """Write every document's tokens, then end-of-text, to work/train.bin or val.bin. Returns {split: counts}."""
    dtype = np.dtype(token_dtype(enc.n_vocab))
    splits = {split: {"documents": 0, "tokens": 0} for split in ("train", "val")}
    with open(work / "train.bin", "w+b") as train, open(work / "val.bin", "wb") as val:
        outputs, begun = {"train": train, "val": val}, None  # begun: where the document being written started
        for batch in _batches(documents, workers * PIECE):
            tokens = iter(_encode(enc, [piece for _, piece, _ in batch if piece is not None], workers))
            for key, piece, last in batch:
                split = "train" if single_document or not is_validation(key, val_fraction) else "val"
                out = outputs[split]
                begun = out.tell() if begun is None else begun
                if piece is None:  # its file turned out unreadable: take back what was written of it
                    out.seek(begun)
                    out.truncate()
                else:
                    out.write(np.asarray(next(tokens), dtype))
                    bar.update(len(piece))
                    if last:
                        out.write(np.array([enc.eot_token], dtype))
                        splits[split]["documents"] += 1
                        report["documents"] += 1
                begun = None if last else begun
        if single_document:  # its last val_fraction of tokens are the validation split
            size = train.tell() // dtype.itemsize
            cut = (size - max(1, int(size * val_fraction))) * dtype.itemsize
            train.seek(cut)
            shutil.copyfileobj(train, val)
            train.truncate(cut)
            splits["val"]["documents"] = splits["train"]["documents"]
    for split in splits:
        splits[split]["tokens"] = (work / f"{split}.bin").stat().st_size // dtype.itemsize
    return splits


def _batches(documents, size):
    """Lists of consecutive (key, piece, last) holding about `size` characters."""
    batch, characters = [], 0
    for item in documents:
        batch.append(item)
        characters += len(item[1] or "")
        if characters >= size:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def _make_work_folder(data_dir, name):
    """An empty folder data_dir/.NAME.RANDOM.PID@HOST to write into, with the permissions of a folder made by hand."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _clean_up(data_dir, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=f".{os.getpid()}@{socket.gethostname()}",
                                     dir=data_dir))
    except OSError as error:
        raise DataError(f"cannot write under {data_dir} ({error.strerror or error}): give a writable folder as "
                        f"--data_dir") from None
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's 700 would hide the corpus from the other users of a shared machine
    return work


def _clean_up(data_dir, name):
    """Finish what runs killed hard left behind: the work folders of this machine's dead processes, and a replacement
    of corpus NAME cut short (.NAME.old is the corpus when NAME is missing, else a leftover)."""
    for folder in data_dir.glob(".*@*"):
        owner = WORK_FOLDER.fullmatch(folder.name)
        if owner and owner[2] == socket.gethostname() and os.name != "nt":  # on Windows, os.kill would end it
            try:
                os.kill(int(owner[1]), 0)  # signal 0 only asks whether the process is there
            except ProcessLookupError:
                shutil.rmtree(folder, ignore_errors=True)
            except PermissionError:  # another user's process, alive
                pass
    old, final = data_dir / f".{name}.old", data_dir / name
    if old.exists() and final.exists():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.rename(final)


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM back until the block is over, then raise KeyboardInterrupt."""
    caught, signals = [], (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        signals = ()  # only the main thread can set signal handlers
    held = {s: signal.signal(s, lambda signum, _: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler or signal.SIG_DFL)
    if caught:
        raise KeyboardInterrupt


# --- Reading a prepared corpus ------------------------------------------------------------------------------------

class Corpus:
    """A prepared corpus: memory-mapped token files and the batches drawn from them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        again = "prepare the corpus again (python data.py)"
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            dtype, self.vocab_size = np.dtype(self.meta["dtype"]), int(self.meta["vocab_size"])
            self.meta["tokenizer"], self.meta["eot_token"]  # noqa: B018 - read later; a missing one is named now
        except KeyError as error:
            raise DataError(f"{self.folder}/meta.json has no {error}: {again}") from None
        except (OSError, ValueError, TypeError):
            raise DataError(f"{self.folder} is not a prepared corpus (no readable meta.json): {again}") from None
        self.name = self.meta.get("name", self.folder.name)
        files = {split: self.folder / f"{split}.bin" for split in ("train", "val")}
        sizes = {split: f.stat().st_size if f.is_file() else 0 for split, f in files.items()}
        for split, size in sizes.items():
            _require(size > 0 and size % dtype.itemsize == 0, f"{files[split]} is missing, empty or cut short: {again}")
        # a stamp per preparation; corpora prepared before there was one are told apart by their sizes
        self.fingerprint = str(self.meta.get("created") or f"sizes-{sizes['train']}-{sizes['val']}")
        self._splits = {split: np.memmap(f, dtype=dtype, mode="r") for split, f in files.items()}

    def tokens(self, split):
        """The whole split as a 1-D memory-mapped array."""
        return self._splits[split]

    def tokenizer(self):
        """The tokenizer that made this corpus; refused when its tokenizer.json has changed since."""
        enc, recorded = get_tokenizer(self.meta["tokenizer"]), self.meta.get("tokenizer_sha256")
        _require(recorded in (None, getattr(enc, "sha256", None)), f"{self.meta['tokenizer']} is not the "
                 f"tokenizer.json that prepared corpus '{self.name}' (its sha256 was {str(recorded)[:12]}...): "
                 f"prepare the corpus again, or put that file back")
        return enc

    def random_windows(self, split, batch_size, length, generator=None):
        """(B, length + 1) int64 windows at uniformly random offsets of a split."""
        tokens = self._splits[split]
        _require(len(tokens) >= length + 2, f"the {split} split of '{self.name}' has {len(tokens):,} tokens, fewer "
                 f"than one window of {length + 1:,}: lower --seq_len or prepare a larger corpus")
        starts = torch.randint(0, len(tokens) - length - 1, (batch_size,), generator=generator)
        return torch.stack([_window(tokens, int(s), length + 1) for s in starts])

    def eval_sequences(self, length, num_seqs, split="val", flags=("--num_seqs", "--len")):
        """(num_seqs, length + 1) int64, the same on every call and machine, and their start offsets. The split is
        cut into num_seqs equal stretches; each sequence starts at the first document start of its stretch that leaves
        room (else at the stretch's start), so they never overlap. flags: the caller's options, for the message."""
        tokens = self._splits[split]
        need = num_seqs * (length + 1)
        _require(len(tokens) >= need, f"the {split} split of '{self.name}' has {len(tokens):,} tokens, but {num_seqs} "
                 f"sequences of {length + 1:,} tokens need {need:,}: lower {flags[0]} or {flags[1]}, or prepare a "
                 f"larger corpus (python data.py --input PATH)")
        stretch, starts = len(tokens) // num_seqs, []
        for lo in range(0, num_seqs * stretch, stretch):
            room = stretch - (length + 1)
            boundaries = np.flatnonzero(tokens[lo:lo + room + 1] == self.meta["eot_token"])
            starts.append(lo + int(boundaries[0]) + 1 if len(boundaries) and boundaries[0] < room else lo)
        sequences = torch.empty(num_seqs, length + 1, dtype=torch.int64)  # filled in place: one copy, not two
        for row, start in zip(sequences, starts):
            row.copy_(_window(tokens, start, length + 1))
        return sequences, starts


class StreamBatcher:
    """Contiguous streams for truncated backpropagation through time. The split is cut into batch_size * world_size
    equal lanes; row i of this rank reads its own lane, T tokens a batch, so row i of batch k + 1 starts exactly where
    row i of batch k stopped (the last target of one window is the first input of the next). A lane that runs out
    starts over, and next() says which rows did, since their carried state no longer belongs to the text."""

    def __init__(self, corpus, split, batch_size, length, rank=0, world_size=1, seed=0):
        tokens = corpus.tokens(split)
        lanes = batch_size * world_size
        self.lane_length = len(tokens) // lanes
        _require(self.lane_length >= length + 1, f"the {split} split of '{corpus.name}' has {len(tokens):,} tokens: "
                 f"too few for {lanes} streams of windows of {length + 1:,}; lower --batch_size or --seq_len")
        self.tokens, self.length = tokens, length
        self.lane_starts = [(rank * batch_size + i) * self.lane_length for i in range(batch_size)]
        # a seeded phase inside each lane, so that different seeds read different text
        seeded = torch.Generator().manual_seed(seed)
        phase = torch.randint(0, self.lane_length - length, (batch_size,), generator=seeded)
        self.positions = [start + int(p) for start, p in zip(self.lane_starts, phase)]
        self.fresh = True

    def next(self):
        """Windows (B, T + 1) int64 and restarted (B,) bool: the rows whose text does not continue the previous
        batch (all on the first call)."""
        restarted = torch.full((len(self.positions),), self.fresh)
        for i, start in enumerate(self.lane_starts):
            if self.positions[i] + self.length + 1 > start + self.lane_length:
                self.positions[i], restarted[i] = start, True
        windows = torch.stack([_window(self.tokens, p, self.length + 1) for p in self.positions])
        self.positions, self.fresh = [p + self.length for p in self.positions], False
        return windows, restarted

    def state_dict(self):
        return {"positions": list(self.positions), "fresh": self.fresh}

    def load_state_dict(self, state):
        self.positions, self.fresh = [int(p) for p in state["positions"]], bool(state["fresh"])


class CorpusBatches:
    """What train.py reads from a prepared corpus: training batches, and fixed validation sequences of 8 T tokens.
    args: the run's options (batch_size, seq_len, eval_seqs, seed).

    next() -> (inputs, targets, restarted) on the CPU: random windows, or with streams (tbptt) windows whose row i
    continues row i of the previous batch. state_dict() holds where the data stands, for an exact resume."""

    def __init__(self, corpus, args, rank, world, seed, streams):
        self.corpus, self.batch_size, self.seq_len = corpus, args.batch_size, args.seq_len
        self.rng = torch.Generator().manual_seed(seed)
        self.streams = (StreamBatcher(corpus, "train", args.batch_size, args.seq_len, rank, world, seed=args.seed)
                        if streams else None)
        self.val_sequences = corpus.eval_sequences(8 * args.seq_len, args.eval_seqs,
                                                   flags=("--eval_seqs", "--seq_len"))[0]

    def next(self):
        if self.streams is not None:
            windows, restarted = self.streams.next()
        else:
            windows, restarted = self.corpus.random_windows("train", self.batch_size, self.seq_len, self.rng), None
        return windows[:, :-1], windows[:, 1:], restarted

    @torch.no_grad()
    def validate(self, model, device, autocast):
        """Mean loss from the zero state over positions [0, T) and [T, 8T) of the validation sequences (n, 8 T + 1),
        read T tokens at a time (memory stays that of one training window)."""
        T = self.seq_len
        with autocast:
            losses = torch.cat([model.loss_per_position(rows.to(device), T) for rows in self.val_sequences.split(4)])
        per_position = losses.mean(0)
        return {"val_loss": per_position[:T].mean().item(), "val_loss_beyond_T": per_position[T:].mean().item()}

    def refusal(self, model):
        """Why model cannot be trained on this corpus's tokens, or None."""
        mismatch = tokenizer_mismatch(self.corpus.meta, getattr(model, "trained_on", None))
        if mismatch:
            return (f"{mismatch}: prepare the corpus with its tokenizer (python data.py --input PATH --tokenizer "
                    f"{model.trained_on['tokenizer']})")
        if model.cfg.vocab_size < self.corpus.vocab_size:
            return (f"it was trained with a vocabulary of {model.cfg.vocab_size} tokens but the corpus has "
                    f"{self.corpus.vocab_size}: use a corpus prepared with its tokenizer")
        return None

    def describe(self):
        """What the checkpoint records of the data: the corpus and, to notice a re-preparation, its fingerprint."""
        meta = self.corpus.meta
        return {"name": self.corpus.name, "tokenizer": meta["tokenizer"], "vocab_size": self.corpus.vocab_size,
                "tokenizer_sha256": meta.get("tokenizer_sha256"), "fingerprint": self.corpus.fingerprint}

    def state_dict(self):
        return {"data_rng": self.rng.get_state(), "streams": self.streams and self.streams.state_dict()}

    def load_state_dict(self, state):
        self.rng.set_state(state["data_rng"])
        if self.streams is not None:
            self.streams.load_state_dict(state["streams"])


def _window(tokens, start, size):
    return torch.from_numpy(tokens[start:start + size].astype(np.int64))


def _require(condition, message):
    if not condition:
        raise DataError(message)


def load_corpus(data=DEFAULT_CORPUS, data_dir=DATA_DIR):
    """A prepared corpus by folder or by name under data_dir. The default corpus ('stdlib', or 'stdlib-TOKENIZER'
    for bytes and tiktoken encodings) is prepared on first use, so the first command a new user runs just works."""
    folder = Path(data) if Path(data).is_dir() else Path(data_dir) / data
    try:
        _clean_up(folder.parent, folder.name)
    except OSError as error:
        raise DataError(f"could not put {folder.parent}/.{folder.name}.old back as {folder} ({error.strerror}): "
                        f"rename it by hand") from None
    if (folder / "meta.json").exists():
        return Corpus(folder)
    tokenizer = data[len(DEFAULT_CORPUS) + 1:] or "bytes"
    _require((data == DEFAULT_CORPUS or data.startswith(DEFAULT_CORPUS + "-")) and _is_builtin(tokenizer),
             f"no prepared corpus '{data}' (looked for {folder}/meta.json): prepare it with python data.py "
             f"--input PATH --name {data}")
    try:
        get_tokenizer(tokenizer)
    except DataError:
        raise DataError(f"the default corpus '{data}' needs tiktoken's {tokenizer} vocabulary, which could not be "
                        f"downloaded (offline?): set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, "
                        f"or read byte tokens (--data {DEFAULT_CORPUS})") from None
    print(f"preparing the default corpus '{data}' (once; see data.py)", file=sys.stderr)
    return Corpus(prepare(name=data, tokenizer=tokenizer, data_dir=data_dir))


def main(argv=None):
    parser = OneLineParser("data.py", __doc__)
    add_options(parser, DataOptions, "preparing a corpus")
    prepare(**given(parser.parse_args(argv), DataOptions))


if __name__ == "__main__":
    run("data.py", main)
