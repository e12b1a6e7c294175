"""Muon: momentum, then the duality map of each parameter's layer kind (docs/MATH.md)."""

import contextlib
import math
import warnings

import torch

from .distributed import WORLD, is_dtensor
from .distribution import OneProcess, make_distribution
from .kinds import KINDS, LR_SCALES, MATRIX
from .newton_schulz import COEFFICIENTS, ROUNDINGS, Coefficients, resolve_coefficients
from .state import check_muon_state_dict, with_keys_since, with_pending_gradients, without_pending_gradients
from .update import STATE_DTYPES, STEP_ROUNDINGS, kind_update, resting


class Muon(torch.optim.Optimizer):
    """Steepest descent under each layer's own norm: momentum, then the duality map of its kind.

    Each param group has a `kind` (optim.KINDS); with g the gradient and m(·) the momentum below,
    the update u (applied as p ← p·(1 − lr·wd) − lr·u) is:

        hidden       orthogonalize(m(g)) · lr_scale(d_out, d_in)
        conv         dualize_conv2d(m(g))
        embed        m(dualize_embed(g))
        head_linear  dualize_linear(m(g))
        head_sign    dualize_sign(m(g))
        adam         torch.optim.AdamW's step (β₁ = momentum, β₂ = beta2, eps, decoupled weight decay)

    `params` takes tensors or param-group dicts, as torch.optim does: one group given is one entry
    of param_groups. One group is one kind: a group without a kind takes torch.optim.Muon's rule,
    "hidden" if all its tensors are 2-D and "adam" if none is; a group mixing the two is refused
    (ValueError), and `optim.param_groups(model)` routes a model's parameters by role. Group keys,
    each defaulting to the constructor argument of its name: lr, momentum, nesterov, weight_decay,
    cautious_wd, ns_steps, ns_coefficients, ns_dtype, ns_eps, ns_rounding, lr_scale, beta2, eps
    and eps_form (Adam's β₂, ε and ε's place: adam_betas[1], adam_eps, adam_eps_form here), and record
    #46's options (docs/MATH.md §4.7), each off by default: normuon, wd_form, lr_mul, step_every,
    matrix_shape, state_dtype, step_rounding; besides them a group may hold kind, role (optim.param_groups),
    initial_lr (torch's schedulers) and pending_steps (step_every's counter); any other key is
    refused. Every value is checked at construction and in add_param_group (ValueError).

    Record #46's options (optim/update.py has the formulas):
    - normuon: None, "row", "column" or "auto" (hidden only): NorMuon's second moment (β₂ = beta2) of
      the orthogonalized update per row or column ("auto": the larger side), divided out, the
      Frobenius norm restored; state "second_moment".
    - wd_form: "decoupled" (p·(1 − lr·wd)) or "in_update" (record #43: the decay lr·wd·p joins the
      update before its step size, so the rate is lr·lr_mul·lr_scale·lr·wd); on every kind, with or
      without cautious_wd.
    - lr_mul: the step size is lr·lr_mul (the record's per-parameter lr_mul; "in_update" decays by lr).
    - step_every: k > 1 steps the group at every k-th step() on the sum of the gradients since
      (record #39's Adam); zero_grad() keeps a resting group's gradients, and its state dict holds them.
    - matrix_shape: (m, n) maps each hidden parameter as the stack of (m, n) matrices its memory holds.
    - state_dtype: the dtype of the group's state (optim/update.py STATE_DTYPES): "float32" (the
      default) at least float32, whatever the parameter's dtype; "param" the parameter's own, so a bf16
      parameter's momentum and NorMuon buffers are bf16 and its update is computed in bf16 (record #46's
      NorMuon on its bf16 gates); "bfloat16" bf16 for every parameter: Adam's moments stored in bf16,
      read into at least float32, rounded once when stored, the step computed from the stored values
      (record #46's DistAdam).
    - step_rounding: where the step's arithmetic rounds. "precise" (the default) computes it in the
      state dtype (at least float32 by default) and rounds each tensor once as stored; "stepwise" is
      record #46's eager ops in its order, each result rounded to the dtype it writes: on adam, its
      DistAdam on bf16 moments (optim/update.py adam_math_stepwise); on a matrix kind (hidden, conv,
      head_linear), its NorMuon, the update kept in ns_dtype from the map on, as its Polar Express
      returns it (optim/update.py matrix_update_stepwise). embed and head_sign take "precise" only.

    `momentum` is every kind's first-moment coefficient: μ below, and β₁ for adam, whose groups
    default to adam_betas[0]. So a scheduler that cycles momentum (OneCycleLR, CyclicLR with
    cycle_momentum) drives every group, and a training loop schedules lr and momentum (e.g. a
    warm-up 0.85 → 0.95) by writing group["lr"] and group["momentum"], read at every step.

    - Momentum m(g), EMA form: buf ← lerp(buf, g, 1−μ); Nesterov u = lerp(g, buf, μ), else u = buf.
    - lr_scale (hidden only): "spectral" √(d_out/d_in), the paper's map, making hidden exactly
      dualize_linear; "muon" √max(1, d_out/d_in), torch.optim.Muon's "original"; "rms"
      0.2·√max(d_out, d_in), Moonlight's match of AdamW's update RMS.
    - Embed dualizes before momentum. A token absent from the batch has a zero gradient row, which
      the map keeps at exactly 0, so that row's momentum decays by μ per step. Dualizing after
      momentum would re-inflate the decaying row to unit RMS, moving every absent token as far as a
      present one on every step.
    - Weight decay is decoupled and uses the group lr, not lr·lr_scale (as torch.optim.Muon);
      cautious_wd=True decays only coordinates where u·p ≥ 0, i.e. where the step already pulls p
      towards 0.
    - Newton–Schulz runs in ns_dtype (None: optim.default_dtype, bf16 on CUDA and on CPUs with
      bf16 dot products, float32 elsewhere), compiled on CUDA. It starts from X₀ = G/(s·‖G‖_F + ε),
      ε = ns_eps (None: the coefficient set's own, 1e-7 for "muon"), normalized in at least float32
      and rounded once, then fused matmul-adds (ns_rounding "precise", the more accurate), or rounded
      to ns_dtype after every operation ("stepwise", the 2025-07-12 record's arithmetic), or normalized
      as "stepwise", then fused matmul-adds ("fused", record #46's Polar Express kernels;
      optim/newton_schulz.py orthogonalize).
    - Adam's ε: adam_eps_form "corrected" adds it to the bias-corrected √v̂ (torch's AdamW), "raw" to
      √v before the correction (the Adam paper's efficient form, the speedrun records' DistAdam;
      optim/update.py adam_math has both formulas). Within a group, matrices of one shape
      are stacked into one batched call: that stack is the unit a distributed step shards.
    - State is kept in float32 (float64 for float64 parameters) whatever the parameter's dtype, so
      a bf16 embedding's Adam moments are float32 and its update is rounded once, as stored; unless
      the group's state_dtype says otherwise (record #46's, above).

    Parameters: real, dense and non-empty (a complex, sparse or size-0 one is refused at
    construction, a sparse gradient at step()); hidden takes (m, n) matrices and (B, m, n) stacks of
    B matrices mapped one by one (a 4-D conv weight is kind "conv").

    State per parameter: "momentum_buffer", or for adam "step" (a 0-dim float32 tensor on the
    parameter's device), "exp_avg", "exp_avg_sq". state_dict() adds "distribution" (this rank, the
    world size) and, while a group rests (step_every), "pending_grad" to each of its parameters' entries:
    p.grad, the gradients summed since its last update (this rank's own and whole, distributed), which
    load_state_dict() puts back into p.grad (None where none was saved, in every group with step_every > 1),
    so that a resumed run steps on the same sums. It holds only tensors, numbers, strings and tuples,
    for torch.load(weights_only=True);
    load_state_dict() refuses, at load, a state dict that is not this optimizer's kind of state, or
    another rank's or world size's. One process also loads a state dict without "distribution", as
    torch.distributed.checkpoint.state_dict's get/set_optimizer_state_dict pass it. A one-process
    Muon can be deep-copied and pickled; a distributed one, which owns a process group and hooks,
    refuses (TypeError).

    Ranks: Muon makes one Distribution (optim/distribution.py: the interface, and OneProcess) when its
    first param group is added and calls it for everything that depends on the ranks.

    Distributed (optim/distributed.py): process_group="world" (the default) means torch.distributed's
    default group when one is initialized, and one process otherwise, refusing to build under
    torchrun (WORLD_SIZE > 1) before init_process_group; None steps each process alone; or pass a
    ProcessGroup. With more than one rank, the optimizer creates its own process group once, at
    construction, broadcasts every parameter from the group's first rank (as DDP does), and then owns
    gradient averaging (no DDP wrapper): gradients are reduce-scattered, each rank steps its share
    (whole matrices for the Newton–Schulz kinds, 1/W of the elements or rows for the others, with
    that share's state only: ZeRO-1), and updated parameters are all-gathered. Each step equals the
    one-process step on the gradient averaged over ranks. p.grad keeps this rank's own gradient.
    unused_parameters (as DDP's find_unused_parameters): False (the default, the speedrun's) requires
    a gradient for every parameter of every group a step updates, on every rank (frozen ones
    included: leave them out of the optimizer), and refuses a missing one (RuntimeError naming it)
    before sending anything more; True leaves a parameter no rank has a gradient for alone, as one
    process does (state, weight decay and step count untouched; one missing on some ranks counts as
    zero there), at the cost of one small all-reduce of has-a-gradient flags per shard. One process
    and fully_shard (p.grad None on every rank or on none) skip a None gradient either way.
    Wrap the last micro-step's backward in `sync_gradients()` so communication overlaps it; clip
    with `clip_grad_norm_`, drop a step with `discard_gradients`, release hooks and the group with
    `close` (or by dropping the optimizer). What would make the ranks disagree is refused on every
    rank (RuntimeError): a p.grad changed between backward and step() (torch.nn.utils.clip_grad_norm_
    clips by this rank's own gradient), and torch.amp.GradScaler (it would skip step() only on the
    ranks whose own gradient has an inf).

    FSDP2 (optim/fsdp.py): on a model sharded with torch.distributed.fsdp.fully_shard, whose
    parameters are DTensors split by rows over a 1-D device mesh, build it the same way
    (`Muon(param_groups(model))`, process_group left "world"). fully_shard averages the gradients;
    each rank steps its rows; a matrix kind's momentum stays sharded and each whole matrix is
    mapped on one rank (round-robin) and returned as rows. Nothing is broadcast: start every rank
    from the same seed or a checkpoint. state_dict() is then DTensors, for torch.distributed.checkpoint
    on any number of ranks. sync_gradients() does nothing: fully_shard's backward communicates
    (model.set_requires_gradient_sync(False) on early micro-steps trades memory for communication).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        cautious_wd: bool = False,
        ns_steps: int = 5,
        ns_coefficients="muon",
        ns_dtype: torch.dtype | None = None,
        ns_eps: float | None = None,
        ns_rounding: str = "precise",
        lr_scale: str = "spectral",
        normuon: str | None = None,
        wd_form: str = "decoupled",
        lr_mul: float = 1.0,
        step_every: int = 1,
        matrix_shape: tuple[int, int] | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_eps_form: str = "corrected",
        state_dtype: str = "float32",
        step_rounding: str = "precise",
        process_group=WORLD,
        unused_parameters: bool = False,
    ):
        # The distribution (optim/distribution.py) is made when torch's constructor adds the first param
        # group, whose tensors say which (DTensors: FSDP); it then takes every group added.
        if not isinstance(unused_parameters, bool):
            raise ValueError(f"Muon: unused_parameters={unused_parameters!r}; expected True or False")
        self._process_group = process_group
        self._unused_parameters = unused_parameters
        if isinstance(params, (set, frozenset)):  # torch refuses a set only as a group's params
            raise TypeError("Muon: params is a set, whose order changes between runs (and with it the state "
                            "dict's parameter indexes); pass a list")
        if not (isinstance(adam_betas, (tuple, list)) and len(adam_betas) == 2):
            raise ValueError(f"Muon: adam_betas={adam_betas!r}; expected a pair (β₁, β₂)")
        self._adam_momentum = adam_betas[0]  # an adam group's momentum (β₁) unless the group sets one
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            cautious_wd=cautious_wd,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype,
            ns_eps=ns_eps,
            ns_rounding=ns_rounding,
            lr_scale=lr_scale,
            normuon=normuon,
            wd_form=wd_form,
            lr_mul=lr_mul,
            step_every=step_every,
            matrix_shape=matrix_shape,
            beta2=adam_betas[1],
            eps=adam_eps,
            eps_form=adam_eps_form,
            state_dtype=state_dtype,
            step_rounding=step_rounding,
        )
        _check_hyperparameters(defaults, "Muon")
        _check_range("Muon: adam_betas[0]", adam_betas[0], 0, 1)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (params listed, sets refused, defaults filled), then the group's kind
        (given, or torch.optim.Muon's by dims) and every key and value checked; ValueError adds nothing."""
        _check_keys(param_group, self.defaults)
        index, given = len(self.param_groups), set(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_sharding(group, sharded=any(is_dtensor(p) for p in self.param_groups[0]["params"]))
            if "kind" not in given:
                group["kind"] = _kind_by_dims(group["params"], index)
            if group["kind"] == "adam" and "momentum" not in given:
                group["momentum"] = self._adam_momentum
            group.setdefault("pending_steps", 0)
            _check_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise
        if index == 0:
            self._distribution = make_distribution(group["params"], self._process_group,
                                                   self._unused_parameters)
        self._distribution.add_group(index, group)  # distributed, a collective: every rank, in order

    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle keep: torch's optimizer state and the Adam β₁; one process only."""
        if not self._distribution.copyable:
            raise TypeError("Muon: a distributed optimizer can't be copied or pickled (it owns a process "
                            "group and gradient hooks); save its state_dict() and load it into a new Muon")
        return {**super().__getstate__(), "_adam_momentum": self._adam_momentum}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.defaults.pop("differentiable")  # torch's __setstate__ adds it; Muon's groups have no such key
        self._process_group, self._distribution = None, OneProcess()

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by torch.amp.GradScaler.step on every rank before it looks at infs; False: GradScaler unscales
        p.grad and skips step() itself, right in one process. Across DataParallel ranks each would skip on
        its own gradient's infs and the ranks' collectives would pair across steps: refused on every rank."""
        if self._distribution.local_gradients:
            raise RuntimeError("Muon: torch.amp.GradScaler with several processes would skip step() on the "
                               "ranks whose own gradient has an inf and not on the others; train under bf16 "
                               "autocast, which needs no GradScaler")
        return False

    def sync_gradients(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Context for the backward of the last micro-step before step(), when `enabled`.

        Inside it, distributed, `loss.backward()` first checks that every nn.Parameter it reaches is
        in this optimizer, then sends each bucket of gradients to the other ranks as soon as its
        gradients are accumulated, overlapping the rest of backward; outside it (earlier
        micro-steps) gradients only accumulate. Misuse fails loudly: a backward that adds to
        gradients already sent, or a p.grad changed after it was sent (e.g. by a DDP wrapper or
        torch.nn.utils.clip_grad_norm_; use this optimizer's clip_grad_norm_), raises RuntimeError.
        Without it, step() sends every gradient as it then is (correct, just not overlapped), and
        refuses one changed since backward accumulated it. With one process it does nothing.

            for micro_step in range(grad_accum):
                with optimizer.sync_gradients(enabled=micro_step == grad_accum - 1):
                    loss.backward()
            optimizer.step()
        """
        return self._distribution.sync_backward() if enabled else contextlib.nullcontext()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._distribution.step(self.param_groups, self._update)
        for group in self.param_groups:
            group["pending_steps"] = group["pending_steps"] + 1 if resting(group) else 0
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, except that a group resting since its last update (step_every > 1, the last
        step() left it alone) keeps its gradients, so that the next backward adds to them: it steps
        on the sum of step_every steps' gradients (record #39's Adam)."""
        kept = [(p, p.grad) for g in self.param_groups if g["pending_steps"] for p in g["params"]]
        for p, _ in kept:
            p.grad = None  # torch's zero_grad then passes over them
        super().zero_grad(set_to_none=set_to_none)
        for p, grad in kept:
            p.grad = grad

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients step() will use by min(1, max_norm/(‖g‖₂ + 1e-6)); returns ‖g‖₂.

        g is every gradient of this optimizer's parameters but those of groups the coming step()
        leaves resting (step_every), averaged over ranks: the result equals
        torch.nn.utils.clip_grad_norm_ on the averaged gradients in one process. The norm is taken
        in float32 and stays on the device (no host sync). Distributed, it first completes the
        gradient collectives and scales this rank's averaged share; p.grad is left as it is.
        Call it after backward and before step().
        """
        return self._distribution.clip_grad_norm_(self.param_groups, max_norm)

    def discard_gradients(self) -> None:
        """Drop this step's gradients without an update, e.g. after a non-finite loss; call on every rank.

        Distributed, it first completes the gradient collectives a synchronized backward started (the
        ranks must stay in step), then forgets them. Gradients are set to None, a resting group's
        (step_every) too: what it accumulated may hold the bad step's; it keeps its place in its cycle.
        """
        self._distribution.discard()
        super().zero_grad(set_to_none=True)

    def close(self) -> None:
        """Remove the gradient hooks and destroy the optimizer's process group; it cannot step after."""
        self._distribution.close()

    def state_dict(self) -> dict:
        """torch's state dict plus "distribution" (the distribution's stamp: rank and world size). On
        fully_shard parameters it holds every parameter's state, zeros where none was made yet, as
        DTensors sharded like the parameter, which torch.distributed.checkpoint saves and loads on any
        number of ranks."""
        state = with_pending_gradients(super().state_dict(), self.param_groups)
        state["distribution"] = self._distribution.stamp()
        return self._distribution.saved(state, self.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, after checking that the state is this optimizer's and this rank's (else ValueError).

        Unlike torch's, state keeps its own dtype (float32 moments stay float32 for bf16 parameters). A
        state dict saved before a group key of optim/state.py KEYS_SINCE existed loads as saved with the
        value that reproduces its run (state_dtype "float32", step_rounding "precise").
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        state_dict = self._distribution.loaded(with_keys_since(state_dict), self.param_groups)
        check_muon_state_dict(state_dict, self.param_groups, self.defaults, self._distribution.stamp(),
                              self._distribution.state_shape)
        saved_groups = state_dict["param_groups"]
        params = {i: p for saved, group in zip(saved_groups, self.param_groups, strict=True)
                  for i, p in zip(saved["params"], group["params"], strict=True)}
        kinds, pending = without_pending_gradients(state_dict["state"])
        state = {params[i]: {k: v.to(device=params[i].device, copy=True) for k, v in entry.items()}
                 for i, entry in kinds.items()}
        groups = [{**group, **{k: v for k, v in saved.items() if k != "params"}}
                  for saved, group in zip(saved_groups, self.param_groups, strict=True)]
        self.state.clear()
        self.state.update(state)
        for group, new in zip(self.param_groups, groups, strict=True):
            group.clear()
            group.update(new)
        _restore_pending(saved_groups, self.param_groups, pending)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _update(self, group: dict, keys: list, tensors: list, grads: list, flags, dualize=None) -> None:
        """Step `tensors` (params or this rank's slices of `keys`) given their averaged gradients;
        `dualize` stands in for a matrix kind's stacked map (optim/update.py kind_update)."""
        if tensors:
            states = [self.state[k] for k in keys]
            kind_update(KINDS[group["kind"]], group, states, tensors, grads, flags, dualize)


def _restore_pending(saved_groups: list[dict], groups: list[dict], pending: dict) -> None:
    """p.grad of each parameter of a group with step_every > 1 ← its saved pending gradient (a copy), or None
    where none was saved: what such a group accumulates between updates is state, so gradients made
    since the save (e.g. by warm-up steps) go. A group saved resting with none saved at all is warned
    about: its update will use only the gradients from now on (a state dict from before they were saved)."""
    for index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if group["step_every"] == 1:
            continue
        grads = [pending.get(i) for i in saved["params"]]
        for p, grad in zip(group["params"], grads, strict=True):
            p.grad = None if grad is None else grad.to(device=p.device, copy=True)
        if group["pending_steps"] and all(grad is None for grad in grads):
            warnings.warn(f"Muon.load_state_dict: param group {index} ({group['kind']}) was saved resting "
                          f"(pending_steps {group['pending_steps']} of step_every {group['step_every']}) "
                          "without its accumulated gradients (saved before optim.Muon kept them, or after "
                          "discard_gradients): its next update uses only the gradients from here on",
                          stacklevel=3)


def _kind_by_dims(params: list[torch.Tensor], index: int) -> str:
    """torch.optim.Muon's rule for a group given without a kind: "hidden" if every tensor is 2-D,
    "adam" if none is; a group mixing them is refused, since one group is one kind."""
    matrices = [p.ndim == 2 for p in params]
    if matrices and all(matrices):
        return "hidden"
    if params and not any(matrices):
        return "adam"
    shapes = [tuple(p.shape) for p in params]
    raise ValueError(
        f"Muon: param group {index} has no 'kind' and "
        f"{'mixes 2-D matrices with other tensors ' + str(shapes) if params else 'no parameters'}; one group "
        "is one kind: pass optim.param_groups(model), or groups like {'params': matrices, 'kind': 'hidden'} "
        "and {'params': others, 'kind': 'adam'}")


# Options fully_shard's distribution does not take (the value that turns each off): NorMuon's second
# moment, the in-update decay's lr_scale and a matrix view need whole matrices where rows are stepped,
# and a resting group's gradients would be averaged at every backward.
NOT_SHARDED = dict(normuon=None, wd_form="decoupled", matrix_shape=None, step_every=1)


def _check_sharding(group: dict, sharded: bool) -> None:
    """All DTensors (fully_shard) or all plain tensors: one distribution steps them all; the options
    NOT_SHARDED names left off under fully_shard."""
    for key, off in NOT_SHARDED.items():
        if sharded and group.get(key, off) != off:
            raise ValueError(f"Muon: {key}={group[key]!r} with fully_shard (DTensor) parameters; leave it "
                             f"{off!r}: it is stepped by DataParallel or in one process only")
    for p in group["params"]:
        if is_dtensor(p) != sharded:
            which = "a plain tensor among DTensors (fully_shard)" if sharded else "a DTensor among plain ones"
            raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is {which}; fully_shard the root "
                             "module too, so that every parameter is sharded, or none is")


