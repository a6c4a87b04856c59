"""A small Dockerfile reader for the deployment tests (no Docker engine needed).

A module of its own, not conftest.py: test modules import it, and several conftest.py files
in one run would shadow each other under the name `conftest`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"


@dataclass
class Stage:
    """One build stage: its base image, name and instructions as (KEYWORD, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, args: dict[str, str] | None = None) -> dict[str, str]:
        """ENV of this stage, in order, with $VAR / ${VAR} expanded from earlier ENV and ARG defaults."""
        scope = dict(args or {})
        env: dict[str, str] = {}
        for kw, text in self.instructions:
            if kw == "ARG":
                name, _, default = text.partition("=")
                scope.setdefault(name.strip(), default.strip().strip('"'))
            elif kw == "ENV":
                for key, value in parse_env(text).items():
                    env[key] = scope[key] = expand(value, scope)
        return env


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def command(self) -> list[str]:
        """ENTRYPOINT + CMD of the final stage, as the container runs them."""
        entry = exec_form(self.final.last("ENTRYPOINT"))
        cmd = exec_form(self.final.last("CMD"))
        return entry + cmd

    def healthcheck(self) -> list[str]:
        text = self.final.last("HEALTHCHECK") or ""
        m = re.search(r"\bCMD\s+(.*)$", text, re.S)
        assert m, f"{self.path.name}: HEALTHCHECK without CMD"
        return exec_form(m.group(1))


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations; drop comments and blank lines."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(path, global_args, stages)


def parse_env(text: str) -> dict[str, str]:
    """`ENV a=1 b="two words"` or the legacy `ENV key value`."""
    words = shlex.split(text, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: text.split(None, 1)[1] if len(words) > 1 else ""}
    return dict(w.split("=", 1) for w in words)


def expand(value: str, scope: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m[1] or m[2], ""), value)


def exec_form(text: str | None) -> list[str]:
    if not text:
        return []
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return ["/bin/sh", "-c", text]
