"""Adapter for decoder-only language models (Hugging Face `GPT2LMHeadModel`, `LlamaForCausalLM`):
the relevance of each input token for one next-token logit.

What is explained: the logits the model gives at the *last* token of the prompt (the last one whose
attention mask is 1; pad on the right, so that every prompt starts at position 0, as the model
assumes when it is given no position ids), one per vocabulary entry; the target is a vocabulary id
(default: the argmax, the greedy next token). The explained position's row plays the part of the
class token's row of an encoder classifier: `readout` is one-hot on it, so raw attention, rollout,
Transformer Attribution, GradCAM and generic attention read the last position's row of each
block's (causal) attention. Methods defined on a class token a classifier reads (`bt_h`, `bt_t`),
on LayerNorm input statistics (`ln_stats`), on a classifier that reads every layer (`legrad`) or on
each sublayer's tokens (`tokentm`) are refused in one sentence.

The forward is re-run op by op through the LRP `Tape` from the model's own modules, like the BERT
adapter's: it starts at the embedding output (GPT-2: token + learned position embeddings; Llama:
the token embedding), where relevance and gradients stop and token scores are summed over the
hidden units. Recorded per block:

* GPT-2: LayerNorm, the fused `c_attn` (a `Conv1D`, y = x W + b, seen as a linear map with weight
  Wᵀ: a view, not a copy), q·kᵀ, the scale (`attn.scaling`: 1/sqrt(d), also divided by the layer
  index with `scale_attn_by_inverse_layer_idx`), the causal and padding mask (an added constant of
  finfo.min), softmax, A·V, `c_proj`, the residual, LayerNorm, `mlp.c_fc`, the activation (gelu_new),
  `mlp.c_proj`, the residual; then `ln_f` and the tied `lm_head` at the last position.
* Llama: RMSNorm (a pass-through op like LayerNorm's division: the identity rule in AttnLRP; the
  module itself is called, and transformers computes it in float32 whatever the model's dtype),
  q/k/v projections, the rotary embedding on q and k (as in models/eva.py: x ⊙ cos + P(x) ⊙ (s ⊙ sin),
  two constant scalings, a permutation and their sum, cos and sin from the model's own
  `rotary_emb`, also computed in float32 by transformers), grouped-query attention (each key/value
  head repeated for its query heads: an index op whose adjoint sums the heads' relevance), the same
  scaled, masked softmax attention, `o_proj`, the residual, RMSNorm, the SwiGLU MLP act(x W_g) ⊙ (x W_u)
  (the gate product recorded as a bilinear product, eva.py's `elementwise_product`), `down_proj`,
  the residual; then the final RMSNorm and `lm_head` at the last position.

Use: `transexplain.explain(model, tokenizer(["The capital of France is"], return_tensors="pt"),
method="attnlrp")`, or `explain(DecoderAdapter(model, tokenizer), ["The capital of France is"], ...)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..lrp import Tape
from .base import CAPABILITIES, EncoderAdapter, Trace
from .eva import _rotation, elementwise_product
from .text import TextAdapter, TextBatch, ids_and_mask, word_ids_of

SUPPORTED_DECODERS = ("GPT2LMHeadModel", "LlamaForCausalLM")


def _refuse(why: str):
    raise UserError(f"This language model is not supported: {why}. Supported decoder-only models: "
                    f"{', '.join(SUPPORTED_DECODERS)}.")


class Conv1DLinear:
    """GPT-2's `Conv1D` (y = x W + b, W of shape (in, out)) as the linear map the tape records:
    weight Wᵀ, a view of the model's parameter (shared, not copied)."""

    def __init__(self, conv: nn.Module):
        self.weight = conv.weight.t()
        self.bias = conv.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Embedding(nn.Module):
    """The embedding output the tape starts from (the model's own modules): GPT-2's token + position
    embeddings (positions 0..N-1), Llama's token embedding. A module, so that the gradient methods
    can swap its output for a leaf with a forward hook (explainers/captum_methods.py)."""

    def __init__(self, kind: str, model: nn.Module):
        super().__init__()
        self.kind = kind
        if kind == "gpt2":
            self.wte, self.wpe = model.transformer.wte, model.transformer.wpe
        else:
            self.tok = model.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "gpt2":
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            return self.wte(input_ids) + self.wpe(pos)[None]
        return self.tok(input_ids)


