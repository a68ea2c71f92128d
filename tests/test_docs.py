"""The documentation: README.md and docs/ have no broken link or anchor, the generated config reference matches the
pydantic models, the code blocks parse and the runnable ones run, every error class has its troubleshooting entry,
and (with the docs extra installed) the site builds in strict mode.

Cost on the 2-core machine: 8 s in all at load average 3.6 (15 s with pytest's start-up), most of it the two
runnable blocks (a fresh interpreter each that imports torch, one of them DeepSpeed and transformers too); the strict
build takes under 2 s and is skipped without the docs extra.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import config_reference  # noqa: E402
import docs_check  # noqa: E402

SETUP_COMMANDS = ("bash launch/quickstart.sh   # installs everything, then runs the main job (ZO fine-tuning of "
                  "SmolLM2-135M)\nbash launch/test.sh         # installs everything, then runs the whole test suite\n")


# ---------------------------------------------------------------------------------------------------- links
def test_every_relative_link_and_anchor_resolves():
    assert docs_check.broken_links() == []


def test_the_link_checker_reports_a_missing_file_a_missing_anchor_and_a_repeated_heading(tmp_path):
    """The checker itself can fail: each kind of breakage in a small tree of pages is reported, by line."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## The `\"zo2\"` section\n\n## Step 2: run it\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n"
        "[ok](docs/page.md#the-zo2-section) [ok too](docs/page.md#step-2-run-it) [here](#title) [web](https://x.y/#z)\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#the-zo2-sections) `[in code](nowhere.md)`\n"
        "\n```\n[in a fence](nowhere.md)\n```\n\n"
        "## Title\n\n[outside](../elsewhere.md)\n")
    (tmp_path.parent / "elsewhere.md").write_text("x")
    problems = docs_check.broken_links([readme, tmp_path / "docs" / "page.md"], root=tmp_path)
    assert problems == [
        f"{readme}:10: heading 'Title' repeats the anchor #title of an earlier heading: give it another title",
        f"{readme}:4: link to 'docs/missing.md': docs/missing.md does not exist",
        f"{readme}:4: link to 'docs/page.md#the-zo2-sections': {tmp_path / 'docs' / 'page.md'} has no heading with "
        f"the anchor #the-zo2-sections",
        f"{readme}:12: link to '../elsewhere.md' leaves the repository",
    ]


@pytest.mark.parametrize("heading, anchor", [
    ('The `"zo2"` section', "the-zo2-section"),
    ("The main job: `launch/train.py`", "the-main-job-launchtrainpy"),
    ("First-order tail (hybrid)", "first-order-tail-hybrid"),
    ("`zo2.first_order.chunk_rows`", "zo2first_orderchunk_rows"),
    ("PEFT (LoRA)", "peft-lora"),
    ("Bit for bit × 2 — exact", "bit-for-bit--2--exact"),
])
def test_anchors_are_githubs(heading, anchor):
    """GitHub's rule (mkdocs.yml configures the site's toc with the same): lower case, punctuation dropped except
    - and _, every space a hyphen (so spaces around a dropped character give two)."""
    assert docs_check.slug(heading) == anchor


# ------------------------------------------------------------------------------------------ config reference
def test_the_config_reference_and_the_readme_table_are_generated_from_the_models():
    stale = config_reference.stale_files()
    assert not stale, "\n".join(f"{path} is out of date: run `python tools/config_reference.py`\n{diff}"
                                for path, diff in stale.items())


def test_the_reference_documents_every_field_with_its_real_error():
    """Every field of every section has an entry with its default and the message the parser gives for a bad value;
    the README's table has a row for every field of the top-level section."""
    from zo2_deepspeed.config import ZO2Config
    page = (ROOT / "docs" / "config-reference.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for prefix, model in config_reference.SECTIONS:
        for name in model.model_fields:
            entry = page.split(f"### `{prefix}.{name}`\n", 1)[1].split("\n### ", 1)[0]
            assert "- **Default:** `" in entry and "ConfigError: " in entry, f"{prefix}.{name}"
    assert "ConfigError: zo2.eps must be > 0, got 0\n" in page
    for name in ZO2Config.model_fields:
        assert f"| [`{name}`](docs/config-reference.md#zo2{name}) |" in readme


def test_a_field_without_a_docstring_or_a_check_stops_the_generator(monkeypatch):
    from pydantic.fields import FieldInfo
    with pytest.raises(ValueError, match="Model.x has no docstring"):
        config_reference.description(FieldInfo(annotation=int, default=1), type("Model", (), {}), "x")
    monkeypatch.setitem(config_reference.BAD_VALUES, "zo2.eps", 0.5)  # a valid value: no error to show
    with pytest.raises(AssertionError, match="zo2.eps = 0.5 was accepted"):
        config_reference.render_reference()


def test_check_mode_names_the_stale_file(tmp_path, monkeypatch, capsys):
    page = tmp_path / "config-reference.md"
    page.write_text(config_reference.render_reference().replace("Perturbation scale ε.", "Perturbation size."))
    monkeypatch.setattr(config_reference, "REFERENCE", page)
    assert config_reference.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "is out of date: run `python tools/config_reference.py`" in out and "+Perturbation scale ε." in out


# ----------------------------------------------------------------------------------------------- code blocks
def test_code_blocks_parse():
    blocks = docs_check.code_blocks()
    assert sum(b.language == "python" for b in blocks) >= 10 and sum(b.language == "json" for b in blocks) >= 3
    assert [p for p in map(docs_check.block_problem, blocks) if p] == []


RUNNABLE = [b for b in docs_check.code_blocks() if b.runnable]


def test_runnable_blocks_are_marked():
    assert {b.path.name for b in RUNNABLE} >= {"usage.md", "configuration.md"}


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_block_runs(block):
    result = docs_check.run_block(block)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stdout}\n{result.stderr}"


# ---------------------------------------------------------------------------------------------- troubleshooting
def _error_classes() -> set[str]:
    """Every exception class the package and the switch define (by name, read from the sources)."""
    names = set()
    for path in [ROOT / "zo2_deepspeed_autopatch.py", *sorted((ROOT / "zo2_deepspeed").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                names.add(node.name)
    return names


def test_every_error_class_has_a_troubleshooting_entry():
    headings = set(re.findall(r"^## (\w+)$", (ROOT / "docs" / "troubleshooting.md").read_text(), re.M))
    classes = _error_classes()
    assert {"ConfigError", "SwitchError", "NoiseKernelError"} <= classes
    assert classes - headings == set(), "add a section (cause, fix) to docs/troubleshooting.md for each"


# ------------------------------------------------------------------------------------------------ the site
def test_readme_is_a_front_page_with_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert f"```bash\n{SETUP_COMMANDS}```" in readme


def test_every_shipped_config_is_in_the_table_of_ready_configs():
    page = (ROOT / "docs" / "configuration.md").read_text()
    table = page.split("## Ready configs\n", 1)[1].split("\n## ", 1)[0]
    assert [p.name for p in sorted((ROOT / "ds_configs").glob("*.json")) if f"`{p.name}`" not in table] == []


def test_every_page_is_in_the_nav():
    nav = set(re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert nav == {p.name for p in (ROOT / "docs").glob("*.md")}


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason='the docs extra is not installed (pip install -e ".[docs]")')
def test_the_site_builds_in_strict_mode(tmp_path):
    """Any warning fails: a page missing from the nav, a link to a missing page or anchor, bad Markdown."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "config-reference" / "index.html").exists()
