"""The sparse-autoencoder section of ``aecore demo``: both parts run end to end at a
small scale, write valid figures and a report section with finite metrics, and the
command runs the section when an SAE is named (and only then)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import aecore
from aecore.cli import main
from aecore.errors import ConfigError

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

#: a few seconds of training: the test checks the plumbing, the full scale the quality
SCALE = 0.05


@pytest.fixture(scope="module")
def one_thread():
    # two torch threads on two cores shared with other work spin against each other
    # (ten times slower here): the small models need only one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def section(tmp_path_factory, one_thread):
    from aecore.sae.demo import sae_demo

    out = tmp_path_factory.mktemp("sae_demo")
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = sae_demo(out, seed=0, log=messages.append, scale=SCALE)
    # no warning from our demo (nor from the libraries it drives)
    assert not [f"{w.category.__name__}: {w.message}" for w in caught]
    return out, lines, messages


def _table_row(lines: list[str], first_header: str) -> dict[str, str]:
    """The one data row of the markdown table whose header starts with ``first_header``."""
    at = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    names = [c.strip() for c in lines[at].strip("|").split("|")]
    values = [c.strip() for c in lines[at + 2].strip("|").split("|")]
    assert lines[at + 1].startswith("| --- |")
    return dict(zip(names, values, strict=True))


def _number(text: str) -> float:
    value = float(text.split("/")[0])
    assert math.isfinite(value), text
    return value


def _assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_the_figures_are_written_as_valid_pngs(section):
    out, lines, _ = section
    names = ["synthetic_density", "synthetic_max_cosine", "lm_density", "lm_top_examples"]
    for name in names:
        _assert_png(out / "sae" / f"{name}.png")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", "\n".join(lines))
    assert sorted(links) == sorted(f"sae/{name}.png" for name in names)


def test_the_synthetic_table_holds_finite_metrics_and_recovers_structure(section):
    _, lines, messages = section
    row = _table_row(lines, "EV")
    assert list(row) == ["EV", "L0", "dead", "MMCS", "MCC", "shrinkage", "seconds"]
    values = {name: _number(text) for name, text in row.items()}
    assert values["EV"] > 0.3  # even a few dozen steps explain a good part
    assert 0 < values["L0"] <= 8 and 0 < values["MMCS"] <= 1 and -1 <= values["MCC"] <= 1
    assert any(m.startswith("sae-topk synthetic: EV") for m in messages)


def test_the_transformer_table_holds_finite_metrics_and_the_splice(section):
    out, lines, _ = section
    row = _table_row(lines, "EV | L0 | dead fraction")
    assert "CE loss recovered" in row
    values = {name: _number(text) for name, text in row.items()}
    assert values["CE zero-ablated"] > values["CE clean"] > 0
    assert values["CE loss recovered"] <= 1.0 + 1e-6
    assert 0 < values["EV"] <= 1 and 0 <= values["dead fraction"] <= 1
    # the language model is a transformers folder others can load
    assert (out / "sae" / "tiny-lm" / "config.json").is_file()


def test_the_top_contexts_are_a_table_of_bracketed_tokens(section):
    _, lines, _ = section
    at = lines.index("| latent | fires on | top contexts |")
    rows = [line for line in lines[at + 2 :] if line.startswith("| ")]
    assert 1 <= len(rows) <= 6
    for line in rows:
        latent, share, contexts = (c.strip() for c in line.strip("|").split(" | ", 2))
        assert latent.isdigit() and share.endswith("%")
        assert re.search(r"`[^`]*\[.\][^`]*`", contexts), contexts


def test_a_bad_scale_is_refused(tmp_path):
    from aecore.sae.demo import sae_demo

    with pytest.raises(ConfigError, match="scale"):
        sae_demo(tmp_path, scale=0)


def test_aecore_demo_with_an_sae_writes_the_sae_section(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr("aecore.cli.demo.SAE_SCALE", 0.02)
    code = main(["demo", "--out", str(tmp_path), "--models", "sae-topk", "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0 and "no demo recipe" not in out
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Sparse autoencoders" in report and "CE loss recovered" in report
    assert "| model | data |" not in report  # no recipe ran: no empty table
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        _assert_png(tmp_path / link)


def test_aecore_demo_without_an_sae_skips_the_section(tmp_path, capsys, monkeypatch):
    from aecore_plugins.ae import PlainAutoencoder

    quick = aecore.DemoRecipe(data="digits", latent_dim=2, epochs=1, hparams={"hidden": [8]})
    monkeypatch.setattr(PlainAutoencoder, "demo", quick)

    def refuse(*args, **kwargs):
        raise AssertionError("the SAE section ran though no SAE was named")

    monkeypatch.setattr("aecore.sae.demo.sae_demo", refuse)
    assert main(["demo", "--out", str(tmp_path), "--models", "ae", "--quiet"]) == 0
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| ae | digits | 2 |" in report and "Sparse autoencoders" not in report


def test_a_plugins_model_named_sae_is_not_taken_for_a_built_in_sae(tmp_path, monkeypatch):
    # a third party's sae-mine without a recipe was skipped without a word and ran the
    # built-in SAE section instead (minutes of sae-topk training)
    from aecore import registry
    from aecore_plugins.ae import PlainAutoencoder

    class Mine(PlainAutoencoder):
        demo = None  # no recipe of its own

    registry.register("sae-mine", Mine)

    def refuse(*args, **kwargs):
        raise AssertionError("the built-in SAE section ran for a plugin's model")

    monkeypatch.setattr("aecore.sae.demo.sae_demo", refuse)
    messages = []
    try:
        from aecore.cli.demo import run

        run(tmp_path / "d", ["sae-mine"], log=messages.append)
    finally:
        registry.unregister("sae-mine")
    assert "sae-mine: no demo recipe, skipped" in messages
