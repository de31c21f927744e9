"""delta_rule: the delta rule (DeltaNet) and its gated form (Gated DeltaNet) under this project's State.

scan_kernels.py runs recurrences whose transition is diagonal: the state decays, then v_t k_t^T is added. The delta
rule first erases what the memory held at key k_t, so its transition is a full (N, N) matrix,

    DeltaNet        S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    Gated DeltaNet  S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   alpha_t = exp(log_decay_t)
    y_t = S_t q_t

with the same state S (B, H, P, N), initial_state and final_state, and needs its own chunked algorithm (the WY / UT
form of Yang et al. 2024). delta_rule/scan.py holds the math, a step-by-step definition in float64, a one-token step
for generation and the chunked PyTorch path with every gradient; delta_rule/mixers.py the two mixers built on it
(--mixer deltanet, --mixer gated_deltanet), which model.py imports so that they join model.MIXERS. The default
commands (a Mamba-2) call none of this folder's functions (tests/test_fla.py).

    from delta_rule import chunked_delta_rule
    y, state = chunked_delta_rule(q, k, v, beta, log_decay, initial_state)   # shapes: delta_rule/scan.py
"""
from delta_rule.scan import chunked_delta_rule, delta_rule_reference, delta_rule_step

__all__ = ["chunked_delta_rule", "delta_rule_reference", "delta_rule_step"]
