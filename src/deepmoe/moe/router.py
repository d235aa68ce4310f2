"""The gate: affinity scores → chosen experts and gate weights (docs/design.md#routing, R1–R6).

The router returns data (`RouterOutput`); it never computes experts.
All router math runs in float32. Its forward never reads a tensor's values on the host (no device→host
sync): the checks that would are debug checks (`deepmoe.runtime.set_debug_checks`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deepmoe.config import MoEConfig
from deepmoe.runtime import debug_checks_enabled


@dataclass
class RouterOutput:
    """The routing decision for T tokens (shapes use N = N_r, K = K_r)."""

    logits: Tensor
    """[T, N] float32, u_t·e_i."""
    scores: Tensor
    """[T, N] float32, affinities s_i,t (softmax or sigmoid, without the bias)."""
    topk_idx: Tensor
    """[T, K] int64, the chosen experts."""
    topk_weight: Tensor
    """[T, K] float32, gate weights g_i,t of the chosen experts (0 where dropped)."""
    kept: Tensor | None
    """[T, K] bool, False where capacity dropped the slot; None when nothing can be dropped."""
    batch_size: int
    """Number of sequences the T tokens form (sequence-major), for per-sequence quantities."""


@dataclass(frozen=True)
class RowExpertMask:
    """Expert masks of one batch's rows (per-request steering): `disabled`, `forced` [B, N_r] bool, applied to
    every token of their row on top of the router's own (global) masks. `Router.row_mask` builds and checks one."""

    disabled: Tensor
    forced: Tensor


def count_ids(ids: Tensor, n: int) -> Tensor:
    """[n] int64, how often each id in [0, n) occurs in `ids`: `torch.bincount(ids, minlength=n)` with a
    static shape (ids >= n are not allowed), which `torch.compile` traces without a graph break."""
    ids = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


ExpertSelection = Iterable[int] | Iterable[bool] | Tensor | None
"""Expert ids (ints, an integer tensor or array) or a bool mask of length N_r (a bool tensor, array or list)."""


def _index_mask(experts: ExpertSelection, n: int, what: str) -> Tensor:
    """[n] bool (CPU) from `experts`: None, integer expert ids, or a bool mask of length n.

    Raises ValueError naming `what` for anything else: non-integer ids (floats, even 2.0), a mix of bools
    and ids, a bool mask of another length, or ids outside [0, n − 1]. An empty selection means no experts.
    """
    mask = torch.zeros(n, dtype=torch.bool, device="cpu")
    if experts is None:
        return mask
    if isinstance(experts, Tensor) or hasattr(experts, "__array__"):  # a tensor or a numpy array
        try:
            values = torch.as_tensor(experts, device="cpu").detach()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{what} must be expert ids or a bool mask of length {n}: {error}") from None
        if values.numel() == 0:  # e.g. np.array([]), whose dtype is float64: no experts
            return mask
        is_mask = values.dtype == torch.bool
        if not is_mask and (values.is_floating_point() or values.is_complex()):
            raise ValueError(f"{what} expert ids must be integers, got a {values.dtype} tensor {values.tolist()}")
    elif isinstance(experts, (int, bool)) or not isinstance(experts, Iterable):
        if isinstance(experts, bool) or not isinstance(experts, int):
            raise ValueError(f"{what} must be expert ids or a bool mask of length {n}, got {experts!r}")
        values, is_mask = torch.tensor([experts], device="cpu"), False
    else:
        items = list(experts)
        kinds = set()
        for item in items:
            try:
                value = torch.as_tensor(item, device="cpu")
            except (TypeError, ValueError, RuntimeError):
                value = None
            if value is None or value.is_floating_point() or value.is_complex():
                raise ValueError(f"{what} expert ids must be integers (or a bool mask), got {item!r}")
            if value.numel() != 1:
                raise ValueError(f"{what} must hold single expert ids (or bools), got {item!r}")
            kinds.add(value.dtype == torch.bool)
        if len(kinds) > 1:
            raise ValueError(f"{what} mixes bools and expert ids: pass either ids or a bool mask of length {n}")
        is_mask = kinds == {True}
        dtype = torch.bool if is_mask else torch.long
        values = torch.tensor([bool(v) if is_mask else int(v) for v in items], dtype=dtype, device="cpu")
    if is_mask:
        if values.shape != (n,):
            raise ValueError(
                f"{what} is a bool mask of shape {tuple(values.shape)}: a mask needs one entry per routed expert ({n},)"
            )
        return values.clone()
    if values.dim() > 1:
        raise ValueError(f"{what} expert ids must be a flat list, got shape {tuple(values.shape)}")
    idx = values.long().reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{what} experts {idx.tolist()} are out of range: expert ids must be in [0, {n - 1}]")
    mask[idx] = True
    return mask


