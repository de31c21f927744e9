"""corpora/prepare.py: documents read, tokenised and written as a corpus that data.py reads, safely.

prepare(input, name, tokenizer) reads a text file, a folder of text files, or .jsonl / .jsonl.gz / .jsonl.zst with a
"text" field, and writes data_dir/NAME/{train.bin, val.bin, meta.json} (corpora/__init__.py describes the format). A
document goes to train or val by the md5 of its name, the same on every machine; a single text file is one document,
whose last val_fraction of tokens is val. Damaged lines and cut-off streams are counted and kept apart. Documents
are UTF-8 text: in a folder, a file that is not (binary, another encoding) is skipped whole and named; a single text
file may hold a few invalid bytes (each becomes U+FFFD, and is counted), and is refused when it is binary or mostly
not UTF-8. Hidden files and folders (.git) are not read, nor data_dir.

Nothing is lost: data_dir/NAME is replaced only when it is a corpus written here (its three files and nothing else) or
an empty folder; anything else is refused before anything is written. The corpus is written into a work folder
data/.NAME.RANDOM.PID@HOST and renamed into place when complete; a corpus being replaced waits as data/.NAME.old and
comes back if anything fails, even after a hard kill. The next run removes the work folders of dead processes; a
folder holding anything but a corpus's files is never removed or renamed, whatever its name.

Memory stays bounded whatever a document's size: files are read in blocks, and documents are tokenised in pieces of
256 K characters (4 M at most), cut where the tokenizer splits the text anyway, so that the tokens are the whole
document's. That is some tens of MB per tokenising thread, plus a few times the longest line of a .jsonl file, which
is parsed whole.
"""
import codecs
import contextlib
import gzip
import hashlib
import itertools
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
from tqdm import tqdm

import runs
from corpora import DATA_DIR, DEFAULT_CORPUS, DataError
from corpora.tokenizer import HFTokenizer, get_tokenizer

try:
    import zstandard
except ImportError:  # needed for .zst files only
    zstandard = None

JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
VAL_FRACTION = 0.1
BLOCK = 2 ** 16  # bytes read from a file at a time
PIECE, MAX_PIECE = 2 ** 18, 2 ** 22  # characters of a piece of a document; a batch holds about a piece per thread
# A newline between two non-spaces: tiktoken's encodings and byte-level BPE tokenizers (GPT-2's, GPT-NeoX's) start
# a new pre-token right after it, so text cut there gets the tokens of the whole.
SAFE_CUT = re.compile(r"\S\n(?=\S)")
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape for half a character, which UTF-8 cannot hold
WORK_FOLDER = re.compile(r"\..+\.[a-z0-9_]{8}\.(\d{1,7})@([^@]+)")  # .NAME.RANDOM.PID@HOST, as mkdtemp names it
CORPUS_FILES = ("train.bin", "val.bin", "meta.json")  # all that a corpus, or its work folder, ever holds
MAX_WORKERS = 256  # a batch holds about PIECE characters per thread: this bounds its memory (a few hundred MB)
MAX_INVALID = 0.01  # the share of a single text file's characters that may be invalid UTF-8 (each becomes U+FFFD)

RULES = [(("val_fraction",), "in (0, 1)", lambda x: 0 < x < 1),
         (("workers",), f"between 1 and {MAX_WORKERS}", lambda x: 1 <= x <= MAX_WORKERS)]


def check_name(name):
    """A corpus name is one plain folder name under data_dir, so that no name can reach (and replace) a folder
    elsewhere; a leading dot is kept for the work and replaced folders, and 100 bytes leave room for their suffixes.
    Control characters and spaces at either end are refused too: such a folder is hard to name again."""
    _require(name and not name.startswith(".") and Path(name).name == name and "\\" not in name and
             name.isprintable() and name == name.strip() and len(name.encode()) <= 100,
             f"corpus name {name!r} is not a plain folder name: give --name with up to 100 letters, digits, '-', '_' "
             f"or '.', without '/' and not starting with '.'")
    return name


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

