"""Mutation run over the method: do the tests notice when one line of it changes?

Each mutant changes one thing in the code that trains and runs the models (TARGETS below): an
arithmetic or comparison operator swapped, a boolean operator or condition negated, a constant
changed, a term, a statement, a keyword argument or a decorator dropped, `.detach()` (or `.float()`,
`.clone()`) removed or `.detach()` added, two arguments swapped, min/max-like calls exchanged.
Every mutant is written into a scratch copy of the repository under /tmp (the working tree is never
touched), then the tests run there with `pytest -x -q` and a timeout. A mutant is caught when they
fail or time out, and survives when they pass: then either a test is missing, or the mutant is
equivalent (it changes nothing observable), which the closing note of issue 22 argues one by one.

    python dev/mutate.py                                # every target against DEFAULT_TESTS
    python dev/mutate.py --files quantize.py losses.py  # some files only
    python dev/mutate.py --tests tests/test_method_losses.py
    python dev/mutate.py --list                         # print the mutants, run nothing
    python dev/mutate.py --only quantize.py:14 model.py:3    # re-run chosen mutants (ids from a run)
    python dev/mutate.py --json run.json; python dev/mutate.py --survivors-of run.json   # after adding tests

Time: each mutant's tests run in a process forked from this one, torch already imported: about
4 s per caught mutant and 7 s (the whole default test set) per survivor. All targets, about 850
mutants, take about an hour on 2 shared CPU cores with --jobs 1 (--jobs 2 on an idle machine about
halves it). Run it under `nice` on a shared machine; OMP_NUM_THREADS defaults to 1 in the tests.
"""
import argparse
import ast
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# File -> the functions and classes (all their methods) whose bodies are mutated; "*" is the whole
# file's functions and classes. Module-level constants (presets, defaults) are configuration, not
# mutated; neither are the checkpoint loaders.
TARGETS = {
    "model.py": ["ALIT.forward", "ALIT.halt", "ALIT.factorize_and_quantize", "ALIT.predict_image_tokens",
                 "ALIT.images_from_prediction", "ALIT.new_latent_tokens", "ALIT.image_tokens"],
    "vqgan.py": ["VQGAN.expected_codes", "VQGAN.decode_prediction", "VQGAN.halts", "VQGAN.token_loss",
                 "VQGAN.correct_cells", "VQGAN.token_score"],
    "vae.py": ["VAE.decode_prediction", "VAE.halts", "VAE.token_loss", "VAE.correct_cells", "VAE.token_score"],
    "quantize.py": ["count_codes", "unused_codes", "VectorQuantizer.__init__", "VectorQuantizer.codebook",
                    "VectorQuantizer.lookup", "VectorQuantizer.forward", "VectorQuantizer.restart_dead_codes"],
    "losses.py": ["iteration_weights", "stage1_terms", "LPIPS.to_vgg_input", "LPIPS.vgg_features", "LPIPS.forward",
                  "reconstruction_loss", "hinge_d_loss", "generator_adversarial_loss", "adaptive_gan_weight",
                  "gan_weight_at", "generator_gan_loss", "discriminator_step", "average_gradients"],
    "train_stage1.py": ["schedule"],
    "train_stage2.py": ["schedule", "parse_gan_schedule"],
    "optim.py": ["EMA", "lr_at"],
    "selection.py": ["*"],
}

# Where gradients flow: only there does the run add `.detach()` (elsewhere values are plain numbers or
# decisions, where a detach only raises).
GRADIENT_FUNCTIONS = {
    "model.py": TARGETS["model.py"],
    "vqgan.py": ["VQGAN.expected_codes", "VQGAN.decode_prediction", "VQGAN.token_loss"],
    "vae.py": ["VAE.decode_prediction", "VAE.token_loss"],
    "quantize.py": ["VectorQuantizer.codebook", "VectorQuantizer.lookup", "VectorQuantizer.forward"],
    "losses.py": [name for name in TARGETS["losses.py"] if name not in ("gan_weight_at", "iteration_weights")],
}

# The fast test files that concern these targets, the new ones first (-x stops at the first failure).
DEFAULT_TESTS = ["tests/test_method_losses.py", "tests/test_method.py", "tests/test_quantize.py",
                 "tests/test_losses.py", "tests/test_model.py", "tests/test_model_vae.py"]
# Minutes-long tests the run leaves out: the full-size official model and the torch.compile variant.
SLOW_TESTS = ["tests/test_model.py::test_from_official_full_small_matches_reference",
              "tests/test_model.py::test_grad_checkpointing_and_compile_give_the_same_loss_and_gradients"]

BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
COMPARE_SWAPS = {ast.Lt: [ast.LtE, ast.GtE], ast.LtE: [ast.Lt, ast.Gt], ast.Gt: [ast.GtE, ast.LtE],
                 ast.GtE: [ast.Gt, ast.Lt], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Is: [ast.IsNot],
                 ast.IsNot: [ast.Is], ast.In: [ast.NotIn], ast.NotIn: [ast.In]}
NAME_SWAPS = {"min": "max", "max": "min", "argmin": "argmax", "argmax": "argmin", "mean": "sum", "sum": "mean",
              "amin": "amax", "amax": "amin", "any": "all", "all": "any"}
REMOVABLE_CALLS = ("detach", "float", "clone")  # x.detach() -> x


@dataclass
class Mutant:
    id: str  # file:number, stable while the file does not change
    file: str
    line: int
    what: str  # the kind of change
    before: str
    after: str
    start: tuple = (0, 0)  # (line, byte column) span of the source replaced
    end: tuple = (0, 0)
    status: str = ""  # caught, timeout, survived
    seconds: float = 0.0


def target_nodes(tree, names):
    """The function definitions (with their qualified names) the names select."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            children = [node] if isinstance(node, ast.FunctionDef) else [
                n for n in node.body if isinstance(n, ast.FunctionDef)]
            for child in children:
                qualified = child.name if child is node else f"{node.name}.{child.name}"
                if "*" in names or qualified in names or node.name in names:
                    found.append((qualified, child))
    missing = set(names) - {"*"} - {q for q, _ in found} - {n.name for n in tree.body if hasattr(n, "name")}
    return found, sorted(missing)


def is_docstring(node):
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def paren(node):
    return f"({ast.unparse(node)})"


def expression_mutants(node, gradients):
    """(what, replacement source) for one expression node; `gradients`: also cut gradient paths."""
    out = []
    if isinstance(node, ast.BinOp):
        swapped = BINOP_SWAPS.get(type(node.op))
        if swapped:
            out.append(("operator", paren(ast.BinOp(node.left, swapped(), node.right))))
        if isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            out.append(("drop term", paren(node.left)))
        if isinstance(node.op, (ast.Add, ast.Mult)):
            out.append(("drop term", paren(node.right)))
        for side in ("left", "right") if gradients else ():  # a gradient path cut: (x).detach()
            operand = getattr(node, side)
            detached_already = isinstance(operand, ast.Call) and getattr(operand.func, "attr", "") == "detach"
            if isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.MatMult)) and not isinstance(
                    operand, ast.Constant) and not detached_already:
                detached = ast.Call(ast.Attribute(operand, "detach", ast.Load()), [], [])
                parts = {"left": node.left, "right": node.right, side: detached}
                out.append(("add detach", paren(ast.BinOp(parts["left"], node.op, parts["right"]))))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):  # each operator of a chain such as 0 <= x <= 1
            for swapped in COMPARE_SWAPS.get(type(op), []):
                ops = node.ops[:i] + [swapped()] + node.ops[i + 1:]
                out.append(("comparison", paren(ast.Compare(node.left, ops, node.comparators))))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("boolean", paren(ast.BoolOp(other, node.values))))
        if len(node.values) == 2:
            out += [("drop operand", paren(v)) for v in node.values]
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append(("drop unary", paren(node.operand)))
    elif isinstance(node, ast.Constant) and not isinstance(node.value, str) and node.value is not None:
        value = node.value
        if isinstance(value, bool):
            out.append(("constant", repr(not value)))
        elif isinstance(value, (int, float)):
            out.append(("constant", repr(value + 1)))
    elif isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in REMOVABLE_CALLS and not node.args:
            out.append((f"drop .{func.attr}()", paren(func.value)))
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in NAME_SWAPS:
            new_func = (ast.Attribute(func.value, NAME_SWAPS[name], ast.Load()) if isinstance(func, ast.Attribute)
                        else ast.Name(NAME_SWAPS[name], ast.Load()))
            out.append(("swap call", paren(ast.Call(new_func, node.args, node.keywords))))
        commutative = isinstance(func, ast.Name) and func.id in ("min", "max")
        positional = [] if commutative else [a for a in node.args if not isinstance(a, ast.Starred)]
        for i in range(len(positional) - 1):
            if ast.dump(positional[i]) != ast.dump(positional[i + 1]):
                args = list(node.args)
                args[i], args[i + 1] = args[i + 1], args[i]
                out.append(("swap arguments", paren(ast.Call(func, args, node.keywords))))
        for i, keyword in enumerate(node.keywords):
            if keyword.arg is not None:
                kept = node.keywords[:i] + node.keywords[i + 1:]
                out.append((f"drop {keyword.arg}=", paren(ast.Call(func, node.args, kept))))
    return out


def skipped_subtrees(function):
    """Nodes never mutated: the docstring, default values, annotations, f-strings (messages)."""
    skip = set()
    args = function.args
    for node in [*args.defaults, *args.kw_defaults, function.returns,
                 *[a.annotation for a in args.args + args.kwonlyargs]]:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(function):
        if isinstance(node, ast.JoinedStr) or is_docstring(node):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def find_mutants(file, source_root=ROOT):
    """Every mutant of the targets in `file`, read from source_root; prints targets it cannot find."""
    source = (source_root / file).read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    mutants = []

    def add(node, what, after, start=None, end=None):
        start = start or (node.lineno, node.col_offset)
        end = end or (node.end_lineno, node.end_col_offset)
        before = segment(lines, start, end)
        mutant_source = splice(lines, start, end, after)
        try:  # a change that parses to the same program is no mutant
            if ast.dump(ast.parse(mutant_source)) == ast.dump(tree):
                return
        except SyntaxError:
            return
        mutants.append(Mutant(f"{file}:{len(mutants)}", file, start[0], what, " ".join(before.split()),
                              after, start, end))

    functions, missing = target_nodes(tree, TARGETS[file])
    if missing:
        print(f"warning: {file} has no {', '.join(missing)}: not mutated", file=sys.stderr)
    for qualified, function in functions:
        skip = skipped_subtrees(function)
        # no .detach() added in index arithmetic, nor inside what is detached already
        no_detach = {id(n) for sub in ast.walk(function) if isinstance(sub, ast.Subscript) for n in ast.walk(sub.slice)}
        no_detach |= {id(n) for call in ast.walk(function) if isinstance(call, ast.Call)
                      and getattr(call.func, "attr", "") == "detach" for n in ast.walk(call.func.value)}
        gradients = qualified in GRADIENT_FUNCTIONS.get(file, ())
        for decorator in function.decorator_list:  # e.g. @torch.no_grad() dropped
            line = decorator.lineno
            add(decorator, "drop decorator", "", start=(line, 0), end=(line + 1, 0))
        for node in ast.walk(function):
            if id(node) in skip or node is function or node in function.decorator_list:
                continue
            if isinstance(node, ast.expr):
                for what, after in expression_mutants(node, gradients and id(node) not in no_detach):
                    add(node, what, after)
            if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
                add(node.test, "negate condition", f"(not {paren(node.test)})")
            if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise)):
                add(node, "drop statement", "pass")
            if isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
                add(node, "operator", ast.unparse(ast.AugAssign(node.target, BINOP_SWAPS[type(node.op)](), node.value)))
    return mutants


def segment(lines, start, end):
    data = "".join(lines).encode()
    return data[offset(lines, start):offset(lines, end)].decode()


def offset(lines, position):
    """Byte offset of an ast (line, byte column) position."""
    line, column = position
    return sum(len(text.encode()) for text in lines[:line - 1]) + column


def splice(lines, start, end, replacement):
    data = "".join(lines).encode()
    return (data[:offset(lines, start)] + replacement.encode() + data[offset(lines, end):]).decode()


def export_source(into: Path, rev=None):
    """The repository's modules and tests (with their reference data) into `into`, without caches:
    from the working tree, or as committed at `rev`."""
    if rev:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
        return
    for path in ROOT.glob("*.py"):
        shutil.copy2(path, into / path.name)
    shutil.copytree(ROOT / "tests", into / "tests", ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))


def pytest_child(workdir: Path, tests):
    """In a process forked from this one (torch already imported: ~3 s saved a mutant), run the tests
    in workdir, output to workdir/pytest.log; exit with pytest's code."""
    os.chdir(workdir)
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    sys.dont_write_bytecode = True  # a stale .pyc of an earlier mutant of the same size must never load
    log = os.open(workdir / "pytest.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import pytest
    code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *tests,
                        *[f"--deselect={t}" for t in SLOW_TESTS]])
    os._exit(int(code))