def worst_case_reach(config: MoEConfig, disabled: Tensor, forced: Tensor) -> int:
    """The fewest experts (forced ones included) any token can choose from under this mask, over every
    possible score and selection bias; `disabled`, `forced` [N_r] bool. The router needs it >= K_r.

    Without group limits a token reaches every enabled expert. With them (M = topk_group < G = n_group) a
    token keeps every group holding a forced expert (they take F of its M group slots, or all of them when
    F > M) and fills the other max(0, M − F) slots with the best-scoring remaining groups. A group scores
    finite only when it has enough enabled experts for its score: 1 for group_limited_greedy (the max), 2
    for noaux_tc (the sum of the top-2 biased scores), −inf otherwise. Any choice of finite-scoring groups
    can win (the bias is arbitrary), so the worst case takes the ones with the fewest enabled experts; when
    there are too few of them the rest of the slots go to −inf groups in index order (the router breaks
    group ties by index), which for noaux_tc may include a group with a single enabled expert.
    """
    cfg = config
    enabled = ~disabled.cpu()
    if cfg.topk_method == "greedy" or cfg.topk_group >= cfg.n_group:
        return int(enabled.sum())
    live = enabled.view(cfg.n_group, cfg.experts_per_group).sum(-1).tolist()
    forced_groups = forced.cpu().view(cfg.n_group, cfg.experts_per_group).any(-1).tolist()
    need = 2 if cfg.topk_method == "noaux_tc" else 1
    slots = max(0, cfg.topk_group - sum(forced_groups))
    others = [g for g in range(cfg.n_group) if not forced_groups[g]]
    scored = sorted(live[g] for g in others if live[g] >= need)
    unscored = [live[g] for g in others if live[g] < need]  # in index order
    reach = sum(live[g] for g in range(cfg.n_group) if forced_groups[g]) + sum(scored[:slots])
    return reach + sum(unscored[: max(0, slots - len(scored))])


def affinity(logits: Tensor, scoring_func: str) -> Tensor:
    """s_i,t from the logits u_t·e_i: softmax over the experts, sigmoid, or V4's √softplus."""
    if scoring_func == "softmax":
        return logits.softmax(-1)
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    return logits.sigmoid()


_HASHED = "a hash-routed MoE layer takes its experts from the token ids (tid2eid): expert masks do not apply to it"
_warned_float64 = False


def _warn_float64_once() -> None:
    global _warned_float64
    if not _warned_float64:
        _warned_float64 = True
        warnings.warn(
            "the MoE router computes in float32: a float64 input is rounded to float32 for routing (scores, top-k, "
            "gate weights); the experts and the rest of the model keep float64",
            stacklevel=3,
        )


