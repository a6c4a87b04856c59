"""Benchmark workloads built from real text that ships with Python and the installed packages.

Five workloads of chat prompts (lists of OpenAI-style messages), each chosen deterministically
from a pool with a seed:

- rag_qa:      a documentation passage + a question answerable by quoting it.
- code_edit:   a real stdlib function (20-60 lines, `inspect.getsource`) + a small edit request.
- summarise:   a passage + "bulleted key points" or "summarise".
- multi_turn:  a document and an overview question, the model's own earlier answer (a real
               greedy generation, made by the caller), then a follow-up question.
- open_ended:  writing and explanation prompts with nothing to copy.

Passages are stdlib docstrings (`inspect.getdoc`) and package READMEs (the long description in
an installed distribution's METADATA). Nothing here is synthetic repetition; the questions and
edit requests are written once by hand or derived from the function's syntax tree.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import random
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

WORKLOADS = ("rag_qa", "code_edit", "summarise", "multi_turn", "open_ended")


@dataclass
class Prompt:
    workload: str
    name: str  # the source of the text, e.g. "stdlib:heapq" or "dist:Jinja2"
    messages: list[dict]
    prompt_ids: list[int] = field(default_factory=list)


# ---- text sources ------------------------------------------------------------------------------


def stdlib_doc(dotted: str) -> str:
    """The cleaned docstring of a stdlib module, class or function, e.g. "shutil.copytree"."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        doc = inspect.getdoc(obj)
        if not doc:
            raise ValueError(f"{dotted} has no docstring")
        return doc
    raise ValueError(f"cannot import {dotted}")


_BADGE = re.compile(r"^\s*(\[!\[|<div|<img|\.\. image::|\s+:(target|alt):)")
_TAIL_HEADINGS = re.compile(r"^#+\s*(Donate|Contributing|License|Links)\b|^(Contributing|License|Code of Conduct)\s*$")


def readme(dist: str) -> str:
    """The README of an installed distribution (its METADATA long description), without badge
    and image lines and without the trailing donate/contributing/licence sections."""
    meta = importlib.metadata.metadata(dist)
    body = meta.get_payload() or meta.get("Description") or ""
    lines = []
    for line in body.splitlines():
        if _TAIL_HEADINGS.match(line):
            break
        if not _BADGE.match(line):
            lines.append(line.rstrip())
    text = "\n".join(lines).strip()
    if not text:
        raise ValueError(f"{dist} has no README text")
    return re.sub(r"\n{3,}", "\n\n", text)


def source_text(name: str) -> str:
    kind, _, ref = name.partition(":")
    return readme(ref) if kind == "dist" else stdlib_doc(ref)


# ---- pools -------------------------------------------------------------------------------------

RAG_POOL = [
    (
        "stdlib:heapq",
        "What does heappushpop do, and how does this heap API differ from textbook heap algorithms?",
    ),
    (
        "stdlib:subprocess.run",
        "How do I capture the output of the command, and what happens when check is True and the command fails?",
    ),
    (
        "stdlib:zipfile.ZipFile",
        "Which compression methods can be used, and which compresslevel values does ZIP_DEFLATED accept?",
    ),
    (
        "stdlib:shutil.copytree",
        "What is the ignore argument used for, and what happens when the destination already exists?",
    ),
    (
        "stdlib:functools.lru_cache",
        "What does the typed argument do, and how can I see or clear the cache statistics?",
    ),
    (
        "stdlib:tempfile",
        "Which function is subject to race conditions, and what is the tempdir variable for?",
    ),
    (
        "stdlib:sched",
        "How are events specified, and do lower priority numbers mean higher or lower priority?",
    ),
    (
        "stdlib:hashlib",
        "Which named constructor functions are available, and what is the difference between digest() and hexdigest()?",
    ),
    (
        "stdlib:copy",
        "What problems can deep copy operations cause, and how does Python's deep copy avoid them?",
    ),
    ("stdlib:os.walk", "What happens when topdown is false, and how can the caller prune the search?"),
    (
        "stdlib:asyncio.gather",
        "What happens when return_exceptions is True, and what happens when the outer future is cancelled?",
    ),
    (
        "stdlib:struct",
        "Which character selects little-endian byte order, and what do the format characters h and H mean?",
    ),
    (
        "stdlib:uuid",
        "Which functions should I call if all I want is a unique ID, and why may uuid1() compromise privacy?",
    ),
    (
        "stdlib:shelve",
        "Why does d[key].append(anitem) have no effect on the shelf, and what does writeback=True change?",
    ),
    (
        "stdlib:urllib.parse.quote",
        "Which characters does quote() leave unescaped, and what is the default for the safe argument?",
    ),
    ("stdlib:gzip.open", "Which mode values are accepted, and what is the default compresslevel?"),
]

