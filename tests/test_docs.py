"""The documentation stays true to the code: the generated rule reference matches the registry, the README
names every rule, every relative link resolves, and the front page and the architecture stay short."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnaudit.rules import all_rules

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_rules_doc.py"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_rules_doc", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    links = [a or b for a, b in LINK.findall(text)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE)]


def test_rules_doc_is_what_the_generator_writes():
    expected = load_generator().generate()
    actual = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/rules.md is stale: run `python tools/gen_rules_doc.py`"


def test_rules_doc_has_a_section_per_rule():
    text = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    for rule in all_rules():
        assert f"\n### {rule.code}\n" in text
        assert f"`{rule.name}` · severity **{rule.severity}**" in text
        assert rule.fix in text


def test_generator_check_flags_a_stale_file(tmp_path):
    good = tmp_path / "rules.md"
    good.write_text((ROOT / "docs" / "rules.md").read_text(encoding="utf-8"), encoding="utf-8")
    ok = subprocess.run([sys.executable, str(GENERATOR), "--check", "--output", str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    stale = tmp_path / "stale.md"
    stale.write_text(good.read_text(encoding="utf-8").replace("BN101", "BN1O1", 1), encoding="utf-8")
    bad = subprocess.run([sys.executable, str(GENERATOR), "--check", "--output", str(stale)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "stale" in bad.stderr and "gen_rules_doc.py" in bad.stderr


def test_fix_column_hook():
    gen = load_generator()
    rules = all_rules()
    plain = gen.index_table(rules)
    assert plain[0] == "| code | name | severity | family | summary |"
    modes = {r.code: "none" for r in rules}
    modes[rules[0].code] = "safe"
    with_fix = gen.index_table(rules, modes)
    assert with_fix[0].endswith("| summary | fix |")
    assert with_fix[2].endswith("| safe |") and with_fix[3].endswith("| none |")
    with pytest.raises(ValueError, match="missing rules"):
        gen.index_table(rules, {rules[0].code: "safe"})
    with pytest.raises(ValueError, match="unknown availabilities"):
        gen.index_table(rules, {**modes, rules[0].code: "maybe"})


def test_docstring_code_becomes_fenced_blocks():
    gen = load_generator()
    doc = "Options:\n    ```yaml\n    a: 1\n    ```\n\nBad:\n    nn.Linear(1, 2)\nGood:\n    nn.Linear(1, 2, bias=False)"
    assert gen.doc_markdown(doc) == [
        "Options:", "", "```yaml", "a: 1", "```", "",
        "Bad:", "", "```", "nn.Linear(1, 2)", "```", "",
        "Good:", "", "```", "nn.Linear(1, 2, bias=False)", "```",
    ]


def test_readme_rule_table_names_every_rule():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| \[(BN\d{3})\]\(docs/rules\.md#bn\d{3}\) \| ([a-z0-9-]+) \|", readme, re.MULTILINE)}
    for rule in all_rules():
        assert rows.get(rule.code) == rule.name, f"README's rule table lacks {rule.code} {rule.name}"
    assert set(rows) == {r.code for r in all_rules()}


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) [b](#nowhere) ![c](img.png) [d](https://example.org)\n# Here\n[e](#here)\n")
    assert relative_links(page) == ["missing.md", "#nowhere", "img.png", "#here"]
    assert anchors(page) == {"here"}


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    # .ci/run runs README's test command verbatim, and the install-and-run command comes first.
    blocks = re.findall(r"```bash\n(.*?)\n```", "\n".join(lines), re.DOTALL)
    assert blocks[0] == 'pip install torch==2.13.0 && pip install -e ".[datasets,plot]" && bnaudit inspect examples/seed_mlp_bn.py'
    assert "-m pytest -q" in blocks[1]


def test_architecture_is_short():
    assert len((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines()) < 100
