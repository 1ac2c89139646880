"""The README's walk through the code ("How it works, in the code") names only what the code has."""
import ast
import re

from conftest import ROOT

OWNER = {"self": "ALIT", "config": "ALITConfig"}  # how the walk names an ALIT and its config


def how_it_works() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## How it works, in the code", 1)[1].split("\n## ", 1)[0]


def definitions():
    """Per module: its top-level names; per class (in any module): its methods and attributes, and the
    names defined anywhere in the project (functions, classes, assignments, self.x attributes, fields)."""
    modules, classes, anywhere = {}, {}, set()
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                top.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                top |= {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                        if isinstance(t, ast.Name)}
        modules[path.stem] = top
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and \
                            item.value.id == "self":
                        members.add(item.attr)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                anywhere |= members | {node.name}
            elif isinstance(node, ast.FunctionDef):
                anywhere.add(node.name)
        anywhere |= top
    return modules, classes, anywhere


def test_every_name_the_walk_cites_exists_where_it_says():
    modules, classes, anywhere = definitions()
    cited = re.findall(r"`([^`]+)`", how_it_works())
    assert len(cited) > 20, cited
    missing = []
    for text in cited:
        name = re.match(r"[A-Za-z_][\w.]*", text)
        if name is None or " " in name[0].split("(")[0]:
            continue
        parts = name[0].split(".")
        if parts[-1] == "py":  # a file
            found = (ROOT / name[0]).is_file()
        elif len(parts) == 1:  # a bare name: defined somewhere in the project
            found = parts[0] in anywhere
        elif parts[0] in modules:  # module.name
            found = parts[1] in modules[parts[0]]
        else:  # Class.member, self.member, config.field
            found = parts[1] in classes.get(OWNER.get(parts[0], parts[0]), set())
        if not found:
            missing.append(text)
    assert not missing, f"README's walk cites names the code does not have: {missing}"


def prose_sentences(markdown: str) -> list:
    """The README's prose, sentence by sentence: code blocks, tables, headings and images left out, and
    each list item a paragraph of its own."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    paragraphs, current = [], []
    for line in markdown.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("|", "#", "![", "<")) or re.match(r"([-*]|\d+\.) ", stripped):
            paragraphs.append(" ".join(current))
            current = [re.sub(r"^([-*]|\d+\.) ", "", stripped)] if re.match(r"([-*]|\d+\.) ", stripped) else []
        else:
            current.append(stripped)
    paragraphs.append(" ".join(current))
    return [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`*(])", p) if s]


def test_no_readme_sentence_runs_past_40_words():
    long = [(len(s.split()), s[:80]) for s in prose_sentences((ROOT / "README.md").read_text()) if len(s.split()) > 40]
    assert not long, f"{len(long)} README sentence(s) over 40 words: {long}"


# The README is a reference, as nanoGPT's: what, the commands, how, results, paper scale, the API; the long material
# lives in docs/*.md, linked from it.
LONGEST_README = 250
WIDEST_LINE = 120
FIRST_COMMAND = ("python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -r requirements.txt && "
                 "python train_vqgan.py && python train_stage1.py && python train_stage2.py && python evaluate.py")


def readme_lines() -> list:
    return (ROOT / "README.md").read_text().splitlines()


def command(text: str, first_words: str) -> str:
    """The shell command in `text` that starts with `first_words`, its continued lines (`\\`) joined as the shell
    joins them."""
    joined = re.sub(r" \\\n\s*", " ", text)
    return next(line for line in joined.splitlines() if line.startswith(first_words))


def test_the_readme_is_a_reference_of_at_most_250_lines():
    assert len(readme_lines()) <= LONGEST_README, f"README: {len(readme_lines())} lines, at most {LONGEST_README}"


def test_no_line_of_the_readme_docs_or_code_is_wider_than_120_characters():
    # The quick start's two commands run over two lines each, joined by the shell (`\\`).
    code = sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "dev").glob("*.py"))
    for page in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + code:
        wide = [(number, len(line)) for number, line in enumerate(page.read_text().splitlines(), 1)
                if len(line) > WIDEST_LINE]
        assert not wide, f"{page.name} lines over {WIDEST_LINE} characters (line, width): {wide}"


def test_the_first_command_is_within_the_first_40_lines():
    first_40 = "\n".join(readme_lines()[:41])
    assert command(first_40, "python -m venv") == FIRST_COMMAND, "the first command within the README's first 40 lines"


def anchors(markdown: str) -> set:
    """GitHub's anchors for a page's headings: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_of_the_readme_and_docs_points_to_what_exists():
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) > 1, "the README's long material lives in docs/*.md"
    broken = []
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, f"broken relative links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [page.name for page in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{page.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