NORMUON_AXES = (None, "row", "column", "auto")  # optim.update.normuon_axis
WD_FORMS = ("decoupled", "in_update")  # optim.update._apply
EPS_FORMS = ("corrected", "raw")  # optim.update.adam_math

# Keys a group may hold besides the hyper-parameters (Muon's defaults): torch's params and param_names,
# the kind, optim.param_groups' role, and the initial_lr torch's schedulers read when resumed.
# pending_steps: step() calls since the group last stepped (step_every), saved with the groups.
GROUP_KEYS = ("params", "param_names", "kind", "role", "initial_lr", "pending_steps")


def _check_keys(param_group: dict, defaults: dict) -> None:
    if not isinstance(param_group, dict):
        raise TypeError(f"Muon: a param group must be a dict, got {type(param_group).__name__}")
    known = (*GROUP_KEYS, *defaults)
    unknown = sorted(set(param_group) - set(known))
    if unknown:
        hint = {"betas": " (Adam's β₁ is momentum, β₂ is beta2)", "maximize": " (minimize the negated loss)"}
        raise ValueError(f"Muon: unknown param-group key {unknown[0]!r}{hint.get(unknown[0], '')}; "
                         f"the known ones are {known}")


def _check_group(group: dict, index: int) -> None:
    """Kind, hyper-parameters and tensors of a filled-in group; ns_coefficients stored as plain values."""
    if group["kind"] not in KINDS:
        raise ValueError(f"Muon: unknown param-group kind {group['kind']!r}; use one of {tuple(KINDS)}")
    _check_hyperparameters(group, f"Muon param group {index}")
    group["ns_coefficients"] = _plain_coefficients(group["ns_coefficients"])
    kind = KINDS[group["kind"]]
    for name in ("normuon", "matrix_shape"):
        if group[name] is not None and kind.name != "hidden":
            raise ValueError(f"Muon param group {index}: {name}={group[name]!r} on kind {kind.name!r}; "
                             "it is an option of kind 'hidden' only")
    if group["step_rounding"] == "stepwise" and kind.dualize is not None:
        if kind.shard != MATRIX:
            raise ValueError(f"Muon param group {index}: step_rounding='stepwise' on kind {kind.name!r}; it "
                             "is record #46's arithmetic of adam and the matrix kinds only: use 'precise'")
        if any(is_dtensor(p) for p in group["params"]):
            raise ValueError(f"Muon param group {index}: step_rounding='stepwise' on kind {kind.name!r} with "
                             "fully_shard (DTensor) parameters; leave it 'precise': it maps whole matrices "
                             "where fully_shard steps rows")
    if group["matrix_shape"] is not None:
        group["matrix_shape"] = tuple(group["matrix_shape"])
    for p in group["params"]:
        _check_tensor(p, kind)
        m, n = group["matrix_shape"] or (1, 1)
        if p.numel() % (m * n):
            raise ValueError(f"Muon param group {index}: a parameter of shape {tuple(p.shape)} is no stack "
                             f"of matrix_shape {group['matrix_shape']} matrices ({p.numel()} elements)")


