"""delta_rule/scan.py: the delta rule, one step at a time and in chunks, with an initial and a final state.

Per batch row and head, with a state S of shape (P, N) as in scan_kernels.py (P value width, N key width):

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T      alpha_t = exp(log_decay_t), log_decay <= 0
    y_t = S_t q_t                                                        (read after the update, as in scan_kernels)
    S_{-1} = initial_state  (zeros when None)             final_state = S_{L-1}

DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", arXiv
2406.06484) has no gate, alpha_t = 1 (log_decay=None); Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks:
Improving Mamba2 with Delta Rule", arXiv 2412.06464) has one alpha_t per head and step, as Mamba-2. beta_t in [0, 1]
is one number per head and step. Read as an edit of a memory: S_{t-1} k_t is what the memory returns at key k_t, and
the step, rewritten,

    S_t = alpha_t S_{t-1} + u_t k_t^T,      u_t = beta_t (v_t - alpha_t S_{t-1} k_t)

moves what it returns there a fraction beta_t of the way to v_t (all of it for beta_t = 1 and a unit k_t, which the
models ensure by L2-normalising k). u_t, the value actually written, is the only difference from scan_kernels'
recurrence S_t = exp(log_decay_t) S_{t-1} + v_t k_t^T: with u in place of v, its four chunked pieces hold as they are.

No scale is applied to q here, as in scan_kernels.py: flash-linear-attention's functions multiply q by `scale`
(N^-0.5 by default), which a caller does by passing q * N ** -0.5. Its states are laid out (N, P), the transpose of
this project's (P, N).

The chunked algorithm. Within a chunk of C positions let g_i = log_decay_0 + ... + log_decay_i (restarted per chunk)
and S_prev the state entering it. Then alpha_i S_{i-1} = exp(g_i) S_prev + sum_{j<i} exp(g_i - g_j) u_j k_j^T, and
the definition of u_i becomes a linear system over the chunk's values, rows u_i of U (C, P):

    u_i + sum_{j<i} beta_i exp(g_i - g_j) (k_i . k_j) u_j = beta_i v_i - beta_i exp(g_i) S_prev k_i
    (I + A) U = diag(beta) V - diag(beta exp(g)) K S_prev^T,      A_ij = beta_i exp(g_i - g_j) (k_i . k_j), j < i

I + A is unit lower triangular, so with T = (I + A)^-1 (the "UT transform"),

    U = U0 - W S_prev^T,        U0 = T diag(beta) V   (C, P),        W = T diag(beta exp(g)) K   (C, N)

U0 and W depend on the chunk alone, and W is the WY representation of the chunk's product of transitions:
substituting U into the hand-over below gives S_end = S_prev (exp(g_last) I - sum_j exp(g_last - g_j) w_j k_j^T) +
sum_j exp(g_last - g_j) u0_j k_j^T, a rank-C correction of the identity. Per chunk, in order:

    1. the values written   U = T (diag(beta) V - diag(beta exp(g)) K S_prev^T)     (= U0 - W S_prev^T)
    2. the output           y_i = exp(g_i) S_prev q_i + sum_{j<=i} exp(g_i - g_j) (q_i . k_j) u_j
    3. the hand-over        S_end = exp(g_last) S_prev + sum_j exp(g_last - g_j) u_j k_j^T

flash-linear-attention's GPU kernels compute U0 and W for every chunk in parallel and leave only W S_prev^T to the
pass over chunks. Here the chunks are walked in order anyway (a CPU's cache favours it), so T is applied once to step
1's whole right-hand side: a triangular solve (forward substitution; T itself is never formed) of P columns instead
of P + N, and no W to keep. Steps 2 and 3 are
scan_kernels' pieces with u in place of v. Every exponent is g_i - g_j with i >= j, g_i or g_last - g_j: all <= 0,
so nothing overflows however strong the gate (masked entries get -inf before exp, as in scan_kernels._masked_decay),
and as g restarts every chunk its magnitude never grows with L. Zero padding to whole chunks is harmless:
beta = k = v = 0 and log_decay = 0 write nothing and decay nothing.

The file reads: the step-by-step definition (delta_rule_reference, float64, with the transition as an explicit
(N, N) matrix), the one-token step (delta_rule_step), then the chunked path (chunked_delta_rule).
"""
import contextlib

import torch

from scan_kernels import _check_inputs, _chunk_views, _masked_decay, _to_chunks