SUMMARY_POOL = [
    "stdlib:argparse",
    "stdlib:csv",
    "stdlib:timeit",
    "stdlib:statistics",
    "stdlib:difflib.SequenceMatcher",
    "stdlib:doctest",
    "stdlib:unittest.mock.patch",
    "stdlib:enum.Enum",
    "stdlib:collections.namedtuple",
    "dist:Jinja2",
    "dist:click",
    "dist:MarkupSafe",
    "dist:hypothesis",
    "dist:iniconfig",
    "dist:typing_extensions",
]

SUMMARY_TASKS = [
    "Extract the key points of this passage as a bulleted list.",
    "Summarise this passage in a short paragraph.",
]

MULTI_TURN_POOL = [
    (
        "stdlib:timeit",
        "How do I run setup code that should not be timed, and how is the number of loops chosen when -n is not given?",
    ),
    ("stdlib:shelve", "What does writeback=True do, and what does it cost?"),
    (
        "dist:Jinja2",
        "Which of the listed features helps when rendering templates written by untrusted users?",
    ),
    ("dist:click", "What does the example program print when it is run with --count=3?"),
    (
        "dist:iniconfig",
        "What happens if two sections have the same name, and how do I strip inline comments from values?",
    ),
    ("dist:hypothesis", "When Hypothesis finds a bug, which failing example does it report?"),
    (
        "dist:MarkupSafe",
        "What does escape() do to a script tag, and what does wrapping a string in Markup do?",
    ),
    ("dist:typing_extensions", "What two purposes does typing_extensions serve?"),
    ("stdlib:uuid", "How do I make a UUID from a namespace and a name?"),
    ("stdlib:csv", "What does the quoting setting control, and what does QUOTE_NONNUMERIC mean?"),
    (
        "stdlib:statistics",
        "Which function gives the median of grouped data, and how should its result be interpreted?",
    ),
    ("stdlib:copy", "What is the difference between a shallow copy and a deep copy?"),
]

FIRST_TURN = "Here is some documentation:\n\n{doc}\n\nWhat is this documentation about? Answer briefly."

OPEN_ENDED_POOL = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Write a poem about the first snow of winter.",
    "What are some good habits for staying focused while studying? Give practical advice.",
    "Describe a day in the life of a medieval blacksmith.",
    "Explain the difference between weather and climate.",
    "Write a letter to a friend recommending your favourite book and explaining why you love it.",
    "Invent a new board game and describe how it is played.",
    "Why is the sky blue? Explain in simple terms.",
    "Write a short dialogue between a cat and a dog arguing about which of them is the better pet.",
    "Plan a relaxing weekend trip to the mountains, with ideas for each day.",
    "Explain why sleep is important for health.",
]

# fmt: off
CODE_MODULES = (
    "textwrap", "shutil", "posixpath", "genericpath", "fnmatch", "glob", "shlex", "string", "difflib",
    "heapq", "json.encoder", "calendar", "base64", "colorsys", "statistics", "tempfile", "urllib.parse",
    "html", "ipaddress", "gettext", "filecmp", "netrc", "pprint", "reprlib", "dataclasses", "functools",
    "inspect", "tokenize", "traceback", "warnings", "contextlib", "mimetypes", "quopri", "zipfile",
    "tarfile", "csv", "email.utils", "http.cookies", "locale", "platform", "sysconfig", "linecache",
)

# Descriptive new names for common short variable names; others get a `new_` prefix.
_RENAMES = {
    "result": "output", "res": "result", "path": "file_path", "name": "item_name", "s": "text",
    "n": "count", "i": "index", "j": "inner_index", "line": "row", "lines": "rows", "data": "payload",
    "text": "content", "words": "tokens", "x": "value", "k": "key", "v": "val", "c": "char",
    "p": "part", "l": "items", "parts": "pieces", "chunks": "pieces", "f": "handle", "fp": "handle",
    "m": "match", "value": "item_value", "st": "stat_result", "dirs": "directories",
}
# fmt: on


