"""runs: everything the scripts need around the idea, in one module beside the core.

train.py and eval.py call it a few times each; nothing in it is about recurrent models or their states:
    one_line(prog, main)            every error a user can cause is one line on stderr and exit status 1 (130 for
                                    Ctrl-C and SIGTERM), never a traceback
    parse(prog, doc, argv, groups)  the command line, made from dataclass fields (model.option) and option tables
    check(values, rules)            the rules an option's value must follow, in one line naming the flag
    resolve(given, ...)             how train.py's options combine: defaults < preset < post-training values < task
                                    < the model it starts from < the command line; on --resume, the saved run
    load_checkpoint, load_model     checkpoints of this project: written atomically, never with a number that is
                                    not finite, read without running code from the file, every entry checked
                                    (tensors within what the file holds, shapes, bookkeeping) before it is used
    RunFolder                       a run's folder: refused when it holds something else, locked while in use, its
                                    old log kept until the new run's first checkpoint; Ctrl-C stops at a step
    check_memory                    refuse a run that cannot fit, before allocating what would not
Presets (whole configurations, as data) are in runs/presets.py.
"""
import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from interventions import INITS
from scan_kernels import triton_refusal
from model import LM, MIXERS, ModelConfig
from runs.presets import PRESETS, TASK_DEFAULTS


# ----------------------------------------------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A problem with the user's options or files, told in one line that says what to do."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or written; the message says what to do."""


class Stopped(Exception):
    """A run stopped early at the user's request; the message says how to continue."""


def one_line(prog, main, argv=None):
    """main(argv), with every error a user can cause told in one line: exit status 1 for errors, 130 for Ctrl-C
    or SIGTERM (both raise KeyboardInterrupt, so that work in progress is cleaned up on the way out, whatever
    the signals' handling was when the script started: nohup, say, ignores SIGINT)."""
    previous = {s: signal.signal(s, handler) for s, handler in ((signal.SIGINT, signal.default_int_handler),
                                                                 (signal.SIGTERM, _interrupt))}
    try:
        return main(argv)
    except UsageError as error:
        sys.exit(f"{prog}: error: {error}")
    except Stopped as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        sys.exit(130)
    except OSError as error:  # a full disk, a folder without write permission, a file that vanished
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        sys.exit(f"{prog}: error: {error.strerror or error}{where}: check the path, its permissions and free space")
    except (MemoryError, torch.OutOfMemoryError):
        sys.exit(f"{prog}: error: out of memory: use smaller sizes, or a larger device")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:  # as they were: a script run from Python (the tests) leaves the caller's handlers alone
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

