"""The documentation against the code: every `causalfusion ...` command in README.md and docs/*.md
names a real subcommand and only flags that subcommand accepts, and every name the Python snippets
import from causalfusion exists (called with keywords its signature takes).

Built from the package's own argparse parser, no processes: a flag renamed in the code, or a typo
in the docs, fails here instead of in a reader's shell.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from causalfusion.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "results" / "README.md"]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
SEPARATORS = {";", "&&", "||", "|", ">", ">>", "2>", "&"}
# a placeholder in prose, e.g. "`causalfusion COMMAND --help`" or "`causalfusion ...`", is not a subcommand
PLACEHOLDER = re.compile(r"^([A-Z_]+|\.\.\.)$")


@dataclass(frozen=True)
class Invocation:
    where: str          # "README.md:123"
    argv: tuple[str, ...]  # subcommand first
    fenced: bool        # from a code block (parsed in full) or an inline span (flags only)

    def __str__(self) -> str:
        return f"{self.where}: causalfusion {' '.join(self.argv)}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _causalfusion_start(words: list[str], i: int) -> int | None:
    """Index of the subcommand if ``words[i]`` starts a causalfusion call: `causalfusion`,
    `.venv/bin/causalfusion`, or `python|torchrun ... -m causalfusion[.cli]`."""
    w = words[i]
    if w == "causalfusion" or w.endswith("/causalfusion"):
        return i + 1
    if w == "-m" and i + 1 < len(words) and words[i + 1] in ("causalfusion", "causalfusion.cli"):
        return i + 2
    return None


def _split_invocations(words: list[str]) -> list[list[str]]:
    out = []
    for i in range(len(words)):
        start = _causalfusion_start(words, i)
        if start is None or start >= len(words):
            continue
        argv = []
        for w in words[start:]:
            if w in SEPARATORS:
                break
            argv.append(w)
        out.append(argv)
    return out


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _fenced(text: str) -> list[tuple[str, str, int]]:
    """(language, body, first body line) of every fenced block."""
    return [(m.group(1), m.group(2), _line_of(text, m.start(2))) for m in FENCE.finditer(text)]


def shell_invocations(path: Path) -> list[Invocation]:
    text = path.read_text()
    found = []
    for lang, body, first in _fenced(text):
        if lang not in SHELL_LANGS:
            continue
        lines = body.split("\n")
        n = 0
        while n < len(lines):
            start, logical = n, lines[n]
            # a trailing backslash continues the command on the next line
            while logical.endswith("\\") and n + 1 < len(lines):
                n += 1
                logical = logical[:-1] + " " + lines[n]
            n += 1
            if "causalfusion" not in logical:
                continue
            words = shlex.split(logical, comments=True)
            for argv in _split_invocations(words):
                found.append(Invocation(f"{path.name}:{first + start}", tuple(argv), True))
    return found


def inline_invocations(path: Path) -> list[Invocation]:
    """`causalfusion SUB ...` in inline code spans (they may hold placeholders: flags only)."""
    text = path.read_text()
    blanked = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    found = []
    for m in re.finditer(r"`([^`]+)`", blanked):
        span = m.group(1).replace("\n", " ")
        if not re.search(r"(^|[\s/])causalfusion\s", span):
            continue
        words = span.split()  # not shlex: spans hold `\|` and unbalanced brackets
        for argv in _split_invocations(words):
            found.append(Invocation(f"{path.name}:{_line_of(blanked, m.start())}", tuple(argv), False))
    return found


def _flags(argv: tuple[str, ...]) -> list[str]:
    """The --long flags of an argv, stripped of `[`/`{`/`]`/`=value` decoration from the docs."""
    flags = []
    for w in argv:
        w = w.lstrip("[{(")
        if w.startswith("--"):
            flags.append(re.split(r"[=\]}),\\|]", w)[0])
    return flags


def _for_parsing(argv: tuple[str, ...]) -> list[str]:
    """The argv as a reader would type it: optional `[...]` parts included, `$VAR`s set to 1."""
    return [re.sub(r"\$\{?\w+\}?", "1", w.strip("[]")) for w in argv if w.strip("[]")]


ALL_SHELL = [inv for p in DOC_FILES for inv in shell_invocations(p)]
ALL_INLINE = [inv for p in DOC_FILES for inv in inline_invocations(p)]
SUBPARSERS = _subparsers()


def test_docs_have_commands_to_check():
    # guards the extraction itself: an empty list would make every test below pass vacuously
    assert len(ALL_SHELL) >= 30 and len(ALL_INLINE) >= 10
    assert {inv.argv[0] for inv in ALL_SHELL} >= {"train", "sample", "edit", "eval", "ablate", "train-mm"}


def check_flags(inv: Invocation) -> list[str]:
    """What is wrong with an invocation's subcommand and flags (empty: nothing)."""
    sub = inv.argv[0]
    if PLACEHOLDER.match(sub):
        return []
    if sub not in SUBPARSERS:
        return [f"{inv}: no subcommand {sub!r}"]
    known = {s for a in SUBPARSERS[sub]._actions for s in a.option_strings}
    # exact names: argparse would also take an abbreviation, which the docs should not teach
    return [f"{inv}: {sub} has no flag {f}" for f in _flags(inv.argv) if f not in known]


