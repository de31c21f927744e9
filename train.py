"""train.py: pre-train a recurrent LM, or post-train one with an initial-state intervention.

    python train.py                                   pre-train the demo model from the zero state -> out/zero
    python train.py --init state_passing              post-train out/zero with state passing -> out/state_passing
                                                      (pre-training out/zero first if it does not exist yet)
    python train.py --init tbptt --init_from PATH     post-train a checkpoint, or an official Mamba model
                                                      (state-spaces/mamba2-370m; pretrained.py)
    python train.py --task copy                       the synthetic copying task of tasks.py -> out/copy/zero
    torchrun --nproc_per_node=4 train.py --preset paper ...      data-parallel on 4 GPUs (or CPU processes)

The paper's recipe (Buitrago Ruiz & Gu, arXiv 2507.02782, Section 4): train as usual from the zero state, then
continue for a few hundred steps at the same training length T with a fresh optimizer, every batch starting from a
state the intervention chooses (--init, interventions.py): the three marked lines of train_step().

Read top to bottom: the loop, the options (TrainConfig, PRESETS and resolve(), which says in what order they
combine), what a run is built from (Run), its output folder, and main(). `python train.py --help` lists every flag.
A run folder (--out_dir, default out/INIT) holds ckpt.pt (everything needed to continue exactly: --resume; written
atomically, never with a number that is not finite), log.jsonl (training and validation losses: val_loss within T
and val_loss_beyond_T over [T, 8T), read from the zero state) and, with --save_every, ckpt_STEP.pt copies. Ctrl-C
stops at the end of the current step with a checkpoint; a second Ctrl-C stops at once.
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
from cli import UsageError, option
from data import DATA_DIR, DEFAULT_CORPUS, CorpusBatches, get_tokenizer, load_corpus
from interventions import INITS, make_intervention
from model import (LM, ModelConfig, check_backend, checkpoint_path, first_nonfinite, is_checkpoint,
                   load_checkpoint, process_alive, training_memory)
from pretrained import OFFICIAL
from tasks import TASKS, TaskBatches, make_task


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------

def train_step(run):
    """One optimizer step over grad_accum micro-batches.  Returns the mean training loss and the learning rate."""
    args = run.args
    lr = lr_at(run.step, args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(args.grad_accum):
        inputs, targets, restarted = run.next_batch()  # (B, T) int64 each; restarted (B,) bool or None
        initial = run.intervention.initial_state(inputs.shape[0], run.device, restarted)  # 1. where it starts
        with run.gradient_sync(micro == args.grad_accum - 1):
            with run.autocast:
                _, loss, final = run.trained(inputs, targets, initial)  # 2. read the batch from there
            (loss / args.grad_accum).backward()
        run.intervention.observe(final.detach())  # 3. the state it ended in (what state passing hands on)
        total += loss.detach()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return run.mean_over_processes(total / args.grad_accum), lr


def train(run):
    """Train to max_steps (or --stop_at), validating and saving every eval_interval steps. Raises UsageError when
    the run cannot go on, Stopped at a Ctrl-C."""
    args = run.args
    run.last_step = min(args.max_steps, args.stop_at or args.max_steps)
    with run.out as out, StopRequests(run) as stop:
        while run.step < run.last_step:
            started = time.perf_counter()
            loss, lr = train_step(run)
            if not math.isfinite(loss):
                raise UsageError(f"the training loss became {loss} at step {run.step}; stopped without saving: "
                                 f"{run.what_survives()}; start again with a lower --lr or --grad_clip")
            out.step(loss, lr, seconds=time.perf_counter() - started)
            if run.step % args.eval_interval == 0 or run.step == run.last_step:
                run.checkpoint(out.validation(run.validate()))
            elif args.save_every and run.step % args.save_every == 0:
                run.checkpoint()
            if stop.requested() and run.step < run.last_step:  # Ctrl-C: stop here, at the end of a whole step
                if run.saved_step != run.step:
                    run.checkpoint()
                raise Stopped(f"stopped at step {run.step}; continue with python train.py --resume --out_dir "
                              f"{args.out_dir}")
    out.finish()


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --min_lr at --max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices (and embeddings, conv kernels) only, not on norms, biases or Mamba's
    A_log, D and dt_bias."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# The options
# ----------------------------------------------------------------------------------------------------------------

POST_TRAINING = ("init", tuple(i for i in INITS if i != "zero"))  # cli.option's only=: for these --init values
COPY, LANGUAGE = ("task", ("copy",)), ("task", ("lm",))
PRESETS = {}  # --preset NAME -> defaults of a whole configuration; filled in below TrainConfig


@dataclass
class TrainConfig:
    """Every training option, written once: its default (the demo's), its help and its marks (cli.option). The
    model's options are ModelConfig's; the command line has both."""
    # what to train
    init: str = option("zero", "initial-state intervention (interventions.py)", choices=INITS, post=True)
    preset: str = option("demo", "defaults of a whole configuration (PRESETS)", choices=PRESETS)
    task: str = option("lm", "lm: language modelling on --data; or a synthetic task of tasks.py (copy), or "
                             "passkey: fine-tune --init_from on passkey examples in its own tokenizer",
                       choices=("lm", *TASKS), inherit=True)
    init_from: str = option(None, "post-train this with a fresh optimizer: a checkpoint (file or run folder), an "
                                  "official Mamba-2 (state-spaces/mamba2-370m) or a folder with its config.json and "
                                  "weights; default for --init other than zero: out/zero (pre-trained first if "
                                  "missing)", type=str, post=True)
    base_steps: int = option(None, "steps of the automatic pre-training of out/zero when it is missing (default: "
                                   "the preset's)", type=int, post=True)
    from_scratch: bool = option(False, "train from random weights even with --init other than zero (the "
                                       "intervention during pre-training)", post=True)
    resume: bool = option(False, "continue the run in --out_dir exactly where it stopped", post=True, resume=True)
    overwrite: bool = option(False, "start over in an --out_dir that already holds a run or other files (they "
                                    "stay until the new run's first checkpoint)", post=True)
    out_dir: str = option(None, "where the checkpoint and log go (default: out/INIT, out/TASK/INIT)", type=str,
                          post=True, resume=True)
    # interventions
    noise_std: float = option(0.1, "random_noise: std of the states", zero_ok=True, post=True,
                              only=("init", ("random_noise",)))
    p_zero: float = option(0.0, "fraction of rows that start from the zero state instead", zero_ok=True, below=1,
                           post=True, only=POST_TRAINING)
    ssm_only: bool = option(False, "state_passing/tbptt: pass the SSM state only, not the convolution state",
                            post=True, only=("init", ("state_passing", "tbptt")))
    # the copy task (tasks.CopyTask)
    alphabet_size: int = option(10, "copy: characters in the alphabet", inherit=True, only=COPY)
    n_train: int = option(16, "copy: training strings have lengths 1 .. n_train", inherit=True, only=COPY)
    context: int = option(0, "copy: 0: one example per row, each read from the zero state; C: rows of C tokens "
                             "packed with examples back to back (the original task's layout)", zero_ok=True,
                          inherit=True, only=COPY)
    # data and optimisation
    data: str = option(DEFAULT_CORPUS, "a prepared corpus name under --data_dir, or its folder (data.py)",
                       inherit=True, only=LANGUAGE)
    data_dir: str = option(str(DATA_DIR), "where corpora live", inherit=True)
    seq_len: int = option(64, "training length T", inherit=True, only=LANGUAGE, most=2 ** 24)
    batch_size: int = option(16, "sequences per micro-batch, per process", inherit=True, most=2 ** 20)
    grad_accum: int = option(1, "micro-batches per optimizer step", inherit=True, most=2 ** 20)
    max_steps: int = option(3000, "optimizer steps of this run", post=True, resume=True, most=10 ** 9)
    lr: float = option(3e-3, "peak learning rate", post=True)
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay (at most --lr)", zero_ok=True,
                           post=True)
    warmup_steps: int = option(100, "linear warm-up steps (at most --max_steps)", zero_ok=True, post=True)
    weight_decay: float = option(0.1, "AdamW weight decay of matrices", zero_ok=True)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", zero_ok=True)
    seed: int = option(0, "random seed of the weights, the data and the intervention", zero_ok=True,
                       most=2 ** 31 - 1)
    # running
    device: str = option("auto", "cpu, cuda, cuda:1, mps (default: cuda when available)", resume=True)
    dtype: str = option("auto", "autocast dtype (auto: bfloat16 on CUDA, float32 on the CPU)",
                        choices=("auto", "float32", "bfloat16"))
    compile: bool = option(False, "torch.compile the model", resume=True)
    eval_interval: int = option(250, "steps between validations and checkpoints", post=True, resume=True)
    eval_seqs: int = option(16, "validation sequences of 8 T tokens (--task: held-out batches)", most=2 ** 20)
    log_interval: int = option(10, "steps between log lines", resume=True)
    save_every: int = option(None, "also keep a copy of the checkpoint every N steps (ckpt_STEP.pt), to look at "
                                   "the model along its training", type=int, resume=True)
    stop_at: int = option(None, "stop after this step with a checkpoint (continue with --resume)", type=int,
                          post=True, resume=True)


# Presets: defaults of whole configurations, over TrainConfig's and ModelConfig's (any field of either); "post"
# holds what changes when post-training (--init_from, or an --init other than zero); "init_from" names the model
# a preset post-trains.
PRESETS.update({
    # a 0.5M-parameter byte-level Mamba-2 on the Python standard library's source, for a laptop CPU
    "demo": dict(mixer="mamba2", d_model=128, n_layer=4, d_state=64, headdim=32,
                 post=dict(max_steps=500, lr=1e-3, warmup_steps=20)),
    # the same size with GLA's per-channel gate (RESULTS.md, "Gated linear attention")
    "gla": dict(mixer="gla", d_model=128, n_layer=4, n_heads=4, post=dict(max_steps=500, lr=1e-3, warmup_steps=20)),
    # the copy task at CPU size, one example per row: a zero-init 0.48M Mamba-2 that copies every string of up to
    # n_train = 16 characters and fails on longer ones (tasks.CopyTask; RESULTS.md, "Synthetic copying")
    "copy": dict(task="copy", mixer="mamba2", d_model=128, n_layer=4, d_state=64, headdim=32, alphabet_size=16,
                 batch_size=64, max_steps=3000, chunk_size=16, eval_interval=500, eval_seqs=8,
                 post=dict(max_steps=600, lr=1e-3, min_lr=1e-4, warmup_steps=30, eval_interval=300)),
    # for GPUs: a 129M-parameter Mamba-2 (the official mamba2-130m's size) at T = 2048 with GPT-2 tokens ...
    "paper": dict(mixer="mamba2", d_model=768, n_layer=24, recompute=True, data=DEFAULT_CORPUS + "-gpt2",
                  seq_len=2048, grad_accum=4, max_steps=20000, warmup_steps=1000, eval_interval=1000,
                  post=dict(max_steps=500, lr=3e-4, warmup_steps=50)),
    # ... and a GLA near the paper's (Figure 1c: trained at T = 512), 0.5M tokens a step, on GPT-NeoX tokens
    "gla-paper": dict(mixer="gla", d_model=1024, n_layer=24, n_heads=4, recompute=True, data="pile-neox",
                      seq_len=512, batch_size=32, grad_accum=32, max_steps=20000, lr=3e-4, min_lr=3e-5,
                      warmup_steps=1000, eval_interval=1000, post=dict(max_steps=500, lr=1e-4, warmup_steps=50)),
})
# Post-training the official models at their T = 2048 on a corpus of their GPT-NeoX tokens (python data.py --input
# PATH --tokenizer EleutherAI/gpt-neox-20b --name pile-neox), as the paper does: Mamba-2 for 500 steps, Mamba-1 for
# 1000. A step is 256 sequences of 2048 tokens (0.5M tokens) as batch_size x grad_accum on one process (under
# torchrun, divide --grad_accum by the processes).
for _name, _batch in (("mamba2-130m", 16), ("mamba2-370m", 8), ("mamba2-780m", 4), ("mamba2-1.3b", 2),
                      ("mamba-130m", 16), ("mamba-370m", 8), ("mamba-790m", 4), ("mamba-1.4b", 2)):
    PRESETS[_name] = dict(init_from=f"state-spaces/{_name}", **OFFICIAL[f"state-spaces/{_name}"],
                          recompute=True, data="pile-neox", seq_len=2048, batch_size=_batch,
                          grad_accum=256 // _batch, max_steps=500 if _name.startswith("mamba2") else 1000, lr=3e-4,
                          min_lr=3e-5, warmup_steps=50, eval_interval=100)
TASK_DEFAULTS = {"passkey": dict(max_steps=1000)}  # the paper fine-tunes on passkeys for 1000 steps


def parse(argv):
    """{option: value} of the flags given on the command line (both dataclasses' options)."""
    parser = cli.OneLineParser("train.py", __doc__)
    cli.add_options(parser, TrainConfig, "training (TrainConfig)")
    cli.add_options(parser, ModelConfig, "model (model.ModelConfig; from the preset, or from --init_from)")
    namespace = parser.parse_args(argv)
    return {**cli.given(namespace, TrainConfig), **cli.given(namespace, ModelConfig)}


def marked(mark):
    """The names of the options (of both dataclasses) that carry this mark."""
    return {f.name for cls in (TrainConfig, ModelConfig) for f in cli.options(cls) if f.metadata.get(mark)}


def defaults():
    return {f.name: f.default for cls in (TrainConfig, ModelConfig) for f in cli.options(cls)
            if f.default is not dataclasses.MISSING}


def resolve(given):
    """A run's options from those given on the command line. Each option takes the last of these that sets it:
        1. the defaults of TrainConfig and ModelConfig
        2. the preset: --preset, else the one an official --init_from or the --task names, else demo
        3. the preset's "post" values, when post-training
        4. TASK_DEFAULTS of the task
        5. what the model it starts from was trained with: its architecture, and the options marked inherit
        6. the command line
    On --resume: the saved run's options, then the flags marked resume. Returns (options as a namespace, the model
    post-training starts from or None). Raises UsageError."""
    check_given(given)
    if given.get("resume"):
        return resume_options(given), None
    official = {p.get("init_from"): name for name, p in PRESETS.items() if p.get("init_from")}
    preset_name = given.get("preset") or official.get(given.get("init_from")) or (
        given.get("task") if given.get("task") in PRESETS else "demo")
    preset = PRESETS[preset_name]
    init, task = given.get("init", "zero"), given.get("task", preset.get("task", "lm"))
    own_base = default_out_dir(task, preset_name, "zero") if init != "zero" and not reads_text(task) else None
    init_from = None if given.get("from_scratch") else given.get("init_from") or preset.get("init_from") or own_base
    values = {**defaults(), **{k: v for k, v in preset.items() if k not in ("post", "init_from")}}
    values.update(preset.get("post", {}) if init_from else {})
    values.update(TASK_DEFAULTS.get(task, {}))
    values.update(preset=preset_name, init_from=init_from, task=task)
    base = None
    if init_from:
        base, trained_with = load_base(init_from, given)
        values.update({k: v for k, v in trained_with.items() if k in marked("inherit") and v is not None})
        values.update({k: v for k, v in base.cfg.architecture().items() if k in values})
    values.update(given)
    args = argparse.Namespace(**values)
    check_resolved(args, given, base)
    if args.task != "lm":
        args.tokenizer = base_tokenizer(base, args) if reads_text(args.task) else None
        args.seq_len = build_task(args).train_tokens  # T: the longest training example
    args.out_dir = args.out_dir or default_out_dir(args.task, args.preset, args.init)
    return args, base


def check_given(given):
    """One-line errors for flags that make no sense whatever else is set, so that nothing (not even the automatic
    pre-training) starts before they are fixed. --init is never inherited: its options can be checked now."""
    for cls in (TrainConfig, ModelConfig):
        cli.check(cls, given)
    cli.check_applies(TrainConfig, given, {"init": given.get("init", "zero")})
    if given.get("resume") and (given.get("init_from") or given.get("from_scratch")):
        raise UsageError("--resume continues a run as it was started; drop --init_from/--from_scratch")
    if given.get("init_from") and given.get("from_scratch"):
        raise UsageError("--init_from and --from_scratch contradict each other; give one")
    if given.get("out_dir") and Path(given["out_dir"]).is_file():
        raise UsageError(f"--out_dir {given['out_dir']} is a file: give a folder (it will hold ckpt.pt and log.jsonl)")


def check_resolved(args, given, base):
    """One-line errors for options that contradict each other once every layer has been applied."""
    values = vars(args)
    for cls in (TrainConfig, ModelConfig):
        cli.check(cls, {k: v for k, v in values.items() if k not in given})  # what a checkpoint said, too
        cli.check_applies(cls, given, values)
    if reads_text(args.task) and not args.init_from:
        raise UsageError(f"--task {args.task} fine-tunes a language model on examples in its own tokenizer: give "
                         f"--init_from (a checkpoint trained on a corpus, or an official Mamba-2)")
    if base is not None:
        architecture = base.cfg.architecture()
        differ = [f"--{k} {given[k]}" for k in architecture if k in given and given[k] != architecture[k]]
        if differ:
            raise UsageError(f"{args.init_from} holds a {base.cfg.mixer} model that {', '.join(differ)} would "
                             f"change: drop the flags or post-train another checkpoint")
    for name, limit in (("warmup_steps", "max_steps"), ("min_lr", "lr")):  # a preset's value yields to the limit
        if values[name] > values[limit]:
            if name in given:
                raise UsageError(f"--{name} {values[name]} is above --{limit} {values[limit]}: lower it")
            values[name] = values[limit]


def resume_options(given):
    """On --resume the run continues with its own options; flags that would change it are refused, except those
    marked resume (how it runs: device, backend, max_steps, ...)."""
    out_dir = given.get("out_dir") or default_out_dir(given.get("task", "lm"), given.get("preset", "demo"),
                                                      given.get("init", "zero"))
    saved = load_checkpoint(out_dir, require=("args",))["args"]
    changed = [k for k in given if k not in marked("resume") and k in saved and given[k] != saved[k]]
    if changed:
        raise UsageError(f"--resume continues the run in {out_dir} as it was started; "
                         f"{', '.join('--' + k for k in changed)} differ from it: drop them or use another --out_dir")
    resumable = {k: v for k, v in given.items() if k in marked("resume")}
    return argparse.Namespace(**{**defaults(), **saved, **resumable, "resume": True, "out_dir": out_dir,
                                 "stop_at": given.get("stop_at")})  # a stop belongs to one invocation only


def load_base(init_from, given):
    """(model in train mode on the CPU, the options it was trained with) for --init_from: a checkpoint of this
    project, or anything LM.from_pretrained loads, whose training length T is all that is known of its training."""
    if checkpoint_path(init_from).resolve() == checkpoint_path(given.get("out_dir") or "-").resolve():
        raise UsageError(f"post-training {init_from} into itself would overwrite it: give another --out_dir")
    if is_checkpoint(init_from):
        ckpt = load_checkpoint(init_from)
        return LM.from_checkpoint(ckpt).train(), ckpt.get("args") or {}
    model = LM.from_pretrained(init_from)
    return model.train(), {"seq_len": model.trained_on.get("seq_len")}


def base_tokenizer(base, args):
    """The tokenizer (a data.get_tokenizer spec) that the model --init_from names read its text in."""
    spec = base.trained_on["tokenizer"]
    if spec is None:
        raise UsageError(f"--task {args.task} writes its examples in the tokens of the model it fine-tunes, but "
                         f"{args.init_from} does not say which tokenizer it was trained with: fine-tune a model "
                         f"trained on a prepared corpus, or a folder that has its tokenizer.json beside the weights")
    return spec


def reads_text(task):
    """Whether --task is written in words, so that only a language model in its own tokenizer can learn it."""
    return getattr(TASKS.get(task), "needs_tokenizer", False)


def build_task(args):
    """The synthetic task of args.task with the run's settings. Raises UsageError."""
    try:
        if reads_text(args.task):
            return TASKS[args.task](get_tokenizer(args.tokenizer))
        return make_task(args.task, vars(args))
    except ValueError as error:
        raise UsageError(f"--task {args.task}: {error}") from None


def default_out_dir(task, preset, init):
    """out/INIT for the demo; out/TASK/INIT for a synthetic task, out/PRESET/INIT for another preset."""
    return os.path.join("out", *([task] if task != "lm" else [preset] if preset != "demo" else []), init)


def needs_base_run(given):
    """The one-command recipe (python train.py --init state_passing) post-trains out/zero: True when out/zero must
    be pre-trained first; an unfinished out/zero is an error."""
    preset = PRESETS[given.get("preset", "demo")]
    task = given.get("task", "lm")
    if given.get("init", "zero") == "zero" or reads_text(task) or any(
            given.get(k) for k in ("init_from", "from_scratch", "resume")) or preset.get("init_from"):
        return False
    base_run = default_out_dir(task, given.get("preset", "demo"), "zero")
    if not checkpoint_path(base_run).exists():
        return True
    base = load_checkpoint(base_run, require=("step", "args"))
    if base["step"] < base["args"]["max_steps"]:
        raise UsageError(f"{base_run} stopped at step {base['step']} of {base['args']['max_steps']}: finish it "
                         f"first with python train.py --resume --out_dir {base_run}")
    return False


def base_run_options(given):
    """The options of that automatic pre-training: the same flags without those that concern the post-training
    only, and --base_steps as its --max_steps."""
    shared = {k: v for k, v in given.items() if k not in marked("post")}
    return {**shared, **({"max_steps": given["base_steps"]} if "base_steps" in given else {})}


# ----------------------------------------------------------------------------------------------------------------
# A run: what the loop reads from, built in this order
# ----------------------------------------------------------------------------------------------------------------

class Run:
    """Everything one training process holds: data, model, optimizer, intervention, and its place in the run."""

    def __init__(self, args, rank, world, device, base=None):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.is_main = rank == 0
        self.autocast, compute_dtype = cli.autocast_for(device, args.dtype)
        seed = (args.seed * 1000 + rank) * 2  # the data and the intervention must not draw the same numbers
        source = build_task(args) if args.task != "lm" else open_corpus(args, rank, world)
        ckpt = load_checkpoint(args.out_dir, require=("model_config", "model", "optimizer", "step", "ranks")) \
            if args.resume else None
        cfg = model_config(args, source.vocab_size, base, ckpt)
        check_backend(cfg, device, compute_dtype)
        check_memory(cfg, args, device, compute_dtype, base)  # before anything large is allocated
        self.batches = (TaskBatches(source, args, seed) if args.task != "lm" else
                        CorpusBatches(source, args, rank, world, seed, streams=INITS[args.init].uses_streams))
        self.model = self._model(cfg, base, ckpt)
        vars(args).update({f.name: getattr(cfg, f.name) for f in cli.options(ModelConfig)})  # recorded as built
        self.optimizer = make_optimizer(self.model, args, device)
        self.intervention = make_intervention(args.init, self.model, seed + 1, **intervention_options(args))
        self.step, self.saved_step, self.tokens = 0, None, 0  # tokens: read by this process in this invocation
        if ckpt is not None:
            self._restore(ckpt)
        self.trained = torch.compile(self.model) if args.compile else self.model
        if world > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(
                self.trained, device_ids=[device.index] if device.type == "cuda" else None)
        self.out = Output(self)

    def _model(self, cfg, base, ckpt):
        """The model to train: resumed, post-trained from base, or fresh (the same weights on every process)."""
        if ckpt is not None:
            runtime = {f.name: getattr(cfg, f.name) for f in cli.options(ModelConfig) if f.metadata.get("resume")}
            return LM.from_checkpoint(ckpt, self.device, **runtime).train()
        if base is not None:
            refusal = self.batches.refusal(base)
            if refusal:
                raise UsageError(f"cannot post-train {self.args.init_from} on {self.batches.describe()['name']}: "
                                 f"{refusal}")
            base.cfg = cfg  # the same architecture; how the scan runs may differ
            return base.to(self.device)
        torch.manual_seed(self.args.seed)
        return LM(cfg).to(self.device)

    def _restore(self, ckpt):
        """Continue a run: optimizer, step, and each process's random states, data position and intervention."""
        out_dir, saved = self.args.out_dir, (ckpt.get("corpus") or {}).get("fingerprint")
        if saved and saved != self.batches.describe()["fingerprint"]:
            raise UsageError(f"corpus '{self.args.data}' was prepared again after the run in {out_dir} started, so "
                             f"resuming would continue on other data: put the original corpus back, or post-train "
                             f"the checkpoint into a new run with --init_from {out_dir} --out_dir NEW")
        if len(ckpt["ranks"]) != self.world:
            raise UsageError(f"the run in {out_dir} was trained by {len(ckpt['ranks'])} process(es); resume it with "
                             f"the same number (torchrun --nproc_per_node={len(ckpt['ranks'])})")
        mine = ckpt["ranks"][self.rank]
        drawn_on = mine["intervention"].get("generator_device")
        if drawn_on and torch.device(drawn_on).type != self.device.type:
            raise UsageError(f"the run in {out_dir} drew its random numbers on {drawn_on}; resume it on a "
                             f"{torch.device(drawn_on).type} device to continue it exactly")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = self.saved_step = ckpt["step"]
        torch.set_rng_state(mine["torch_rng"])
        self.batches.load_state_dict(mine)
        self.intervention.load_state_dict(_to_device(mine["intervention"], self.device))

    def describe(self):
        args, per_step = self.args, self.args.batch_size * self.args.grad_accum * self.world
        mode = "resuming" if args.resume else ("post-training " + args.init_from if args.init_from else "training")
        split = f" ({args.batch_size} x {args.grad_accum} micro-batches x {self.world} processes)" \
            if per_step != args.batch_size else ""
        return (f"{mode} with --init {args.init}: {self.model.num_parameters() / 1e6:.2f}M parameters, {args.mixer}, "
                f"{per_step} sequences of {args.seq_len} tokens per step{split}, {args.max_steps} steps, "
                f"device {self.device}, out {args.out_dir}")

    def next_batch(self):
        """(inputs, targets, restarted): (B, T) int64 on the device; restarted (B,) bool or None."""
        inputs, targets, restarted = self.batches.next()
        self.tokens += inputs.numel()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True), restarted

    def gradient_sync(self, last_micro_batch):
        """Processes average their gradients in the backward pass of a step's last micro-batch only."""
        return contextlib.nullcontext() if last_micro_batch or self.world == 1 else self.trained.no_sync()

    def mean_over_processes(self, value):
        """A scalar tensor averaged over the processes, as a float."""
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return value.item()

    def validate(self):
        """Rank 0's validation losses ({name: loss}); None on the other processes."""
        if not self.is_main:
            return None
        self.model.eval()
        losses = self.batches.validate(self.model, self.device, self.autocast)
        self.model.train()
        return losses

    def checkpoint(self, losses=None):
        """Save the run: rank 0 writes, every process gives its own random, data and intervention state. A weight,
        optimizer moment, intervention state or validation loss that is not finite is refused with a UsageError,
        and nothing is saved."""
        mine = {"torch_rng": torch.get_rng_state(), "intervention": _to_device(self.intervention.state_dict(), "cpu"),
                **self.batches.state_dict()}
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        extra = dict(optimizer=self.optimizer.state_dict(), step=self.step, args=vars(self.args), ranks=ranks,
                     corpus=self.batches.describe(), losses=losses or {})
        broken = first_nonfinite({"model": self.model.state_dict(), **extra})
        if broken:
            raise UsageError(f"{broken} is not finite after step {self.step}; stopped without saving: "
                             f"{self.what_survives()}; start again with a lower --lr or --grad_clip")
        if self.is_main:
            self.out.save(self.model, extra)
        self.saved_step = self.step
        if self.world > 1:
            dist.barrier()  # nobody reads the checkpoint (a post-training that follows, say) before it exists

    def what_survives(self):
        if self.saved_step is not None:
            return f"the last good checkpoint (step {self.saved_step}) in {self.args.out_dir} survives"
        if checkpoint_path(self.args.out_dir).exists():
            return f"no checkpoint of this run was written ({self.args.out_dir} still holds the run it replaces)"
        return "no checkpoint was written"


def intervention_options(args):
    """The options of the --init in use: those of TrainConfig marked only=("init", (..., args.init, ...))."""
    return {f.name: getattr(args, f.name) for f in cli.options(TrainConfig)
            if f.metadata.get("only", ("",))[0] == "init" and args.init in f.metadata["only"][1]}


def model_config(args, vocab_size, base, ckpt):
    """The ModelConfig of the run: the resumed checkpoint's or the base model's, with the options marked resume
    as args says; else one made of the model options in args."""
    saved = ckpt["model_config"] if ckpt is not None else base.cfg.to_dict() if base is not None else None
    runtime = {f.name: getattr(args, f.name) for f in cli.options(ModelConfig) if f.metadata.get("resume")}
    try:
        if saved is not None:
            return ModelConfig(**{**saved, **runtime})
        return ModelConfig(vocab_size=vocab_size, **{f.name: getattr(args, f.name) for f in cli.options(ModelConfig)})
    except (TypeError, ValueError) as error:
        raise UsageError(f"{error}: change the model flags") from None


def open_corpus(args, rank, world):
    """load_corpus, with rank 0 preparing a missing default corpus while the other processes wait."""
    if world > 1 and rank > 0:
        dist.barrier()
    corpus = load_corpus(args.data, args.data_dir)
    if world > 1 and rank == 0:
        dist.barrier()
    return corpus


def check_memory(cfg, args, device, compute_dtype, base=None):
    """Refuse, before the first allocation, a run whose estimate (model.training_memory, plus the validation data)
    exceeds 90% of what is available: the alternative is an out-of-memory error, or on Linux the kernel killing the
    process without a word. A base model already in the CPU's memory is no longer available but will not be needed
    twice."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type != "cuda" else 1  # sharing the RAM
    validation = 16 * args.eval_seqs * (8 if args.task == "lm" else args.batch_size) * args.seq_len
    held = 4 * base.num_parameters() if base is not None and device.type == "cpu" else 0
    need = (training_memory(cfg, args.batch_size * args.seq_len, compute_dtype) + validation - held) * processes
    free = cli.available_memory(device)
    if free is not None and need > 0.9 * free:
        raise UsageError(f"this run needs about {need / 2**30:.1f} GiB of memory on {device} but "
                         f"{free / 2**30:.1f} GiB are available: lower --batch_size (raising --grad_accum keeps "
                         f"the {args.batch_size * args.grad_accum} sequences per step), --seq_len or the model's size")


def warn_if_slow(model, args, device):
    """Say before the first step when a step will take far longer than a person waits for a first result: the
    compute of a step (6 x parameters x tokens) over what this device just did in a short matrix product."""
    size, started, repeats = 512, time.perf_counter(), 0
    a = torch.randn(size, size, device=device)
    while time.perf_counter() - started < 0.05:
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
# The output folder, and stopping on request
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


class Output:
    """What rank 0 shows and writes (the other processes nothing): the progress bar, log.jsonl and the
    checkpoints, in a folder held for the run's life by a lock file naming the process (a lock whose process is
    gone is stale and taken over). A new run leaves the files of a run it replaces (--overwrite) as they are until
    its first checkpoint: its log waits in memory until then."""

    def __init__(self, run):
        self.run, self.args, self.started, self.train_seconds = run, run.args, time.time(), 0.0
        self.path, self.pending = Path(run.args.out_dir), None if run.args.resume else []
        self.lock = self.path / ".lock"

    def __enter__(self):
        if self.run.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            if self.args.resume:  # the records up to the checkpoint (later steps were lost), not a torn line
                log = self.path / "log.jsonl"
                lines = log.read_text(errors="replace").splitlines() if log.exists() else []
                _write_atomically(log, "".join(line + "\n" for line in lines if _step_of(line) <= self.run.step))
        self.bar = tqdm(total=self.run.last_step, initial=self.run.step, disable=not self.run.is_main,
                        desc=self.args.init, dynamic_ncols=True)
        return self

    def _take_lock(self):
        try:
            descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only one process can create it
        except FileExistsError:
            owner = self.lock.read_text().strip()
            if process_alive(owner):
                raise UsageError(f"another run (process {owner}) is using {self.path}: wait for it, stop it, or "
                                 f"choose another --out_dir") from None
            self.lock.unlink(missing_ok=True)  # stale: its process is gone
            descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(descriptor, "w") as f:
            f.write(str(os.getpid()))

    def __exit__(self, *exc):
        self.bar.close()
        if self.run.is_main:
            self.lock.unlink(missing_ok=True)

    def step(self, loss, lr, seconds):
        self.train_seconds += seconds
        rate, step = self.run.tokens * self.run.world / self.train_seconds, self.run.step
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
        if step == self.run.last_step:
            self.bar.close()  # before the last validation, so the bar's final speed is the training speed
        if step % self.args.log_interval == 0 or step == self.run.last_step:
            self.log(step=step, train_loss=loss, lr=lr, tokens_per_s=rate, time=time.time() - self.started)

    def validation(self, losses):
        """Log and show rank 0's validation losses; returns them."""
        if losses is not None:
            self.log(step=self.run.step, **losses)
            self.bar.write(f"step {self.run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            self.bar.unpause()  # the time spent validating does not count in the bar's speed
        return losses

    def log(self, **record):
        if not self.run.is_main:
            return
        if self.pending is not None:
            self.pending.append(record)
        else:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, model, extra):
        """ckpt.pt, and a ckpt_STEP.pt copy with what eval.py reads (--save_every). The first checkpoint of a new run
        also replaces the log and the copies of the run that was there."""
        step, every = extra["step"], self.args.save_every
        model.save(self.path, **extra)
        if every and step % every == 0:
            model.save(self.path / f"ckpt_{step}.pt", **{k: extra[k] for k in ("step", "args", "corpus")})
        if self.pending is not None:
            for old in self.path.glob("ckpt_*.pt"):
                if old.name != f"ckpt_{step}.pt" or not (every and step % every == 0):
                    old.unlink()
            _write_atomically(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.pending))
            self.pending = None

    def finish(self):
        if not self.run.is_main:
            return
        if self.run.step < self.args.max_steps:
            print(f"train.py: stopped at step {self.run.step} (--stop_at); continue with python train.py --resume "
                  f"--out_dir {self.args.out_dir}")
        else:  # a post-trained model is read beside the model it started from
            models = " ".join(f"--ckpt {path}" for path in (self.args.init_from, self.args.out_dir) if path)
            print(f"train.py: done: {checkpoint_path(self.args.out_dir)} (step {self.run.step}); next: python eval.py "
                  f"{models}")


