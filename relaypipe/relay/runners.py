"""Model runners: one forward of a causal LM over the slot cache (:mod:`.kv_store`).

A runner takes a batch of input ids ``[B, T]`` and the batch's :class:`SlotRows` (each row's
slot, the cache column of each input, the columns attended), writes the inputs' keys and
values into the store and returns the logits ``[B, V]`` of each row's last real input.

* :class:`HFRunner`: any Hugging Face causal LM through its own forward, the slot cache
  plugged in as a duck-typed cache;
* :class:`LlamaRunner`: a lean forward for standard Llama models (the same arithmetic, fewer
  ops), the default where it applies.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from relaypipe.relay.kv_store import SlotRows


def text_config(model: PreTrainedModel):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (where torch has autocast for it)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class HFRunner:
    """Any Hugging Face causal LM through its own forward, with the slot cache plugged in.

    The model sees a duck-typed cache whose ``update`` writes the new keys/values at each
    token's position and returns the batch's columns, and a ready 4D additive mask (which
    Hugging Face passes through as-is).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        # padding and finished rows may sit past a learned position table: clamp their ids
        self.max_position = getattr(text_config(model), "max_position_embeddings", None)

    def refresh(self, version: tuple[int, ...]) -> None:
        pass

    def __call__(
        self, ids: torch.Tensor, rows: SlotRows, cols: torch.Tensor, last: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits [B, V] for each row's last input (``last``: its index in T; None: T-1);
        writes the inputs' keys/values into the store. ``cols``: an arange of >= hi."""
        pos, hi = rows.pos, rows.hi
        allowed = cols[:hi] <= pos.unsqueeze(-1)  # [B, T, hi]
        dtype = rows.data.dtype
        bias = torch.zeros(allowed.shape, dtype=dtype, device=rows.data.device)
        bias.masked_fill_(~allowed, torch.finfo(dtype).min)
        logits = self.model(
            input_ids=ids,
            attention_mask=bias.unsqueeze(1),
            position_ids=pos if self.max_position is None else pos.clamp(max=self.max_position - 1),
            cache=SlotCache(rows),
            use_cache=True,
        ).logits  # [B, T, V]
        return logits[:, -1] if last is None else logits[rows.batch[:, 0], last]


class SlotCache:
    """What a Hugging Face attention layer needs from a cache, over the slot layout."""

    is_compileable = False

    def __init__(self, rows: SlotRows) -> None:
        self.rows = rows

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        shape = self.rows.data.shape
        if keys.shape[1] != shape[3] or keys.shape[-1] != shape[-1]:
            raise ValueError(
                f"layer {layer_idx}: keys {tuple(keys.shape)} do not fit the cache "
                f"{tuple(shape)} sized from the model config"
            )
        # the store keeps the weights' dtype: a forward under autocast (accelerate wraps a
        # mixed-precision model's forward in one) yields bf16 keys for float32 weights
        self.rows.write(layer_idx, keys.transpose(1, 2), values.transpose(1, 2))
        return self.rows.read(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.rows.hi - self.rows.pos.shape[1]


class LlamaRunner:
    """A lean forward for Llama-architecture models, reading the model's own weights.

    The arithmetic of Hugging Face's ``LlamaForCausalLM`` (RMSNorm, rotary embedding, SiLU
    MLP, in the same order, so greedy tokens agree), without its per-call machinery: building
    masks, output records and module dispatch cost more than a micro model's matmuls. Fewer
    ops per layer: q/k/v and gate/up are one matmul each, the rotary "rotate half" is one roll
    with a signed sine table, the vocabulary projection runs only on each row's last position.
    Weights are re-read whenever a parameter changes (training between rollouts).

    It pays (``relaypipe bench --pair realistic --forward model`` against the default, 2 CPU
    cores, one thread): student-only decoding 1.6x the model's own forward at batch 1 (272 vs
    170 tokens/s; the model's own is 0.86x ``generate()``, this one 1.28x) and 1.14x at batch
    8; the teacher 1.22x at batch 1; relay (random router, 5 %) 1.23x at batch 1 and 1.06x at
    batch 8. The gain is the fixed cost per forward, which small models and batches feel most.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = text_config(model)
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self._version: tuple[int, ...] | None = None
        self._layers: list[tuple[torch.Tensor, ...]] = []
        self._rope: tuple[torch.Tensor, ...] = (torch.empty(0),) * 3  # inv_freq, cos, signed sin

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
            return False
        rope = getattr(cfg, "rope_parameters", None) or {}
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        return (
            cfg.hidden_act == "silu"
            and rope.get("rope_type", "default") == "default"
            and getattr(cfg, "pretraining_tp", 1) == 1
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(rotary, "attention_scaling", None) == 1.0
        )

    def refresh(self, version: tuple[int, ...]) -> None:
        """Re-read the weights if a parameter changed since the last call."""
        if version == self._version:
            return
        self._version = version
        self._layers = []
        for layer in self.model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self._layers.append(
                (
                    layer.input_layernorm.weight,
                    qkv,
                    att.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    gate_up,
                    mlp.down_proj.weight,
                )
            )
        self._final_norm = self.model.model.norm.weight
        self._embed = self.model.get_input_embeddings().weight
        self._head = self.model.get_output_embeddings().weight

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, the same arithmetic as below
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _cos_sin(self, pos: torch.Tensor, hi: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables looked up by position: the values HF computes for those positions,
        the sine negated on the first half so that ``rotate_half(x) * sin`` becomes
        ``roll(x) * signed_sin`` (negation is exact)."""
        inv = self.model.model.rotary_emb.inv_freq
        inv_old, cos, sin = self._rope
        if len(cos) < hi or inv_old is not inv or cos.dtype != dtype:
            n = max(256, 2 * hi)
            freqs = torch.arange(n, device=inv.device).float().unsqueeze(-1) * inv.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            sin[:, : sin.shape[1] // 2].neg_()
            self._rope = (inv, cos, sin)
        return cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # [B, 1, T, D]

    def __call__(
        self, ids: torch.Tensor, rows: SlotRows, cols: torch.Tensor, last: torch.Tensor | None
    ) -> torch.Tensor:
        pos, hi = rows.pos, rows.hi
        b, t = ids.shape
        h, g, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self._embed)
        cos, sin = self._cos_sin(pos, hi, x.dtype)
        allowed = (cols[:hi] <= pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, hi]
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self._layers):
            qkv = F.linear(self._norm(x, w_in), w_qkv).view(b, t, h + 2 * g, d).transpose(1, 2)
            qk = qkv[:, : h + g]
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            rows.write(i, qk[:, h:].transpose(1, 2), qkv[:, h + g :].transpose(1, 2))
            k, v = rows.read(i)
            if g != h:
                k = k.repeat_interleave(h // g, dim=1)
                v = v.repeat_interleave(h // g, dim=1)
            att = F.scaled_dot_product_attention(qk[:, :h], k, v, attn_mask=allowed)
            x = x + F.linear(att.transpose(1, 2).reshape(b, t, h * d), w_o)
            gate, up = F.linear(self._norm(x, w_post), w_gu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        x = x[:, -1] if last is None else x[rows.batch[:, 0], last]
        return F.linear(self._norm(x, self._final_norm), self._head)
