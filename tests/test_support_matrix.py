"""The method x architecture matrix comes from what methods need and what adapters offer."""
import subprocess
import sys

import pytest
import torch

from transexplain import explain
from transexplain.errors import UserError
from transexplain.explainers import base
from transexplain.models.base import CAPABILITIES
from transexplain.models.registry import adapter_classes

from conftest import make_vit


def test_every_declared_need_is_a_known_capability():
    for name, cls in base._REGISTRY.items():
        assert set(cls.needs) <= set(CAPABILITIES), name
    for family, cls in adapter_classes().items():
        assert set(cls.offers) <= set(CAPABILITIES), family


@pytest.fixture
def class_token_method(monkeypatch):
    """A throwaway method that reads the class token's row (registered for this test only)."""

    class ClassRow(base.Explainer):
        name = "class_row_probe"
        needs = frozenset({"attention", "class_token"})

        def scores(self, adapter, x, target):
            trace = adapter.run(x)
            return trace.attentions[-1].mean(1)[:, 0], trace.logits.detach(), target

    monkeypatch.setitem(base._REGISTRY, ClassRow.name, ClassRow)
    return ClassRow.name


def test_a_class_token_method_is_refused_on_swin_and_runs_on_vit(class_token_method):
    row = base.support_matrix()[class_token_method]
    assert row["vit"] is None and row["bert"] is None
    assert "Swin" in row["swin"] and class_token_method in row["swin"] and "class token" in row["swin"]
    out = explain(make_vit(), torch.randn(2, 3, 16, 16, dtype=torch.float64), method=class_token_method)
    assert out.token_map.shape == (2, 4, 4)

    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=2,
                             embed_dim=8, depths=(1, 1), num_heads=(1, 1), num_classes=3).double().eval()
    with pytest.raises(UserError, match="not defined on Swin"):
        explain(swin, torch.randn(1, 3, 32, 32, dtype=torch.float64), method=class_token_method)


def test_methods_command_prints_a_row_per_method():
    out = subprocess.run([sys.executable, "-m", "transexplain", "methods"], capture_output=True, text=True, check=True).stdout
    table = out.split("Where each method runs")[1].splitlines()
    header = table[1].split()
    assert header == ["method", *adapter_classes()]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:] if line and not line.startswith(" ")}
    assert set(rows) == set(base.method_names())
    matrix = base.support_matrix()
    for name, cells in rows.items():
        assert cells == ["yes" if matrix[name][f] is None else "no" for f in header[1:]]


def test_method_option_all_leaves_out_what_the_architecture_cannot_run(class_token_method):
    from transexplain.commands.common import resolve_methods
    from transexplain.models import as_adapter

    import timm

    swin = as_adapter(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                                        window_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 1), num_classes=3).eval())
    vit = as_adapter(make_vit())
    assert class_token_method in resolve_methods("all", vit)
    on_swin = resolve_methods("all", swin)
    # exactly the methods that need no class token (the one capability the Swin adapter lacks)
    assert on_swin == [m for m in base.method_names() if "class_token" not in base.get_method(m).needs]
    assert class_token_method not in on_swin
    with pytest.raises(UserError, match="class token"):
        resolve_methods(f"rollout,{class_token_method}", swin)
    assert resolve_methods(f"rollout,{class_token_method}", vit) == ["rollout", class_token_method]


def test_docs_models_holds_the_generated_family_matrix():
    from pathlib import Path

    from transexplain.models.families import matrix_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    block = doc.split("<!-- matrix:begin -->\n", 1)[1].split("<!-- matrix:end -->", 1)[0]
    assert block == matrix_markdown(), "docs/models.md is out of date: paste `tx-bench methods --models` between the markers"
