"""Multi-head Latent Attention (DeepSeek-V2/V3), tensor-parallel over heads.

Training path (shapes for one tensor-parallel rank with n local heads):
    c_q   = RMSNorm(W_DQ h)                       [s, b, q_lora_rank]   (or q = W_Q h without it)
    q     = W_UQ c_q -> [q_nope | q_rope]         [s, b, n, dn + dr], RoPE on q_rope
    c_kv, k_rope = W_DKV h                        [s, b, kv_lora_rank], [s, b, dr]
    c_kv  = RMSNorm(c_kv); k_rope = RoPE(k_rope)  (one k_rope shared by all heads)
    [k_nope | v] = W_UKV c_kv                     [s, b, n, dn + dv]
    o     = W_O softmax(q k^T * scale) v
Absorbed path (decoding): W_UK folds into the query and W_UV into the output, so attention runs
against the cached latents [c_kv | k_rope] (kv_lora_rank + dr values per token) directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsv3.attention.rope import YarnRotary, apply_rotary, rotate_into
from megatron_dsv3.configs import latent_norm_epsilon
from megatron_dsv3.core.gemm import DEFAULT_GEMM, shared_input_linear
from megatron_dsv3.core.linear import KeyedInit, ReplicatedLinear, group_size, tp_group_or_default
from megatron_dsv3.core.recompute import checkpointed, recompute_region


class _AssembleQKV(torch.autograd.Function):
    """MLA's q, k, v for the core attention in one step. In: q [s, b, n, dn + dr] and kv
    [s, b, n, dn + dv] from the up-projections, k_rope [s, b, dr] from the down-projection, RoPE
    not yet applied to q's last dr columns nor to k_rope. Out: q, k [s, b, n, dn + dr] (RoPE
    applied, k's rope part shared by every head) and v [s, b, n, dv_out] (zero-padded beyond dv
    where the core wants it wider), each written once into fresh memory laid out [b, n, s, ...]
    with `heads_major` (the portable core's kernel layout), else [s, b, n, ...]. Backward writes
    each input's gradient once (k_rope's: the heads' sum, rotated back). It replaces the autograd
    graph of splits, RoPE, concatenations and permutations, whose backward made a zero-filled
    gradient per split and a copy per view."""

    @staticmethod
    def forward(ctx, q, kv, k_rope, cos, sin, dn: int, dv_out: int, heads_major: bool):
        s, b, n, dqk = q.shape
        dr, dv = dqk - dn, kv.shape[-1] - dn

        def fresh(d):
            if heads_major:
                return q.new_empty(b, n, s, d).permute(2, 0, 1, 3)
            return q.new_empty(s, b, n, d)

        q_out, k_out, v_out = fresh(dqk), fresh(dqk), fresh(dv_out)
        q_out[..., :dn].copy_(q[..., :dn])
        rotate_into(q_out[..., dn:], q[..., dn:], cos, sin)
        k_out[..., :dn].copy_(kv[..., :dn])
        rotate_into(k_out[..., dn:], k_rope[:, :, None, :].expand(s, b, n, dr), cos, sin)
        v_out[..., :dv].copy_(kv[..., dn:])
        v_out[..., dv:].zero_()
        ctx.save_for_backward(cos, sin)
        ctx.dims = (dn, dv)
        return q_out, k_out, v_out

    @staticmethod
    def backward(ctx, g_q, g_k, g_v):
        cos, sin = ctx.saved_tensors
        dn, dv = ctx.dims
        s, b, n, dqk = g_q.shape
        d_q = g_q.new_empty(s, b, n, dqk)
        d_q[..., :dn].copy_(g_q[..., :dn])
        rotate_into(d_q[..., dn:], g_q[..., dn:], cos, sin, inverse=True)
        d_kv = g_k.new_empty(s, b, n, dn + dv)
        d_kv[..., :dn].copy_(g_k[..., :dn])
        d_kv[..., dn:].copy_(g_v[..., :dv])
        k_sum = g_k[..., dn:].sum(2, keepdim=True)  # [s, b, 1, dr]
        d_k_rope = rotate_into(torch.empty_like(k_sum), k_sum, cos, sin, inverse=True)
        return d_q, d_kv, d_k_rope[:, :, 0], None, None, None, None, None


@dataclass
class MLASubmodules:
    linear_q_proj: Union[ModuleSpec, type] = None  # used when q_lora_rank is None
    linear_q_down_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    linear_q_up_proj: Union[ModuleSpec, type] = None
    linear_kv_down_proj: Union[ModuleSpec, type] = None
    kv_layernorm: Union[ModuleSpec, type] = None
    linear_kv_up_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


class MLASelfAttention(MegatronModule):
    def __init__(self, config, submodules: MLASubmodules, layer_number: int = 1,
                 pg_collection=None, **_megatron_kwargs):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tp_group = tp_group_or_default(getattr(pg_collection, "tp", None))
        tp = group_size(self.tp_group)
        self.num_heads = config.num_attention_heads // tp
        self.dn, self.dr, self.dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        h, nh = config.hidden_size, config.num_attention_heads
        key = f"layers.{layer_number - 1}.self_attention"

        def linear(spec, n_in, n_out, name, dim, **kw):
            return build_module(spec, n_in, n_out, config=config, bias=False, skip_bias_add=False,
                                is_expert=False, tp_comm_buffer_name=name, tp_group=self.tp_group,
                                init_method=KeyedInit(config, f"{key}.{name}", (n_out, n_in), dim,
                                                      self.tp_group), **kw)

        q_out = nh * (self.dn + self.dr)
        latent_eps = latent_norm_epsilon(config)
        if self.q_lora_rank is None:
            self.linear_q_proj = linear(submodules.linear_q_proj, h, q_out, "q_proj", 0,
                                        gather_output=False)
        else:
            self.linear_q_down_proj = linear(submodules.linear_q_down_proj, h, self.q_lora_rank,
                                             "q_down_proj", 0, gather_output=False)
            self.q_layernorm = build_module(submodules.q_layernorm, config=config,
                                            hidden_size=self.q_lora_rank, eps=latent_eps)
            self.linear_q_up_proj = linear(submodules.linear_q_up_proj, self.q_lora_rank, q_out,
                                           "q_up_proj", 0, gather_output=False)
        self.linear_kv_down_proj = linear(submodules.linear_kv_down_proj, h,
                                          self.kv_lora_rank + self.dr, "kv_down_proj", 0,
                                          gather_output=False)
        self.kv_layernorm = build_module(submodules.kv_layernorm, config=config,
                                         hidden_size=self.kv_lora_rank, eps=latent_eps)
        self.linear_kv_up_proj = linear(submodules.linear_kv_up_proj, self.kv_lora_rank,
                                        nh * (self.dn + self.dv), "kv_up_proj", 0,
                                        gather_output=False)
        self.rotary = YarnRotary(config)
        self.softmax_scale = (self.dn + self.dr) ** -0.5 * self.rotary.softmax_mscale
        from megatron.core.transformer.enums import AttnMaskType

        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=AttnMaskType.causal, softmax_scale=self.softmax_scale,
            k_channels=self.dn + self.dr, v_channels=self.dv, pg_collection=pg_collection)
        self.linear_proj = linear(submodules.linear_proj, nh * self.dv, h, "o_proj", 1,
                                  input_is_parallel=True)
        self._stacked_down = True  # allowed; see _down_projections_stack

    def _down_projections_stack(self) -> bool:
        """Both down-projections read the hidden states: while both are our plain replicated
        linears (no FP8 or other GEMM strategy, no bias; checked on each call, since tools such as
        modelopt's quantisation swap module classes after construction), the training path runs
        them as one GEMM per pass over their stacked weights (SharedInputLinearFunction)."""
        if not self._stacked_down or self.q_lora_rank is None:
            return False
        return all(type(m) is ReplicatedLinear and m.gemm is DEFAULT_GEMM and m.bias is None
                   for m in (self.linear_q_down_proj, self.linear_kv_down_proj))

    # -- pieces shared by the training and the absorbed path ---------------------------------
    def _query_latent(self, x, c_q=None):
        """Normalised query latent c_q (or x itself without query compression); `c_q`: the
        down-projection's output if already computed."""
        if self.q_lora_rank is None:
            return x
        if c_q is None:
            c_q, _ = self.linear_q_down_proj(x)
        return self.q_layernorm(c_q)

    def _query_heads(self, c_q):
        """q [s, b, n, dn + dr], RoPE not applied."""
        proj = self.linear_q_proj if self.q_lora_rank is None else self.linear_q_up_proj
        q, _ = proj(c_q)
        return q.view(*q.shape[:2], self.num_heads, self.dn + self.dr)

    def _query(self, c_q):
        return self._query_heads(c_q).split([self.dn, self.dr], dim=-1)

    def _kv_latent(self, x, kv=None):
        """(normalised c_kv [s, b, kv_lora_rank], k_rope before RoPE [s, b, dr]); `kv`: the
        down-projection's output if already computed."""
        if kv is None:
            kv, _ = self.linear_kv_down_proj(x)
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.dr], dim=-1)
        if group_size(self.tp_group) > 1:
            # k_rope feeds every local head: its gradient is the sum over all ranks' heads.
            k_rope = mappings.copy_to_tensor_model_parallel_region(k_rope, group=self.tp_group)
        return self.kv_layernorm(c_kv), k_rope

    def _positions(self, s, b, device, position_ids):
        if position_ids is None:
            cos, sin = self.rotary.cos_sin_range(s, device)  # [s, dr/2]
            return cos[:, None, None, :], sin[:, None, None, :]
        cos, sin = self.rotary.cos_sin(position_ids.to(device))  # [b, s, dr/2]
        return cos.transpose(0, 1)[:, :, None, :], sin.transpose(0, 1)[:, :, None, :]

    # -- training / prefill path -----------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, packed_seq_params=None, **_unused):
        s, b, _ = hidden_states.shape
        if self._down_projections_stack():
            down = shared_input_linear(hidden_states, [self.linear_q_down_proj.weight,
                                                       self.linear_kv_down_proj.weight])
            q_down, kv = down.split([self.q_lora_rank, self.kv_lora_rank + self.dr], dim=-1)
            c_q = self._query_latent(hidden_states, q_down)
            c_kv, k_rope = self._kv_latent(hidden_states, kv)
        else:
            c_q = self._query_latent(hidden_states)
            c_kv, k_rope = self._kv_latent(hidden_states)
        cos, sin = self._positions(s, b, hidden_states.device, position_ids)

        heads_major = getattr(self.core_attention, "heads_major_inputs", False)
        # v in the head dim the core wants it (zero-padded to q/k's for the CPU flash kernel)
        value_head_dim = getattr(self.core_attention, "value_head_dim", None)
        dv = self.dv if value_head_dim is None else value_head_dim(
            self.dn + self.dr, self.dv, hidden_states.device, attention_mask, s, s,
            batch_heads=b * self.num_heads, dtype=hidden_states.dtype)
        core_kwargs = {} if dv == self.dv else {"value_dim": self.dv}

        def up_project(c_q, c_kv, k_rope):
            q = self._query_heads(c_q)
            kv, _ = self.linear_kv_up_proj(c_kv)
            kv = kv.view(s, b, self.num_heads, self.dn + self.dv)
            return _AssembleQKV.apply(q, kv, k_rope, cos, sin, self.dn, dv, heads_major)

        run, release = recompute_region(self.config, "mla_up_proj", up_project)
        q, k, v = run(c_q, c_kv, k_rope)
        core_attention = checkpointed(self.config, "core_attn", self.core_attention)
        context = core_attention(q, k, v, attention_mask, packed_seq_params=packed_seq_params,
                                 **core_kwargs)
        release(context)
        return self.linear_proj(context)

    # -- absorbed decode path ----------------------------------------------------------------
    def latents(self, hidden_states, position_ids):
        """What the latent cache stores for these tokens: (c_kv [b, s, kv_lora_rank],
        k_rope after RoPE [b, s, dr])."""
        s, b, _ = hidden_states.shape
        c_kv, k_rope = self._kv_latent(hidden_states)
        cos, sin = self._positions(s, b, hidden_states.device, position_ids)
        k_rope = apply_rotary(k_rope[:, :, None, :], cos, sin)[:, :, 0]
        return c_kv.transpose(0, 1), k_rope.transpose(0, 1)

    def forward_cached(self, hidden_states, position_ids, cache, absorbed: bool = True):
        """New tokens hidden_states [s, b, h] at position_ids [b, s] attending over a latent cache:
        their latents go into `cache` (a layer's cache view: `update(c_kv, k_rope)` stores them
        and returns every key's c_kv, k_rope and key mask), then absorbed attention (or, with
        `absorbed=False`, the expanded formula) reads all keys. -> (output, bias) as forward."""
        c_kv, k_rope = self.latents(hidden_states, position_ids)          # [b, s, c], [b, s, dr]
        keys_c_kv, keys_k_rope, key_mask = cache.update(c_kv, k_rope)     # [b, T, c], [b, T, dr]
        attend = self.forward_absorbed if absorbed else self.forward_expanded
        return attend(hidden_states, position_ids, keys_c_kv, keys_k_rope, key_mask=key_mask)

    def forward_absorbed(self, hidden_states, position_ids, cache_c_kv, cache_k_rope,
                         key_positions=None, key_mask=None):
        """Attention of new tokens against cached latents, with W_UK/W_UV absorbed.

        hidden_states [s, b, h] for tokens at position_ids [b, s]; cache_c_kv [b, T, c] and
        cache_k_rope [b, T, dr] hold every key (the new tokens included); key_positions [b, T]
        (default arange) and key_mask [b, T] (True = valid) restrict what each query sees.
        """
        s, b, _ = hidden_states.shape
        q_nope, q_rope = self._query(self._query_latent(hidden_states))
        cos, sin = self._positions(s, b, hidden_states.device, position_ids)
        q_rope = apply_rotary(q_rope, cos, sin)
        w = self.linear_kv_up_proj.weight.view(self.num_heads, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.dn].float(), w[:, self.dn:].float()
        q_latent = torch.einsum("sbhd,hdc->bhsc", q_nope.float(), w_uk)
        scores = (torch.einsum("bhsc,btc->bhst", q_latent, cache_c_kv.float())
                  + torch.einsum("sbhr,btr->bhst", q_rope.float(), cache_k_rope.float()))
        probs = self._cached_probs(scores, position_ids, key_positions, key_mask)
        ctx_latent = torch.einsum("bhst,btc->sbhc", probs, cache_c_kv.float())
        context = torch.einsum("sbhc,hdc->sbhd", ctx_latent, w_uv)
        context = context.reshape(s, b, self.num_heads * self.dv).to(hidden_states.dtype)
        return self.linear_proj(context)

    def forward_expanded(self, hidden_states, position_ids, cache_c_kv, cache_k_rope,
                         key_positions=None, key_mask=None):
        """`forward_absorbed` without the absorption, for comparison: every step expands all
        cached latents into per-head keys and values (k_nope, v = W_UK c_kv, W_UV c_kv) and
        attends over them, as a cache of latents read by the plain MLA formula would."""
        s, b, _ = hidden_states.shape
        q_nope, q_rope = self._query(self._query_latent(hidden_states))
        cos, sin = self._positions(s, b, hidden_states.device, position_ids)
        q_rope = apply_rotary(q_rope, cos, sin)
        w = self.linear_kv_up_proj.weight.view(self.num_heads, self.dn + self.dv, self.kv_lora_rank)
        kv = torch.einsum("btc,hdc->bthd", cache_c_kv.float(), w.float())   # [b, T, H, dn + dv]
        k_nope, v = kv[..., : self.dn], kv[..., self.dn:]
        scores = (torch.einsum("sbhd,bthd->bhst", q_nope.float(), k_nope)
                  + torch.einsum("sbhr,btr->bhst", q_rope.float(), cache_k_rope.float()))
        probs = self._cached_probs(scores, position_ids, key_positions, key_mask)
        context = torch.einsum("bhst,bthd->sbhd", probs, v)
        context = context.reshape(s, b, self.num_heads * self.dv).to(hidden_states.dtype)
        return self.linear_proj(context)

    def _cached_probs(self, scores, position_ids, key_positions, key_mask):
        """Softmax of scores [b, H, s, T] over the keys each query may see (causal by position,
        valid by key_mask)."""
        b, _, _, T = scores.shape
        scores = scores * self.softmax_scale
        if key_positions is None:
            key_positions = torch.arange(T, device=scores.device).expand(b, T)
        allowed = key_positions[:, None, :] <= position_ids[:, :, None]  # [b, s, T]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1)
