"""The README and the pages of docs/: every relative link reaches a file and, for a #anchor, a
heading that exists (GitHub's slugs); the README stays short; its test command is the one CI
runs (.ci/run)."""

import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-test.txt"
    " && .venv/bin/python -m pytest"
)
TRAIN_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
    " && .venv/bin/python model_def.py const-cifar10.yaml"
)

FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def prose_lines(text):
    """The lines outside fenced code blocks, with their line numbers."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def github_slug(heading):
    """GitHub's anchor for a heading's text: the rendered text lower-cased, punctuation dropped
    (letters, digits, '_', '-' and spaces kept), spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline html
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of a markdown file's headings, numbered for repeats as GitHub numbers them."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen = {}
    result = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        if slug in seen:
            seen[slug] += 1
            result.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            result.add(slug)
    return result


def links(path):
    """(line number, target) of every link of a markdown file, outside code."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in prose_lines(text):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            yield number, definition.group(1)
            continue
        for match in INLINE_LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def broken_links(path):
    """Each relative link of a file whose file or #anchor does not exist, as 'file:line: why'."""
    problems = []
    here = os.path.dirname(path)
    name = os.path.relpath(path, ROOT)
    for number, target in links(path):
        if not target:
            problems.append(f"{name}:{number}: an empty link")
            continue
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address: not checked here
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(here, file_part)) if file_part else path
        if not os.path.exists(linked):
            problems.append(f"{name}:{number}: {target}: no file {os.path.relpath(linked, ROOT)}")
            continue
        if anchor and linked.endswith(".md"):
            if anchor not in anchors(linked):
                problems.append(
                    f"{name}:{number}: {target}: no heading #{anchor} in "
                    f"{os.path.relpath(linked, ROOT)}"
                )
    return problems


def code_lines(text):
    """The lines of a markdown text's code blocks (fenced, or indented by four spaces after a
    blank line), stripped."""
    lines = text.splitlines()
    result = []
    fence = None
    previous_blank = True
    in_indented = False
    for line in lines:
        match = FENCE.match(line)
        if match:
            fence = None if fence else match.group(1)
            continue
        if fence:
            result.append(line.strip())
        elif line.startswith("    ") and (previous_blank or in_indented):
            in_indented = True
            result.append(line.strip())
        else:
            in_indented = False
        previous_blank = not line.strip()
    return result


def section(text, heading):
    """The text under a '## heading' up to the next heading of level 2 or above."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.S | re.M)
    assert match, f"no '## {heading}' in README.md"
    return match.group(1)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_reaches_a_file_and_heading(path):
    assert broken_links(path) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        os.path.normpath(os.path.join(ROOT, target.partition("#")[0]))
        for _, target in links(README)
        if not SCHEME.match(target)
    }
    pages = set(markdown_files()[1:])
    assert pages, "no docs/*.md"
    assert sorted(os.path.relpath(p, ROOT) for p in pages - linked) == []


def test_readme_is_at_most_300_lines():
    with open(README, encoding="utf-8") as f:
        count = len(f.read().splitlines())
    assert count <= 300, f"README.md has {count} lines"


def test_the_commands_are_the_executable_files_the_readme_lists():
    """At a glance in a listing (`ls -F`, a file browser): the top-level files a user runs are
    executable and start with a shebang; every other module is a library one. They are the
    files with a __main__ block, and the commands the README's layout names."""
    modules = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    executable = [f for f in modules if os.access(os.path.join(ROOT, f), os.X_OK)]
    with_main = [
        f
        for f in modules
        if 'if __name__ == "__main__":' in open(os.path.join(ROOT, f), encoding="utf-8").read()
    ]
    shebang = [
        f
        for f in modules
        if open(os.path.join(ROOT, f), encoding="utf-8").readline() == "#!/usr/bin/env python3\n"
    ]
    table = section(open(README, encoding="utf-8").read(), "Layout").split("\n\n")[1]
    listed = sorted(re.findall(r"^\| `([a-z_]+\.py)` \|", table, re.M))
    assert executable == with_main == shebang == listed
    assert listed == [
        "evaluate_result.py",
        "finetune.py",
        "generate_blob_list.py",
        "make_shards.py",
        "model_def.py",
    ]


def test_the_two_commands_are_the_readmes_code_in_its_section():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    commands = [line for line in code_lines(section(text, "The two commands")) if line]
    assert commands[:2] == [TRAIN_COMMAND, TEST_COMMAND]


def test_readme_test_command_is_what_ci_runs():
    """.ci/run (lane main) makes .venv with python3, installs the same requirement files and runs
    pytest with .venv's python on tests/, which is what the README's command runs from the
    repository root (pytest.ini: testpaths = tests)."""
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    assert TEST_COMMAND in code_lines(readme), "the README's test command is not a code line"

    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    make_venv, install, run_tests = (part.strip() for part in TEST_COMMAND.split("&&"))
    assert make_venv in ci
    readme_requirements = shlex.split(install)[shlex.split(install).index("install") + 1 :]
    ci_installs = [
        shlex.split(line) for line in ci if line.startswith(".venv/bin/python -m pip install")
    ]
    assert any(
        [word for word in words[words.index("install") + 1 :] if word != "-q"]
        == readme_requirements
        for words in ci_installs
    ), (readme_requirements, ci_installs)
    ci_pytest = [line for line in ci if line.startswith(run_tests)]
    assert ci_pytest, f"no '{run_tests}' line in .ci/run"
    arguments = shlex.split(ci_pytest[0])[len(shlex.split(run_tests)) :]
    paths = [a for a in arguments if not a.startswith("-") and a != "no:cacheprovider"]
    with open(os.path.join(ROOT, "pytest.ini"), encoding="utf-8") as f:
        testpaths = re.search(r"^testpaths\s*=\s*(.+)$", f.read(), re.M).group(1).split()
    assert paths == testpaths, (paths, testpaths)


def test_github_slugs():
    assert github_slug("What ran on a real master (not in CI)") == (
        "what-ran-on-a-real-master-not-in-ci"
    )
    assert github_slug("Evaluating, fine-tuning and exporting") == (
        "evaluating-fine-tuning-and-exporting"
    )
    assert github_slug("Shards with a bounded side (make_shards.py --max-side)") == (
        "shards-with-a-bounded-side-make_shardspy---max-side"
    )
    assert github_slug("`--check` first") == "--check-first"
    assert github_slug("A gs:// folder of single images") == "a-gs-folder-of-single-images"


def test_the_checker_finds_a_missing_file_a_missing_heading_and_ignores_code(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here it is\n\n"
        "[ok](#here-it-is) [ok](other.md) [ok](other.md#same-1) [web](https://example.com/x)\n"
        "[gone](missing.md) [no heading](other.md#nowhere) [no anchor](#not-here)\n"
        "`[in code](missing-in-code.md)`\n\n"
        "```\n[in a block](missing-in-block.md)\n# Not a heading\n```\n\n"
        "[def]: also-missing.md\n"
    )
    found = broken_links(str(page))
    assert len(found) == 4, found
    assert "missing.md: no file" in found[0]
    assert "other.md#nowhere: no heading #nowhere" in found[1]
    assert "#not-here: no heading #not-here" in found[2]
    assert "also-missing.md: no file" in found[3]
    assert anchors(str(tmp_path / "other.md")) == {"other", "same", "same-1"}
