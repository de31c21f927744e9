"""interventions.py: where the recurrent state of each training sequence starts.

Read first: Buitrago Ruiz & Gu (arXiv 2507.02782), Section 3 for the hypothesis and Section 4 for these
interventions. The unexplored-states hypothesis: a recurrent model trained only from the zero state on sequences of
length T never sees the states that positions far beyond T produce, so its behaviour there is untrained. The remedy
is to start training sequences from states like those: each class below decides the initial state of the next batch
and may look at the (detached) final state of the batch just trained on.

    zero           the usual zero state                                          (the baseline and control)
    random_noise   iid N(0, noise_std^2) SSM states                              (crude, cheap)
    fitted_noise   N(mean, std^2) per layer and head, fitted to real final states (noise at the right scale)
    state_passing  the final state of the previous batch: real states of an earlier, unrelated sequence
    tbptt          the final state of the previous chunk of the same text stream (truncated backpropagation
                   through time): the batches are contiguous streams, see data.StreamBatcher

All of them can send a fraction p_zero of the rows back to the zero state (a common practical mix): with state
passing, this makes the chains of passed states geometrically long, so states from every depth are visited, not only
the zero start and the long-run regime. Gradients never flow into an initial state: states handed on are detached.

Each class declares its own options ({name: (default, help)}); train.py offers every one of them as a flag --name
and builds the chosen strategy as INITS[args.init](model, seed=..., **its options), refusing the options of the
others. A new strategy is a class here with its options, and its entry in INITS.
"""
import torch

from model import State