def _step_of(line):
    """The step of a log.jsonl line, or infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _write_atomically(path, text):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Stopped(Exception):
    """The run stopped early at the user's request; the message says how to continue."""


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM during training asks for a stop at the end of the current step, where a
    checkpoint continues the run exactly; another one a second or more later stops at once. requested() is
    collective: every process stops at the same step."""

    def __init__(self, run):
        self.run, self.first = run, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:  # the second request, or a Ctrl-C that came as an exception
            raise Stopped(f"interrupted after step {self.run.step}; stopped without saving: "
                          f"{self.run.what_survives()}") from None

    def _handle(self, signum, frame):
        if self.first is not None and time.monotonic() - self.first > 1:  # torchrun repeats the signal at once
            raise KeyboardInterrupt
        self.first = self.first or time.monotonic()
        if self.run.is_main:
            print(f"\ntrain.py: stopping after step {self.run.step + 1} (Ctrl-C again to stop at once)",
                  file=sys.stderr)

    def requested(self):
        if self.run.world == 1:
            return self.first is not None
        flag = torch.tensor(float(self.first is not None), device=self.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


# ----------------------------------------------------------------------------------------------------------------
# Processes and the command line
# ----------------------------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world size, device). Under torchrun: one process per GPU with NCCL, or CPU processes with gloo.
    Called once per process: the pre-training that the one-command recipe may run first shares the group."""
    device = cli.pick_device(device_arg)
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