FLOAT32_MAX = 3.4e38  # a float option must be finite in the float32 the model computes in


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), like every other error of the scripts."""

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def parse(prog, doc, argv, groups):
    """{name: value} of the flags given on the command line. groups: {title: flags}, flags a dataclass (a flag
    --NAME per field made with model.option) or a list of (name, type, help, choices). A bool is --NAME /
    --no-NAME; a List[T] takes one or more values and may be repeated. Every default is None, so that what was
    given is known: the defaults are the dataclasses' (or the caller's) to fill in."""
    parser = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
    for title, flags in groups.items():
        group = parser.add_argument_group(title)
        if dataclasses.is_dataclass(flags):
            flags = [(f.name, f.type, f.metadata["help"], f.metadata["choices"]) for f in dataclasses.fields(flags)
                     if "help" in f.metadata]
        for name, kind, help, choices in flags:
            if kind is bool:
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help)
            elif typing.get_origin(kind) is list:
                group.add_argument(f"--{name}", type=typing.get_args(kind)[0], nargs="+", action="extend",
                                   choices=choices, help=help)
            else:
                group.add_argument(f"--{name}", type=kind, choices=choices, help=help)
    return {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not None}


def check(values, rules, only_for=None, setting=None):
    """Refuse, in one line naming the flag, a value of values ({name: value}) that breaks its rule. rules: a list of
    (names, what each must be, test); besides them every float must be finite. only_for ({name: (option, values
    it applies to)}) refuses an option given for another value of that option in setting (--noise_std with --init
    state_passing), or without a switch it needs (eval.py's --effrem_T without --effrem: allowed (True,)); an
    option whose setting is not known yet is not checked."""
    for name in values:
        key, allowed = (only_for or {}).get(name, (None, ()))
        if key in (setting or {}) and setting[key] not in allowed:
            if allowed == (True,):  # a switch: --len means something with --eval only
                raise UsageError(f"--{name} applies with --{key} only: add --{key} or drop --{name}")
            if allowed == (False,):
                raise UsageError(f"--{name} does not apply with --{key}: drop --{name}")
            raise UsageError(f"--{name} applies to --{key} {' or '.join(allowed)} only, not --{key} "
                             f"{setting[key]}: drop it")
    for name, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not abs(item) < FLOAT32_MAX:
                raise UsageError(f"--{name} must be a finite number; got {item}")
            if isinstance(item, str) and not item.strip():  # --out_dir '' would mean the default, silently
                raise UsageError(f"--{name} is empty: give a value or leave the flag out")
    for names, what, test in rules:
        for name in names:
            value = values.get(name)
            for item in [] if value is None else value if isinstance(value, (list, tuple)) else [value]:
                if not test(item):
                    raise UsageError(f"--{name} must be {what}; got {item}")


def pick_device(name):
    """The torch.device for a --device flag ("auto": CUDA when available), with one-line errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    usable = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not usable.get(device.type, False):
        raise UsageError(f"--device {name}: no such device is usable here; use --device cpu"
                         + (" or cuda" if usable["cuda"] else ""))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def autocast_for(device, dtype="auto"):
    """(autocast context, the dtype the scan then reads its inputs in) for a --dtype flag: bfloat16 autocast on
    CUDA unless told otherwise, float32 on the CPU."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return (torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
            torch.bfloat16 if use_bf16 else torch.float32)


def check_backend(cfg, device, compute_dtype):
    """A one-line error now rather than a traceback at the first step when --backend triton cannot run."""
    if cfg.backend != "triton":
        return
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--backend triton needs a CUDA device; use --backend torch (or auto) on the CPU")
    refusal = triton_refusal(*cfg.head_sizes(), cfg.chunk_size, compute_dtype, device)
    if refusal:
        raise UsageError(f"--backend triton: {refusal}; or use --backend auto")


LOGITS_BUDGET = 2 ** 26  # logits held at once (256 MB in float32): bounds memory whatever the vocabulary


def piece_length(chunk, rows, vocab_size):
    """Tokens per row in one forward pass, so that rows x length stays within chunk tokens and LOGITS_BUDGET logits:
    the memory of a pass is then bounded whatever the number of rows, the vocabulary or the sequence length."""
    return max(1, min(chunk, LOGITS_BUDGET // vocab_size) // rows)


def print_table(rows, left=0, title=None, rule=False):
    """Rows of cells (strings or numbers) printed in aligned columns: the first `left` columns aligned left, the
    others right; a title above, and a rule under the first row (the header) when asked."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(([f"\n{title}"] if title else []) + lines))


def pyplot():
    """matplotlib's pyplot on the file-only backend (no screen needed), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------------------
# Files and checkpoints
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "lengen-checkpoint-v1"


def write_atomically(path, data):
    """Write data (str, bytes, or a function that writes into a binary file) to path: into a temporary file beside
    it, synced to disk, then renamed over path, so that a reader or a crash never sees half a file. Temporary files
    that killed writers left are removed first."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if not process_alive(stale.name.rsplit("-", 1)[-1]):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_alive(pid):
    """Whether the process with this id (an int or a string of digits) is running; anything else counts as alive,
    so that nothing is taken from a process that might still use it."""
    pid = str(pid)
    if not pid.isdigit() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process is there
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        pass
    return True


def checkpoint_path(path):
    """The file a checkpoint argument stands for: a run folder (or a name without a suffix) means its ckpt.pt."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() or not path.suffix else path


def is_checkpoint(spec):
    """The one rule for what a model argument names: a checkpoint of this project (a .pt file or a run folder,
    existing or not, whenever the path or its parent folder exists here), or else an official model for
    pretrained/ (a folder with config.json, or a Hugging Face hub name such as state-spaces/mamba2-370m)."""
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return False
    return path.exists() or path.parent.is_dir()


def named_tensors(obj, name=""):
    """(dotted name, tensor) for every tensor inside obj (nested dicts, lists, tuples), depth first. Walked with a
    list rather than recursion, and each container once: an unpickled file can nest deeper than Python recurses, or
    hold a list that contains itself."""
    pending, seen = [(name, obj)], set()
    while pending:
        name, obj = pending.pop()
        if isinstance(obj, torch.Tensor):
            yield name or "tensor", obj
        elif isinstance(obj, (dict, list, tuple)) and id(obj) not in seen:
            seen.add(id(obj))
            items = list(obj.items() if isinstance(obj, dict) else enumerate(obj))
            pending.extend((f"{name}.{key}" if name else str(key), value) for key, value in reversed(items))


def first_nonfinite(obj):
    """The dotted name of the first floating-point tensor inside obj that holds a NaN or an infinity, or None.
    Checks the weights, and also the optimizer's moments and the intervention's states: a non-finite moment would
    silently freeze its parameter after a resume."""
    return next((name for name, t in named_tensors(obj) if t.is_floating_point() and not torch.isfinite(t).all()),
                None)


def overdrawn(tensor):
    """Whether a tensor stands for more numbers than its storage (what the file holds for it) has: a view that
    reaches beyond the storage, or one whose strides repeat numbers (stride 0, overlapping rows), so that a few bytes
    pose as a huge tensor. Reading its values (isfinite, a copy) would allocate the claimed size. Reads no value."""
    if tensor.numel() == 0:
        return False
    reach = tensor.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return max(reach, tensor.numel()) * tensor.element_size() > tensor.untyped_storage().nbytes()


def save_checkpoint(path, payload):
    """Write payload (a dict with the weights under "model") to path (a file or run folder) atomically. A payload
    holding a number that is not finite is refused, so a good checkpoint is never replaced by a broken one; a write
    that fails (a full disk) is an OSError, and the checkpoint that was there stays as it was."""
    path = checkpoint_path(path)
    broken = first_nonfinite(payload)
    if broken:
        raise CheckpointError(f"not saving {path}: {broken} is not finite")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f):
        try:
            torch.save(payload, f)
        except RuntimeError as error:  # torch's zip writer reports a failed write as a RuntimeError, not an OSError
            if "PytorchStreamWriter" not in str(error) and "inline_container" not in str(error):
                raise
            raise OSError(errno.EIO, "writing the checkpoint failed", str(path)) from None

    write_atomically(path, write)


def model_payload(model, **extra):
    """What a checkpoint holds of a model: its configuration and weights, plus any extra entries."""
    return {"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
            **extra}


def check_weights(cfg, weights, where):
    """The LM of configuration cfg on the meta device (nothing allocated), once weights ({name: tensor}) are known
    to be its tensors: the same names, each a contiguous floating-point tensor of the shape cfg implies. The layer
    count is compared first (a configuration can claim a million layers). No value is read; where names the weights'
    source in errors."""
    if not isinstance(weights, dict) or not all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
                                                for name, tensor in weights.items()):
        raise CheckpointError(f"{where}: its model is not a dict of named tensors: it is damaged or not what it "
                              f"claims to be")
    layers = {name.split(".")[2] for name in weights if name.startswith("backbone.layers.")}
    if layers != {str(i) for i in range(cfg.n_layer)}:
        raise CheckpointError(f"{where} holds {len(layers)} layers but its configuration says n_layer = "
                              f"{cfg.n_layer}: it is damaged or not what it claims to be")
    with torch.device("meta"):
        model = LM(cfg)
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} (model.py has no such part)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, its configuration "
                                  f"implies {tuple(expected[name].shape)}")
        if not tensor.is_floating_point() or not tensor.is_contiguous():  # a view would become the parameter itself
            raise CheckpointError(f"{where}: tensor {name} is not a contiguous floating-point tensor")
    missing = [name for name in expected if name not in weights]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}")
    return model


def build(cfg, weights, where):
    """An LM of configuration cfg holding weights ({name: tensor}), float32 on the CPU; where names the weights'
    source in errors. Nothing is allocated before the weights are known to fit cfg (check_weights): the model is
    built on the meta device and adopts the weights (load_state_dict(assign=True))."""
    model = check_weights(cfg, weights, where)
    broken = first_nonfinite(weights)
    if broken:
        raise CheckpointError(f"{where}: tensor {broken} holds values that are not finite")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    if cfg.tie_embeddings:  # assign gave the output layer a parameter of its own: tie it again
        model.lm_head.weight = model.backbone.embedding.weight
    return model


def load_checkpoint(path, require=("model_config", "model")):
    """A checkpoint of this project as a dict, read with weights_only=True (loading it cannot run code) and
    checked before any of its numbers is read: its format, the keys in require, that no tensor stands for more than
    the file holds, its bookkeeping (check_bookkeeping) and its weights against its configuration; then that every
    number in it is finite."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py) or give another path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated files and foreign pickles fail in many ways
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}): it may be truncated "
                              f"or not from this project; delete it or give another path") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format {CHECKPOINT_FORMAT})")
    missing = [key for key in require if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is incomplete (no {', '.join(missing)}): it was not written by train.py; "
                              f"give another checkpoint")
    tensors = list(named_tensors(ckpt))
    posing = next((name for name, tensor in tensors if overdrawn(tensor)), None)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in tensors}
    if posing or sum(storages.values()) > path.stat().st_size:  # (older torch grows a storage a view overruns)
        raise CheckpointError(f"{path}: {posing or 'a tensor'} stands for more numbers than the file holds: it is "
                              f"damaged or crafted; give another checkpoint")
    check_bookkeeping(ckpt, path)
    if "model_config" in ckpt and "model" in ckpt:
        check_weights(saved_config(ckpt, path), ckpt["model"], path)
    broken = first_nonfinite(ckpt)
    if broken:
        raise CheckpointError(f"{path}: {broken} is not finite, so the checkpoint cannot be used; give another")
    return ckpt


