"""DeBERTa-v2 through the text adapter: its recorded forward equals transformers' own, and the
relevance, attention and gradient methods equal computations that use none of the package's code
(a NumPy forward and backward of the rules written from their definitions, torch.autograd on the
Hugging Face model, its `output_attentions`); and `tx-bench eraser` runs on a saved instance."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DebertaV2Config, DebertaV2ForSequenceClassification  # noqa: E402
from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position  # noqa: E402

from conftest import spread_weights  # noqa: E402
from transexplain import explain  # noqa: E402
from transexplain.errors import UserError  # noqa: E402
from transexplain.explainers import method_names  # noqa: E402
from transexplain.explainers.base import refusal  # noqa: E402
from transexplain.models import as_adapter  # noqa: E402
from transexplain.models.text import TextAdapter  # noqa: E402

from brute_force import NumpyViT, gelu, layer_norm, sdiv  # noqa: E402
from conftest import rollout_reference  # noqa: E402

TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=40, num_labels=3)
#: the layouts transformers' DeBERTa-v2 code covers: v3 (shared projections, log buckets, LayerNorm'd
#: relative embeddings, no absolute positions), v2 (own position projections, clamped span,
#: absolute positions too) and one relative term only
CONFIGS = {
    "v3": dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=4, max_relative_positions=-1,
               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0),
    "v2": dict(relative_attention=True, pos_att_type="c2p|p2c", max_relative_positions=5, share_att_key=False,
               position_biased_input=True, type_vocab_size=2),
    "c2p only": dict(relative_attention=True, pos_att_type="c2p", max_relative_positions=6, position_biased_input=False),
}


def tiny_deberta(layout="v3", seed=0, dtype=torch.float64):
    """Weights spread wider than the init (0.4·N(0,1), LayerNorm gains 1 ± 0.1), so that attention and
    the relative terms are far from uniform and zero."""
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(DebertaV2Config(**TINY, **CONFIGS[layout]))
    spread_weights(model, 0.4, lambda name: "LayerNorm" in name)
    return model.eval().to(dtype)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return ids * mask, mask


# -- the reference: DeBERTa in NumPy, the rules from their definitions -------------------------------
class NumpyDeberta:
    """One unpadded sequence. The embedding output (where the text tape starts) comes from the model's
    embedding module; everything after it is written out here."""

    def __init__(self, model, ids):
        self.model = model
        cfg = model.config
        self.p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
        self.heads = cfg.num_attention_heads
        self.kinds = list(cfg.pos_att_type or [])
        self.share = getattr(cfg, "share_att_key", False)
        self.eps = cfg.layer_norm_eps
        self.depth = cfg.num_hidden_layers
        buckets, max_rel = getattr(cfg, "position_buckets", -1), getattr(cfg, "max_relative_positions", -1)
        max_rel = max_rel if max_rel >= 1 else cfg.max_position_embeddings
        self.span = buckets if buckets > 0 else max_rel
        with torch.no_grad():
            self.h0 = model.deberta.embeddings(input_ids=ids[None])[0].double().numpy()
        n = self.h0.shape[0]
        t = torch.zeros(1, n, 1)
        rel = build_relative_position(t, t, bucket_size=buckets, max_position=max_rel)[0].numpy()
        self.c2p_idx = np.clip(rel + self.span, 0, 2 * self.span - 1)  # [i, j]
        self.p2c_idx = np.clip(-rel + self.span, 0, 2 * self.span - 1)  # [j, i]
        emb = self.p["deberta.encoder.rel_embeddings.weight"]
        if "layer_norm" in getattr(cfg, "norm_rel_ebd", "none"):
            emb = layer_norm(emb, self.p["deberta.encoder.LayerNorm.weight"], self.p["deberta.encoder.LayerNorm.bias"], self.eps)
        self.rel_emb = emb[: 2 * self.span]
        d = cfg.hidden_size // self.heads
        scale_factor = 1 + len(self.kinds)
        self.scale = float(np.sqrt(np.float32(d * scale_factor)))  # a float32 square root, as transformers

    def lin(self, x, name):
        return x @ self.p[name + ".weight"].T + self.p[name + ".bias"]

    def split(self, t):
        return t.reshape(t.shape[0], self.heads, -1).transpose(1, 0, 2)

    def forward(self):
        x, acts = self.h0, []
        for b in range(self.depth):
            pre = f"deberta.encoder.layer.{b}.attention."
            q, k, v = (self.split(self.lin(x, pre + f"self.{w}_proj")) for w in ("query", "key", "value"))
            kts = k.transpose(0, 2, 1) / self.scale
            content = q @ kts
            a = dict(x=x, q=q, k=k, v=v, kts=kts, content=content)
            rel = np.zeros_like(content)
            if "c2p" in self.kinds:
                pk = self.split(self.lin(self.rel_emb, pre + ("self.key_proj" if self.share else "self.pos_key_proj")))
                a["pk_g"] = pk[:, self.c2p_idx]  # (H, i, j, d): k^r_{δ(i,j)}
                a["c2p_raw"] = np.einsum("hia,hija->hij", q, a["pk_g"])
                a["c2p"] = a["c2p_raw"] / self.scale
                rel = a["c2p"]
            if "p2c" in self.kinds:
                pq = self.split(self.lin(self.rel_emb, pre + ("self.query_proj" if self.share else "self.pos_query_proj")))
                a["pq_g"] = pq[:, self.p2c_idx]  # (H, j, i, d): q^r_{δ'(j,i)}
                a["p2c_raw"] = np.einsum("hja,hjia->hij", k, a["pq_g"])
                a["p2c"] = a["p2c_raw"] / self.scale
                rel = a["p2c"] if "c2p" not in self.kinds else a["c2p"] + a["p2c"]
            a["rel"] = rel
            logits = content + rel if self.kinds else content
            e = np.exp(logits - logits.max(-1, keepdims=True))
            att = e / e.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(1, 0, 2).reshape(x.shape[0], -1)
            ao = self.lin(ctx, pre + "output.dense")
            x1 = layer_norm(ao + x, self.p[pre + "output.LayerNorm.weight"], self.p[pre + "output.LayerNorm.bias"], self.eps)
            lp = f"deberta.encoder.layer.{b}."
            i = self.lin(x1, lp + "intermediate.dense")
            g = gelu(i)
            o = self.lin(g, lp + "output.dense")
            y = layer_norm(o + x1, self.p[lp + "output.LayerNorm.weight"], self.p[lp + "output.LayerNorm.bias"], self.eps)
            a.update(logits=logits, att=att, ctx=ctx, ao=ao, x1=x1, i=i, g=g, o=o)
            acts.append(a)
            x = y
        cls = x[0]
        pre_act = self.lin(cls[None], "pooler.dense")
        pooled = gelu(pre_act)
        out = self.lin(pooled, "classifier")[0]
        return out, dict(blocks=acts, cls=cls, pre_act=pre_act, pooled=pooled, last=x)

    def backward(self, target, rules, eps=0.0):
        """rules "ours" (Transformer Attribution's): α1β0 shared, rescaled proportional additions,
        halved bilinear products, identity for LayerNorm/GELU/softmax/scales; rules "attnlrp": the
        ε-rule everywhere, LayerNorm with σ constant, the softmax rule, ε-then-halved products.
        Returns ({block: R of A}, relevance of the embedding output)."""
        out, acts = self.forward()
        p = self.p
        if rules == "ours":
            def lin(x, name, r):
                return NumpyViT.linear(x, p[name + ".weight"], r, True)

            def add(a, b, r):
                return NumpyViT.add(a, b, r, True)

            def ln(x, name, r):
                return r

            def product(a, b, r):  # (.., i, k) @ (.., k, j)
                return NumpyViT.bilinear(a, b, r)

            def softmax(x, s, r):
                return r

            def share(terms, z, r):
                return terms * sdiv(r, z)[..., None] / 2
            seed = np.eye(out.shape[0])[target]
        else:
            def stab(z):
                return z + eps * np.where(z >= 0, 1.0, -1.0)

            def lin(x, name, r):
                w, bias = p[name + ".weight"], p[name + ".bias"]
                contrib = x[:, :, None] * w.T[None]
                return (contrib / stab(contrib.sum(1) + bias)[:, None, :] * r[:, None, :]).sum(2)

            def add(a, b, r):
                s = r / stab(a + b)
                return a * s, b * s

            def ln(x, name, r):
                w, bias = p[name + ".weight"], p[name + ".bias"]
                d = x.shape[-1]
                sd = np.sqrt(((x - x.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + self.eps)
                contrib = x[:, :, None] * (np.eye(d) - 1.0 / d)[None] * (w[None, None, :] / sd[:, :, None])
                return (contrib / stab(contrib.sum(1) + bias)[:, None, :] * r[:, None, :]).sum(2)

            def product(a, b, r):
                terms = a[..., :, :, None] * b[..., None, :, :]
                sh = terms / stab(a @ b)[..., :, None, :] * r[..., :, None, :]
                return sh.sum(-1) / 2, sh.sum(-3) / 2

            def softmax(x, s, r):
                return x * (r - s * r.sum(-1, keepdims=True))

            def share(terms, z, r):
                return terms / stab(z)[..., None] * r[..., None] / 2
            seed = np.eye(out.shape[0])[target] * out
        r_pooled = lin(acts["pooled"], "classifier", seed[None])  # GELU: identity
        r_cls = lin(acts["cls"][None], "pooler.dense", r_pooled)
        r = np.zeros_like(acts["last"])
        r[0] = r_cls[0]
        att_rel = {}
        for b in reversed(range(self.depth)):
            a, lp = acts["blocks"][b], f"deberta.encoder.layer.{b}."
            pre = lp + "attention."
            r = ln(a["o"] + a["x1"], lp + "output.LayerNorm", r)
            r_o, r_x1 = add(a["o"], a["x1"], r)
            r_x1 = r_x1 + lin(a["x1"], lp + "intermediate.dense", lin(a["g"], lp + "output.dense", r_o))
            r = ln(a["ao"] + a["x"], pre + "output.LayerNorm", r_x1)
            r_ao, r_x = add(a["ao"], a["x"], r)
            n = r_x.shape[0]
            r_ctx = self.split(lin(a["ctx"], pre + "output.dense", r_ao))
            r_att, r_v = product(a["att"], a["v"], r_ctx)
            att_rel[b] = r_att
            r_logits = softmax(a["logits"], a["att"], r_att)
            r_logits, _ = add(a["logits"], np.zeros_like(a["logits"]), r_logits)  # the (all-zero) mask
            if self.kinds:
                r_content, r_rel = add(a["content"], a["rel"], r_logits)
            else:
                r_content, r_rel = r_logits, None
            r_q, r_kts = product(a["q"], a["kts"], r_content)
            r_k = r_kts.transpose(0, 2, 1)
            if len(self.kinds) == 2:
                r_c2p, r_p2c = add(a["c2p"], a["p2c"], r_rel)
            else:
                r_c2p = r_p2c = r_rel
            if "c2p" in self.kinds:  # z_ij = Σ_a q_ia k^r_{δ(i,j)a}: each term's share of R_ij, half to q
                r_q = r_q + share(a["q"][:, :, None, :] * a["pk_g"], a["c2p_raw"], r_c2p).sum(2)
            if "p2c" in self.kinds:  # z_ij = Σ_a k_ja q^r_{δ'(j,i)a}: half to k
                sh = share(a["k"][:, :, None, :] * a["pq_g"], a["p2c_raw"].transpose(0, 2, 1), r_p2c.transpose(0, 2, 1))
                r_k = r_k + sh.sum(2)
            merge = lambda t: t.transpose(1, 0, 2).reshape(n, -1)  # noqa: E731
            r = r_x + sum(lin(a["x"], pre + f"self.{w}_proj", merge(rw)) for w, rw in (("query", r_q), ("key", r_k), ("value", r_v)))
        return att_rel, r


def hf_attention_grads(model, ids, mask, target):
    """∇A of the target logit from torch.autograd on the Hugging Face model, with its attentions."""
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    grads = torch.autograd.grad(out.logits.gather(1, target[:, None]).sum(), out.attentions)
    return out, grads


def close(ours, expected, rtol=1e-6):
    ours, expected = np.asarray(ours).reshape(-1), np.asarray(expected).reshape(-1)
    scale = np.abs(expected).max()
    assert scale > 0
    err = np.abs(ours - expected).max()
    assert err <= rtol * scale, (err, scale)
    return err / scale


# -- the forward -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(CONFIGS))
def test_recorded_logits_and_attentions_equal_hf(layout):
    model = tiny_deberta(layout)
    ids, mask = padded_batch()
    adapter = as_adapter(model)
    assert isinstance(adapter, TextAdapter) and adapter.kind == "deberta"
    trace = adapter.run(adapter.prepare({"input_ids": ids, "attention_mask": mask}), record=True)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert (trace.logits - ref.logits).abs().max().item() <= 1e-12
    for ours, theirs in zip(trace.attentions, ref.attentions, strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-12
    m32 = tiny_deberta(layout, dtype=torch.float32)
    got = TextAdapter(m32).run(TextAdapter(m32).prepare({"input_ids": ids, "attention_mask": mask})).logits
    torch.testing.assert_close(got, m32(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    # the NumPy reference agrees with transformers, per unpadded sample
    for i in range(3):
        n = int(mask[i].sum())
        logits, _ = NumpyDeberta(model, ids[i, :n]).forward()
        close(logits, ref.logits[i].numpy(), 1e-10)


def test_raw_attention_and_rollout_equal_hf_attentions():
    model = tiny_deberta("v3")
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    batch = {"input_ids": ids, "attention_mask": mask}
    raw = explain(model, batch, "raw_attention", precision="float64").token_map
    torch.testing.assert_close(raw, ref.attentions[-1].mean(1)[:, 0] * mask, atol=1e-12, rtol=0)
    roll = explain(model, batch, "rollout", precision="float64").token_map
    torch.testing.assert_close(roll, rollout_reference(ref.attentions)[:, 0] * mask, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_gradient_methods_equal_autograd_on_the_model(method):
    """Gradients at the embedding output (where the text methods differentiate) from the Hugging Face
    model's own forward, the embedding output swapped for a leaf by a hook."""
    model = tiny_deberta("v2")
    ids, mask = padded_batch()
    target = torch.tensor([0, 2, 1])
    leaf = {}

    def hook(module, args, out):
        leaf["h"] = out.detach().requires_grad_(True)
        return leaf["h"]

    handle = model.deberta.embeddings.register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), leaf["h"])
    expected = g.abs().sum(-1) if method == "saliency" else (g * leaf["h"]).sum(-1)
    got = explain(model, {"input_ids": ids, "attention_mask": mask}, method, target=target, precision="float64").token_map
    torch.testing.assert_close(got, (expected * mask).detach(), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["v3", "v2"])
