"""README's supported-models table is `selprune families --markdown`, regenerated from the code."""

from __future__ import annotations

from pathlib import Path

from selprune.cli import main
from selprune.families_command import BEGIN, END, markdown

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_table_is_the_generated_one():
    text = README.read_text()
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == markdown(), "README is stale: run `selprune families --markdown --write README.md`"
    assert "| Gemma 3 (text) | `gemma3_text` |" in block and "mixture-of-experts" in block


def test_write_replaces_only_the_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nbefore\n{BEGIN}\nstale rows\n{END}\nafter\n")
    assert main(["families", "--markdown", "--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "stale rows" not in text and "`model.layers.{i}.mlp.down_proj`" in text


def test_write_needs_markdown_and_a_block(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("no block here\n")
    assert main(["families", "--write", str(doc)]) == 2
    assert main(["families", "--markdown", "--write", str(doc)]) == 1
    assert "no generated families block" in capsys.readouterr().err
    assert doc.read_text() == "no block here\n"  # nothing written on error