class Intervention:
    """The interface: initial_state() before each batch, observe() after it, state_dict() for checkpoints.

    options: the strategy's own settings, {name: (default, help)}; each becomes an attribute of the instance, its
    value given to __init__ or the default."""

    options = {"p_zero": (0.0, "fraction of rows that start from the zero state instead")}
    uses_streams = False  # True when batches must be contiguous streams (tbptt)

    def __init__(self, model, seed=0, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no option {', '.join(sorted(unknown))}")
        for name, (default, _) in self.options.items():
            setattr(self, name, options.get(name, default))
        self.model, self.seed = model, seed
        self.generator = None  # created on the device of the first batch, so sampling costs no transfer

    def _rng(self, device):
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def initial_state(self, batch_size, device, restarted=None):
        """The State the next batch starts from, or None for the zero state (which is cheaper to run).

        restarted (B,) bool marks rows whose text does not continue the previous batch (tbptt only).
        """
        state = self.propose(batch_size, device, restarted)
        if state is not None and self.p_zero > 0:
            reset = torch.rand(batch_size, generator=self._rng(device), device=device) < self.p_zero
            state = state.zero_rows(reset)
        return state

    def propose(self, batch_size, device, restarted):
        return None

    def observe(self, final_state):
        """Called with the detached State after the batch just trained on."""

    def state_dict(self):
        return {"generator": None if self.generator is None else self.generator.get_state(),
                "generator_device": None if self.generator is None else str(self.generator.device)}

    def load_state_dict(self, d):
        if d.get("generator") is not None:
            self._rng(d["generator_device"]).set_state(d["generator"])


class Zero(Intervention):
    """Every sequence starts from the zero state: standard training."""

    options = {}


class RandomNoise(Intervention):
    """SSM states drawn iid from N(0, noise_std^2); convolution states zero (they hold recent inputs, not memory)."""

    options = {**Intervention.options, "noise_std": (0.1, "std of the noise states")}

    def propose(self, batch_size, device, restarted):
        zero = self.model.init_state(batch_size, device)
        rng = self._rng(device)
        return State([torch.randn(s.shape, generator=rng, device=device) * self.noise_std for s in zero.ssm],
                     zero.conv)


class FittedNoise(Intervention):
    """SSM states drawn iid from N(mean, std^2) with a mean and std per layer and per head, fitted to the final
    states of the batches trained on so far (a running estimate over every entry of every observed state).

    Before the first batch nothing has been observed, so the first batch starts from the zero state; its final
    states seed the fit. Noise at the scale of real states, without their structure. Later batches start from this
    noise, so the fit follows final states reached from noisy starts too: after T tokens these are real states of
    the model, but a model whose memory outlasts T carries some of the noise into them (a feedback the paper's fit
    to zero-start states does not have).
    """

    count = 0  # entries seen per head (the same for every layer and head)
    sums = None  # per layer: (H,) float64 sums of entries
    sums_sq = None  # per layer: (H,) float64 sums of squared entries

    def observe(self, final_state):
        per_head = [s.double().transpose(0, 1).flatten(1) for s in final_state.ssm]  # (H, B * P * N) per layer
        sums = [x.sum(1) for x in per_head]
        sums_sq = [x.pow(2).sum(1) for x in per_head]
        if self.sums is None:
            self.sums, self.sums_sq = sums, sums_sq
        else:
            self.sums = [a + b for a, b in zip(self.sums, sums)]
            self.sums_sq = [a + b for a, b in zip(self.sums_sq, sums_sq)]
        self.count += per_head[0].shape[1]

    def statistics(self):
        """Per layer, (mean (H,), std (H,)) of the observed entries, or None before any observation."""
        if self.sums is None:
            return None
        means = [s / self.count for s in self.sums]
        stds = [(sq / self.count - m.pow(2)).clamp_min(0).sqrt() for sq, m in zip(self.sums_sq, means)]
        return list(zip(means, stds))

    def propose(self, batch_size, device, restarted):
        stats = self.statistics()
        if stats is None:
            return None
        zero = self.model.init_state(batch_size, device)
        rng = self._rng(device)
        ssm = []
        for s, (mean, std) in zip(zero.ssm, stats):
            shape = (-1, 1, 1)  # one mean and std per head, broadcast over (P, N)
            noise = torch.randn(s.shape, generator=rng, device=device)
            ssm.append(mean.float().to(device).view(shape) + std.float().to(device).view(shape) * noise)
        return State(ssm, zero.conv)

    def state_dict(self):
        return {**super().state_dict(), "count": self.count, "sums": self.sums, "sums_sq": self.sums_sq}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.count, self.sums, self.sums_sq = d["count"], d["sums"], d["sums_sq"]


class StatePassing(Intervention):
    """Each batch starts from the final state of the previous batch: a real state, reached by reading an earlier,
    unrelated sequence, detached so gradients stay inside the batch. The convolution state is passed too unless
    ssm_only (it holds the previous batch's last inputs). The first batch starts from zero."""

    options = {**Intervention.options, "ssm_only": (False, "pass the SSM state only, not the convolution state")}
    previous = None  # the final State of the previous batch

    def observe(self, final_state):
        self.previous = final_state.detach()

    def propose(self, batch_size, device, restarted):
        if self.previous is None:
            return None
        if self.ssm_only:
            return State(self.previous.ssm, self.model.init_state(batch_size, device).conv)
        return self.previous

    def state_dict(self):
        # the State as a plain dict of lists of tensors, which torch.load(weights_only=True) accepts
        return {**super().state_dict(), "previous": None if self.previous is None else vars(self.previous)}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.previous = None if d["previous"] is None else State(**d["previous"])


class TBPTT(StatePassing):
    """Truncated backpropagation through time: batches are contiguous streams, so row i's final state is the true
    state at the start of row i's next window; rows whose stream restarted begin from zero. Gradients stop at the
    window boundaries (the state is detached)."""

    uses_streams = True

    def propose(self, batch_size, device, restarted):
        state = super().propose(batch_size, device, restarted)
        if state is not None and restarted is not None and restarted.any():
            state = state.zero_rows(restarted.to(device))
        return state


INITS = {"zero": Zero, "random_noise": RandomNoise, "fitted_noise": FittedNoise, "state_passing": StatePassing,
         "tbptt": TBPTT}  # --init NAME -> its class