def start_tests(workdir: Path, tests):
    child = multiprocessing.get_context("fork").Process(target=pytest_child, args=(workdir, tests))
    child.start()
    return child


def outcome(child) -> str:
    """pytest's exit code as a mutant's status: 0 passed, 1 failed, 2 interrupted (an import or
    collection error: caught as well); 3-5 (internal or usage error, no tests) are errors."""
    return {0: "survived", 1: "caught", 2: "caught"}.get(child.exitcode, "error")


def run_mutants(mutants, workdirs, tests, timeout):
    """Each mutant in turn in a free scratch copy, len(workdirs) at a time, printing as they finish."""
    queue, running, began = list(mutants), {}, time.monotonic()  # child sentinel -> (mutant, workdir, child, start)
    free = list(workdirs)
    while queue or running:
        while queue and free:
            mutant, workdir = queue.pop(0), free.pop()
            path = workdir / mutant.file
            original = path.read_text()
            path.write_text(splice(original.splitlines(keepends=True), mutant.start, mutant.end, mutant.after))
            child = start_tests(workdir, tests)
            running[child.sentinel] = (mutant, workdir, child, original, time.monotonic())
        multiprocessing.connection.wait(list(running), timeout=1.0)
        for sentinel, (mutant, workdir, child, original, start) in list(running.items()):
            mutant.seconds = time.monotonic() - start
            if child.is_alive() and mutant.seconds < timeout:
                continue
            if child.is_alive():
                child.kill()
                child.join()
                mutant.status = "timeout"
            else:
                child.join()
                mutant.status = outcome(child)
            (workdir / mutant.file).write_text(original)
            del running[sentinel]
            free.append(workdir)
            report(mutant, mutants, began)