def _check_range(label: str, value, low: float, high: float | None) -> None:
    """ValueError unless value is a real number with low ≤ value (< high)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or math.isnan(value) or value < low or (high is not None and value >= high):
        within = f"in [{low}, {high})" if high is not None else f"≥ {low}"
        raise ValueError(f"{label}={value!r}; expected a number {within}")


def _check_hyperparameters(group: dict, where: str) -> None:
    for name, low, high in (("lr", 0, None), ("momentum", 0, 1), ("beta2", 0, 1), ("eps", 0, None),
                            ("weight_decay", 0, None), ("ns_steps", 1, None), ("lr_mul", 0, None),
                            ("step_every", 1, None)):
        _check_range(f"{where}: {name}", group[name], low, high)
    for name in ("ns_steps", "step_every"):
        if not isinstance(group[name], int):
            raise ValueError(f"{where}: {name}={group[name]!r}; expected an integer ≥ 1")
    for name, choices in (("normuon", NORMUON_AXES), ("wd_form", WD_FORMS), ("eps_form", EPS_FORMS),
                          ("ns_rounding", ROUNDINGS), ("state_dtype", tuple(STATE_DTYPES)),
                          ("step_rounding", STEP_ROUNDINGS)):
        if group[name] not in choices:
            raise ValueError(f"{where}: {name}={group[name]!r}; use one of {choices}")
    eps = group["ns_eps"]
    number = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if eps is not None and not (number and 0 < eps < math.inf):
        raise ValueError(f"{where}: ns_eps={eps!r}; expected None (the coefficient set's own) or a "
                         "number > 0")
    shape = group["matrix_shape"]
    if shape is not None and not (isinstance(shape, (tuple, list)) and len(shape) == 2
                                  and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{where}: matrix_shape={shape!r}; expected None or (m, n), two positive integers")
    for name in ("nesterov", "cautious_wd"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{where}: {name}={group[name]!r}; expected True or False")
    if group["lr_scale"] not in LR_SCALES:
        raise ValueError(f"{where}: unknown lr_scale {group['lr_scale']!r}; use one of {tuple(LR_SCALES)}")
    dtype = group["ns_dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{where}: ns_dtype={dtype!r}; expected None or a floating torch.dtype")
    try:
        resolve_coefficients(group["ns_coefficients"])  # a bad name fails here, not at the first step
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _plain_coefficients(coefficients):
    """A Coefficients object as its name in COEFFICIENTS or its triples, so state dicts load with
    torch.load(weights_only=True); names and triples are kept as given."""
    if not isinstance(coefficients, Coefficients):
        return coefficients
    for name, named in COEFFICIENTS.items():
        if named == coefficients:
            return name
    if Coefficients(coefficients.triples) != coefficients:
        raise ValueError(f"Muon: ns_coefficients {coefficients!r} has its own scale or eps, which a state "
                         "dict can't hold as plain values; add it to optim.COEFFICIENTS and pass its name")
    return coefficients.triples


def _check_tensor(p: torch.Tensor, kind) -> None:
    shape = tuple(p.shape)
    if p.is_complex():
        raise ValueError(f"Muon: a parameter of shape {shape} is complex; Muon steps real tensors "
                         "(optimize torch.view_as_real of it)")
    if p.layout != torch.strided:
        raise ValueError(f"Muon: a parameter of shape {shape} is {p.layout}; Muon steps dense tensors")
    if p.numel() == 0:
        raise ValueError(f"Muon: a parameter of shape {shape} has no elements; leave it out of the param "
                         "groups")
    if not kind.accepts(p):
        conv = "; a 4-D conv weight is kind 'conv'" if kind.name == "hidden" and p.ndim == 4 else ""
        raise ValueError(f"Muon: a parameter of shape {shape} can't be kind {kind.name!r} "
                         f"(it needs {kind.dims()} dims); give it another kind in its param group{conv}")