@pytest.mark.parametrize("start", [0, 1])
def test_transformer_attribution_equals_reference(layout, start):
    """R^(b) from the NumPy rules (block 0's passes back through block 1's relative terms), ∇A from
    autograd on the model, combined as the definition says (the text protocol row-normalises)."""
    model = tiny_deberta(layout, seed=1)
    ids, mask = padded_batch()
    target = torch.tensor([1, 0, 2])
    e = explain(model, {"input_ids": ids, "attention_mask": mask}, "transformer_attribution", target=target,
                start_layer=start, precision="float64")
    for i in range(3):
        n = int(mask[i].sum())
        ref = NumpyDeberta(model, ids[i, :n])
        att_rel, _ = ref.backward(int(target[i]), "ours")
        _, grads = hf_attention_grads(model, ids[i:i + 1, :n], mask[i:i + 1, :n], target[i:i + 1])
        v = np.eye(n)[0]
        for b in reversed(range(start, ref.depth)):
            m = np.clip(grads[b][0].detach().numpy() * att_rel[b], 0, None).mean(0) + np.eye(n)
            v = v @ (m / m.sum(-1, keepdims=True))
        close(e.token_map[i, :n].numpy(), v, 1e-10)
        assert (e.token_map[i, n:] == 0).all()


@pytest.mark.parametrize("layout", ["v3", "v2", "c2p only"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_attnlrp_equals_reference(layout, eps):
    """AttnLRP to the embedding output, summed over hidden units, against the ε-rules written out
    contribution by contribution (the relative terms as bilinear products with a constant factor)."""
    model = tiny_deberta(layout, seed=2)
    ids, mask = padded_batch()
    target = torch.tensor([2, 1, 0])
    e = explain(model, {"input_ids": ids, "attention_mask": mask}, "attnlrp", target=target, epsilon=eps,
                precision="float64")
    for i in range(3):
        n = int(mask[i].sum())
        _, r = NumpyDeberta(model, ids[i, :n]).backward(int(target[i]), "attnlrp", eps)
        close(e.token_map[i, :n].numpy(), r.sum(-1), 1e-10)
        assert (e.token_map[i, n:] == 0).all()


def test_every_method_runs_batch_invariant_and_refusals():
    model = tiny_deberta("v3")
    adapter = as_adapter(model)
    ids, mask = padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask}
    target = torch.tensor([0, 1, 2])
    for method in method_names():
        if refusal(method, adapter) is not None:
            assert method == "ln_stats"
            continue
        e = explain(adapter, batch, method, target=target, precision="float64")
        assert e.token_map.shape == (3, 9) and torch.isfinite(e.token_map).all(), method
        assert (e.token_map[mask == 0] == 0).all(), method
        if method in ("random", "smoothgrad"):
            continue
        one = explain(adapter, {"input_ids": ids[2:, :4], "attention_mask": mask[2:, :4]}, method, target=target[2:],
                      precision="float64")
        torch.testing.assert_close(e.token_map[2, :4], one.token_map[0], atol=1e-8, rtol=1e-6, msg=method)
    with pytest.raises(UserError, match="ln_stats"):
        explain(adapter, batch, "ln_stats")
    torch.manual_seed(0)
    conv = DebertaV2ForSequenceClassification(DebertaV2Config(**TINY, relative_attention=True, pos_att_type="p2c|c2p",
                                                              conv_kernel_size=3))
    with pytest.raises(UserError, match="convolution"):
        as_adapter(conv)


# -- the CLI -------------------------------------------------------------------------------------------
def save_tiny_text_folder(model, root: Path) -> Path:
    """The model with a WordPiece tokenizer (MiniLM's vocabulary) as a local Hugging Face folder."""
    from transformers import AutoTokenizer

    from transexplain.models.text import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_eraser_command_on_a_saved_deberta(tmp_path):
    from transexplain.results.store import ResultStore
    from transexplain.models.text import minilm_dir

    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(minilm_dir())).vocab_size
    torch.manual_seed(0)
    # two unnamed classes: the embedded reviews' NEG, POS in their order
    config = DebertaV2Config(**{**TINY, "vocab_size": vocab, "max_position_embeddings": 64, "num_labels": 2}, **CONFIGS["v3"])
    folder = save_tiny_text_folder(DebertaV2ForSequenceClassification(config), tmp_path / "deberta")
    out = tmp_path / "e.h5"
    exe = Path(sys.executable).parent / "tx-bench"
    methods = "transformer_attribution,attnlrp,saliency"
    r = subprocess.run([str(exe), "eraser", "--model", str(folder), "--method", methods, "--limit", "2", "--out",
                        str(out), "--quiet"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr
    store = ResultStore(out)
    assert store.is_complete and all(store.done(m) == 2 for m in methods.split(","))
    assert math.isfinite(store.summary("attnlrp")["auprc"])