def report(mutant, mutants, began):
    finished = sum(1 for m in mutants if m.status)
    print(f"[{finished}/{len(mutants)} {time.monotonic() - began:.0f}s] {mutant.id:<20} {mutant.status:<8} "
          f"line {mutant.line}: {mutant.what}: {mutant.before}  ->  {mutant.after}", flush=True)


def summary(mutants):
    rows = {}
    for m in mutants:
        row = rows.setdefault(m.file, {"tried": 0, "caught": 0, "timeout": 0, "survived": 0, "error": 0})
        row["tried"] += 1
        row[m.status] += 1
    total = {key: sum(r[key] for r in rows.values()) for key in ("tried", "caught", "timeout", "survived", "error")}
    header = f"{'file':<18}{'tried':>7}{'caught':>8}{'timeout':>9}{'survived':>10}{'error':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for file, row in [*rows.items(), ("total", total)]:
        print(f"{file:<18}{row['tried']:>7}{row['caught']:>8}{row['timeout']:>9}{row['survived']:>10}{row['error']:>7}")
    survivors = [m for m in mutants if m.status in ("survived", "error")]
    if survivors:
        print(f"\n{len(survivors)} surviving (or erroring) mutants:")
        for m in survivors:
            print(f"  {m.id:<20} line {m.line:<4} {m.status:<8} {m.what}: {m.before}  ->  {m.after}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=list(TARGETS), choices=list(TARGETS), help="files to mutate")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files (or node ids) to run")
    parser.add_argument("--rev", help="mutate and test the code as committed at this git revision "
                                      "(default: the working tree as it is)")
    parser.add_argument("--only", nargs="+", help="mutant ids to run (file:number)")
    parser.add_argument("--survivors-of", metavar="JSON", help="run only the mutants that survived in this --json "
                                                               "output of an earlier run (matched by their text)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested in parallel (one scratch copy each)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 5x the clean run, at least 60)")
    parser.add_argument("--json", help="also write every mutant and its status to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="alit-mutate-") as scratch:
        base = Path(scratch) / "base"  # the unmutated code, read once: edits to the tree meanwhile do not matter
        base.mkdir()
        export_source(base, args.rev)
        mutants = [m for file in args.files for m in find_mutants(file, base)]
        if args.only:
            unknown = set(args.only) - {m.id for m in mutants}
            if unknown:
                sys.exit(f"error: unknown mutant ids {sorted(unknown)} (see --list)")
            mutants = [m for m in mutants if m.id in args.only]
        if args.survivors_of:
            survivors = json.loads(Path(args.survivors_of).read_text())
            earlier = {(m["file"], m["what"], m["before"], m["after"]) for m in survivors
                       if m["status"] in ("survived", "error")}
            mutants = [m for m in mutants if (m.file, m.what, m.before, m.after) in earlier]
        if args.list:
            for m in mutants:
                print(f"{m.id:<20} line {m.line:<4} {m.what}: {m.before}  ->  {m.after}")
            print(f"{len(mutants)} mutants")
            return
        workdirs = [Path(scratch) / f"copy{j}" for j in range(args.jobs)]
        for workdir in workdirs:
            shutil.copytree(base, workdir)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the tests' threads: one each, beside other work
        import torch  # noqa: F401  (imported once here: every forked test run starts with it)
        began = time.monotonic()
        clean = start_tests(workdirs[0], args.tests)
        clean.join()
        seconds = time.monotonic() - began
        if outcome(clean) != "survived":
            sys.exit(f"error: the tests fail without any mutant:\n{(workdirs[0] / 'pytest.log').read_text()[-3000:]}")
        timeout = args.timeout or max(60.0, 5 * seconds)
        print(f"{'commit ' + args.rev if args.rev else 'working tree'}; clean run {seconds:.0f} s; {len(mutants)} "
              f"mutants, timeout {timeout:.0f} s each, {args.jobs} job(s)", flush=True)
        run_mutants(mutants, workdirs, args.tests, timeout)
    summary(mutants)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(m) for m in mutants], indent=1))


if __name__ == "__main__":
    main()