def run_training(given, rank, world, device):
    """Resolve the options, build the run, train it."""
    args, base = resolve(given)
    check_out_dir(args)
    run = Run(args, rank, world, device, base)
    if run.is_main:
        print(run.describe(), file=sys.stderr)
        warn_if_slow(run.model, args, device)
    train(run)


def main(argv=None):
    return cli.run("train.py", train_all, argv)


def train_all(argv):
    """Train what the command line asks for: first the automatic pre-training when the recipe needs one."""
    given = parse(sys.argv[1:] if argv is None else argv)
    check_given(given)
    world = 1
    try:
        rank, world, device = setup_distributed(given.get("device", "auto"))
        if needs_base_run(given):  # the paper's recipe in one command: pre-train the zero-init model first
            if rank == 0:
                print(f"{default_out_dir(given.get('task', 'lm'), given.get('preset', 'demo'), 'zero')} does not "
                      f"exist yet: pre-training it "
                      f"first; the post-training follows", file=sys.stderr)
            try:
                run_training(base_run_options(given), rank, world, device)
            except Stopped as stop:
                raise Stopped(f"{stop}; then run this command again for the post-training") from None
        run_training(given, rank, world, device)
    except (Stopped, KeyboardInterrupt) as stop:
        print(f"train.py: {str(stop) or 'interrupted before training began'}", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