def read_documents(files, root, report, skipped, errors="strict"):
    """Yield (key, piece, last) for every document: key names it (for the split), piece is the next part of its
    text, last marks its end. A piece None takes the document back: its file turned out part-way not to be UTF-8
    text, or unreadable; its key goes to the list skipped. What cannot be used is counted in report. errors: what
    invalid UTF-8 in a text file does, "strict" (the file is skipped) or "replace" (it becomes U+FFFD)."""
    for f in files:
        key = f.relative_to(root).as_posix() if root.is_dir() else f.name
        if f.name.endswith(JSONL):
            yield from _jsonl_documents(f, key, report)
            continue
        try:
            with open(f, encoding="utf-8", errors=errors) as text:  # as text: \r\n and \r become \n
                yield from ((key, *piece) for piece in _pieces(_text_chunks(text)))
        except (OSError, UnicodeError):
            report["unreadable_files"] += 1
            skipped.append(key)
            yield key, None, True


def _text_chunks(text):
    """An open text file in chunks of MAX_PIECE characters; UnicodeError at a NUL, which text never holds (a binary
    file may be valid UTF-8 by chance)."""
    for chunk in iter(lambda: text.read(MAX_PIECE), ""):
        if "\0" in chunk:
            raise UnicodeError(f"{text.name} holds a NUL character")
        yield chunk


def check_text_file(f):
    """The number of invalid UTF-8 sequences (each read as U+FFFD) in a text file given alone, the whole corpus: a
    stray byte is not worth losing it for. DataError, before anything is written, when it cannot be read, is empty,
    binary (a NUL byte) or more than MAX_INVALID not UTF-8 (another encoding)."""
    replacing, ignoring = (codecs.getincrementaldecoder("utf-8")(errors) for errors in ("replace", "ignore"))
    invalid = characters = 0
    try:
        with open(f, "rb") as stream:
            for block in itertools.chain(iter(lambda: stream.read(BLOCK), b""), [b""]):
                end = not block  # the last, empty block: a sequence cut short there is invalid too
                _require(b"\0" not in block, f"--input {f} is binary, not text (it holds NUL bytes, as UTF-16 text "
                         f"does too): give UTF-8 text; nothing was written")
                text = replacing.decode(block, final=end)
                # a U+FFFD of the text itself stays with errors="ignore" too; the others replace invalid bytes
                invalid += text.count("\ufffd") - ignoring.decode(block, final=end).count("\ufffd")
                characters += len(text)
    except OSError as error:
        raise DataError(f"cannot read --input {f} ({error.strerror or error}): check it and its permissions; "
                        f"nothing was written") from None
    _require(characters, f"--input {f} is empty: there is no text to prepare; nothing was written")
    _require(invalid <= MAX_INVALID * characters, f"--input {f} is not UTF-8 text ({invalid:,} of its {characters:,} "
             f"characters are not): convert it (iconv -f ENCODING -t UTF-8), or give another file; nothing was written")
    return invalid


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
    checked (DataError, UsageError) before anything is written, and so is data_dir/NAME: only a corpus written here,
    or an empty folder, is replaced."""
    runs.check({"val_fraction": val_fraction, "workers": workers}, RULES)
    for flag, value in (("input", input), ("tokenizer", tokenizer), ("data_dir", data_dir)):
        _require(value is None or str(value).strip(), f"--{flag} is empty: give one, or leave the flag out")
    if name is not None:
        check_name(name)
    data_dir = Path(data_dir)
    root, files, source, invalid = _input(input, data_dir)  # before the tokenizer, which may wait for a download
    enc = get_tokenizer(tokenizer)
    name = check_name(name if name is not None else _default_name(DEFAULT_CORPUS if input is None else root, enc))
    final, old = data_dir / name, data_dir / f".{name}.old"
    _check_destination(final, old)
    _require(zstandard or not any(f.name.endswith(".zst") for f in files), "reading .zst files needs the zstandard "
             "package: pip install zstandard")
    single_document = root.is_file() and not root.name.endswith(JSONL)
    report = dict.fromkeys(("documents", "bad_lines", "lines_without_text", "unreadable_files", "truncated_files",
                            "invalid_utf8_replaced"), 0)
    report["invalid_utf8_replaced"], skipped = invalid, []
    if invalid:
        print(f"warning: {root} holds {invalid:,} invalid UTF-8 sequence(s), read as U+FFFD", file=sys.stderr)
    made = [folder for folder in (data_dir, *data_dir.parents) if not folder.exists()]  # removed if nothing is written
    work = _make_work_folder(data_dir, name)
    try:
        with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenising") as bar:
            documents = read_documents(files, root, report, skipped, "replace" if invalid else "strict")
            splits = _write_splits(documents, enc, workers or min(os.cpu_count() or 1, 8), work, single_document,
                                   val_fraction, report, bar)
        if skipped:
            print(f"warning: skipped {len(skipped):,} file(s) that could not be read as UTF-8 text (binary, another "
                  f"encoding, or unreadable): {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}",
                  file=sys.stderr)
        _require(report["documents"], f"no documents found in {root} ({_summary(report)}); nothing was written")
        _require(sum(counts["tokens"] for counts in splits.values()) > report["documents"], f"no text found in {root}: "
                 f"its {report['documents']:,} document(s) are empty; nothing was written")
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
            replacing = _written_here(final)
            if replacing:
                final.rename(old)  # until the new corpus is in place: if anything fails, _clean_up puts it back
            elif final.is_dir() and not final.is_symlink():
                final.rmdir()  # an empty folder (_check_destination): rmdir removes nothing else
            work.rename(final)
            if replacing:
                shutil.rmtree(old, ignore_errors=True)
            for split, counts in splits.items():
                print(f"{split:5s} {counts['documents']:9,} documents {counts['tokens']:15,} tokens")
            print(f"read {_summary(report)}\nwrote {final}")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        _clean_up(data_dir, name)
        for folder in made:  # the folders made for it, deepest first; rmdir removes empty ones only
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return final


def _input(input, data_dir):
    """(root, files, source, invalid UTF-8 sequences to replace) of an --input path; None is the default corpus, the
    Python standard library."""
    if input is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
        return root, files, f"Python {sys.version.split()[0]} standard library ({root}), *.py, without site-packages", 0
    root = Path(input).resolve()
    _require(root.exists(), f"--input {root} does not exist: give a text file, a folder of text files or .jsonl file")
    if root.is_file():
        return root, [root], str(root), 0 if root.name.endswith(JSONL) else check_text_file(root)
    files = _folder_files(root, data_dir.resolve())
    _require(files, f"--input {root} holds no files (hidden files and folders are not read)")
    return root, files, str(root), 0


def _folder_files(root, data_dir):
    """The files under folder root, in order, but for hidden ones, those in hidden folders (.git, never walked) and
    those in data_dir (the corpora): they are not documents. Links to folders are not followed."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and Path(folder, name) != data_dir]
        files += [Path(folder, name) for name in names if not name.startswith(".")]
    return sorted(f for f in files if f.is_file())


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
        if single_document and train.tell():  # its last val_fraction of tokens are the validation split (none when
            # the file was taken back: it turned out unreadable)
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


