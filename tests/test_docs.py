"""The documentation holds together: every relative link of README.md, CONTRIBUTING.md and docs/*.md (images
included) reaches a file of the repository, and a heading of it where the link names one; every ``dmfast ...``
command of their fenced code blocks parses as the CLI would parse it (a misspelled option or command fails).

(The README's Python block is run by tests/test_predict.py::test_the_readme_example_runs.)"""

import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(p for p in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")] if p.is_file())

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def split_fences(text: str) -> tuple:
    """(the text outside fenced code blocks, with the blocks' lines blanked; the blocks as (first line number,
    info string, lines))."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = (number + 1, line.strip()[3:].strip(), [], fence.group(1))
            prose.append("")
        elif block is not None:
            if fence and fence.group(1) == block[3] and not line.strip()[3:].strip():
                blocks.append(block[:3])
                block = None
            else:
                block[2].append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text as rendered (code spans, emphasis and links reduced to their text),
    lowercased, punctuation other than hyphens, underscores and spaces removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    """The anchors of a Markdown file's headings (repeats numbered -1, -2, ... as GitHub does)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list:
    """(line number, target) of every inline link and image in the file's prose (code spans and blocks left out)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    prose = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)  # keeps line numbers
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def broken(path: Path, target: str) -> str | None:
    """What is wrong with a relative link ``target`` of ``path``, or None (external links are not checked)."""
    if not target:
        return "an empty link"
    if EXTERNAL.match(target) or target.startswith("//"):
        return None
    file, _, anchor = target.partition("#")
    resolved = (path.parent / unquote(file)).resolve() if file else path
    if not resolved.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if not resolved.exists():
        return f"{target}: no such file ({resolved.relative_to(ROOT)})"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}"
    return None


def test_slugs_follow_githubs_rule():
    assert slug("Set-up: the two commands") == "set-up-the-two-commands"
    assert slug("The metrics API (`dmfast.metrics`)") == "the-metrics-api-dmfastmetrics"
    assert slug("Evaluation: the paper's numbers and the detection field's") == \
        "evaluation-the-papers-numbers-and-the-detection-fields"
    assert slug("Adding a [backbone](x.md) **now**") == "adding-a-backbone-now"


def test_the_link_checker_finds_broken_links(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A title\n\n## Second part\n\n```sh\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#second-part) ![img](docs/a.md) [bad](docs/b.md) [gone](docs/a.md#not-a-heading)\n"
                    "`[code](docs/none.md)` [web](https://example.com/x) [self](#top)\n\n# Top\n")
    problems = [broken(page, target) for _, target in links(page)]
    assert [p for p in problems if p] == ["docs/b.md: no such file (docs/b.md)",
                                          "docs/a.md#not-a-heading: no heading #not-a-heading in docs/a.md"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    found = links(path)
    problems = [f"{path.relative_to(ROOT)}:{line}: {problem}"
                for line, target in found if (problem := broken(path, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_docs_have_links():
    """A guard against a link pattern that silently finds nothing."""
    assert sum(len(links(path)) for path in DOCS) > 20
    assert ROOT / "CONTRIBUTING.md" in DOCS


# The commands of the fenced code blocks


def without_comment(line: str) -> str:
    """The line up to a shell comment: a ``#`` at the start of a word, outside quotes."""
    quote, previous = None, " "
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and previous.isspace():
            return line[:i]
        previous = char
    return line


def commands() -> list:
    """(where, the command's words) of every ``dmfast ...`` line of the docs' fenced code blocks, continuation lines
    joined, comments dropped, and optional parts shown in brackets (``[--overlays]``) kept without the brackets."""
    found = []
    for path in DOCS:
        _, blocks = split_fences(path.read_text(encoding="utf-8"))
        for first, info, lines in blocks:
            if info not in ("", "sh", "bash", "shell", "console"):
                continue
            i = 0
            while i < len(lines):
                number, line = first + i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                line = without_comment(line.strip().removeprefix("$ "))
                if not line.startswith("dmfast "):
                    continue
                line = re.sub(r"(^|\s)\[", r"\1", line)
                line = re.sub(r"\](?=\s|$)", "", line)
                found.append((f"{path.relative_to(ROOT)}:{number}", shlex.split(line)))
    return found


COMMANDS = commands()


@pytest.fixture
def parse(tmp_path, monkeypatch):
    """A function that parses a command's words as ``dmfast`` would, without running it, and returns the usage
    error (a click exception; None when it parses). Paths the commands name are placeholders (DATA, RUN/model.pt):
    parsing runs in an empty folder with the CLI's path parameters not asking for existing files, so that every
    other check (option names, choices, numbers and their ranges, required options, extra arguments) still
    applies."""
    import click

    from dmfast.cli.main import main

    for command in main.commands.values():
        for param in command.params:
            if isinstance(param.type, click.Path) and param.type.exists:
                monkeypatch.setattr(param.type, "exists", False)
    monkeypatch.chdir(tmp_path)

    def parse(words: list):
        assert words[0] == "dmfast"
        group = click.Context(main, info_name="dmfast")
        try:
            with group:
                name, command, rest = main.resolve_command(group, words[1:])
                command.make_context(name, rest, parent=group, resilient_parsing=False)
        except click.ClickException as error:
            return error
        return None

    return parse


def test_the_docs_have_commands():
    assert sum(where.startswith("README.md") for where, _ in COMMANDS) >= 8


@pytest.mark.parametrize("where, words", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_documented_command_parses(parse, where, words):
    problem = parse(words)
    assert problem is None, f"{where}: {shlex.join(words)}\n{type(problem).__name__}: {problem.format_message()}"


@pytest.mark.parametrize("command, error, words", [
    ("dmfast predict RUN/model.pt scans/ --out predictions --overlay", "NoSuchOption", "--overlay"),
    ("dmfast trian DATA --out base", "UsageError", "trian"),
    ("dmfast train DATA --out base --arch resnet51", "BadParameter", "resnet51"),
    ("dmfast eval DATA --checkpoint base=base --out eval --box-score median", "BadParameter", "median"),
    ("dmfast train DATA --out base --epochs 0", "BadParameter", "--epochs"),
    ("dmfast masks DATA --checkpoint aligned", "MissingParameter", "--out"),
    ("dmfast prepare DATA extra --size 512", "UsageError", "extra"),
])
def test_the_command_check_catches_mistakes(parse, command, error, words):
    import click

    problem = parse(shlex.split(command))
    assert isinstance(problem, getattr(click, error)), problem
    assert words in problem.format_message() or words in str(getattr(problem, "param_hint", "")), \
        problem.format_message()
