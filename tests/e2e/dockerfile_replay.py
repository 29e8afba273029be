"""Read a Dockerfile and replay its pip commands outside Docker (used by test_dockerfiles.py).

`parse` turns a Dockerfile into instructions (comments dropped, continuation lines joined, `--flag=value`
options split off); `split_stages` groups them by FROM with the ARG defaults in scope. `Replay` emulates what
the pip commands of a stage see in a container: each stage gets a directory standing for its filesystem root
and a fresh virtualenv standing for the image's Python; WORKDIR and COPY (from the build context, filtered by
the Dockerfile's own .dockerignore, or --from another stage) are done on that directory; a RUN is split at its
top-level `&&` and each part is handed to a chooser that says what to run for it (as written, changed, or
nothing). Container paths in what runs are mapped into the stage directory (a bind mount's target to the source
stage's directory); ARGs are in the environment as in `docker build`. Nothing outside tmp directories is
touched: only the commands a chooser returns are run, with the venv first on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    flags: dict[str, list[str]]  # --mount=..., --from=... (a flag may repeat)
    args: str
    line: int

    def flag(self, name: str) -> str | None:
        values = self.flags.get(name)
        return values[-1] if values else None


def parse(path: Path) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if text.startswith("#") or not text:  # comments (also inside a continuation, as Docker does), blanks
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        pending += text
        keyword, _, rest = pending.partition(" ")
        rest, flags = rest.strip(), {}
        while rest.startswith("--"):
            option, _, rest = rest.partition(" ")
            name, _, value = option[2:].partition("=")
            flags.setdefault(name, []).append(value)
            rest = rest.strip()
        instructions.append(Instruction(keyword.upper(), flags, rest, start))
        pending = ""
    if pending:
        raise ValueError(f"{path}: the file ends inside a continuation line")
    return instructions


def parse_arg(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), (default.strip().strip('"') if eq else None)


def expand(text: str, values: dict[str, str]) -> str:
    """${NAME} and $NAME from `values` (as Docker does in FROM)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


@dataclass
class Stage:
    index: int
    base: str  # the FROM image with global ARGs expanded, or the name of an earlier stage
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def args(self, global_args: dict[str, str]) -> dict[str, str]:
        """ARGs in scope at the end of the stage, with their defaults (`ARG X` re-declares a global one)."""
        values: dict[str, str] = {}
        for ins in self.instructions:
            if ins.keyword == "ARG":
                name, default = parse_arg(ins.args)
                values[name] = default if default is not None else global_args.get(name, "")
        return values

    @property
    def key(self) -> str:
        return repr((self.base, [(i.keyword, sorted(i.flags.items()), i.args) for i in self.instructions]))


