"""An independent float64 NumPy implementation of the paper's methods for a timm ViT.

Written from the definitions in shared/spec/methods.md, with no autograd and none of the
package's code: contributions x_j·w_ij are materialised explicitly, attention gradients come from
central finite differences. Slow, so only for tiny models.
"""
from __future__ import annotations

import math

import numpy as np


def sdiv(a, b):
    den = b + 1e-9
    den = np.where(den == 0, 1e-9, den)
    return a / den * (b != 0)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


class NumpyViT:
    def __init__(self, model):
        g = lambda t: t.detach().double().numpy()  # noqa: E731
        self.p = {k: g(v) for k, v in model.state_dict().items()}
        self.depth = len(model.blocks)
        self.heads = model.blocks[0].attn.num_heads
        self.patch = model.patch_embed.patch_size[0]
        self.eps = model.blocks[0].norm1.eps
        self.eps_final = model.norm.eps

    # ---- forward, optionally with one block's attention replaced -------------------------
    def forward(self, img, override=None, keep=False):
        p, P = self.p, self.patch
        c, hh, ww = img.shape
        gh, gw = hh // P, ww // P
        wconv = p["patch_embed.proj.weight"]
        tokens = []
        for r in range(gh):
            for s in range(gw):
                patch = img[:, r * P:(r + 1) * P, s * P:(s + 1) * P]
                tokens.append((wconv * patch[None]).sum((1, 2, 3)) + p["patch_embed.proj.bias"])
        emb = np.stack(tokens)
        x0 = np.concatenate([p["cls_token"][0], emb], 0)
        x = x0 + p["pos_embed"][0]
        acts = {"img": img, "emb_cat": x0, "pos": np.broadcast_to(p["pos_embed"][0], x0.shape), "blocks": []}
        for b in range(self.depth):
            pre = f"blocks.{b}."
            h1 = layer_norm(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], self.eps)
            qkv = h1 @ p[pre + "attn.qkv.weight"].T + p[pre + "attn.qkv.bias"]
            n, c3 = qkv.shape
            d = c3 // 3 // self.heads
            q = qkv.reshape(n, 3, self.heads, d)[:, 0].transpose(1, 0, 2)
            k = qkv.reshape(n, 3, self.heads, d)[:, 1].transpose(1, 0, 2)
            v = qkv.reshape(n, 3, self.heads, d)[:, 2].transpose(1, 0, 2)
            qs = q * d ** -0.5
            scores = qs @ k.transpose(0, 2, 1)
            e = np.exp(scores - scores.max(-1, keepdims=True))
            att = e / e.sum(-1, keepdims=True)
            if override is not None and b in override:
                att = override[b]
            o = att @ v
            oc = o.transpose(1, 0, 2).reshape(n, -1)
            a_out = oc @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"]
            x_mid = x + a_out
            h2 = layer_norm(x_mid, p[pre + "norm2.weight"], p[pre + "norm2.bias"], self.eps)
            f1 = h2 @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"]
            g1 = gelu(f1)
            f2 = g1 @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]
            acts["blocks"].append(dict(x_in=x, h1=h1, qs=qs, k=k, v=v, att=att, oc=oc, a_out=a_out,
                                       x_mid=x_mid, h2=h2, g1=g1, f2=f2))
            x = x_mid + f2
        xf = layer_norm(x, p["norm.weight"], p["norm.bias"], self.eps_final)
        pooled = xf[0]
        logits = pooled @ p["head.weight"].T + p["head.bias"]
        acts["pooled"] = pooled
        return (logits, acts) if keep else logits

    def attention_grad(self, img, target, b, h=1e-6):
        _, acts = self.forward(img, keep=True)
        att = acts["blocks"][b]["att"].copy()
        grad = np.zeros_like(att)
        for idx in np.ndindex(*att.shape):
            up, down = att.copy(), att.copy()
            up[idx] += h
            down[idx] -= h
            grad[idx] = (self.forward(img, {b: up})[target] - self.forward(img, {b: down})[target]) / (2 * h)
        return grad

    # ---- rules, straight from their definitions -----------------------------------------
    @staticmethod
    def linear(x, w, r, shared):
        contrib = x[:, None, :] * w[None, :, :]  # (n, out, in): x_j w_ij
        pos = np.where((x[:, None, :] > 0) & (w[None] > 0), contrib, 0.0)
        neg = np.where((x[:, None, :] < 0) & (w[None] < 0), contrib, 0.0)
        zp, zn = pos.sum(-1, keepdims=True), neg.sum(-1, keepdims=True)
        if shared:
            return ((pos + neg) * sdiv(r[:, :, None], zp + zn)).sum(1)
        return (pos * sdiv(r[:, :, None], zp) + neg * sdiv(r[:, :, None], zn)).sum(1)

    @staticmethod
    def add(a, b, r, rescale):
        s = sdiv(r, a + b)
        ra, rb = a * s, b * s
        if rescale:
            sa, sb = ra.sum(), rb.sum()
            fa = sdiv(np.abs(sa), np.abs(sa) + np.abs(sb)) * r.sum()
            fb = sdiv(np.abs(sb), np.abs(sa) + np.abs(sb)) * r.sum()
            ra, rb = ra * sdiv(fa, sa), rb * sdiv(fb, sb)
        return ra, rb

    @staticmethod
    def bilinear(a, b, r):
        # z_ij = Σ_k a_ik b_kj ; each term's share of R_ij goes to both of its factors
        terms = a[..., :, :, None] * b[..., None, :, :]  # (..., i, k, j)
        share = terms * sdiv(r, a @ b)[..., :, None, :]
        return share.sum(-1) / 2, share.sum(-3) / 2

    def relevance(self, img, target, rules, to_pixels=False):
        """R^(b) for every block (after the A·V rule), and the pixel relevance if asked."""
        p = self.p
        shared = rescale = rules == "ours"
        logits, acts = self.forward(img, keep=True)
        seed = np.zeros_like(logits)
        seed[target] = 1.0
        r_pooled = self.linear(acts["pooled"][None], p["head.weight"], seed[None], shared)[0]
        n = acts["emb_cat"].shape[0]
        r = np.zeros((n, r_pooled.shape[0]))
        r[0] = r_pooled
        att_rel = {}
        for b in reversed(range(self.depth)):
            a, pre = acts["blocks"][b], f"blocks.{b}."
            r_res, r_mlp = self.add(a["x_mid"], a["f2"], r, rescale)
            r_g = self.linear(a["g1"], p[pre + "mlp.fc2.weight"], r_mlp, shared)
            r_h2 = self.linear(a["h2"], p[pre + "mlp.fc1.weight"], r_g, shared)
            r = r_res + r_h2
            r_res, r_att = self.add(a["x_in"], a["a_out"], r, rescale)
            r_oc = self.linear(a["oc"], p[pre + "attn.proj.weight"], r_att, shared)
            heads = a["att"].shape[0]
            r_o = r_oc.reshape(n, heads, -1).transpose(1, 0, 2)
            r_att_map, r_v = self.bilinear(a["att"], a["v"], r_o)
            att_rel[b] = r_att_map
            r_q, r_kt = self.bilinear(a["qs"], a["k"].transpose(0, 2, 1), r_att_map)
            r_k = r_kt.transpose(0, 2, 1)
            r_qkv = np.stack([r_q, r_k, r_v], 0).transpose(2, 0, 1, 3).reshape(n, -1)
            r = r_res + self.linear(a["h1"], p[pre + "attn.qkv.weight"], r_qkv, shared)
        if not to_pixels:
            return att_rel, None
        r_cat, _ = self.add(acts["emb_cat"], acts["pos"], r, rescale)
        r_emb = r_cat[1:]
        # z^B rule per patch: bounds are the image's min and max
        w = p["patch_embed.proj.weight"]
        lo, hi = img.min(), img.max()
        P = self.patch
        gh, gw = img.shape[1] // P, img.shape[2] // P
        pix = np.zeros_like(img)
        for t in range(gh * gw):
            rr, ss = divmod(t, gw)
            x = img[:, rr * P:(rr + 1) * P, ss * P:(ss + 1) * P]
            cont = x[None] * w - lo * np.clip(w, 0, None) - hi * np.clip(w, None, 0)  # (C, 3, P, P)
            z = cont.sum((1, 2, 3)) + 1e-9
            pix[:, rr * P:(rr + 1) * P, ss * P:(ss + 1) * P] = (cont * (r_emb[t] / z)[:, None, None, None]).sum(0)
        return att_rel, pix.sum(0)
