"""train.py: pre-train a recurrent LM, or post-train one with an initial-state intervention.

    python train.py                                   pre-train the demo model from the zero state -> out/zero
    python train.py --init state_passing              post-train out/zero with state passing -> out/state_passing
                                                      (pre-training out/zero first if it does not exist yet)
    python train.py --init tbptt --init_from PATH     post-train a checkpoint, or an official Mamba (pretrained/)
    python train.py --task copy                       the synthetic copying task (tasks/copy.py) -> out/copy/zero
    torchrun --nproc_per_node=4 train.py --preset paper ...      data-parallel on 4 GPUs (or CPU processes)

The paper's recipe (Buitrago Ruiz & Gu, arXiv 2507.02782, Section 4): train as usual from the zero state, then
continue for a few hundred steps at the same training length T with a fresh optimizer, every batch starting from a
state the intervention chooses (--init, interventions.py): the three marked lines of train_step().

Read top to bottom: the loop, the options (TrainConfig: a field is a flag), what a run is built from (build_run),
and main(). What lies around the idea is in runs/: how the options combine (presets, post-training, --resume; in
runs.resolve), the run folder (a lock, log.jsonl, atomic checkpoints that never hold a number that is not finite,
a Ctrl-C that stops at the end of a step), memory checks and one-line errors. A run folder (--out_dir, default
out/INIT) holds ckpt.pt (everything needed to continue exactly: --resume), log.jsonl (training and validation
losses: val_loss within T and val_loss_beyond_T over [T, 8T), read from the zero state) and, with --save_every,
ckpt_STEP.pt copies. `python train.py --help` lists every flag.
"""
if __name__ == "__main__":  # a Ctrl-C while the imports below load ends quietly, not with a traceback
    import signal
    import sys
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import List

import torch
import torch.distributed as dist

import runs
from data import DATA_DIR, DEFAULT_CORPUS, CorpusBatches, load_corpus
from interventions import INITS
from model import LM, ModelConfig, option


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
        inputs, targets, restarted = run.batches.next()  # (B, T) int64 each; restarted (B,) bool or None
        run.tokens += inputs.numel()
        inputs, targets = inputs.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        initial = run.intervention.initial_state(inputs.shape[0], run.device, restarted)  # 1. where it starts
        last = micro == args.grad_accum - 1  # processes average their gradients in the last backward pass only
        with contextlib.nullcontext() if last or run.world == 1 else run.trained.no_sync():
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
    loss = total / args.grad_accum
    if run.world > 1:
        dist.all_reduce(loss)
        loss /= run.world
    return loss.item(), lr


def train(run, folder):
    """Train to max_steps (or --stop_at), validating and saving every eval_interval steps. Raises UsageError when
    the run cannot go on, runs.Stopped at a Ctrl-C."""
    args = run.args
    while run.step < run.last_step:
        started = time.perf_counter()
        loss, lr = train_step(run)
        if not math.isfinite(loss):
            raise runs.UsageError(f"the training loss became {loss} at step {run.step}; stopped without saving: "
                                  f"{folder.what_survives()}; start again with a lower --lr or --grad_clip")
        folder.step(loss, lr, seconds=time.perf_counter() - started)
        if run.step % args.eval_interval == 0 or run.step == run.last_step:
            folder.save(validate(run))
        elif args.save_every and run.step % args.save_every == 0:
            folder.save()
        if folder.stop_requested() and run.step < run.last_step:  # Ctrl-C: stop here, at the end of a whole step
            if run.saved_step != run.step:
                folder.save()
            raise runs.Stopped(f"stopped at step {run.step}; continue with python train.py --resume --out_dir "
                               f"{args.out_dir}")
    folder.finish()