@pytest.mark.parametrize("inv", ALL_SHELL + ALL_INLINE, ids=str)
def test_subcommand_and_flags_exist(inv):
    assert not check_flags(inv)


@pytest.mark.parametrize("inv", ALL_SHELL, ids=str)
def test_fenced_command_parses(inv, capsys):
    """A whole fenced command passes argparse: values of the right type and choice, required
    options present, no two exclusive options."""
    try:
        build_parser().parse_args(_for_parsing(inv.argv))
    except SystemExit as e:
        pytest.fail(f"{inv}: {capsys.readouterr().err.strip()} (exit {e.code})")


def test_a_made_up_flag_is_caught():
    inv = Invocation("x.md:1", ("sample", "--ckpt", "runs/demo", "--made-up", "3"), True)
    assert check_flags(inv) == ["x.md:1: causalfusion sample --ckpt runs/demo --made-up 3: sample has no flag --made-up"]
    assert check_flags(Invocation("x.md:1", ("smaple",), True))
    assert not check_flags(Invocation("x.md:1", ("COMMAND", "--help"), False))


# ---- Python snippets ---------------------------------------------------------------------------

def python_snippets() -> list[tuple[str, ast.Module]]:
    out = []
    for path in DOC_FILES:
        for lang, body, first in _fenced(path.read_text()):
            if lang == "python":
                out.append((f"{path.name}:{first}", ast.parse(body)))
    return out


SNIPPETS = python_snippets()


def _imported(tree: ast.Module) -> dict[str, object]:
    """name -> object for every `from causalfusion... import name` (fails if one is missing)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("causalfusion"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("causalfusion"):
                    importlib.import_module(alias.name)
    return names


@dataclass(frozen=True)
class Instance:
    """An object of ``cls`` in a snippet (``Trainer(...)``, or a variable bound to one)."""
    cls: type


def _returns(func: object) -> object | None:
    """What calling ``func`` gives, as far as a snippet can tell: an Instance of a class."""
    if inspect.isclass(func):
        return Instance(func)
    try:
        ret = typing.get_type_hints(func).get("return")
    except Exception:  # an annotation that does not evaluate here: not checked
        return None
    return Instance(ret) if inspect.isclass(ret) else None


def _resolve(node: ast.expr, names: dict[str, object]) -> object | None:
    """The object an expression names (imported names, their attributes, instances), or None."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Call):
        func = _resolve(node.func, names)
        return _returns(func) if func is not None and not isinstance(func, Instance) else None
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        if owner is None:
            return None
        if isinstance(owner, Instance):
            if not hasattr(owner.cls, node.attr):
                return None  # an instance attribute (a dataclass field, set in __init__): not checked
            raw = inspect.getattr_static(owner.cls, node.attr)
            attr = getattr(owner.cls, node.attr)
            if inspect.isfunction(raw):  # a method called on an instance: self is bound
                return functools.partial(attr, None)
            return attr
        assert hasattr(owner, node.attr), f"{getattr(owner, '__name__', owner)} has no {node.attr}"
        return getattr(owner, node.attr)
    return None


def _check_call(node: ast.Call, names: dict[str, object], where: str) -> None:
    func = _resolve(node.func, names)
    if func is None or isinstance(func, Instance) or not callable(func):
        return
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        return  # *args / **kwargs in the snippet: the count is unknown
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature
        return
    try:
        sig.bind_partial(*node.args, **{k.arg: None for k in node.keywords})
    except TypeError as e:
        pytest.fail(f"{where} line {node.lineno}: {ast.unparse(node.func)}{sig}: {e}")


