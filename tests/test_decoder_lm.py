"""Decoder-only language models (models/decoder.py): the relevance of each prompt token for the
next-token logit at the last position, on tiny random GPT-2 and Llama (grouped-query attention)
models in float64, with a right-padded batch."""
import pytest
import torch
import torch.nn.functional as F

from transexplain import explain
from transexplain.errors import UserError
from transexplain.explainers.base import refusal
from transexplain.models import as_adapter
from transexplain.models.decoder import DecoderAdapter

from conftest import rollout_reference, spread_weights

VOCAB = 40


def _spread(model, seed=0):
    """Weights spread so that attention is peaked and the SwiGLU gate far from linear."""
    torch.manual_seed(seed + 1)
    spread_weights(model, 0.5, lambda name: "ln" in name or "norm" in name)
    return model.double().eval()


def gpt2(attn="sdpa", **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     attn_implementation=attn, **kw)
    return _spread(GPT2LMHeadModel(cfg))


def llama(kv_heads=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1)
    return _spread(LlamaForCausalLM(cfg))


MODELS = {"gpt2": gpt2, "llama": llama}


def batch():
    """Two prompts, the second right-padded (its last token at position 4)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask}


LAST = torch.tensor([6, 4])


def own_logits(model, b, embeds=None):
    """The model's own next-token logits at each prompt's last token (from input ids, or from the
    token embeddings given as inputs_embeds)."""
    kwargs = {"input_ids": b["input_ids"]} if embeds is None else {"inputs_embeds": embeds}
    return model(attention_mask=b["attention_mask"], **kwargs).logits[torch.arange(2), LAST]


@pytest.mark.parametrize("name", list(MODELS))
def test_recorded_logits_are_the_models_own(name):
    model = MODELS[name]()
    adapter = as_adapter(model)
    assert isinstance(adapter, DecoderAdapter) and adapter.num_classes == VOCAB
    with torch.no_grad():
        got = adapter.run(batch()).logits
        want = own_logits(model, batch())
        alone = adapter.run({"input_ids": batch()["input_ids"][1:, :5]}).logits  # the padded prompt alone
    assert (got - want).abs().max().item() < 1e-12
    assert (alone - got[1:]).abs().max().item() < 1e-12


def test_gpt2_attention_and_rollout_equal_the_models_own_attention():
    model = gpt2(attn="eager")  # eager: transformers hands back the attention probabilities
    b = batch()
    with torch.no_grad():
        atts = model(**b, output_attentions=True).attentions
        trace = as_adapter(model).run(b)
    for ours, theirs in zip(trace.attentions, atts):
        valid = b["attention_mask"].bool()  # rows of real tokens (padded rows are never read)
        assert (ours - theirs).abs()[valid[:, None, :, None].expand_as(ours)].max().item() < 1e-12
    joint = rollout_reference(list(atts))
    want = joint[torch.arange(2), LAST] * b["attention_mask"]
    assert torch.allclose(explain(model, b, method="rollout").token_map, want, atol=1e-12)
    raw = atts[-1].mean(1)[torch.arange(2), LAST]
    assert torch.allclose(explain(model, b, method="raw_attention").token_map, raw * b["attention_mask"], atol=1e-12)


def _embedding_leaf(model, name, b):
    """(the tape's start: the embedding output, the token embeddings as a leaf for inputs_embeds)."""
    if name == "gpt2":
        tok = model.transformer.wte(b["input_ids"]).detach().requires_grad_(True)
        return tok + model.transformer.wpe(torch.arange(tok.shape[1]))[None], tok
    tok = model.model.embed_tokens(b["input_ids"]).detach().requires_grad_(True)
    return tok, tok


@pytest.mark.parametrize("name", list(MODELS))
def test_saliency_and_input_x_gradient_equal_autograd_on_the_model(name):
    model = MODELS[name]()
    b = batch()
    start, leaf = _embedding_leaf(model, name, b)
    logits = own_logits(model, b, embeds=leaf)
    target = logits.argmax(-1)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), leaf)
    valid = b["attention_mask"].double()
    sal = explain(model, b, method="saliency")
    assert torch.equal(sal.target, target)
    assert torch.allclose(sal.token_map, g.abs().sum(-1) * valid, atol=1e-12, rtol=1e-9)
    ixg = explain(model, b, method="input_x_gradient").token_map
    assert torch.allclose(ixg, (g * start.detach()).sum(-1) * valid, atol=1e-12, rtol=1e-9)
    other = explain(model, b, method="saliency", target=[3, 5])  # a given vocabulary id per prompt
    (g3,) = torch.autograd.grad(own_logits(model, b, embeds=leaf)[:, [3, 5]].diagonal().sum(), leaf)
    assert torch.allclose(other.token_map, g3.abs().sum(-1) * valid, atol=1e-12, rtol=1e-9)