class DecoderAdapter(EncoderAdapter):
    family = "decoder"
    description = "decoder-only language models (the next-token logit at the last position)"
    offers = frozenset(CAPABILITIES) - {"ln_stats", "class_token", "layer_readout", "sublayer_tokens"}
    #: every block, as rollout (the paper's ViT protocol without its skipped first block)
    default_start_layer = 0
    default_rollout_start_layer = 0
    default_row_normalize = False
    #: GradCAM's head weights: the mean gradient over the explained position's row (as the vision models)
    gradcam_full_matrix = False
    pixel_input = False

    def __init__(self, model: nn.Module, tokenizer=None, max_length: int | None = None):
        super().__init__(model)
        name = type(model).__name__
        cfg = model.config
        if name == "GPT2LMHeadModel":
            self.kind = "gpt2"
            self.layers = list(model.transformer.h)
            if getattr(cfg, "reorder_and_upcast_attn", False):
                _refuse("reorder_and_upcast_attn computes the attention in float32 in another order")
            if getattr(cfg, "add_cross_attention", False):
                _refuse("the model has cross-attention")
            self.final_norm = model.transformer.ln_f
            self.num_heads = cfg.n_head
            self.kv_heads = cfg.n_head
            self.head_dim = cfg.n_embd // cfg.n_head
            #: per block: its Conv1D projections as linear maps (views of the weights)
            self.conv = [{"c_attn": Conv1DLinear(layer.attn.c_attn), "attn_proj": Conv1DLinear(layer.attn.c_proj),
                          "c_fc": Conv1DLinear(layer.mlp.c_fc), "mlp_proj": Conv1DLinear(layer.mlp.c_proj)}
                         for layer in self.layers]
            default_length = cfg.n_positions
        elif name == "LlamaForCausalLM":
            self.kind = "llama"
            self.layers = list(model.model.layers)
            self.final_norm = model.model.norm
            attn = self.layers[0].self_attn
            self.num_heads = cfg.num_attention_heads
            self.kv_heads = cfg.num_key_value_heads
            self.head_dim = attn.head_dim
            for i, layer in enumerate(self.layers):
                if type(layer.mlp).__name__ != "LlamaMLP" or type(layer.self_attn).__name__ != "LlamaAttention":
                    _refuse(f"layer {i} has a {type(layer.self_attn).__name__} / {type(layer.mlp).__name__}")
            default_length = getattr(cfg, "max_position_embeddings", 2048)
        else:
            _refuse(f"{name} has another layout")
        if not isinstance(model.lm_head, nn.Linear):
            _refuse("its lm_head is not a linear layer")
        self.encoder = nn.Module()  # what the gradient methods hook (captum_methods._CaptumInput)
        self.encoder.embeddings = _Embedding(self.kind, model)
        self.num_blocks = len(self.layers)
        self.num_classes = model.lm_head.out_features
        self.tokenizer = tokenizer
        self.max_length = int(max_length or default_length)
        self.input_size = (self.max_length,)
        self._mask = None

    def with_model(self, model: nn.Module) -> "DecoderAdapter":
        return DecoderAdapter(model, tokenizer=self.tokenizer, max_length=self.max_length)

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, batch) -> TextBatch:
        """A TextBatch from a tokenizer's output, token ids ((B, N) or (N,)), a TextBatch, or text
        (a string or a list of strings; needs a tokenizer, which pads on the right)."""
        if isinstance(batch, TextBatch):
            return batch.to(self.device)
        if isinstance(batch, str):
            batch = [batch]
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(s, str) for s in batch):
            if self.tokenizer is None:
                raise UserError("This language model was given no tokenizer: pass DecoderAdapter(model, tokenizer) or token ids.")
            tok = self.tokenizer
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "right"
            batch = tok(list(batch), padding=True, return_tensors="pt")
        if torch.is_tensor(batch):
            batch = {"input_ids": batch}
        ids, mask = ids_and_mask(batch, "token ids or strings")
        if ids.shape[1] > self.max_length:
            raise UserError(f"The prompt has {ids.shape[1]} tokens but the model takes at most {self.max_length}: shorten it.")
        if (mask.sum(-1) == 0).any():
            raise UserError("A prompt in the batch has no tokens (its attention mask is all 0).")
        if (mask[:, 1:] > mask[:, :-1]).any():  # a 1 after a 0
            raise UserError("The prompts are padded on the left: pad on the right (tokenizer.padding_side = 'right'), so that "
                            "each prompt starts at position 0.")
        word_ids = word_ids_of(batch, ids.shape[0])
        return TextBatch(ids, mask, None, 1 - mask, word_ids).to(self.device)

    def embed(self, x: TextBatch) -> torch.Tensor:
        return self.encoder.embeddings(x.input_ids)

    @staticmethod
    def last_positions(mask: torch.Tensor) -> torch.Tensor:
        """(B,) the index of each prompt's last token (its last position with attention mask 1)."""
        n = mask.shape[1]
        return n - 1 - mask.flip(-1).argmax(-1)

    # -- the recorded forward --------------------------------------------------------------------
    def run(self, x, record: bool = False) -> Trace:
        if not isinstance(x, TextBatch):
            x = self.prepare(x)
        self._mask = x.attention_mask
        tape = Tape(record=record)
        h = self.embed(x)
        if torch.is_grad_enabled() and not h.requires_grad:  # frozen embeddings: the graph starts here
            h = h.detach().requires_grad_(True)
        start = h
        n_batch, n_tok, _ = h.shape
        allowed = torch.ones(n_tok, n_tok, dtype=torch.bool, device=h.device).tril()[None] & x.attention_mask.bool()[:, None, :]
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, torch.finfo(h.dtype).min)
        bias = bias[:, None]  # (B, 1, N, N): causal and key padding
        rope = None
        if self.kind == "llama":
            pos = torch.arange(n_tok, device=h.device)[None]
            cos, sin = self.model.model.rotary_emb(h, pos)  # (1, N, d), the model's own tables
            rope = (cos[:, None], sin[:, None])
        attentions, hidden, inputs = [], [], []
        for b, layer in enumerate(self.layers):
            inputs.append(h)
            block = self._gpt2_block if self.kind == "gpt2" else self._llama_block
            h, att = block(tape, layer, h, bias, b, rope)
            attentions.append(att)
            hidden.append(h)
        h = tape.passthrough(self.final_norm, h)
        last = self.last_positions(x.attention_mask)
        rows = torch.arange(n_batch, device=h.device)
        h = tape.move(lambda t: t[rows, last], h)
        logits = tape.linear(h, self.model.lm_head)
        return Trace(logits=logits, attentions=attentions, tape=tape, input=start,
                     extras={"attention_mask": x.attention_mask, "special_mask": x.special_mask, "last": last,
                             "hidden": hidden, "block_inputs": inputs})

    def _split(self, tape: Tape, t: torch.Tensor, heads: int) -> torch.Tensor:
        n_batch, n_tok, _ = t.shape
        d = self.head_dim
        return tape.move(lambda u: u.reshape(n_batch, n_tok, heads, d).transpose(1, 2), t)

    def _attend(self, tape: Tape, q, k, v, scaling: float, bias, b: int):
        """Softmax attention of (B, H, N, d) q, k, v: q·kᵀ, the scale, the mask, softmax, A·V; the
        (B, N, H·d) context and A."""
        scores = tape.matmul(q, tape.move(lambda t: t.transpose(-2, -1), k), tag=("attn_scores", b))
        scores = tape.passthrough(lambda t: t * scaling, scores)
        scores = tape.add(scores, bias)
        att = tape.softmax(scores)
        ctx = tape.matmul(att, v, tag=("attn_value", b))
        n_batch, heads, n_tok, d = ctx.shape
        return tape.move(lambda t: t.transpose(1, 2).reshape(n_batch, n_tok, heads * d), ctx), att

    def _gpt2_block(self, tape: Tape, layer, x, bias, b: int, rope=None):
        conv = self.conv[b]
        dim = x.shape[-1]
        h = tape.passthrough(layer.ln_1, x)
        qkv = tape.linear(h, conv["c_attn"])
        q, k, v = (self._split(tape, tape.move(lambda t, i=i: t[..., i * dim:(i + 1) * dim], qkv), self.num_heads)
                   for i in range(3))
        ctx, att = self._attend(tape, q, k, v, layer.attn.scaling, bias, b)
        x = tape.add(x, tape.linear(ctx, conv["attn_proj"]))
        h = tape.passthrough(layer.ln_2, x)
        h = tape.passthrough(layer.mlp.act, tape.linear(h, conv["c_fc"]))
        x = tape.add(x, tape.linear(h, conv["mlp_proj"]))
        return x, att

    def _rotary(self, tape: Tape, t: torch.Tensor, rope) -> torch.Tensor:
        """transformers' q·cos + rotate_half(q)·sin as two constant scalings, a permutation and a sum."""
        cos, sin = rope
        perm, signs = _rotation(t.shape[-1], True, t.device)
        sin_signed = sin * signs.to(sin.dtype)
        a = tape.passthrough(lambda u: u * cos, t)
        r = tape.passthrough(lambda u: u * sin_signed, tape.move(lambda u: u[..., perm], t))
        return tape.add(a, r)

    def _llama_block(self, tape: Tape, layer, x, bias, b: int, rope=None):
        att_mod, mlp = layer.self_attn, layer.mlp
        h = tape.passthrough(layer.input_layernorm, x)
        q = self._rotary(tape, self._split(tape, tape.linear(h, att_mod.q_proj), self.num_heads), rope)
        k = self._rotary(tape, self._split(tape, tape.linear(h, att_mod.k_proj), self.kv_heads), rope)
        v = self._split(tape, tape.linear(h, att_mod.v_proj), self.kv_heads)
        groups = self.num_heads // self.kv_heads
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads

            def repeat(t):
                n_batch, kv, n_tok, d = t.shape
                return t[:, :, None].expand(n_batch, kv, groups, n_tok, d).reshape(n_batch, kv * groups, n_tok, d)

            k, v = tape.move(repeat, k), tape.move(repeat, v)
        ctx, att = self._attend(tape, q, k, v, att_mod.scaling, bias, b)
        x = tape.add(x, tape.linear(ctx, att_mod.o_proj))
        h = tape.passthrough(layer.post_attention_layernorm, x)
        gate = tape.passthrough(mlp.act_fn, tape.linear(h, mlp.gate_proj))
        h = elementwise_product(tape, gate, tape.linear(h, mlp.up_proj))
        x = tape.add(x, tape.linear(h, mlp.down_proj))
        return x, att

    # -- token-space operators ------------------------------------------------------------------
    def readout(self, trace: Trace) -> torch.Tensor:
        """One-hot on the explained (last) position: its row of each attention map."""
        mask = trace.extras["attention_mask"]
        v = torch.zeros(mask.shape, dtype=trace.logits.dtype, device=trace.logits.device)
        v[torch.arange(mask.shape[0], device=v.device), trace.extras["last"]] = 1.0
        return v

    def mix(self, v, block, mats):
        return torch.bmm(v.unsqueeze(1), mats).squeeze(1)

    # padding-aware token maps, as the text classifiers' (the mask of the batch run last)
    _valid = TextAdapter._valid
    content_mean = TextAdapter.content_mean
    masked_matrix_mean = TextAdapter.masked_matrix_mean
    to_token_map = TextAdapter.to_token_map
    heatmap_from_tokens = TextAdapter.heatmap_from_tokens