def _check_destination(final, old):
    """Refuse, before anything is written, to replace what this module did not write: data_dir/NAME (and .NAME.old,
    where a replaced corpus waits) may be missing, an empty folder, or a corpus written here."""
    for path in (final, old):
        if not (path.exists() or path.is_symlink()) or _written_here(path):
            continue
        if path.is_symlink() or not path.is_dir():
            held = "a link" if path.is_symlink() else "a file"
        else:
            names = sorted(p.name for p in path.iterdir())
            if not names:
                continue  # an empty folder: replacing it loses nothing
            held = f"it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        raise DataError(f"{path} is not a corpus written by python -m corpora ({held}): choose another --name or "
                        f"--data_dir, or move it away; nothing was written")


def _written_here(folder, finished=True):
    """Whether folder is one this module wrote: a folder (not a link) holding nothing but a corpus's files and, if
    finished, a corpus's meta.json. Nothing else is ever replaced, renamed or removed, whatever its name."""
    try:
        if folder.is_symlink() or not folder.is_dir() or not {p.name for p in folder.iterdir()} <= set(CORPUS_FILES):
            return False
        if not finished:
            return True
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"tokenizer", "vocab_size", "dtype"} <= meta.keys()


def _clean_up(data_dir, name):
    """Finish what runs killed hard left behind: the work folders of this machine's dead processes, and a replacement
    of corpus NAME cut short (.NAME.old is the corpus when NAME is missing, else a leftover). Only folders that this
    module wrote are touched."""
    for folder in data_dir.glob(".*@*"):
        owner = WORK_FOLDER.fullmatch(folder.name)
        if owner and owner[2] == socket.gethostname() and os.name != "nt":  # on Windows, os.kill would end it
            if not runs.process_alive(owner[1]) and _written_here(folder, finished=False):
                shutil.rmtree(folder, ignore_errors=True)
    old, final = data_dir / f".{name}.old", data_dir / name
    if not _written_here(old):
        return
    if not (final.exists() or final.is_symlink()):
        old.rename(final)
    elif _written_here(final):
        shutil.rmtree(old, ignore_errors=True)


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


def _require(condition, message):
    if not condition:
        raise DataError(message)