def _check_delta_inputs(q, k, v, beta, log_decay, initial_state):
    """scan_kernels' shape checks, plus beta (B, L, H) and a gate that is one number per head and step; returns
    (B, L, G, N)."""
    gate = log_decay if log_decay is not None else torch.empty(q.shape[:2] + v.shape[2:3], device="meta")
    B, L, G, N = _check_inputs(q, k, v, gate, initial_state)
    H = v.shape[2]
    if gate.dim() != 3:
        raise ValueError(f"the delta rule's gate is one number per head and step: log_decay (B, L, H) = {(B, L, H)} "
                         f"or None; got {tuple(gate.shape)}")
    if beta.shape != (B, L, H):
        raise ValueError(f"beta must be (B, L, H) = {(B, L, H)}; got {tuple(beta.shape)}")
    return B, L, G, N


# ----------------------------------------------------------------------------------------------------------------
# The definition, and the step for generation
# ----------------------------------------------------------------------------------------------------------------

def delta_rule_reference(q, k, v, beta, log_decay=None, initial_state=None, *, chunk_size=64):
    """The recurrence one step at a time in float64, written straight from S_t = alpha_t S_{t-1} (I - beta_t k_t
    k_t^T) + beta_t v_t k_t^T with the transition as an (N, N) matrix: slow, obviously right, the definition the
    fast paths are tested against.

    q, k (B, L, G, N); v (B, L, H, P); beta (B, L, H); log_decay (B, L, H) or None (no gate: DeltaNet);
    initial_state (B, H, P, N) or None. Returns y (B, L, H, P) in v's dtype and final_state (B, H, P, N) in
    float32 (float64 for float64 inputs). chunk_size is accepted so that the signature matches chunked_delta_rule.
    """
    B, L, G, N = _check_delta_inputs(q, k, v, beta, log_decay, initial_state)
    H, P = v.shape[2], v.shape[3]
    y_dtype, state_dtype = v.dtype, torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k = (x.double().repeat_interleave(H // G, dim=2) for x in (q, k))  # head h reads group h // R: (B, L, H, N)
    v, beta = v.double(), beta.double()[..., None, None]  # beta (B, L, H, 1, 1)
    alpha = (torch.zeros_like(beta) if log_decay is None else log_decay.double()[..., None, None]).exp()
    identity = torch.eye(N, dtype=torch.float64, device=v.device)
    state = (torch.zeros(B, H, P, N, dtype=torch.float64, device=v.device) if initial_state is None
             else initial_state.double())
    outputs = []
    for t in range(L):
        k_t = k[:, t, :, :, None]  # (B, H, N, 1)
        transition = alpha[:, t] * (identity - beta[:, t] * k_t @ k_t.transpose(-1, -2))  # (B, H, N, N)
        state = state @ transition + beta[:, t] * v[:, t, :, :, None] @ k_t.transpose(-1, -2)  # S_t: (B, H, P, N)
        outputs.append((state @ q[:, t, :, :, None]).squeeze(-1))  # y_t = S_t q_t: (B, H, P)
    return torch.stack(outputs, dim=1).to(y_dtype), state.to(state_dtype)


def delta_rule_step(q, k, v, beta, log_decay=None, state=None):
    """One token of the recurrence, O(P N) per head, for generation: S = alpha S, then u = beta (v - S k),
    S += u k^T, y = S q.

    q, k (B, G, N); v (B, H, P); beta (B, H); log_decay (B, H) or None; state (B, H, P, N) or None (zeros).
    Returns y (B, H, P) in v's dtype and the new state (B, H, P, N) in float32 (float64 for float64 inputs); the
    caller's state is left as it was.
    """
    B, G, N = q.shape
    H, P = v.shape[1], v.shape[2]
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    if state is None:
        state = torch.zeros(B, H, P, N, dtype=dtype, device=v.device)
    alpha = 1.0 if log_decay is None else torch.exp(log_decay.to(dtype)).view(B, H, 1, 1)
    state = alpha * state.to(dtype)  # a new tensor (the product), updated in place below
    # the R = H // G heads of a group share its k and q: one (R * P, N) matrix per group, one product each
    grouped = state.view(B * G, H // G * P, N)
    k_column = k.to(dtype).reshape(B * G, N, 1)
    recalled = torch.bmm(grouped, k_column).view(B, H, P)  # alpha S_{t-1} k_t: what the memory returns at k_t
    written = beta.to(dtype)[..., None] * (v.to(dtype) - recalled)  # u_t: (B, H, P)
    grouped.baddbmm_(written.view(B * G, H // G * P, 1), k_column.transpose(1, 2))  # S_t = alpha S_{t-1} + u_t k_t^T
    y = torch.bmm(grouped, q.to(dtype).reshape(B * G, N, 1)).view(B, H, P)
    return y.to(v.dtype), state


# ----------------------------------------------------------------------------------------------------------------
# The chunked algorithm
# ----------------------------------------------------------------------------------------------------------------

def chunked_delta_rule(q, k, v, beta, log_decay=None, initial_state=None, *, chunk_size=64):
    """Run S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, y_t = S_t q_t from initial_state, in
    chunks (the WY / UT form above), differentiable in every input by autograd.

    q, k          (B, L, G, N)   head h reads q/k group h // (H // G); DeltaNet L2-normalises them
    v             (B, L, H, P)
    beta          (B, L, H)      the writing strength, usually in [0, 1] (a sigmoid)
    log_decay     (B, L, H)      <= 0, one per head and step (Gated DeltaNet), or None (DeltaNet)
    initial_state (B, H, P, N) or None (the zero state)
    returns y (B, L, H, P) in v's dtype, final_state (B, H, P, N) in float32 (float64 for float64 inputs)

    A chunk longer than the sequence is shortened to it. Activation memory grows as B H L (C + N + P + P N / C):
    (C, C) products inside each chunk and one state per chunk, nothing L x L.
    """
    _check_delta_inputs(q, k, v, beta, log_decay, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    chunk_size = min(chunk_size, q.shape[1])
    if log_decay is None:  # DeltaNet: alpha = 1 everywhere
        log_decay = beta.new_zeros(beta.shape)
    initial_state = None if initial_state is None else initial_state.to(dtype)
    no_autocast = contextlib.nullcontext() if q.device.type == "meta" else torch.autocast(q.device.type, enabled=False)
    with no_autocast:  # the triangular solve and the products in float32 even inside an autocast region
        y, final_state = _chunked(*(x.to(dtype) for x in (q, k, v, beta, log_decay)), initial_state, chunk_size)
    return y.to(v.dtype), final_state


def _chunked(q, k, v, beta, log_decay, initial_state, chunk_size):
    """Steps 1-3 above, chunk after chunk.  q, k (B, L, G, N); v (B, L, H, P); beta, log_decay (B, L, H);
    initial_state (B, H, P, N) or None; all in the state's dtype.  Returns y (B, L, H, P) and the final state.

    As in scan_kernels._scan_torch_scalar, walking the chunks keeps every intermediate small enough for a CPU's
    cache. k and q of a chunk are stacked into one (2C, N) matrix, so that each of the two products with k^T and
    with S_prev^T serves both: [K; Q] K^T gives A's products and the output's scores, [K; Q] S_prev^T what the state
    returns at every key and every query.
    """
    B, L, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    R, C = H // G, chunk_size
    cum = _to_chunks(log_decay, C).cumsum(2)  # g_i, restarted at every chunk: (B, nc, C, H)
    cum = cum.unflatten(3, (G, R)).permute(1, 0, 3, 4, 2).contiguous()  # (nc, B, G, R, C)
    from_start = torch.exp(cum)[..., None]  # exp(g_i): (nc, B, G, R, C, 1)
    to_end = torch.exp(cum[..., -1:] - cum)[..., None]  # exp(g_last - g_j): (nc, B, G, R, C, 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # True where i >= j

    state = (torch.zeros(B, G, R, P, N, dtype=v.dtype, device=v.device) if initial_state is None
             else initial_state.reshape(B, G, R, P, N))  # the initial state enters here
    outputs = []
    for q_c, k_c, v_c, beta_c, cum_c, from_start_c, to_end_c in zip(
            _chunk_views(q, C, G), _chunk_views(k, C, G), _chunk_views(v, C, G), _chunk_views(beta[..., None], C, G),
            cum, from_start, to_end):
        keys_and_queries = torch.cat([k_c, q_c], dim=3)  # (B, G, 1, 2C, N): shared by the R heads of a group
        k_c, v_c, beta_c = keys_and_queries[..., :C, :], v_c.contiguous(), beta_c.contiguous()
        decay = _masked_decay(cum_c, causal).repeat(1, 1, 1, 2, 1)  # exp(g_i - g_j), i >= j, else 0: (.., 2C, C)
        products = (keys_and_queries @ k_c.transpose(-1, -2)) * decay  # (B, G, R, 2C, C)
        recalled = (keys_and_queries * from_start_c.repeat(1, 1, 1, 2, 1)) @ state.transpose(-1, -2)  # (.., 2C, P)
        # 1. A's diagonal and upper triangle are never read: unitriangular takes I + A's diagonal as 1
        A = beta_c * products[..., :C, :]  # beta_i exp(g_i - g_j) (k_i . k_j): (B, G, R, C, C)
        u = torch.linalg.solve_triangular(A, beta_c * (v_c - recalled[..., :C, :]), upper=False, unitriangular=True)
        outputs.append(products[..., C:, :] @ u + recalled[..., C:, :])  # 2. (B, G, R, C, P)
        state = torch.addcmul((u * to_end_c).transpose(-1, -2) @ k_c, from_start_c[..., -1:, :], state)  # 3.
    y = torch.stack(outputs, dim=1).permute(0, 1, 4, 2, 3, 5).reshape(B, -1, H, P)[:, :L]  # (B, nc, C, G, R, P)
    return y, state.reshape(B, H, P, N)
