"""The prompts bench/eviction.py scores KV policies on, all built from text that ships with
Python (`pydoc_data.topics`, the language reference): see that script's docstring for the tasks."""

from __future__ import annotations

import pydoc_data.topics
import random
import re
from dataclasses import dataclass, field

# (section, question, the answer's first words, the rest of the answer: found in the section's
# text whitespace-insensitively and teacher-forced as the section words it)
QUESTIONS = (
    ("execmodel", "What is a code block executed in?", "A code block is executed in an", "*execution frame*."),
    (
        "execmodel",
        "What is a variable called that is used in a code block but not defined there?",
        "It is a",
        "*free variable*.",
    ),
    (
        "execmodel",
        "What happens when a name is not found at all?",
        "When a name is not found at all,",
        'a "NameError" exception is raised.',
    ),
    (
        "types",
        "What will evaluating NotImplemented in a boolean context raise in a future version of Python?",
        "It will raise a",
        '"TypeError"',
    ),
    ("types", "How is the Ellipsis object accessed?", "It is accessed through the literal", '"..."'),
    (
        "types",
        "How are negative integers represented for shift and mask operations?",
        "They are represented in",
        "a variant of 2’s complement",
    ),
    ("compound", "What is a suite?", "A suite is", "a group of statements controlled by a clause."),
    ("compound", 'What is the "if" statement used for?', 'The "if" statement is used for', "conditional execution"),
    (
        "compound",
        'What is the "while" statement used for?',
        'The "while" statement is used for',
        "repeated execution as long as an expression is true",
    ),
)
DOCS = ("compound", "types", "specialnames", "formatstrings", "typesseq", "execmodel", "datamodel")
NAMES = (
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Irene",
    "Jack",
    "Karen",
    "Liam",
)
CONT = 32  # fidelity: true continuation tokens teacher-forced


@dataclass
class Sample:
    task: str  # passkey | kv | qa | fidelity
    ids: list[int]
    answer: list[int] = field(default_factory=list)  # retrieval: the tokens greedy must emit
    cont: list[int] = field(default_factory=list)  # fidelity: the document's true next tokens


def doc_tokens(tok, name: str) -> list[int]:
    text = pydoc_data.topics.topics.get(name) or pydoc_data.topics.topics["compound"]
    return tok(text)["input_ids"]


def insert_lines(tok, doc: list[int], n_tokens: int, lines: dict[float, str]) -> str:
    """The first n_tokens of a document with `lines` inserted at line breaks near their depths."""
    text = tok.decode(doc[:n_tokens])
    pieces, last = [], 0
    for depth, line in sorted(lines.items()):
        cut = text.rfind("\n", last, max(last + 1, int(len(text) * depth))) + 1 or int(len(text) * depth)
        pieces += [text[last:cut], line + "\n"]
        last = cut
    return "".join(pieces + [text[last:]])


def make_samples(tok, args, rng: random.Random) -> list[Sample]:
    samples = []
    for i in range(args.passkey):
        key = rng.randrange(10000, 99999)
        depth = (0.1, 0.5, 0.9)[i % 3]
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        body = insert_lines(tok, doc_tokens(tok, DOCS[i // 3 % len(DOCS)]), args.length, {depth: needle})
        intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
        ids = tok.encode(intro + body + "\n\nWhat is the pass key? The pass key is")
        samples.append(Sample("passkey", ids, answer=tok.encode(f" {key}")))
    for i in range(args.kv):
        names = rng.sample(NAMES, 4)
        values = {n: rng.randrange(1000, 9999) for n in names}
        target = rng.choice(names)
        lines = {0.15 + 0.22 * j: f"{n}'s locker number is {values[n]}." for j, n in enumerate(names)}
        doc = doc_tokens(tok, DOCS[(i + 3) % len(DOCS)])[i * 150 :]
        body = insert_lines(tok, doc, args.length, lines)
        text = "A document with locker numbers hidden in it. Remember every locker number.\n\n" + body
        text += f"\n\nQuestion: What is {target}'s locker number?\nAnswer: {target}'s locker number is"
        samples.append(Sample("kv", tok.encode(text), answer=tok.encode(f" {values[target]}")))
    for i in range(args.qa):
        section, question, stem, answer = QUESTIONS[i % len(QUESTIONS)]
        body = tok.decode(doc_tokens(tok, section)[: args.length])
        found = re.search(r"\s+".join(map(re.escape, answer.split())), body)
        if found is None:
            raise ValueError(f"the answer {answer!r} is not in the first {args.length} tokens of {section!r}")
        answer = body[found.start() : found.end()]  # the section's own words, line breaks included
        text = f"Read the document, then answer the question.\n\n{body}\n\nQuestion: {question}\nAnswer: {stem}"
        samples.append(Sample("qa", tok.encode(text), answer=tok.encode(f" {answer}")))
    for i in range(args.fidelity):
        doc = doc_tokens(tok, DOCS[(i + 1) % len(DOCS)])
        start = min(200 * i, max(len(doc) - args.length - CONT, 0))
        ids = doc[start : start + args.length + CONT]
        samples.append(Sample("fidelity", ids[:-CONT], cont=ids[-CONT:]))
    return samples