def test_docs_have_python_snippets():
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("where, tree", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_python_snippet_names_and_calls(where, tree):
    """Imported names exist; calls of them, of their attributes and of the methods of the objects
    they return (by annotation) bind: no unknown keyword, not too many positional arguments."""
    names = _imported(tree)
    for stmt in tree.body:  # in order, so `model = load_model(...)` is known to later lines
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call):
                _check_call(node, names, where)
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _resolve(stmt.value, names)
            if value is not None:
                names[stmt.targets[0].id] = value


# ---- files and links ---------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _links(path: Path) -> list[tuple[str, str]]:
    """(where, target) of every relative Markdown link and every path like causalfusion/masks.py."""
    text = path.read_text()
    out = [(f"{path.name}:{_line_of(text, m.start())}", m.group(1))
           for m in re.finditer(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m.group(1))]
    # a repository path in prose or code (not inside a URL or another path): relative to the root
    for m in re.finditer(r"(?<![\w/.-])((?:causalfusion|tests|benchmarks|docs|\.ci)/[\w./-]*[\w/])", text):
        out.append((f"{path.name}:{_line_of(text, m.start())}", "/" + m.group(1)))
    return sorted(set(out))


LINKS = [(p, where, target) for p in DOC_FILES for where, target in _links(p)]


def test_docs_have_links_to_check():
    assert len(LINKS) >= 30


@pytest.mark.parametrize("doc, where, target", LINKS, ids=[f"{w} {t}" for _, w, t in LINKS])
def test_linked_files_and_anchors_exist(doc, where, target):
    file, _, anchor = target.partition("#")
    dest = (ROOT / file.lstrip("/")) if file.startswith("/") else (doc.parent / file if file else doc)
    assert dest.exists(), f"{where}: {target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
    if anchor:
        assert anchor in _anchors(dest), f"{where}: {target}: no heading with anchor #{anchor}"


# ---- documented signatures ---------------------------------------------------------------------

# prose that spells out a function's whole keyword list, e.g. `sample(model, labels, *, ar_steps | groups, ...)`
DOCUMENTED = {"sample": "causalfusion.sampling", "edit": "causalfusion.editing"}
SIGNATURE_SPAN = re.compile(r"`(\w+)\(([^()`]*\*,[^()`]*)\)`")


def documented_signatures() -> list[tuple[str, str, list[str]]]:
    out = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in SIGNATURE_SPAN.finditer(text):
            names = [re.split(r"[=\s]", p.strip())[0] for part in m.group(2).replace("\n", " ").split(",")
                     for p in part.split("|")]
            out.append((f"{path.name}:{_line_of(text, m.start())}", m.group(1), [n for n in names if n]))
    return out


SIGNATURES = documented_signatures()


def test_documented_signatures_are_found():
    assert {name for _, name, _ in SIGNATURES} >= set(DOCUMENTED)


@pytest.mark.parametrize("where, name, params", SIGNATURES, ids=[f"{w} {n}" for w, n, _ in SIGNATURES])
def test_documented_signature_lists_every_parameter(where, name, params):
    assert name in DOCUMENTED, f"{where}: add {name}'s module to DOCUMENTED"
    sig = inspect.signature(getattr(importlib.import_module(DOCUMENTED[name]), name))
    actual = []
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and "*" not in actual:
            actual.append("*")
        actual.append(p.name)
    missing, extra = [p for p in actual if p not in params], [p for p in params if p not in actual]
    assert params == actual, f"{where}: {name} documented as ({', '.join(params)}); missing {missing}, no such {extra}"


# ---- the command line: help and defaults, one meaning per flag ---------------------------------------
def _options():
    from causalfusion.cli.common import Renamed

    for name, sp in SUBPARSERS.items():
        for a in sp._actions:
            if a.option_strings and not isinstance(a, (argparse._HelpAction, Renamed)):
                yield name, sp, a


def test_every_option_has_help_and_a_shown_default():
    bad = []
    for name, sp, a in _options():
        shown = sp._get_formatter()._get_help_string(a) if a.help else ""
        if not a.help or not ("default" in shown or "required" in shown):
            bad.append(f"{name} {a.option_strings[0]}")
    assert not bad, bad