def split_stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(len(stages), expand(words[0], global_args), name))
        elif not stages:
            if ins.keyword != "ARG":
                raise ValueError(f"line {ins.line}: only ARG may come before the first FROM, got {ins.keyword}")
            arg, default = parse_arg(ins.args)
            global_args[arg] = default or ""
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def split_and(command: str) -> list[str]:
    """A shell command split at its top-level `&&` (not inside quotes, $(...), (...) or {...})."""
    parts, buf, quote, depth, i = [], [], "", 0, 0
    while i < len(command):
        c = command[i]
        if quote:
            buf.append(c)
            if c == "\\" and quote == '"' and i + 1 < len(command):
                buf.append(command[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif c in "({":
            depth += 1
            buf.append(c)
        elif c in ")}":
            depth -= 1
            buf.append(c)
        elif depth == 0 and command.startswith("&&", i):
            parts.append("".join(buf).strip())
            buf = []
            i += 1
        else:
            buf.append(c)
        i += 1
    parts.append("".join(buf).strip())
    return [p for p in parts if p]


_ENV_PREFIX = r"(?:[A-Za-z_]\w*=\S*\s+)*"
PIP = re.compile(rf"^{_ENV_PREFIX}(?:pip3?|python3?\s+-m\s+pip)\s+(?P<sub>[a-z]+)\b")
SMOKE = re.compile(rf"^{_ENV_PREFIX}(?:warmserve|python3?\s+-m\s+warmserve[\w.]*)(?:\s|$)")
PYTHON_C = re.compile(rf"^{_ENV_PREFIX}python3?\s+-c\s")


def kind_of(segment: str) -> str:
    """`pip`, `smoke` (a warmserve command), `python-c` or `other` (apt-get, useradd, rm, ln, ...)."""
    if PIP.match(segment):
        return "pip"
    if SMOKE.match(segment):
        return "smoke"
    if PYTHON_C.match(segment):
        return "python-c"
    return "other"


def pip_subcommand(segment: str) -> str:
    match = PIP.match(segment)
    return match.group("sub") if match else ""


# ------------------------------------------------------------------------------------------ .dockerignore
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per pattern line, in order (the last matching rule wins)."""
    rules = []
    for raw in path.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        negated = text.startswith("!")
        text = os.path.normpath(text.lstrip("!").lstrip("/")).replace(os.sep, "/")
        rules.append((negated, _ignore_regex(text)))
    return rules


def ignored(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: a path is excluded when the last rule matching it or one of its parent directories is not
    negated."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            verdict = not negated
    return verdict


def context_files(sources: Iterable[str], rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """The files under `sources` (context-relative) that the .dockerignore lets into the build context."""
    files = []
    for source in sources:
        top = REPO / source
        candidates = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        files += [rel for p in candidates if not ignored(rel := p.relative_to(REPO).as_posix(), rules)]
    return files


# ------------------------------------------------------------------------------------------ replay
#: absolute paths under these are the system's, not directories of the build (which are mapped into the stage)
SYSTEM_ROOTS = frozenset(("bin", "boot", "dev", "etc", "home", "lib", "lib64", "opt", "proc", "root", "run"))
SYSTEM_ROOTS |= {"sbin", "srv", "sys", "tmp", "usr", "var", "mnt", "media"}
_ABS_PATH = re.compile(r"(?<![\w.$}/:-])/[\w.*-]+(?:/[\w.*-]*)*")


def make_venv(path: Path) -> Path:
    """A fresh virtualenv whose `pip` is the pip running these tests, not installed into it.

    `python -m venv` would install its bundled pip (5 s, and an old pip that is several times slower). Here the
    venv gets a .pth entry for a directory holding only a link to this interpreter's pip package, and `pip`/`pip3`
    scripts that run `python -m pip`; pip installs into the interpreter that runs it, so into the venv.
    """
    import pip

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    only_pip = path / "pip-only"
    only_pip.mkdir()
    (only_pip / "pip").symlink_to(Path(pip.__file__).parent, target_is_directory=True)
    (site_packages,) = path.glob("lib/python*/site-packages")
    (site_packages / "_replay_pip.pth").write_text(f"{only_pip}\n")
    for name in ("pip", "pip3"):
        script = path / "bin" / name
        script.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
        script.chmod(0o755)
    return path


#: chooser(stage, segment) → the commands to run for it ([] skips it)
Chooser = Callable[[Stage, str], list[str]]


@dataclass
class Step:
    stage: str
    segment: str
    ran: list[str]


class Replay:
    """Replays one Dockerfile's stages in `work` (see the module docstring)."""

    def __init__(
        self,
        dockerfile: Path,
        work: Path,
        *,
        build_args: dict[str, str] | None = None,
        stage_cache: dict[str, Path] | None = None,
        timeout: float = 600,
    ) -> None:
        self.dockerfile = dockerfile
        self.work = work
        self.build_args = build_args or {}
        self.global_args, self.stages = split_stages(parse(dockerfile))
        self.rules = dockerignore_rules(dockerfile.with_name(dockerfile.name + ".dockerignore"))
        self.roots: dict[str, Path] = {}  # stage name or index → its root directory
        self.venvs: dict[str, Path] = {}
        self.stage_cache = stage_cache if stage_cache is not None else {}
        self.timeout = timeout
        self.steps: list[Step] = []

    # -- per stage -----------------------------------------------------------------------------------------
    def label(self, stage: Stage) -> str:
        return stage.name or str(stage.index)

    def root(self, stage: Stage | str) -> Path:
        return self.roots[stage if isinstance(stage, str) else self.label(stage)]

    def venv(self, stage: Stage) -> Path:
        return self.venvs[self.label(stage)]

    def run_all(self, choose: Chooser) -> None:
        for stage in self.stages:
            self.run_stage(stage, choose)

    def run_stage(self, stage: Stage, choose: Chooser) -> None:
        label = self.label(stage)
        cached = self.stage_cache.get(stage.key)
        if cached is not None and stage.name:  # an identical named stage (the builder) replayed before
            self.roots[label], self.venvs[label] = cached, cached.parent / (cached.name + "-venv")
            return
        root = self.work / f"stage-{label}"
        root.mkdir(parents=True)
        venv = make_venv(self.work / f"stage-{label}-venv")
        self.roots[label], self.venvs[label] = root, venv
        workdir = "/"
        args = dict(stage.args(self.global_args)) | {
            k: v for k, v in self.build_args.items() if k in stage.args(self.global_args)
        }
        for ins in stage.instructions:
            if ins.keyword == "WORKDIR":
                workdir = os.path.join(workdir, ins.args)
                self.local(stage, workdir).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                self.copy(stage, ins, workdir)
            elif ins.keyword == "RUN":
                self.run(stage, ins, workdir, args, choose)
        if stage.name:
            self.stage_cache[stage.key] = root

    def local(self, stage: Stage, container_path: str) -> Path:
        return self.root(stage) / container_path.lstrip("/")

    def copy(self, stage: Stage, ins: Instruction, workdir: str) -> None:
        *sources, dest = ins.args.split()
        target = self.local(stage, dest if dest.startswith("/") else os.path.join(workdir, dest))
        source_stage = ins.flag("from")
        for source in sources:
            # (file, its path below a directory source, or None for a file source)
            files: list[tuple[Path, Path | None]]
            if source_stage:
                base = self.root(source_stage) / source.lstrip("/")
                files = [(p, p.relative_to(base)) for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
                files = files or ([(base, None)] if base.is_file() else [])
            else:
                base = REPO / source
                files = [
                    (REPO / rel, Path(rel).relative_to(source) if base.is_dir() else None)
                    for rel in context_files([source], self.rules)
                ]
            if not files:
                raise AssertionError(f"{self.dockerfile.name}:{ins.line}: COPY source {source} is not in the context")
            for path, rel in files:
                if rel is not None:  # a directory's contents go into dest
                    into = target / rel
                elif dest.endswith("/") or len(sources) > 1 or target.is_dir():
                    into = target / path.name
                else:
                    into = target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)

    def mounts(self, stage: Stage, ins: Instruction) -> dict[str, Path]:
        """Bind mounts of a RUN: container target → the local directory of the source stage's source path."""
        found = {}
        for spec in ins.flags.get("mount", []):
            opts = dict(item.partition("=")[::2] for item in spec.split(","))
            if opts.get("type", "bind") == "bind" and "from" in opts:
                found[opts["target"]] = self.root(opts["from"]) / opts.get("source", "/").lstrip("/")
        return found

    def map_paths(self, stage: Stage, command: str, mounts: dict[str, Path]) -> str:
        def local(match: re.Match[str]) -> str:
            path = match.group(0)
            for target, where in mounts.items():
                if path == target or path.startswith(target.rstrip("/") + "/"):
                    return str(where) + path[len(target.rstrip("/")) :]
            if path.split("/")[1] in SYSTEM_ROOTS:
                return path
            return str(self.local(stage, path))

        return _ABS_PATH.sub(local, command)

    def run(self, stage: Stage, ins: Instruction, workdir: str, args: dict[str, str], choose: Chooser) -> None:
        mounts = self.mounts(stage, ins)
        for segment in split_and(ins.args):
            commands = choose(stage, segment)
            self.steps.append(Step(self.label(stage), segment, commands))
            for command in commands:
                self.shell(stage, self.map_paths(stage, command, mounts), workdir, args)

    def shell(self, stage: Stage, command: str, workdir: str, args: dict[str, str]) -> str:
        venv = self.venv(stage)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env |= args | {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
        # Bytecode compilation changes nothing about what gets installed and takes most of an install's time.
        env |= {"PYTHONNOUSERSITE": "1", "PIP_COMPILE": "0"}
        cwd = self.local(stage, workdir)
        result = subprocess.run(
            ["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=self.timeout
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{self.dockerfile.name}: `{command}` failed (exit {result.returncode}) in {cwd}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result.stdout

    def wheel(self, stage: str = "builder") -> Path:
        wheels = sorted(self.root(stage).rglob("warmserve-*.whl"))
        assert len(wheels) == 1, f"expected one warmserve wheel in stage {stage}, found {wheels}"
        return wheels[0]