def load_model(checkpoint, device="cpu", **overrides):
    """The LM a checkpoint of this project holds, in eval mode. checkpoint: a path (file or run folder) or a dict
    from load_checkpoint. overrides: fields of ModelConfig.COMPUTATION (backend, chunk_size, recompute); None keeps
    the saved value. model.trained_on says what it was trained with: tokenizer, training length T, corpus, the run's
    options (args), the step it reached and where it came from (source)."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    where = str(checkpoint_path(checkpoint)) if ckpt is not checkpoint else "the checkpoint"
    model = build(saved_config(ckpt, where, **overrides), ckpt["model"], where)
    corpus, args = ckpt.get("corpus") or {}, ckpt.get("args") or {}
    model.trained_on = {"tokenizer": corpus.get("tokenizer"), "tokenizer_sha256": corpus.get("tokenizer_sha256"),
                        "seq_len": args.get("seq_len"), "corpus": corpus.get("name"), "args": args,
                        "step": ckpt.get("step"), "source": where}
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# What a checkpoint's bookkeeping may hold: each entry checked before it is used, in one line naming it
# ----------------------------------------------------------------------------------------------------------------

def _expect(ok, where, field, value, what):
    """Refuse the checkpoint at where unless ok: its entry field (value) is not what it must be."""
    if not ok:
        if isinstance(value, torch.Tensor):
            shown = f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
        elif value is None or isinstance(value, (bool, int, float)) and len(repr(value)) < 30:
            shown = repr(value)
        elif isinstance(value, str):
            shown = repr(value[:30])
        else:
            shown = f"a {type(value).__name__}"
        raise CheckpointError(f"{where}: {field} is {shown}, not {what}: the checkpoint is damaged or was not "
                              f"written by this project's train.py; give another")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    """A finite int or float (not a bool)."""
    return _is_int(x) or isinstance(x, float) and math.isfinite(x)


def _of_type(value, kind):
    """Whether value is of the type a dataclass field declares (a float field takes an int; Optional[X] takes None)."""
    if typing.get_origin(kind) is typing.Union:
        return any(_of_type(value, k) for k in typing.get_args(kind))
    if kind is float:
        return _is_number(value)
    if kind is int:
        return _is_int(value)
    return isinstance(value, type(None) if kind is None else kind)


def _generator_takes(state, device="cpu"):
    """Whether state (a uint8 tensor) is the state of a random generator on device."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        return False
    try:
        torch.Generator(device=device).set_state(state)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def check_bookkeeping(ckpt, where):
    """Refuse, in one line naming the entry, what train.py and eval.py read from a checkpoint besides its weights
    when it is not what train.py writes: the step (a whole number up to the run's max_steps), the options (args:
    those with a rule in RULES follow it), the corpus, the validation losses, each process's random and data states
    (ranks) and the optimizer's layout. What must match the run that continues (the optimizer's parameters, the
    intervention's states) is checked by restore. Reads no tensor's values but the generators' states."""
    args = ckpt.get("args", {})
    _expect(isinstance(args, dict) and all(isinstance(k, str) for k in args), where, "args", args,
            "the run's options by name")
    for names, what, test in RULES:
        for name in (n for n in names if args.get(n) is not None):
            _expect(_is_number(args[name]) and test(args[name]), where, f"args.{name}", args[name], what)
    for name in ("seq_len", "max_steps"):  # read as counts: the training length T, the step's limit
        _expect(args.get(name) is None or _is_int(args[name]), where, f"args.{name}", args.get(name), "a whole number")
    _expect(args.get("init") in (None, *INITS), where, "args.init", args.get("init"), f"one of {', '.join(INITS)}")
    import tasks  # (not at the top: tasks imports runs)

    _expect(args.get("task", "lm") in ("lm", *tasks.TASKS), where, "args.task", args.get("task"),
            f"one of lm, {', '.join(tasks.TASKS)}")
    if "step" in ckpt:
        limit = args.get("max_steps") or 10 ** 9  # (the largest --max_steps when the run's is not recorded)
        _expect(_is_int(ckpt["step"]) and 0 <= ckpt["step"] <= limit, where, "step", ckpt["step"],
                f"a whole number from 0 to {limit} (max_steps)")
    corpus = ckpt.get("corpus") or {}
    _expect(isinstance(corpus, dict), where, "corpus", corpus, "a description of the training data")
    for key in ("name", "tokenizer", "tokenizer_sha256", "fingerprint"):
        _expect(corpus.get(key) is None or isinstance(corpus[key], str), where, f"corpus.{key}", corpus.get(key),
                "a string")
    losses = ckpt.get("losses") or {}
    _expect(isinstance(losses, dict) and all(_is_number(v) for v in losses.values()), where, "losses", losses,
            "validation losses by name")
    if "ranks" in ckpt:
        check_ranks(ckpt["ranks"], where)
    if "optimizer" in ckpt:
        optimizer = ckpt["optimizer"]
        _expect(isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict), where, "optimizer.state",
                optimizer.get("state") if isinstance(optimizer, dict) else optimizer, "the moments by parameter")
        groups = optimizer.get("param_groups")
        _expect(isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is_int(i) for i in g["params"])
            for g in groups), where, "optimizer.param_groups", groups, "a list of groups of parameter indices")


def check_ranks(ranks, where):
    """Each process's state as RunFolder.save writes it: its random generators, intervention and data position."""
    _expect(isinstance(ranks, list) and ranks, where, "ranks", ranks, "a list with the state of each process")
    for rank, mine in enumerate(ranks):
        field = f"ranks[{rank}]"
        _expect(isinstance(mine, dict), where, field, mine, "the state of one process")
        for key in ("torch_rng", "data_rng"):
            _expect(_generator_takes(mine.get(key)), where, f"{field}.{key}", mine.get(key),
                    "the state of a CPU random generator")
        intervention = mine.get("intervention")
        _expect(isinstance(intervention, dict), where, f"{field}.intervention", intervention,
                "the intervention's state")
        drawn_on = intervention.get("generator_device")
        _expect(drawn_on is None or isinstance(drawn_on, str) and _is_device(drawn_on), where,
                f"{field}.intervention.generator_device", drawn_on, "a device")
        streams = mine.get("streams")  # tbptt's: where each row's stream stands
        _expect(streams is None or isinstance(streams, dict), where, f"{field}.streams", streams, "the streams' state")
        if streams is not None:
            positions = streams.get("positions")
            _expect(isinstance(positions, list) and all(_is_int(p) and p >= 0 for p in positions), where,
                    f"{field}.streams.positions", positions, "a list of positions in the corpus")
            _expect(isinstance(streams.get("fresh"), bool), where, f"{field}.streams.fresh", streams.get("fresh"),
                    "True or False")


