"""cli.py: the command line that train.py, eval.py, data.py and bench.py share.

Every option is a field of a dataclass (model.ModelConfig, train.TrainConfig, eval.EvalConfig, ...), written once
with option(): its default, its help and marks that say how it behaves. add_options() turns the fields into flags,
so no script lists an option by hand. run() runs a script's main and turns what a user can cause (a UsageError, an
OSError, Ctrl-C) into one line on stderr, never a traceback.
"""
import argparse
import dataclasses
import os
import signal
import sys

import torch

FLOAT32_MAX = 3.4e38  # a float option must be finite in the float32 the model computes in


class UsageError(Exception):
    """A problem with the user's options or files, told in one line that says what to do."""


def option(default, help, **marks):
    """A dataclass field offered as the flag --NAME (type: the field's). Marks, all optional:
        choices=(...)       the values allowed
        zero_ok=True        0 is allowed: numbers are otherwise at least 1 (ints) or above 0 (floats)
        least=X             a lower bound other than those
        below=X / most=X    an upper bound, excluded / included
        type=T, nargs="+"   the flag's type when the field's is not it (a list, or None by default); a list
        action="append"     a flag that may be repeated, each value appended
        only=("init", (...))  the option means something only when that option has one of these values
        resume=True         may differ from the saved run on --resume (how a run is computed, not what)
        inherit=True        post-training takes it from the model it starts from unless given
        post=True           concerns the post-training only: the automatic pre-training does not take it
    """
    return dataclasses.field(default=default, metadata={"help": help, **marks})


def options(cls):
    """The fields of a dataclass that are flags (made with option())."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_options(parser, cls, title):
    """One flag per option of cls, in a group of --help called title. Every default is None, so that the parsed
    namespace tells which flags were given; the dataclass's defaults fill in the rest later."""
    group = parser.add_argument_group(title)
    for f in options(cls):
        kind = f.metadata.get("type", f.type)
        if kind is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            group.add_argument(f"--{f.name}", type=kind, choices=f.metadata.get("choices"), nargs=f.metadata.get(
                "nargs"), action=f.metadata.get("action", "store"), help=f.metadata["help"])


def given(namespace, cls):
    """{name: value} of the options of cls that the command line set."""
    return {f.name: getattr(namespace, f.name) for f in options(cls) if getattr(namespace, f.name, None) is not None}


def check(cls, values):
    """Refuse, in one line naming the flag, a value of values ({name: value}) that its option does not allow."""
    fields = {f.name: f for f in options(cls)}
    for name, value in values.items():
        f = fields.get(name)
        if f is None or value is None or isinstance(value, (bool, str)):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (bool, str)):
                _check_number(name, item, f.metadata)


def _check_number(name, value, marks):
    low = marks.get("least", 0 if marks.get("zero_ok") else (1 if isinstance(value, int) else None))
    if isinstance(value, float) and not abs(value) < FLOAT32_MAX:
        raise UsageError(f"--{name} must be a finite number; got {value}")
    if low is None and not value > 0:
        raise UsageError(f"--{name} must be above 0; got {value}")
    if low is not None and value < low:
        raise UsageError(f"--{name} must be at least {low}; got {value}")
    if "below" in marks and not value < marks["below"]:
        raise UsageError(f"--{name} must be below {marks['below']}; got {value}")
    if "most" in marks and value > marks["most"]:
        raise UsageError(f"--{name} must be at most {marks['most']:,}; got {value:,}")


def check_applies(cls, values, setting):
    """Refuse an option given for a choice it does not apply to (--noise_std with --init state_passing).
    values: the options given; setting: the values they depend on ({"init": "state_passing", ...}); an option
    that depends on something setting does not hold is not checked."""
    for f in options(cls):
        if f.name in values and "only" in f.metadata:
            key, allowed = f.metadata["only"]
            if key in setting and setting[key] not in allowed:
                raise UsageError(f"--{f.name} applies to --{key} {' or '.join(allowed)} only, not "
                                 f"--{key} {setting.get(key)}: drop it")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), like every other error of the scripts."""

    def __init__(self, prog, doc, **kwargs):
        super().__init__(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False, **kwargs)

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def run(prog, main, argv=None):
    """main(argv), with every error a user can cause told in one line: exit status 1 for errors, 130 for Ctrl-C
    or SIGTERM (both raise KeyboardInterrupt, so that work in progress is cleaned up on the way out, whatever
    the signals' handling was when the script started: nohup, say, ignores SIGINT)."""
    previous = {s: signal.signal(s, handler) for s, handler in ((signal.SIGINT, signal.default_int_handler),
                                                                 (signal.SIGTERM, _interrupt))}
    try:
        return main(argv)
    except UsageError as error:
        sys.exit(f"{prog}: error: {error}")
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