# what each flag that several commands share means; a flag in two commands must be listed here
FLAG_MEANINGS = {  # every flag that more than one command takes, with its one meaning
    "--steps": "training steps", "--sample-steps": "diffusion steps per AR step",
    "--eval-sample-steps": "diffusion steps per AR step of in-loop evaluation",
    "--n": "number of images (per original / prompt where there are several)",
    "--out": "output path", "--ckpt": "run or model folder to load", "--ar-steps": "number of AR steps",
    "--no-progress": "progress bars off", "--precision": "fp32 or bf16", "--compile": "torch.compile the model",
    "--adam-eps": "AdamW epsilon", "--batch-size": "images (or sequences) per batch", "--block": "block-order tile",
    "--cfg": "guidance scale", "--cfg-interval": "guidance interval in timesteps", "--channels": "image channels",
    "--ckpt-every": "training steps between checkpoints", "--class": "class id(s) to generate",
    "--class-tokens": "in-context class tokens", "--config": "a paper configuration", "--data": "dataset spec",
    "--depth": "transformer blocks", "--device": "torch device", "--dilation": "dilated-order stride",
    "--ema-decay": "EMA decay", "--eta": "DDIM eta", "--eval-ar-steps": "S_eval of in-loop evaluation",
    "--eval-n": "samples per evaluation", "--gamma": "AR-step decay", "--groups": "explicit AR group sizes",
    "--hidden-size": "transformer width", "--image": "input image file(s)", "--image-size": "image side in pixels",
    "--inception": "Inception-v3 weights file", "--json": "also write JSON", "--lam": "loss weight of the first AR step",
    "--lr": "learning rate", "--no-cache": "no KV cache", "--npz": "ADM-format .npz of samples",
    "--num-heads": "attention heads", "--order": "token order name", "--patch-size": "token side",
    "--permutation": "explicit token order", "--prediction": "eps or v", "--preset": "model size",
    "--raw": "raw weights instead of EMA", "--ref": "reference statistics .npz", "--resume": "continue a run",
    "--sampler": "ddpm or ddim", "--seed": "random seed", "--vae": "latent space", "--vae-path": "VAE weights folder",
    "--warmup": "warm-up steps",
}


def test_every_shared_flag_has_one_declared_meaning():
    """A flag taken by two or more commands is listed in FLAG_MEANINGS: a new flag that reuses a name
    with another meaning must be renamed (or declared here and made to mean the same)."""
    commands: dict[str, set] = {}
    for name, _, a in _options():
        if type(a).__name__ != "Renamed":
            for o in a.option_strings:
                if o.startswith("--") and o != "--help":
                    commands.setdefault(o, set()).add(name)
    shared = {o for o, c in commands.items() if len(c) > 1}
    assert shared <= set(FLAG_MEANINGS), sorted(shared - set(FLAG_MEANINGS))
    assert set(FLAG_MEANINGS) <= set(commands), sorted(set(FLAG_MEANINGS) - set(commands))


def test_steps_flags_mean_one_thing():
    """--steps only where training happens; diffusion steps are --sample-steps wherever they are given."""
    training = {"train", "train-mm", "demo", "ablate"}
    have = {name for name, _, a in _options() if "--steps" in a.option_strings}
    assert have <= training, have - training
    sampling = {name for name, _, a in _options() if "--sample-steps" in a.option_strings}
    assert sampling >= {"sample", "edit", "eval", "t2i", "eval-mm"}
    for name, sp, a in _options():
        if "--precision" in a.option_strings:
            assert set(a.choices) == {"fp32", "bf16"}, name
        if "--order" in a.option_strings:
            from causalfusion.ar_plan import ORDERS
            assert list(a.choices) == list(ORDERS), name
        if "--n" in a.option_strings:
            assert a.type is int, name


def test_old_diffusion_steps_spelling_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["sample", "--ckpt", "x", "--steps", "10"])
    assert e.value.code == 2 and "--sample-steps" in capsys.readouterr().err


def test_no_abbreviated_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--ckpt", "x", "--sample-st", "10"])


# ---- no history of the project in its text -------------------------------------------------------------
NARRATION = re.compile(
    r"\b(re-?measured|re-?run in|a later (run|session)|earlier (run|session)|previous session|"
    r"this session|sixth session|fifth session|now fixed|was fixed|used to (hang|fail)|"
    r"target set for|could not pin down|not in the repository|202[4-9]-\d\d-\d\d|"
    r"(I|we) (did|would|could) not|tried, not kept|untested here)\b", re.I)


def _text_files():
    for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "causalfusion").rglob("*.py"),
              *(ROOT / "tests").rglob("*.py")]:
        if p != Path(__file__):
            yield p


def test_no_development_narration():
    hits = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in _text_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) for m in [NARRATION.search(line)] if m]
    assert not hits, hits[:40]
