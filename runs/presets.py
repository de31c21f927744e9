"""runs/presets.py: whole configurations for train.py --preset NAME, as data.

Each preset gives values to any option of train.TrainConfig or model.ModelConfig; "post" holds what changes when
post-training (--init_from, or an --init other than zero); "init_from" names the model a preset post-trains. How
presets combine with the other sources of an option is written once, in runs.resolve.
"""

PRESETS = {
    # a 0.5M-parameter byte-level Mamba-2 on the Python standard library's source, for a laptop CPU
    "demo": dict(mixer="mamba2", d_model=128, n_layer=4, d_state=64, headdim=32,
                 post=dict(max_steps=500, lr=1e-3, warmup_steps=20)),
    # the same size with GLA's per-channel gate (RESULTS.md, "Gated linear attention")
    "gla": dict(mixer="gla", d_model=128, n_layer=4, n_heads=4, post=dict(max_steps=500, lr=1e-3, warmup_steps=20)),
    # the copy task at CPU size, one example per row: a zero-init 0.48M Mamba-2 that copies every string of up to
    # n_train = 16 characters and fails on longer ones (tasks/copy.py; RESULTS.md, "Synthetic copying")
    "copy": dict(task="copy", mixer="mamba2", d_model=128, n_layer=4, d_state=64, headdim=32, alphabet_size=16,
                 batch_size=64, max_steps=3000, chunk_size=16, eval_interval=500, eval_seqs=8,
                 post=dict(max_steps=600, lr=1e-3, min_lr=1e-4, warmup_steps=30, eval_interval=300)),
    # for GPUs: a 129M-parameter Mamba-2 (the official mamba2-130m's size) at T = 2048 with GPT-2 tokens ...
    "paper": dict(mixer="mamba2", d_model=768, n_layer=24, recompute=True, data="stdlib-gpt2", seq_len=2048,
                  grad_accum=4, max_steps=20000, warmup_steps=1000, eval_interval=1000,
                  post=dict(max_steps=500, lr=3e-4, warmup_steps=50)),
    # ... and a GLA near the paper's (Figure 1c: trained at T = 512), 0.5M tokens a step, on GPT-NeoX tokens
    "gla-paper": dict(mixer="gla", d_model=1024, n_layer=24, n_heads=4, recompute=True, data="pile-neox",
                      seq_len=512, batch_size=32, grad_accum=32, max_steps=20000, lr=3e-4, min_lr=3e-5,
                      warmup_steps=1000, eval_interval=1000, post=dict(max_steps=500, lr=1e-4, warmup_steps=50)),
}
# Post-training the official models (pretrained/) at their T = 2048 on a corpus of their GPT-NeoX tokens (python -m
# corpora --input PATH --tokenizer EleutherAI/gpt-neox-20b --name pile-neox), as the paper does: Mamba-2 for 500
# steps, Mamba-1 for 1000. A step is 256 sequences of 2048 tokens (0.5M tokens) as batch_size x grad_accum on one
# process (under torchrun, divide --grad_accum by the processes). The architecture comes from the model itself.
for _name, _batch in (("mamba2-130m", 16), ("mamba2-370m", 8), ("mamba2-780m", 4), ("mamba2-1.3b", 2),
                      ("mamba-130m", 16), ("mamba-370m", 8), ("mamba-790m", 4), ("mamba-1.4b", 2)):
    PRESETS[_name] = dict(init_from=f"state-spaces/{_name}", recompute=True, data="pile-neox", seq_len=2048,
                          batch_size=_batch, grad_accum=256 // _batch,
                          max_steps=500 if _name.startswith("mamba2") else 1000, lr=3e-4, min_lr=3e-5,
                          warmup_steps=50, eval_interval=100)

TASK_DEFAULTS = {"passkey": dict(max_steps=1000)}  # the paper fine-tunes on passkeys for 1000 steps

# flash-linear-attention's public checkpoints (pretrained/fla.py), post-trained as the official Mamba-2 models are:
# 500 steps of 0.5M tokens on a corpus in their own tokens. fla-hub's folders hold their tokenizer (python -m corpora
# --input PATH --tokenizer fla-hub/gla-1.3B-100B --name slimpajama-fla); linear-moe-hub's hold none. T = 2048 is an
# assumption: neither their model cards nor their configs state a training length (RESULTS.md says what is known).
for _name, _hub, _batch in (("gla-1.3b", "fla-hub/gla-1.3B-100B", 4), ("deltanet-1.3b", "fla-hub/delta_net-1.3B-100B", 4),
                            ("gated-deltanet-340m", "linear-moe-hub/Gated-Deltanet-340M", 8),
                            ("gated-deltanet-1.3b", "linear-moe-hub/Gated-Deltanet-1.3B", 4)):
    PRESETS[_name] = dict(init_from=_hub, recompute=True, data="slimpajama-fla", seq_len=2048, batch_size=_batch,
                          grad_accum=256 // _batch, max_steps=500, lr=3e-4, min_lr=3e-5, warmup_steps=50,
                          eval_interval=100)