def _is_device(name):
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def saved_config(ckpt, where, **overrides):
    """The ModelConfig of a checkpoint's model_config, each field of its declared type, with overrides (fields of
    ModelConfig.COMPUTATION; None keeps the saved value)."""
    saved, kinds = ckpt["model_config"], typing.get_type_hints(ModelConfig)
    _expect(isinstance(saved, dict), where, "model_config", saved, "the model's configuration")
    for name, value in saved.items():
        if name in kinds:
            _expect(_of_type(value, kinds[name]), where, f"model_config.{name}", value,
                    f"of type {getattr(kinds[name], '__name__', kinds[name])}")
    try:
        return ModelConfig(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the model of {where} does not match this code ({error})") from None


# ----------------------------------------------------------------------------------------------------------------
# How train.py's options combine
# ----------------------------------------------------------------------------------------------------------------

# The options that may differ from the saved run on --resume: how a run is computed, not what it computes.
RESUMABLE = ("resume", "out_dir", "max_steps", "stop_at", "device", "compile", "eval_interval", "log_interval",
             "save_every", *ModelConfig.COMPUTATION)
# Post-training takes these from the run of the model it starts from, unless they are given.
INHERITED = ("task", "alphabet_size", "n_train", "context", "data", "data_dir", "seq_len", "batch_size",
             "grad_accum", "chunk_size", "babilong_tasks", "babilong_facts", "passkey_filler")
# Options that concern the post-training only: the automatic pre-training of out/zero does not take them.
POST_ONLY = ("init", "init_from", "base_steps", "from_scratch", "resume", "overwrite", "out_dir", "max_steps", "lr",
             "min_lr", "warmup_steps", "eval_interval", "stop_at", *{o for cls in INITS.values() for o in cls.options})
# Options that mean something for some values of another option only: given for any other, they are refused.
ONLY_FOR = {"data": ("task", ("lm",)), "seq_len": ("task", ("lm", "babilong")),
            "alphabet_size": ("task", ("copy",)), "n_train": ("task", ("copy",)), "context": ("task", ("copy",)),
            "tokenizer": ("task", ("passkey", "babilong")), "babilong_tasks": ("task", ("babilong",)),
            "babilong_facts": ("task", ("babilong",)), "passkey_filler": ("task", ("passkey",)),
            **{o: ("init", tuple(n for n, cls in INITS.items() if o in cls.options))
               for cls in INITS.values() for o in cls.options},
            **{o: ("init", tuple(n for n in INITS if n != "zero")) for o in ("from_scratch", "base_steps")},
            **{o: ("mixer", tuple(n for n, cls in MIXERS.items() if o in cls.flags))
               for cls in MIXERS.values() for o in cls.flags}}
# The values each option may take (any option not named here takes what its type allows).
RULES = [
    (("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_seqs", "log_interval", "save_every",
      "stop_at", "alphabet_size", "n_train", "base_steps", "d_model", "n_layer", "d_state", "expand", "headdim",
      "n_heads", "chunk_size"), "at least 1", lambda x: x >= 1),
    (("lr", "dt_min", "dt_max", "gate_temperature"), "above 0", lambda x: x > 0),
    (("min_lr", "warmup_steps", "weight_decay", "grad_clip", "seed", "noise_std", "context"), "at least 0",
     lambda x: x >= 0),
    (("p_zero",), "in [0, 1)", lambda x: 0 <= x < 1),
    (("seq_len",), "at most 16,777,216", lambda x: x <= 2 ** 24),
    (("batch_size", "grad_accum", "eval_seqs"), "at most 1,048,576", lambda x: x <= 2 ** 20),
    (("max_steps",), "at most 1,000,000,000", lambda x: x <= 10 ** 9),
    (("seed",), "at most 2,147,483,647", lambda x: x <= 2 ** 31 - 1),
]


def resolve(given, defaults, load, reads_text):
    """A run's options from those given on the command line. Each option takes the last of these that sets it:
        1. defaults: TrainConfig's, ModelConfig's and the interventions'
        2. the preset: --preset, else the one an official --init_from or the --task names, else demo
        3. the preset's "post" values, when post-training
        4. TASK_DEFAULTS of the task
        5. what the model it starts from was trained with: its architecture, and the options in INHERITED
        6. the command line
    On --resume: the saved run's options, then the flags in RESUMABLE. load(spec) loads the model --init_from names
    (a checkpoint or an official model); reads_text(task) says whether a task is written in a tokenizer's words.
    Returns (options as a namespace, the model post-training starts from or None). Raises UsageError."""
    if given.get("resume"):
        return resume_options(given, defaults), None
    official = {p.get("init_from"): name for name, p in PRESETS.items() if p.get("init_from")}
    preset_name = given.get("preset") or official.get(given.get("init_from")) or (
        given.get("task") if given.get("task") in PRESETS else "demo")
    preset = PRESETS[preset_name]
    init, task = given.get("init", "zero"), given.get("task", preset.get("task", "lm"))
    own_base = default_out_dir(task, preset_name, "zero") if init != "zero" and not reads_text(task) else None
    init_from = None if given.get("from_scratch") else given.get("init_from") or preset.get("init_from") or own_base
    values = {**defaults, **{k: v for k, v in preset.items() if k not in ("post", "init_from")}}
    values.update(preset.get("post", {}) if init_from else {})
    values.update(TASK_DEFAULTS.get(task, {}))
    values.update(preset=preset_name, init_from=init_from, task=task)
    base = None
    if init_from:
        if checkpoint_path(init_from).resolve() == checkpoint_path(given.get("out_dir") or "-").resolve():
            raise UsageError(f"post-training {init_from} into itself would overwrite it: give another --out_dir")
        base = load(init_from).train()
        trained_with = base.trained_on.get("args") or {"seq_len": base.trained_on["seq_len"]}
        if init_from == own_base and base.trained_on.get("step", 0) < trained_with.get("max_steps", 0):
            raise UsageError(f"{own_base} stopped at step {base.trained_on['step']} of {trained_with['max_steps']}: "
                             f"finish it first with python train.py --resume --out_dir {own_base}")
        values.update({k: v for k, v in trained_with.items() if k in INHERITED and v is not None})
        values.update({k: v for k, v in base.cfg.architecture().items() if k in values})
    values.update(given)
    args = argparse.Namespace(**values)
    check_options(given, args, base, reads_text)
    if args.task != "lm":  # a task in words is written in the tokenizer of the model it fine-tunes
        args.tokenizer = (base.trained_on["tokenizer"] if base is not None else args.tokenizer) \
            if reads_text(args.task) else None
    args.out_dir = args.out_dir or default_out_dir(args.task, args.preset, args.init)
    return args, base


def check_options(given, args=None, base=None, reads_text=None):
    """Refuse in one line what the options cannot mean. Called with the flags given alone first, so that nothing
    (not even the automatic pre-training) starts before they are fixed (--init is never inherited: its options can
    be checked then), and again with every layer resolved (args), the model post-training starts from (base) and
    reads_text (see resolve)."""
    check(given, RULES, ONLY_FOR, vars(args) if args is not None else {"init": given.get("init", "zero")})
    if args is None:
        if given.get("resume") and (given.get("init_from") or given.get("from_scratch")):
            raise UsageError("--resume continues a run as it was started; drop --init_from/--from_scratch")
        if given.get("init_from") and given.get("from_scratch"):
            raise UsageError("--init_from and --from_scratch contradict each other; give one")
        skips = [k for k in ("init_from", "from_scratch", "resume") if given.get(k)]
        if "base_steps" in given and skips:
            raise UsageError(f"--base_steps sets the automatic pre-training of out/zero, which --{skips[0]} does "
                             f"not do: drop --base_steps")
        if given.get("out_dir") and Path(given["out_dir"]).is_file():
            raise UsageError(f"--out_dir {given['out_dir']} is a file: give a folder (it will hold ckpt.pt and "
                             f"log.jsonl)")
        return
    values = vars(args)
    check({k: v for k, v in values.items() if k not in given}, RULES)  # what a checkpoint said, too
    if reads_text(args.task) and not args.init_from and not given.get("tokenizer"):
        raise UsageError(f"--task {args.task} fine-tunes a language model on examples in its own tokenizer: give "
                         f"--init_from (a checkpoint trained on a corpus, or an official Mamba-2), or --tokenizer "
                         f"to train a fresh model")
    if args.init_from and given.get("tokenizer"):
        raise UsageError(f"--tokenizer is for a fresh model; {args.init_from} keeps its own: drop --tokenizer")
    if base is not None:
        architecture = base.cfg.architecture()
        differ = [f"--{k} {given[k]}" for k in architecture if k in given and given[k] != architecture[k]]
        if differ:
            raise UsageError(f"{args.init_from} holds a {base.cfg.mixer} model that {', '.join(differ)} would "
                             f"change: drop the flags or post-train another checkpoint")
    if args.stop_at is not None and args.stop_at > args.max_steps:
        raise UsageError(f"--stop_at {args.stop_at} is beyond --max_steps {args.max_steps}, where the run ends "
                         f"anyway: lower it or raise --max_steps")
    for name, limit in (("warmup_steps", "max_steps"), ("min_lr", "lr")):  # a preset's value yields to the limit
        if values[name] > values[limit]:
            if name in given:
                raise UsageError(f"--{name} {values[name]} is above --{limit} {values[limit]}: lower it")
            values[name] = values[limit]


def resume_options(given, defaults):
    """On --resume the run continues with its own options; flags that would change it are refused, except those
    in RESUMABLE (how it runs: device, backend, max_steps, ...)."""
    out_dir = given.get("out_dir") or default_out_dir(given.get("task", "lm"), given.get("preset", "demo"),
                                                      given.get("init", "zero"))
    ckpt = load_checkpoint(out_dir, require=("args", "step"))
    saved, reached = ckpt["args"], ckpt["step"]
    check_saved_options(saved, defaults, checkpoint_path(out_dir))
    changed = [k for k in given if k not in RESUMABLE and k in saved and given[k] != saved[k]]
    if changed:
        raise UsageError(f"--resume continues the run in {out_dir} as it was started; "
                         f"{', '.join('--' + k for k in changed)} differ from it: drop them or use another --out_dir")
    for name in ("stop_at", "max_steps"):
        if given.get(name) is not None and given[name] <= reached:
            raise UsageError(f"--{name} {given[name]}: the run in {out_dir} is at step {reached} already; give a "
                             f"later step")
    if given.get("stop_at") is not None and given["stop_at"] > given.get("max_steps", saved["max_steps"]):
        raise UsageError(f"--stop_at {given['stop_at']} is beyond --max_steps "
                         f"{given.get('max_steps', saved['max_steps'])}, where the run ends anyway: lower it")
    resumable = {k: v for k, v in given.items() if k in RESUMABLE}
    return argparse.Namespace(**{**defaults, **saved, **resumable, "resume": True, "out_dir": out_dir,
                                 "stop_at": given.get("stop_at")})  # a stop belongs to one invocation only


def check_saved_options(saved, defaults, where):
    """Refuse, in one line naming it, an option a checkpoint records (args) that is not of its type: a model field's
    declared type, else its default's (check_bookkeeping has checked the rules of RULES, --init and --task)."""
    declared = typing.get_type_hints(ModelConfig)
    for name, value in saved.items():
        default = defaults.get(name)
        kind = declared.get(name) or (type(default) if default not in (None, dataclasses.MISSING) else None)
        if kind is not None:
            _expect(_of_type(value, kind), where, f"args.{name}", value, f"of type {kind.__name__}")


def default_out_dir(task, preset, init):
    """out/INIT for the demo; out/TASK/INIT for a synthetic task, out/PRESET/INIT for another preset."""
    return os.path.join("out", *([task] if task != "lm" else [preset] if preset != "demo" else []), init)


def base_run(given, reads_text):
    """The one-command recipe (python train.py --init state_passing) post-trains out/zero: when out/zero must be
    pre-trained first, the options of that pre-training (the same flags without those in POST_ONLY, and
    --base_steps as its --max_steps), else None."""
    preset, task = PRESETS[given.get("preset", "demo")], given.get("task", "lm")
    if given.get("init", "zero") == "zero" or reads_text(task) or any(
            given.get(k) for k in ("init_from", "from_scratch", "resume")) or preset.get("init_from") or \
            checkpoint_path(default_out_dir(task, given.get("preset", "demo"), "zero")).exists():
        return None
    shared = {k: v for k, v in given.items() if k not in POST_ONLY}
    return {**shared, **({"max_steps": given["base_steps"]} if "base_steps" in given else {})}


def setup_distributed(device_arg):
    """(rank, world size, device). Under torchrun: one process per GPU with NCCL, or CPU processes with gloo.
    Called once per process: the pre-training that the one-command recipe may run first shares the group."""
    device = pick_device(device_arg)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world, device


# ----------------------------------------------------------------------------------------------------------------
# A run's folder: refused when taken, locked while in use, checkpoints that continue a run exactly
# ----------------------------------------------------------------------------------------------------------------

def check_out_dir(args):
    """Refuse, before anything is created, a folder that holds a run (without --resume or --overwrite) or any other
    file (without --overwrite): a run writes into a folder of its own."""
    path = Path(args.out_dir)
    if args.resume or args.overwrite or not path.is_dir():
        return
    if checkpoint_path(path).exists():
        raise UsageError(f"{path} already holds a run: --resume to continue it, --overwrite to start over, or "
                         f"choose another --out_dir")
    files = sorted(p.name for p in path.iterdir() if p.name != ".lock" and not p.name.startswith(".ckpt.pt.tmp"))
    if files:
        raise UsageError(f"{path} is not empty (it holds {', '.join(files[:3])}): choose another --out_dir, or "
                         f"--overwrite to train there (files that are not the run's are kept)")


@dataclasses.dataclass
class RunFolder:
    """What rank 0 shows and writes (the other processes nothing) for the run (train.Run): the progress bar,
    log.jsonl and the checkpoints, in a folder held for the run's life by a lock file naming the process (a lock
    whose process is gone is stale and taken over). A new run leaves the files of a run it replaces (--overwrite)
    as they are until its first checkpoint: its log waits in memory until then. Ctrl-C or SIGTERM asks for a stop
    at the end of the current step (stop_requested()); another one a second or more later stops at once."""
    run: object
    then: str = None  # what follows in the same command (post-training after the automatic pre-training)

    def __enter__(self):
        self.args, self.path, self.started, self.train_seconds = self.run.args, Path(self.run.args.out_dir), \
            time.time(), 0.0
        self.pending, self.lock, self.first_stop = None if self.args.resume else [], self.path / ".lock", None
        if self.run.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only one can create it
            except FileExistsError:
                owner = self.lock.read_text().strip()
                if process_alive(owner):
                    raise UsageError(f"another run (process {owner}) is using {self.path}: wait for it, stop it, or "
                                     f"choose another --out_dir") from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(descriptor, "w") as f:
                f.write(str(os.getpid()))
            if self.args.resume:  # the records up to the checkpoint (later steps were lost), not a torn line
                log = self.path / "log.jsonl"
                lines = log.read_text(errors="replace").splitlines() if log.exists() else []
                write_atomically(log, "".join(line + "\n" for line in lines if _step_of(line) <= self.run.step))
        self.previous = {s: signal.signal(s, self._stop_request) for s in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(total=self.run.last_step, initial=self.run.step, disable=not self.run.is_main,
                        desc=self.args.init, dynamic_ncols=True)
        return self

    def __exit__(self, kind, error, traceback):
        self.bar.close()
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.run.is_main:
            self.lock.unlink(missing_ok=True)
        if kind is KeyboardInterrupt:  # the second request, or a Ctrl-C that came as an exception
            raise Stopped(f"interrupted after step {self.run.step}; stopped without saving: "
                          f"{self.what_survives()}") from None

    def _stop_request(self, signum, frame):
        if self.first_stop is not None and time.monotonic() - self.first_stop > 1:  # torchrun repeats it at once
            raise KeyboardInterrupt
        self.first_stop = self.first_stop or time.monotonic()
        if self.run.is_main:
            print(f"\ntrain.py: stopping after step {self.run.step + 1} (Ctrl-C again to stop at once)",
                  file=sys.stderr)

    def stop_requested(self):
        """Whether a stop was asked for, collectively: every process stops at the same step."""
        if self.run.world == 1:
            return self.first_stop is not None
        flag = torch.tensor(float(self.first_stop is not None), device=self.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def step(self, loss, lr, seconds):
        """Show and log a training step."""
        self.train_seconds += seconds
        rate, step = self.run.tokens * self.run.world / self.train_seconds, self.run.step
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
        if step == self.run.last_step:
            self.bar.close()  # before the last validation, so the bar's final speed is the training speed
        if step % self.args.log_interval == 0 or step == self.run.last_step:
            self.log(step=step, train_loss=loss, lr=lr, tokens_per_s=rate, time=time.time() - self.started)

    def log(self, **record):
        if not self.run.is_main:
            return
        if self.pending is not None:
            self.pending.append(record)
        else:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, losses=None):
        """Save the run: rank 0 writes, every process gives its own random, data and intervention state. A weight,
        optimizer moment, intervention state or validation loss that is not finite is refused with a UsageError,
        and nothing is saved. Validation losses are logged and shown first. The first checkpoint of a new run also
        replaces the log and the ckpt_STEP.pt copies of the run that was there."""
        run, every = self.run, self.args.save_every
        if losses is not None:
            self.log(step=run.step, **losses)
            self.bar.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            self.bar.unpause()  # the time spent validating does not count in the bar's speed
        mine = {"torch_rng": torch.get_rng_state(), "intervention": _to_device(run.intervention.state_dict(), "cpu"),
                **run.batches.state_dict()}
        ranks = [mine]
        if run.world > 1:
            ranks = [None] * run.world
            dist.all_gather_object(ranks, mine)
        extra = dict(optimizer=run.optimizer.state_dict(), step=run.step, args=vars(self.args), ranks=ranks,
                     corpus=run.batches.describe(), losses=losses or {})
        broken = first_nonfinite({"model": run.model.state_dict(), **extra})
        if broken:
            raise UsageError(f"{broken} is not finite after step {run.step}; stopped without saving: "
                             f"{self.what_survives()}; start again with a lower --lr or --grad_clip")
        if run.is_main:
            save_checkpoint(self.path, model_payload(run.model, **extra))
            if every and run.step % every == 0:  # a copy with what eval.py reads
                save_checkpoint(self.path / f"ckpt_{run.step}.pt", model_payload(run.model, **{
                    k: extra[k] for k in ("step", "args", "corpus")}))
            if self.pending is not None:
                for old in self.path.glob("ckpt_*.pt"):
                    if old.name != f"ckpt_{run.step}.pt" or not (every and run.step % every == 0):
                        old.unlink()
                write_atomically(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.pending))
                self.pending = None
        run.saved_step = run.step
        if run.world > 1:
            dist.barrier()  # nobody reads the checkpoint (a post-training that follows, say) before it exists

    def what_survives(self):
        if self.run.saved_step is not None:
            return f"the last good checkpoint (step {self.run.saved_step}) in {self.args.out_dir} survives"
        if checkpoint_path(self.args.out_dir).exists():
            return f"no checkpoint of this run was written ({self.args.out_dir} still holds the run it replaces)"
        return "no checkpoint was written"

    def finish(self):
        if not self.run.is_main:
            return
        if self.run.step < self.args.max_steps:
            print(f"train.py: stopped at step {self.run.step} (--stop_at); continue with python train.py --resume "
                  f"--out_dir {self.args.out_dir}")
        elif self.then:
            print(f"train.py: done: {checkpoint_path(self.args.out_dir)} (step {self.run.step}); {self.then}")
        else:  # a post-trained model is read beside the model it started from
            models = " ".join(f"--ckpt {path}" for path in (self.args.init_from, self.args.out_dir) if path)
            task = "--task babilong " if self.args.task == "babilong" else ""  # evaluated on its task, not on text
            print(f"train.py: done: {checkpoint_path(self.args.out_dir)} (step {self.run.step}); next: python eval.py "
                  f"{task}{models}{eval_out(self.args.out_dir)}")


def eval_out(out_dir):
    """The --out that keeps eval.py's figures of a run apart from the quick start's (eval/): out/la/zero -> eval/la,
    elsewhere/run -> elsewhere/eval; nothing for a run directly under out/."""
    parent = Path(out_dir).parent
    if parent == Path("out"):
        return ""
    return f" --out {Path('eval', *parent.parts[1:]) if parent.parts[:1] == ('out',) else parent / 'eval'}"


def restore(run, ckpt):
    """Continue a run from its checkpoint: optimizer, step, and each process's random states, data position and
    intervention, each checked against this run first (check_bookkeeping has checked what they are made of)."""
    out_dir, saved = run.args.out_dir, (ckpt.get("corpus") or {}).get("fingerprint")
    if saved and saved != run.batches.describe()["fingerprint"]:
        raise UsageError(f"corpus '{run.args.data}' was prepared again after the run in {out_dir} started, so "
                         f"resuming would continue on other data: put the original corpus back, or post-train the "
                         f"checkpoint into a new run with --init_from {out_dir} --out_dir NEW")
    if len(ckpt["ranks"]) != run.world:
        raise UsageError(f"the run in {out_dir} was trained by {len(ckpt['ranks'])} process(es); resume it with "
                         f"the same number (torchrun --nproc_per_node={len(ckpt['ranks'])})")
    mine = ckpt["ranks"][run.rank]
    drawn_on = mine["intervention"].get("generator_device")
    if drawn_on and torch.device(drawn_on).type != run.device.type:
        raise UsageError(f"the run in {out_dir} drew its random numbers on {drawn_on}; resume it on a "
                         f"{torch.device(drawn_on).type} device to continue it exactly")
    where = checkpoint_path(out_dir)
    check_optimizer_state(ckpt["optimizer"], run.optimizer, where)
    streams = run.batches.state_dict()["streams"]
    if streams is not None:
        _expect(mine["streams"] is not None and len(mine["streams"]["positions"]) == len(streams["positions"]),
                where, f"ranks[{run.rank}].streams", mine["streams"], f"the positions of {len(streams['positions'])} "
                                                                       f"streams (--batch_size)")
    check_intervention_state(mine["intervention"], run, where, f"ranks[{run.rank}].intervention")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.step = run.saved_step = ckpt["step"]
    torch.set_rng_state(mine["torch_rng"])
    run.batches.load_state_dict(mine)
    run.intervention.load_state_dict(_to_device(mine["intervention"], run.device))


# AdamW's settings that say what it computes: a checkpoint must have the run's (the others say how it runs)
OPTIMIZER_ALGORITHM = ("amsgrad", "maximize", "decoupled_weight_decay", "differentiable")


def check_optimizer_state(saved, optimizer, where):
    """A checkpoint's optimizer state against the optimizer of the run that continues it: the same groups of the
    same parameters, settings of the kinds it takes, and for each parameter AdamW's step count and two moments,
    contiguous tensors of the parameter's shape. Reads no moment's values."""
    fresh, groups = optimizer.state_dict()["param_groups"], saved["param_groups"]
    _expect([g["params"] for g in groups] == [g["params"] for g in fresh], where, "optimizer.param_groups", groups,
            f"{len(fresh)} groups of the model's {sum(len(g['params']) for g in fresh)} parameters")
    for i, (group, new) in enumerate(zip(groups, fresh)):
        for key, value in ((k, v) for k, v in group.items() if k in new and k != "params"):
            expected = new[key]
            if key in OPTIMIZER_ALGORITHM:
                ok, what = value is expected, repr(expected)
            elif isinstance(expected, bool) or expected is None:
                ok, what = value is None or isinstance(value, bool), "True, False or None"
            elif isinstance(expected, tuple):  # betas
                ok, what = isinstance(value, (tuple, list)) and len(value) == len(expected) and all(
                    _is_number(b) and 0 <= b < 1 for b in value), f"{len(expected)} numbers in [0, 1)"
            else:
                ok, what = _is_number(value) and value >= 0, "a number of at least 0"
            _expect(ok, where, f"optimizer.param_groups[{i}].{key}", value, what)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # in the order the indices count
    for index, state in saved["state"].items():
        field = f"optimizer.state.{index}"
        _expect(_is_int(index) and 0 <= index < len(params) and isinstance(state, dict), where, field, state,
                "the state of one of the model's parameters")
        shape = tuple(params[index].shape)
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state.get(key)
            _expect(isinstance(moment, torch.Tensor) and moment.is_floating_point() and moment.is_contiguous() and
                    tuple(moment.shape) == shape, where, f"{field}.{key}", moment,
                    f"a contiguous floating-point tensor of its parameter's shape {shape}")
        step = state.get("step")
        count = step.item() if isinstance(step, torch.Tensor) and step.shape == () else step
        _expect(_is_number(count) and count >= 1, where, f"{field}.step", step, "a count of at least one step")


def check_intervention_state(saved, run, where, field):
    """A process's intervention state against the run's intervention and model: the entries its state_dict writes,
    a generator state its device takes, a passed state (previous) shaped like the model's state for --batch_size
    rows, and fitted statistics (count, sums) with one sum per head of each layer. Reads no state's values."""
    for key in run.intervention.state_dict():
        _expect(key in saved, where, field, saved, f"an intervention state with {key}")
    drawn_on = saved["generator_device"] or "cpu"
    _expect(saved["generator"] is None or _generator_takes(saved["generator"], drawn_on), where, f"{field}.generator",
            saved["generator"], f"the state of a random generator on {drawn_on}")
    zero = run.model.init_state(run.args.batch_size, "meta")  # the shapes of the model's states, nothing allocated
    previous = saved.get("previous")
    if previous is not None:
        _expect(isinstance(previous, dict) and set(previous) == {"ssm", "conv"} and all(
            isinstance(previous[k], list) and len(previous[k]) == len(zero.ssm) for k in previous), where,
            f"{field}.previous", previous, f"the ssm and conv states of {len(zero.ssm)} layers")
        for kind in ("ssm", "conv"):
            for layer, (state, like) in enumerate(zip(previous[kind], getattr(zero, kind))):
                _expect(state is None if like is None else isinstance(state, torch.Tensor) and
                        state.is_floating_point() and state.shape == like.shape, where,
                        f"{field}.previous.{kind}.{layer}", state,
                        "None" if like is None else f"a floating-point tensor of shape {tuple(like.shape)}")
    if "sums" in saved:
        fitted, count = saved["sums"] is not None, saved["count"]
        _expect(_is_int(count) and count >= (1 if fitted else 0), where, f"{field}.count", count,
                "the number of entries observed" + (" (at least 1, with sums)" if fitted else ""))
        for key in ("sums", "sums_sq"):
            sums = saved[key]
            _expect(sums is None if not fitted else isinstance(sums, list) and len(sums) == len(zero.ssm) and all(
                isinstance(s, torch.Tensor) and s.is_floating_point() and s.shape == like.shape[1:2]
                for s, like in zip(sums, zero.ssm)), where, f"{field}.{key}", sums,
                    f"one sum per head of each of {len(zero.ssm)} layers" if fitted else "None, as sums")


def _step_of(line):
    """The step of a log.jsonl line, or infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _to_device(obj, device):
    """Move every tensor inside nested dicts/lists (generator states, uint8, stay on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dtype == torch.uint8 else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Resources: refuse what cannot fit before allocating it
# ----------------------------------------------------------------------------------------------------------------

def available_memory(device):
    """Bytes that device could still give: free GPU memory, else the system's available RAM, or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # no /proc (macOS): all of the physical memory, so only a run that could never fit is refused
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(args, device, cfg=None, model=None, compute_dtype=torch.float32, autocast=None, held=0):
    """Refuse a run whose memory exceeds 90% of what device can give: the alternative is an allocator's traceback,
    or on Linux the kernel killing the process without a word. Called twice. Before anything is allocated (cfg):
    the weights, gradients and AdamW moments (16 bytes a parameter, the parameters counted on models of one and two
    blocks built on the meta device, every block being alike, so that even a model far too large for the machine is
    counted in a moment) and the validation data. Once the model is built (model): training_memory, with the
    model's own activations. held: bytes already allocated that will not be needed twice (a base model on the
    CPU)."""
    if model is None:
        with torch.device("meta"):
            one, two = (LM(dataclasses.replace(cfg, n_layer=n)).num_parameters() for n in (1, 2))
        need = 16 * (one + (two - one) * (cfg.n_layer - 1))
    else:
        need = training_memory(model, args.batch_size * args.seq_len, compute_dtype, autocast, args.seq_len)
    need += 16 * args.eval_seqs * (8 if args.task == "lm" else args.batch_size) * args.seq_len - held  # validation
    need *= int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type != "cuda" else 1  # processes sharing the RAM
    free = available_memory(device)
    if free is not None and need > 0.9 * free:
        raise UsageError(f"this run needs about {need / 2**30:.1f} GiB of memory on {device} but "
                         f"{free / 2**30:.1f} GiB are available: lower --batch_size (raising --grad_accum keeps "
                         f"the {args.batch_size * args.grad_accum} sequences per step), --seq_len or the model's size")


def training_memory(model, tokens, compute_dtype=torch.float32, autocast=None, seq_len=None):
    """Bytes that training model on micro-batches of `tokens` tokens needs, at least: 16 per parameter (float32
    weights, gradients and AdamW's two moments), 2 more under bfloat16 (the weights' bfloat16 copies) and 1.5 times
    the activations autograd keeps for the backward pass (the factor covers what the backward pass holds on top;
    RESULTS.md gives its calibration). With recompute, only each block's input is kept, and one block's activations
    are live in the backward pass. The activations are measured (activations_per_token, on sequences of seq_len
    tokens at most), not modelled."""
    per_block, outside = activations_per_token(model, autocast, seq_len)
    cfg, params = model.cfg, model.num_parameters()
    if cfg.recompute:
        per_token = outside + 4 * cfg.d_model * cfg.n_layer + 2 * per_block
    else:
        per_token = outside + per_block * cfg.n_layer
    copies = 2 * params if compute_dtype == torch.bfloat16 else 0
    return 16 * params + copies + 1.5 * per_token * tokens


def activations_per_token(model, autocast=None, seq_len=None):
    """(bytes per token that one block keeps for the backward pass, bytes per token kept outside the blocks:
    embedding, final norm, logits), measured as autograd saves them while the model itself reads one sequence of
    C and one of 2C tokens, without recomputation, taking the difference: what does not grow with the length
    (masks, the bfloat16 copies of the weights under autocast) cancels. C is the chunk the scan runs on sequences
    of seq_len tokens, both times: its chunk size, or seq_len when shorter (so a huge --chunk_size is never read
    whole). A model built on the meta device is measured without computing or allocating anything."""
    from torch.multiprocessing.reductions import StorageWeakRef  # names a storage, even on the meta device

    device = next(model.parameters()).device
    weights = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    inside, saved, totals = [False], {}, []

    def keep(tensor):
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        if key not in weights and key not in saved:
            saved[key] = (tensor.untyped_storage().nbytes(), inside[0])
        return tensor

    hooks = [hook for block in model.backbone.layers for hook in (
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False)))]
    C = min(model.cfg.chunk_size, seq_len or model.cfg.chunk_size)  # what the scan runs on seq_len tokens; Triton
    C = model.cfg.chunk_size if model.cfg.backend == "triton" else C  # takes powers of two up to 128 only: as given
    settings = model.cfg.recompute, model.cfg.chunk_size
    model.cfg.recompute, model.cfg.chunk_size = False, C
    try:
        for length in (C, 2 * C):
            saved.clear()
            tokens = torch.zeros(1, length, dtype=torch.long, device=device)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast or \
                    contextlib.nullcontext():
                model(tokens, torch.zeros_like(tokens))  # targets of their own, as in training
            in_blocks = sum(size for size, block in saved.values() if block)
            totals.append((in_blocks, sum(size for size, _ in saved.values()) - in_blocks))
    finally:
        model.cfg.recompute, model.cfg.chunk_size = settings
        for hook in hooks:
            hook.remove()
    (blocks_1, outside_1), (blocks_2, outside_2) = totals
    return (blocks_2 - blocks_1) / C / model.cfg.n_layer, (outside_2 - outside_1) / C


def warn_if_slow(model, args, device):
    """Say before the first step when a step will take far longer than a person waits for a first result: the
    compute of a step (6 x parameters x tokens) over what this device just did in a short matrix product."""
    size, repeats = 512, 0
    a = torch.randn(size, size, device=device)
    started = time.perf_counter()
    while repeats == 0 or time.perf_counter() - started < 0.05:  # at least one: a loaded machine may take 50 ms
        a @ a
        repeats += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    flops = 2 * size ** 3 * repeats / (time.perf_counter() - started)
    seconds = 6 * model.num_parameters() * args.batch_size * args.grad_accum * args.seq_len / flops
    if seconds > 30:
        print(f"train.py: one step of this run will take about {seconds / 60:.0f} minutes on {device} (about "
              f"{seconds * args.max_steps / 3600:.0f} hours for {args.max_steps} steps); on a CPU, start with the "
              f"demo (python train.py) or a GPU", file=sys.stderr)