# -- AttnLRP as Gradient x Input of a hand-written forward carrying its rules' gradients --------------
# With ε = 0 AttnLRP's rules are Gradient x Input of a forward in which every element-wise
# non-linearity (GELU, SiLU) and every RMSNorm passes its own ratio f(x)/x as a constant (the
# identity rule), every LayerNorm holds σ constant, and every product of two activations (Q·Kᵀ, A·V,
# the SwiGLU gate) halves the gradient to each factor; linear maps (rotary embeddings included) and
# the softmax keep their true gradients. Written from the models' parameters, without the package.
def _ratio(f, x):
    y = f(x)
    return x * torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x)).detach()


def _ln_const_sigma(ln, x):
    mu = x.mean(-1, keepdim=True)
    sd = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps).detach()
    return (x - mu) / sd * ln.weight + ln.bias


def _half(a, b, op=torch.matmul):
    return 0.5 * (op(a, b.detach()) + op(a.detach(), b))


def _mask_bias(mask, n):
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)[:, None]


def _heads(t, h):
    return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def _merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def gpt2_attnlrp_forward(m, mask):
    def forward(h):
        bias = _mask_bias(mask, h.shape[1])
        for blk in m.transformer.h:
            a = _ln_const_sigma(blk.ln_1, h)
            q, k, v = (_heads(t, m.config.n_head) for t in (a @ blk.attn.c_attn.weight + blk.attn.c_attn.bias).chunk(3, -1))
            att = (_half(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias).softmax(-1)
            h = h + _merge(_half(att, v)) @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
            f = _ratio(blk.mlp.act, _ln_const_sigma(blk.ln_2, h) @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias)
            h = h + f @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
        return _ln_const_sigma(m.transformer.ln_f, h)[torch.arange(2), LAST] @ m.lm_head.weight.T

    return forward


def llama_attnlrp_forward(m, mask):
    cfg = m.config

    def rot(t, cos, sin):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    def forward(h):
        n = h.shape[1]
        bias = _mask_bias(mask, n)
        cos, sin = m.model.rotary_emb(h, torch.arange(n)[None])  # the model's own tables
        cos, sin = cos[:, None], sin[:, None]
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        for layer in m.model.layers:
            sa, mlp = layer.self_attn, layer.mlp
            a = _ratio(layer.input_layernorm, h)
            q = rot(_heads(F.linear(a, sa.q_proj.weight), cfg.num_attention_heads), cos, sin)
            k = rot(_heads(F.linear(a, sa.k_proj.weight), cfg.num_key_value_heads), cos, sin).repeat_interleave(groups, 1)
            v = _heads(F.linear(a, sa.v_proj.weight), cfg.num_key_value_heads).repeat_interleave(groups, 1)
            att = (_half(q, k.transpose(-1, -2)) * sa.head_dim ** -0.5 + bias).softmax(-1)
            h = h + F.linear(_merge(_half(att, v)), sa.o_proj.weight)
            a = _ratio(layer.post_attention_layernorm, h)
            gate = _ratio(F.silu, F.linear(a, mlp.gate_proj.weight))
            h = h + F.linear(_half(gate, F.linear(a, mlp.up_proj.weight), op=torch.mul), mlp.down_proj.weight)
        return F.linear(_ratio(m.model.norm, h)[torch.arange(2), LAST], m.lm_head.weight)

    return forward


@pytest.mark.parametrize("name", list(MODELS))
def test_attnlrp_equals_the_rules_as_gradient_x_input(name):
    model = MODELS[name]()
    b = batch()
    got = explain(model, b, method="attnlrp", epsilon=0.0)
    start, _ = _embedding_leaf(model, name, b)
    x = start.detach().clone().requires_grad_(True)
    forward = (gpt2_attnlrp_forward if name == "gpt2" else llama_attnlrp_forward)(model, b["attention_mask"])
    logits = forward(x)
    with torch.no_grad():
        assert (logits - own_logits(model, b)).abs().max().item() < 1e-12  # the hand-written forward is the model's
    (g,) = torch.autograd.grad(logits.gather(1, got.target[:, None]).sum(), x)
    ref = (g * x.detach()).sum(-1) * b["attention_mask"]
    assert (got.token_map - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_offered_method_runs_zero_on_padding_and_batch_invariant(name):
    from transexplain import list_methods

    model = MODELS[name]()
    adapter = as_adapter(model)
    b = batch()
    alone = {"input_ids": b["input_ids"][1:, :5]}
    ran = []
    for method in list_methods():
        why = refusal(method, adapter)
        if why is not None:
            with pytest.raises(UserError, match="decoder-only"):
                explain(model, b, method=method)
            continue
        out = explain(model, b, method=method)
        assert out.token_map.shape == (2, 7) and torch.isfinite(out.token_map).all(), method
        assert (out.token_map[1, 5:] == 0).all(), method
        single = explain(model, alone, method=method).token_map
        assert torch.allclose(single[0], out.token_map[1, :5], atol=1e-10, rtol=1e-8), method
        ran.append(method)
    # what docs/models.md says runs (and that the others are refused)
    assert sorted(ran) == sorted(["raw_attention", "rollout", "random", "saliency", "input_x_gradient",
                                  "integrated_gradients", "smoothgrad", "gradcam", "generic_attention",
                                  "transformer_attribution", "partial_lrp", "full_lrp", "attnlrp", "cp_lrp", "attcat"])


def test_text_with_a_tokenizer_and_bad_inputs():
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(VOCAB - 1)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    assert not isinstance(tok, GPT2TokenizerFast)
    model = gpt2()
    adapter = DecoderAdapter(model, tok)
    out = explain(adapter, ["w3 w5 w7 w9", "w2 w4"], method="attnlrp")
    assert out.token_map.shape == (2, 4) and (out.token_map[1, 2:] == 0).all()
    ids = torch.tensor([[4, 6, 8, 10], [3, 5, 0, 0]])
    same = explain(model, {"input_ids": ids, "attention_mask": (torch.arange(4) < torch.tensor([[4], [2]])).long()},
                   method="attnlrp")
    assert torch.allclose(out.token_map, same.token_map, atol=1e-12)
    with pytest.raises(UserError, match="padded on the left"):
        explain(model, {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}, method="saliency")
    with pytest.raises(UserError, match="no tokenizer"):
        explain(model, ["w1 w2"], method="saliency")
    with pytest.raises(UserError, match="out of range"):
        explain(model, ids, method="saliency", target=VOCAB)
    with pytest.raises(UserError, match="at most 16"):
        explain(model, torch.zeros(1, 17, dtype=torch.long), method="saliency")


def test_unsupported_decoders_are_refused_in_one_sentence():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(UserError, match="not supported"):
        as_adapter(GPT2Model(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)))
    with pytest.raises(UserError, match="reorder_and_upcast_attn"):
        as_adapter(gpt2(reorder_and_upcast_attn=True))
    for method in ("bt_h", "ln_stats", "legrad", "tokentm"):
        assert "decoder-only" in refusal(method, DecoderAdapter(gpt2()))