def validate(run):
    """Rank 0's validation losses ({name: loss}); None on the other processes."""
    if not run.is_main:
        return None
    run.model.eval()
    losses = run.batches.validate(run.model, run.device, run.autocast)
    run.model.train()
    return losses


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --min_lr at --max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# The options: a field is a flag; runs.resolve says how the defaults, a preset, the model post-training starts
# from and the command line combine, and runs.RULES what values each may take
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every training option with its default (the demo's) and help. The model's options are ModelConfig's, the
    interventions' their classes' (interventions.py); the command line has them all."""
    # what to train
    init: str = option("zero", "initial-state intervention (interventions.py)", choices=INITS)
    preset: str = option("demo", "defaults of a whole configuration (runs/presets.py)", choices=runs.PRESETS)
    task: str = option("lm", "lm: language modelling on --data; copy: the copying task (tasks/copy.py); passkey, "
                             "babilong: fine-tune --init_from on passkey or BABILong examples in its own tokenizer",
                       choices=("lm", "copy", "passkey", "babilong"))
    init_from: str = option(None, "post-train this with a fresh optimizer: a checkpoint (file or run folder), an "
                                  "official Mamba-2 (state-spaces/mamba2-370m) or a folder with its config.json and "
                                  "weights; default for --init other than zero: out/zero (pre-trained first if "
                                  "missing)")
    base_steps: int = option(None, "steps of the automatic pre-training of out/zero when it is missing (default: "
                                   "the preset's)")
    from_scratch: bool = option(False, "train from random weights even with --init other than zero (the "
                                       "intervention during pre-training)")
    resume: bool = option(False, "continue the run in --out_dir exactly where it stopped")
    overwrite: bool = option(False, "start over in an --out_dir that already holds a run or other files (they "
                                    "stay until the new run's first checkpoint)")
    out_dir: str = option(None, "where the checkpoint and log go (default: out/INIT, out/TASK/INIT)")
    # the copy task (tasks/copy.py)
    alphabet_size: int = option(10, "copy: characters in the alphabet")
    n_train: int = option(16, "copy: training strings have lengths 1 .. n_train")
    context: int = option(0, "copy: 0: one example per row, each read from the zero state; C: rows of C tokens "
                             "packed with examples back to back (the original task's layout)")
    # text tasks from scratch, and BABILong's stories (tasks/babilong/)
    tokenizer: str = option(None, "--task passkey or babilong without --init_from: train a fresh model on examples "
                                  "in this tokenizer (bytes, gpt2, a tokenizer.json)")
    babilong_tasks: List[str] = option(None, "babilong: the bAbI tasks trained on (default: qa1 qa2)")
    babilong_facts: List[int] = option(None, "babilong: the fewest and the most facts a story (default: bAbI's)")
    passkey_filler: str = option("repeated", "passkey: the paper's repeated line, or varied: natural sentences",
                                 choices=("repeated", "varied"))
    # data and optimisation
    data: str = option(DEFAULT_CORPUS, "a prepared corpus name under --data_dir, or its folder (python -m corpora)")
    data_dir: str = option(str(DATA_DIR), "where corpora live")
    seq_len: int = option(64, "training length T")
    batch_size: int = option(16, "sequences per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(3000, "optimizer steps of this run")
    lr: float = option(3e-3, "peak learning rate")
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay (at most --lr)")
    warmup_steps: int = option(100, "linear warm-up steps (at most --max_steps)")
    weight_decay: float = option(0.1, "AdamW weight decay of matrices")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    seed: int = option(0, "random seed of the weights, the data and the intervention")
    # running
    device: str = option("auto", "cpu, cuda, cuda:1, mps (default: cuda when available)")
    dtype: str = option("auto", "autocast dtype (auto: bfloat16 on CUDA, float32 on the CPU)",
                        choices=("auto", "float32", "bfloat16"))
    compile: bool = option(False, "torch.compile the model")
    eval_interval: int = option(250, "steps between validations and checkpoints")
    eval_seqs: int = option(16, "validation sequences of 8 T tokens (--task: held-out batches)")
    log_interval: int = option(10, "steps between log lines")
    save_every: int = option(None, "also keep a copy of the checkpoint every N steps (ckpt_STEP.pt), to look at "
                                   "the model along its training")
    stop_at: int = option(None, "stop after this step with a checkpoint (continue with --resume)")


def parse(argv):
    """{option: value} of the flags given on the command line: TrainConfig's, the interventions' and ModelConfig's."""
    interventions = {name: (name, type(default), f"{help} (--init {' or '.join(runs.ONLY_FOR[name][1])})", None)
                     for cls in INITS.values() for name, (default, help) in cls.options.items()}
    return runs.parse("train.py", __doc__, argv, {"training (TrainConfig)": TrainConfig,
                                                   "interventions (interventions.py)": list(interventions.values()),
                                                   "model (model.ModelConfig; from the preset, or --init_from)":
                                                       ModelConfig})


# every option's default: TrainConfig's, ModelConfig's and the interventions'
DEFAULTS = {**{f.name: f.default for cls in (TrainConfig, ModelConfig) for f in fields(cls) if "help" in f.metadata},
            **{name: default for cls in INITS.values() for name, (default, _) in cls.options.items()}}


def load_model(spec):
    """The model --init_from names, on the CPU: a checkpoint of this project, or an official one (pretrained/)."""
    if runs.is_checkpoint(spec):
        return runs.load_model(spec)
    import pretrained

    return pretrained.load_pretrained(spec)


def reads_text(task):
    """Whether --task is written in words, so that only a language model in its own tokenizer can learn it."""
    if task == "lm":
        return False
    import tasks

    return tasks.TASKS[task].needs_tokenizer


# ----------------------------------------------------------------------------------------------------------------
# A run: what the loop reads from, built in this order
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one training process holds (built by build_run): its options and place among the processes,
    the data, the model (and trained: the same model compiled or wrapped for several processes), the optimizer,
    the intervention, and how far it has come."""
    args: object
    rank: int
    world: int
    device: torch.device
    last_step: int  # where this invocation stops: --max_steps, or --stop_at
    autocast: object = None
    batches: object = None  # data.CorpusBatches or tasks.TaskBatches
    model: LM = None
    trained: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    intervention: object = None
    step: int = 0
    saved_step: int = None
    tokens: int = 0  # read by this process in this invocation
    is_main: bool = False  # rank 0, which writes and shows what the run does


def build_run(args, rank, world, device, base=None):
    """A Run for these options: the data, the model (resumed, post-trained from base, or fresh), the optimizer and
    the intervention, with what a resumed run had reached. Raises UsageError."""
    run = Run(args, rank, world, device, last_step=min(args.max_steps, args.stop_at or args.max_steps),
              is_main=rank == 0)
    run.autocast, compute_dtype = runs.autocast_for(device, args.dtype)
    seed = (args.seed * 1000 + rank) * 2  # the data and the intervention must not draw the same numbers
    ckpt = runs.load_checkpoint(args.out_dir, require=("model_config", "model", "optimizer", "step", "ranks")) \
        if args.resume else None
    if args.task == "lm":
        if world > 1 and rank > 0:  # rank 0 prepares a missing default corpus while the others wait
            dist.barrier()
        corpus = load_corpus(args.data, args.data_dir)
        if world > 1 and rank == 0:
            dist.barrier()
        vocab_size = corpus.vocab_size
    else:
        import tasks

        task = tasks.build(args)
        args.seq_len, vocab_size = task.train_tokens, task.vocab_size  # T: the longest training example
    saved = ckpt["model_config"] if ckpt else asdict(base.cfg) if base else None
    try:
        cfg = ModelConfig(**{**saved, **{k: getattr(args, k) for k in ModelConfig.COMPUTATION}}) if saved else \
            ModelConfig(vocab_size=vocab_size, **{f.name: getattr(args, f.name) for f in fields(ModelConfig)
                                                  if "help" in f.metadata})
    except (TypeError, ValueError) as error:
        raise runs.UsageError(f"{error}: change the model flags") from None
    held = 4 * base.num_parameters() if base is not None and device.type == "cpu" else 0
    if cfg.backend == "triton":
        runs.check_backend(cfg, device, compute_dtype)
    runs.check_memory(args, device, cfg=cfg, held=held)  # before the model or the validation data are allocated
    run.batches = (CorpusBatches(corpus, args, rank, world, seed, streams=INITS[args.init].uses_streams)
                   if args.task == "lm" else tasks.TaskBatches(task, args, seed))
    if ckpt is not None:
        run.model = runs.load_model(ckpt, device, **{k: getattr(cfg, k) for k in ModelConfig.COMPUTATION}).train()
    elif base is not None:
        refusal = run.batches.refusal(base)
        if refusal:
            raise runs.UsageError(f"cannot post-train {args.init_from} on {run.batches.describe()['name']}: "
                                  f"{refusal}")
        base.cfg = cfg  # the same architecture; how the scan runs may differ
        run.model = base.to(device)
    else:
        torch.manual_seed(args.seed)
        run.model = LM(cfg).to(device)
    runs.check_memory(args, device, model=run.model, compute_dtype=compute_dtype, autocast=run.autocast, held=held)
    vars(args).update({f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if "help" in f.metadata})
    decay = [p for p in run.model.parameters() if p.dim() >= 2]  # AdamW's weight decay: matrices (and embeddings,
    no_decay = [p for p in run.model.parameters() if p.dim() < 2]  # conv kernels), not norms, biases, A_log, D
    run.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                                      fused=device.type == "cuda")
    options = {name: getattr(args, name) for name in INITS[args.init].options}
    run.intervention = INITS[args.init](run.model, seed=seed + 1, **options)
    if ckpt is not None:
        runs.restore(run, ckpt)
    run.trained = torch.compile(run.model) if args.compile else run.model
    if world > 1:
        run.trained = torch.nn.parallel.DistributedDataParallel(
            run.trained, device_ids=[device.index] if device.type == "cuda" else None)
    return run


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    return runs.one_line("train.py", train_all, argv)


def train_all(argv):
    """Train what the command line asks for: first the automatic pre-training when the recipe needs one."""
    given = parse(sys.argv[1:] if argv is None else argv)
    runs.check_options(given)
    world = 1
    try:
        rank, world, device = runs.setup_distributed(given.get("device", "auto"))
        base_run = runs.base_run(given, reads_text)
        if base_run is not None:  # the recipe in one command: pre-train the zero-init model first
            if rank == 0:
                print(f"{runs.default_out_dir(base_run.get('task', 'lm'), base_run.get('preset', 'demo'), 'zero')} "
                      f"does not exist yet: pre-training it first; the post-training follows", file=sys.stderr)
            try:
                train_one(base_run, rank, world, device, then="the post-training follows")
            except runs.Stopped as stop:
                raise runs.Stopped(f"{stop}; then run this command again for the post-training") from None
        train_one(given, rank, world, device)
        if world > 1:  # gloo's threads let go of the last collective before Python shuts down (pytorch#190489)
            dist.barrier()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_one(given, rank, world, device, then=None):
    """Resolve the options, build the run, train it in its folder (then: what follows it in this command)."""
    args, base = runs.resolve(given, DEFAULTS, load_model, reads_text)
    runs.check_out_dir(args)
    run = build_run(args, rank, world, device, base)
    if run.is_main:
        per_step, mode = args.batch_size * args.grad_accum * world, "resuming" if args.resume else (
            "post-training " + args.init_from if args.init_from else "training")
        split = f" ({args.batch_size} x {args.grad_accum} micro-batches x {world} processes)" \
            if per_step != args.batch_size else ""
        print(f"{mode} with --init {args.init}: {run.model.num_parameters() / 1e6:.2f}M parameters, {args.mixer}, "
              f"{per_step} sequences of {args.seq_len} tokens per step{split}, {args.max_steps} steps, device "
              f"{device}, out {args.out_dir}", file=sys.stderr)
        runs.warn_if_slow(run.model, args, device)
    with runs.RunFolder(run, then) as folder:
        train(run, folder)


if __name__ == "__main__":
    main()