class Router(nn.Module):
    """DeepSeek top-K gate with group limits, selection bias, capacity and masks.

    Parameters use HF names: `weight` [N_r, H] (the expert centroids e_i) and,
    with aux-loss-free balancing, the buffer `e_score_correction_bias` [N_r] (b_i). The bias is routing
    state and stays float32 when the module is cast (`.to(torch.bfloat16)`, `.half()`, a parent's cast):
    in bf16 its γ = 1e-3 steps would round away and the selection would change.

    Routing is computed in float32 for every input dtype: bf16/fp16 inputs are widened, a float64 input is
    rounded to float32 (warned once per process), so float64 models route as float32 ones do.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        n = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(n, config.hidden_size))
        if config.use_expert_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        if config.hash_vocab_size:  # V4's hash routing: token id -> its K_r experts, a checkpoint tensor
            table = torch.zeros(config.hash_vocab_size, config.num_experts_per_tok, dtype=torch.long)
            self.register_buffer("tid2eid", table)
        else:
            self.tid2eid = None
        self.register_buffer("disabled_experts", torch.zeros(n, dtype=torch.bool), persistent=False)
        self.register_buffer("forced_experts", torch.zeros(n, dtype=torch.bool), persistent=False)
        self.disable_top = 0
        self.has_expert_mask = False
        self.replay: Tensor | None = None
        """[T, K] expert ids to use instead of choosing (routing replay, e.g. RL's re-scoring of sampled tokens):
        the next forwards take these experts, with gate weights from the current scores; None: choose."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise everything the router owns (also after `to_empty`, whose memory is uninitialised):
        `weight` Kaiming-uniform (as nn.Linear), the selection bias b = 0, and no expert mask."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()
        if self.tid2eid is not None:  # each token id gets K_r distinct experts drawn uniformly
            n, k = self.config.n_routed_experts, self.config.num_experts_per_tok
            draws = torch.rand(self.tid2eid.shape[0], n, device=self.tid2eid.device)
            self.tid2eid.copy_(draws.argsort(dim=-1)[:, :k])
        self.disabled_experts.fill_(False)
        self.forced_experts.fill_(False)
        self.disable_top = 0
        self.has_expert_mask = False

    # ---- the bias stays float32 ---------------------------------------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Router:
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        self._keep_bias_float32(bias)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_bias_float32(None)  # load_state_dict(assign=True) may have put a bf16 tensor in place

    def _keep_bias_float32(self, before: Tensor | None) -> None:
        """A dtype cast (as RotaryEmbedding's θ): keep the float32 bias from `before`, follow the new device."""
        after = self.e_score_correction_bias
        if after is not None and after.dtype != torch.float32:
            source = before if before is not None and before.dtype == torch.float32 else after
            self.e_score_correction_bias = source.to(device=after.device, dtype=torch.float32)

    # ---- R6: masks ---------------------------------------------------------------------------
    def set_expert_mask(
        self,
        disabled: ExpertSelection = None,
        forced: ExpertSelection = None,
        disable_top: int = 0,
    ) -> None:
        """Never choose `disabled` experts; always choose `forced` ones (inference steering).
        Each is None, expert ids (ints, an integer tensor or array) or a bool mask of length N_r.
        `disable_top`: per token, its `disable_top` highest-affinity experts may not be chosen either
        (the DeepSeekMoE redundancy test, §4.5: top-K is taken from the remaining experts).

        Raises ValueError if the ids are not integers or out of range, a bool mask has the wrong length,
        the two overlap, more experts are forced than a token chooses, or some token (for some scores and
        bias) could not fill its K_r slots with enabled experts of its groups (`worst_case_reach`).
        """
        cfg = self.config
        n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        if self.tid2eid is not None and (disabled is not None or forced is not None or disable_top):
            raise ValueError(_HASHED)
        if isinstance(disable_top, bool) or not isinstance(disable_top, int) or disable_top < 0:
            raise ValueError(f"disable_top must be an integer >= 0, got {disable_top!r}")
        if disable_top and (cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group):
            raise ValueError("disable_top needs routing without group limits (topk_method='greedy')")
        if disable_top and (forced is not None or disabled is not None):
            raise ValueError("disable_top cannot be combined with disabled or forced experts")
        if disable_top + k > n:
            raise ValueError(
                f"disable_top={disable_top} leaves {n - disable_top} experts, fewer than num_experts_per_tok={k}"
            )
        off, on = _index_mask(disabled, n, "disabled"), _index_mask(forced, n, "forced")
        self._check_mask(off, on)
        self.disabled_experts.copy_(off)
        self.forced_experts.copy_(on)
        self.disable_top = disable_top
        self.has_expert_mask = bool(off.any() or on.any() or disable_top)

    def _check_mask(self, off: Tensor, on: Tensor) -> None:
        """ValueError when `off` and `on` ([N_r] bool) overlap, force more than K_r experts, or leave some token
        fewer than K_r reachable experts (`worst_case_reach`)."""
        cfg = self.config
        k = cfg.num_experts_per_tok
        if (off & on).any():
            raise ValueError(f"experts {torch.nonzero(off & on).flatten().tolist()} are both disabled and forced")
        if on.sum() > k:
            raise ValueError(f"{int(on.sum())} forced experts exceed num_experts_per_tok={k}")
        reach = worst_case_reach(cfg, off, on)
        if reach < k:
            detail = ""
            if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
                detail = f" in its topk_group={cfg.topk_group} groups (a forced expert's group always takes one"
                if cfg.topk_method == "noaux_tc":
                    detail += "; noaux_tc ranks only groups with >= 2 enabled experts: it sums their top-2 scores"
                detail += ")"
            raise ValueError(
                f"disabling {int(off.sum())} and forcing {int(on.sum())} experts leaves some token only {reach} "
                f"reachable experts{detail}, fewer than num_experts_per_tok={k}"
            )

    def row_mask(self, rows: Sequence[tuple[ExpertSelection, ExpertSelection]]) -> RowExpertMask:
        """Per-row expert masks for a batch of len(rows) rows, each (disabled, forced) as `set_expert_mask` takes
        them, checked as it checks them, combined with this router's own masks (a row cannot re-enable an
        expert the router disables). Pass it as `expert_mask` to `forward`, `MoE.forward`, or per layer to the
        model's forward (`expert_masks`)."""
        if self.tid2eid is not None:
            raise ValueError(_HASHED)
        if self.disable_top:
            raise ValueError("per-row expert masks cannot be combined with disable_top")
        n = self.config.n_routed_experts
        disabled, forced = [], []
        for i, (row_off, row_on) in enumerate(rows):
            off = _index_mask(row_off, n, f"row {i} disabled") | self.disabled_experts.cpu()
            on = _index_mask(row_on, n, f"row {i} forced") | self.forced_experts.cpu()
            try:
                self._check_mask(off, on)
            except ValueError as error:
                raise ValueError(f"row {i}: {error}") from None
            disabled.append(off)
            forced.append(on)
        device = self.weight.device
        stacked = [torch.stack(m).to(device) if m else torch.zeros(0, n, dtype=torch.bool, device=device)
                   for m in (disabled, forced)]  # fmt: skip
        return RowExpertMask(*stacked)

    def clear_expert_mask(self) -> None:
        self.set_expert_mask()

    # ---- R4: aux-loss-free bias ---------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, load: Tensor | Sequence[float], process_group: dist.ProcessGroup | None = None) -> None:
        """b_i += γ·sign(mean(load) − load_i), `load` [N_r] = tokens routed to each expert (a tensor, or a list of
        numbers, converted).

        Data parallelism (DDP, FSDP): each rank only counts its own tokens, so pass the data-parallel
        `process_group` (`torch.distributed.group.WORLD` for the default group): `load` is then summed over
        the group before the sign step and every rank takes the same step. The default, None, communicates
        nothing: under DDP the ranks' biases would drift apart (and DDP's buffer broadcast keeps rank 0's).
        """
        bias = self.e_score_correction_bias
        if bias is None:
            raise ValueError("update_bias needs MoEConfig.use_expert_bias=True")
        if not isinstance(load, Tensor):  # a list, tuple or array of token counts: converted
            try:
                load = torch.as_tensor(load)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"load must be the tokens routed to each expert: a tensor or a list of {bias.numel()} numbers, "
                    f"got {type(load).__name__}"
                ) from None
            if load.dtype == torch.bool or load.is_complex():
                raise TypeError(f"load must hold numbers (token counts), got dtype {load.dtype}")
        if load.shape != bias.shape:
            raise ValueError(f"load must have shape {tuple(bias.shape)}, got {tuple(load.shape)}")
        exact = not (load.is_floating_point() or load.is_complex())  # token counts: exact integer arithmetic
        load = load.detach().to(device=bias.device, dtype=torch.int64 if exact else torch.float32, copy=True)
        if process_group is not None:
            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=process_group)
        above_mean = load.sum() - load * load.numel() if exact else load.mean() - load  # same sign as mean − load_i
        bias.add_(self.config.bias_update_speed * torch.sign(above_mean).to(bias.dtype))

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        batch_size: int = 1,
        expert_mask: RowExpertMask | None = None,
        token_ids: Tensor | None = None,
    ) -> RouterOutput:
        """Route `x` [T, H]; `batch_size` sequences of T / batch_size tokens each. `expert_mask` (from `row_mask`):
        each sequence's own expert masks, [batch_size, N_r], on top of the router's. `token_ids` (the T tokens' ids):
        what a hash-routed layer (`hash_vocab_size`) chooses its experts by, `tid2eid[token_ids]` (masks do not apply).

        The routing is computed in float32 whatever x's dtype: a float64 input (a float64 model) is rounded to
        float32 here, with a warning, once per process (the rest of the layer keeps float64)."""
        cfg = self.config
        if x.dtype == torch.float64 and not torch.compiler.is_compiling():
            _warn_float64_once()
        with torch.autocast(x.device.type, enabled=False):  # router math stays float32 under autocast
            logits = F.linear(x.float(), self.weight.float())  # [T, N]
        if debug_checks_enabled() and not torch.isfinite(logits).all():  # a host sync: debug only
            raise ValueError("MoE router got NaN or inf: the layer input (or the router weight) is not finite")
        scores = affinity(logits, cfg.scoring_func)

        if self.replay is not None:
            topk_idx = self._replayed(logits.shape[0])
        elif self.tid2eid is not None:
            if expert_mask is not None:
                raise ValueError(_HASHED)
            if token_ids is None or token_ids.numel() != logits.shape[0]:
                raise ValueError("a hash-routed MoE layer needs the token ids of its T tokens (token_ids)")
            topk_idx = self.tid2eid[token_ids.reshape(-1)]
        else:
            topk_idx = self._choose(scores, expert_mask, batch_size)
        topk_weight = scores.gather(1, topk_idx)
        if cfg.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * cfg.routed_scaling_factor

        kept = None
        if self.training and cfg.capacity_factor is not None:
            kept = self._capacity_mask(scores, topk_idx, batch_size)
            topk_weight = topk_weight * kept
        return RouterOutput(logits, scores, topk_idx, topk_weight, kept, batch_size)

    def _replayed(self, tokens: int) -> Tensor:
        """The replayed expert ids [T, K], checked against this forward's tokens and the layer's experts."""
        replay, cfg = self.replay, self.config
        if replay.shape != (tokens, cfg.num_experts_per_tok) or replay.dtype != torch.int64:
            raise ValueError(
                f"routing replay must be int64 [{tokens}, {cfg.num_experts_per_tok}] for this forward's tokens, got "
                f"{replay.dtype} {tuple(replay.shape)}"
            )
        if debug_checks_enabled() and ((replay < 0) | (replay >= cfg.n_routed_experts)).any():  # a host sync
            raise ValueError(f"routing replay holds expert ids outside [0, {cfg.n_routed_experts})")
        return replay

    def _choose(self, scores: Tensor, expert_mask: RowExpertMask | None = None, batch_size: int = 1) -> Tensor:
        """R2/R3/R6: the K_r experts [T, K] each token takes, ranked by s + b within its allowed groups (and the
        rows' own `expert_mask`)."""
        cfg = self.config
        choice = scores.detach()  # what selection ranks: s + b, limited to allowed groups/experts
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        masked = self.has_expert_mask or expert_mask is not None
        disabled, forced = self.disabled_experts, self.forced_experts  # [N], or per token [T, N]
        if expert_mask is not None:
            disabled, forced = self._per_token(expert_mask, scores.shape[0], batch_size)
        if masked:
            choice = choice.masked_fill(disabled, -math.inf)
            if self.disable_top:
                choice = choice.scatter(1, scores.detach().topk(self.disable_top, dim=-1).indices, -math.inf)
        if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
            choice = self._limit_groups(choice, forced if masked else None)
        if masked:
            choice = choice.masked_fill(forced, math.inf)
        topk_idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
        # set_expert_mask's reach check proves this never happens; asserting it costs a host sync: debug only
        if masked and debug_checks_enabled() and torch.isneginf(choice.gather(1, topk_idx)).any():
            raise RuntimeError(
                "MoE router had to choose a disabled or out-of-group expert: the expert mask leaves a token too few "
                "(set_expert_mask refuses such masks; was the mask or the config changed after it?)"
            )
        return topk_idx

    def _per_token(self, row_mask: RowExpertMask, tokens: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """The row masks, each row's repeated for its tokens and combined with the router's: [T, N] each."""
        n = self.config.n_routed_experts
        for name in ("disabled", "forced"):
            mask = getattr(row_mask, name)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, n):
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"expert_mask.{name} must be a bool tensor [{batch_size}, {n}], got {shape}")
        per_row = tokens // batch_size
        disabled = (row_mask.disabled | self.disabled_experts).repeat_interleave(per_row, 0)
        forced = (row_mask.forced | self.forced_experts).repeat_interleave(per_row, 0)
        return disabled, forced

    def _limit_groups(self, choice: Tensor, forced: Tensor | None) -> Tensor:
        """R3: keep the experts of each token's best `topk_group` groups; −inf elsewhere. `forced` [N] or [T, N]
        (None: no mask): a forced expert's group is always kept."""
        cfg = self.config
        t = choice.shape[0]
        grouped = choice.view(t, cfg.n_group, cfg.experts_per_group)
        if cfg.topk_method == "group_limited_greedy":
            group_scores = grouped.amax(-1)  # V2: best expert of the group
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # V3: sum of the top-2 biased scores
        forced_groups = None
        if forced is not None:
            forced_groups = forced.view(*forced.shape[:-1], cfg.n_group, cfg.experts_per_group).any(-1)
        if forced_groups is not None:
            group_scores = group_scores.masked_fill(forced_groups, math.inf)
        # ties (−inf groups under a mask) go to the lower group index, as `worst_case_reach` assumes
        top_groups = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, : cfg.topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        if forced_groups is not None:
            keep |= forced_groups  # a forced expert's group always counts as chosen
        return grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).view(t, -1)

    def _capacity_mask(self, scores: Tensor, topk_idx: Tensor, batch_size: int) -> Tensor:
        """R5: [T, K] bool, False for slots over their expert's (or device's) capacity.

        Within each expert (device) the slots are ranked by affinity s_i,t ("probs")
        or by token position ("position"); slots of the first `no_drop_fraction` of
        the sequences rank first and are never dropped.
        """
        cfg = self.config
        t, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        if cfg.capacity_scope == "expert":
            unit, n_units = flat_expert, cfg.n_routed_experts
        else:
            unit, n_units = flat_expert // cfg.experts_per_device, cfg.n_devices
        capacity = math.ceil(cfg.capacity_factor * t * k / n_units)

        if cfg.drop_policy == "probs":
            priority = scores.detach().gather(1, topk_idx).reshape(-1)
        else:
            priority = -torch.arange(t, device=scores.device, dtype=torch.float32).repeat_interleave(k)
        n_protected = math.floor(cfg.no_drop_fraction * batch_size) * (t // batch_size)
        protected = torch.zeros(t, k, dtype=torch.bool, device=scores.device)
        protected[:n_protected] = True
        priority = priority.masked_fill(protected.reshape(-1), math.inf)

        order = priority.argsort(descending=True, stable=True)
        order = order[unit[order].argsort(stable=True)]  # grouped by unit, best first inside a unit
        counts = count_ids(unit, n_units)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - starts[unit[order]]
        return (rank < capacity).view(t, k) | protected