# ---- workload builders -------------------------------------------------------------------------


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def rag_prompts(rng: random.Random, n: int) -> list[Prompt]:
    out = []
    for name, question in rng.sample(RAG_POOL, min(n, len(RAG_POOL))):
        text = (
            f"Passage:\n{source_text(name)}\n\nQuestion: {question}\n\n"
            "Answer using the passage; quote the relevant sentences."
        )
        out.append(Prompt("rag_qa", name, _user(text)))
    return out


def summary_prompts(rng: random.Random, n: int) -> list[Prompt]:
    out = []
    for name in rng.sample(SUMMARY_POOL, min(n, len(SUMMARY_POOL))):
        task = rng.choice(SUMMARY_TASKS)
        out.append(Prompt("summarise", name, _user(f"{task}\n\n{source_text(name)}")))
    return out


def multi_turn_prompts(rng: random.Random, n: int, answer: Callable[[list[dict]], str]) -> list[Prompt]:
    """`answer(messages)` returns the assistant's reply to the first turn (a real generation)."""
    out = []
    for name, question in rng.sample(MULTI_TURN_POOL, min(n, len(MULTI_TURN_POOL))):
        first = _user(FIRST_TURN.format(doc=source_text(name)))
        reply = answer(first).strip()
        messages = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": question}]
        out.append(Prompt("multi_turn", name, messages))
    return out


def open_ended_prompts(rng: random.Random, n: int) -> list[Prompt]:
    return [
        Prompt("open_ended", "writing", _user(text))
        for text in rng.sample(OPEN_ENDED_POOL, min(n, len(OPEN_ENDED_POOL)))
    ]


def code_candidates(min_lines: int = 20, max_lines: int = 60) -> list[tuple[str, str]]:
    """(qualified name, source) of public top-level stdlib functions of 20-60 lines, in a fixed order."""
    out = []
    for mod_name in CODE_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr, obj in sorted(vars(mod).items()):
            if not inspect.isfunction(obj) or obj.__module__ != mod.__name__ or attr.startswith("_"):
                continue
            try:
                src = textwrap.dedent(inspect.getsource(obj))
            except (OSError, TypeError):
                continue
            if min_lines <= len(src.splitlines()) <= max_lines:
                out.append((f"{mod_name}.{attr}", src))
    return out


def edit_requests(src: str) -> list[str]:
    """Small edits that make sense for this function, derived from its syntax tree."""
    fn = ast.parse(src).body[0]
    assert isinstance(fn, ast.FunctionDef)
    requests = []
    params = [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
    shared = {name for node in ast.walk(fn) if isinstance(node, (ast.Global, ast.Nonlocal)) for name in node.names}
    assigned = {
        t.id for node in ast.walk(fn) if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    }
    local_names = sorted(n for n in assigned - shared - set(params) if not n.startswith("_"))
    for name in params[:1] + local_names[:2]:
        new = _RENAMES.get(name, f"new_{name}")
        requests.append(f"the variable `{name}` is renamed to `{new}` everywhere")
    if not any(a.annotation for a in fn.args.args) and params:
        requests.append("its parameters and return value have type hints")
    if ast.get_docstring(fn) is None:
        requests.append("it has a short docstring describing what it does")
    requests.append(f"the function is renamed to `{fn.name}_v2`")
    return requests


def code_prompts(rng: random.Random, n: int) -> list[Prompt]:
    candidates = code_candidates()
    out = []
    for name, src in rng.sample(candidates, min(n, len(candidates))):
        change = rng.choice(edit_requests(src))
        text = f"Rewrite this Python function so that {change}. Output the whole function.\n\n```python\n{src}```"
        out.append(Prompt("code_edit", f"stdlib:{name}", _user(text)))
    return out


def build_workload(
    workload: str, num_prompts: int, seed: int, answer: Callable[[list[dict]], str] | None = None
) -> list[Prompt]:
    """The prompts of one workload; the same (workload, num_prompts, seed) always gives the same
    prompts. multi_turn needs `answer` to make the assistant's first reply."""
    rng = random.Random(f"{seed}:{workload}")
    if workload == "rag_qa":
        return rag_prompts(rng, num_prompts)
    if workload == "code_edit":
        return code_prompts(rng, num_prompts)
    if workload == "summarise":
        return summary_prompts(rng, num_prompts)
    if workload == "multi_turn":
        if answer is None:
            raise ValueError("multi_turn needs an `answer` function for the first assistant turn")
        return multi_turn_prompts(rng, num_prompts, answer)
    if workload == "open_ended":
        return open_ended_prompts(rng, num_prompts)
    raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids exactly as the server makes them for a chat request."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
