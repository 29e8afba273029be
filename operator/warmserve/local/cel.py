"""The part of CEL (the Common Expression Language) that CRD validation rules use, on JSON values.

`warmserve up` checks its YAML with the CRDs' `x-kubernetes-validations` as the API server would, without a
dependency: literals (int, double, string, bool, null, lists), field selection and indexing, `has()`,
`! - * / % + < <= > >= == != in && || ?:`, `size()`, the string functions `startsWith`, `endsWith`, `contains`,
`matches`, the conversions `int`, `double`, `string`, and the macros `all`, `exists`, `exists_one`, `map`,
`filter`. As in CEL, `&&` and `||` absorb an error on one side when the other side decides the result, and a
missing field is an error (which fails the rule), not false. Anything else is a `CelSyntaxError` at compile
time, so an unsupported rule is found by a test, not skipped. A test compares it with cel-python.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

Node = tuple[Any, ...]

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|0[xX][0-9a-fA-F]+|\d+)(?P<unsigned>[uU])?
    | (?P<str>[rR]?(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"))
    | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>\|\||&&|==|!=|<=|>=|[<>!+\-*/%().,\[\]?:])
    )""",
    re.VERBOSE,
)
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_RESERVED = {"true": True, "false": False, "null": None}


class CelSyntaxError(ValueError):
    """The expression is not CEL, or uses a part of CEL this evaluator does not have."""


class CelError(Exception):
    """Evaluating the expression failed (a missing field, a type mismatch, a division by zero)."""


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CelSyntaxError(f"unexpected {text[pos:].strip()[:20]!r}")
        pos = m.end()
        if m.group("num") is not None:
            raw = m.group("num")
            if m.group("unsigned"):
                raise CelSyntaxError("unsigned integers are not supported")
            if raw.lower().startswith("0x"):
                out.append(("lit", int(raw, 16)))
            else:
                out.append(("lit", float(raw) if any(c in raw for c in ".eE") else int(raw)))
        elif m.group("str") is not None:
            out.append(("lit", _string(m.group("str"))))
        elif m.group("id") is not None:
            word = m.group("id")
            out.append(("lit", _RESERVED[word]) if word in _RESERVED else ("id", word))
        else:
            out.append(("op", m.group("op")))
    out.append(("end", None))
    return out


def _string(raw: str) -> str:
    if raw[0] in "rR":
        return raw[2:-1]
    body = raw[1:-1]
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt not in escapes:
                raise CelSyntaxError(f"unsupported escape \\{nxt}")
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, value: str | None = None) -> bool:
        kind, v = self.toks[self.i]
        return kind == "op" and (value is None or v == value)

    def take(self, value: str) -> None:
        kind, v = self.toks[self.i]
        if kind != "op" or v != value:
            raise CelSyntaxError(f"expected {value!r}, got {v!r}")
        self.i += 1

    def parse(self) -> Node:
        node = self.expr()
        if self.toks[self.i][0] != "end":
            raise CelSyntaxError(f"unexpected {self.toks[self.i][1]!r}")
        return node

    def expr(self) -> Node:
        cond = self.binary(0)
        if self.peek("?"):
            self.take("?")
            then = self.expr()
            self.take(":")
            return ("cond", cond, then, self.expr())
        return cond

    LEVELS: tuple[tuple[str, ...], ...] = (
        ("||",),
        ("&&",),
        ("==", "!=", "<", "<=", ">", ">=", "in"),
        ("+", "-"),
        ("*", "/", "%"),
    )

    def binary(self, level: int) -> Node:
        if level == len(self.LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while True:
            kind, v = self.toks[self.i]
            if not ((kind == "op" or (kind == "id" and v == "in")) and v in self.LEVELS[level]):
                return node
            self.i += 1
            right = self.binary(level + 1)
            node = ("logic", v, node, right) if v in ("||", "&&") else ("binary", v, node, right)

    def unary(self) -> Node:
        if self.peek("!") or self.peek("-"):
            op = self.toks[self.i][1]
            self.i += 1
            return ("unary", op, self.unary())
        return self.postfix(self.primary())

    def args(self) -> list[Node]:
        self.take("(")
        out: list[Node] = []
        while not self.peek(")"):
            out.append(self.expr())
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return out

    def postfix(self, node: Node) -> Node:
        while True:
            if self.peek("."):
                self.take(".")
                kind, name = self.toks[self.i]
                if kind != "id":
                    raise CelSyntaxError(f"expected a field name, got {name!r}")
                self.i += 1
                if self.peek("("):
                    args = self.args()
                    if name in _MACROS:
                        if len(args) != 2 or args[0][0] != "ident":
                            raise CelSyntaxError(f"{name}() takes a variable and an expression")
                        node = ("macro", name, node, args[0][1], args[1])
                    else:
                        node = ("call", name, node, args)
                else:
                    node = ("select", node, name)
            elif self.peek("["):
                self.take("[")
                key = self.expr()
                self.take("]")
                node = ("index", node, key)
            else:
                return node

    def primary(self) -> Node:
        kind, v = self.toks[self.i]
        self.i += 1
        if kind == "lit":
            return ("lit", v)
        if kind == "id":
            if self.peek("("):
                args = self.args()
                if v == "has":
                    if len(args) != 1 or args[0][0] != "select":
                        raise CelSyntaxError("has() takes a field selection")
                    return ("has", args[0][1], args[0][2])
                return ("call", v, None, args)
            return ("ident", v)
        if kind == "op" and v == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind == "op" and v == "[":
            items: list[Node] = []
            while not self.peek("]"):
                items.append(self.expr())
                if not self.peek("]"):
                    self.take(",")
            self.take("]")
            return ("list", items)
        raise CelSyntaxError(f"unexpected {v!r}")


# -- evaluation ------------------------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    if _is_num(a) and _is_num(b):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _compare(op: str, a: Any, b: Any) -> bool:
    if not ((_is_num(a) and _is_num(b)) or (type(a) is type(b) and isinstance(a, str | bool))):
        raise CelError(f"no such overload: {type(a).__name__} {op} {type(b).__name__}")
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _arith(op: str, a: Any, b: Any) -> Any:
    if op == "+" and type(a) is type(b) and isinstance(a, str | list):
        return a + b
    if not (_is_num(a) and _is_num(b)) or (isinstance(a, int) != isinstance(b, int)):
        raise CelError(f"no such overload: {type(a).__name__} {op} {type(b).__name__}")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if isinstance(a, float):
        if op == "%":
            raise CelError("no such overload: double % double")
        return a / b if b else (float("inf") if a > 0 else float("-inf") if a < 0 else float("nan"))
    if b == 0:
        raise CelError("division by zero" if op == "/" else "modulus by zero")
    quotient = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)  # truncated toward zero
    return quotient if op == "/" else a - b * quotient


def _size(v: Any) -> int:
    if isinstance(v, str | list | dict):
        return len(v)
    raise CelError(f"no such overload: size({type(v).__name__})")


def _string_fn(name: str, target: Any, args: list[Any]) -> Any:
    if not isinstance(target, str) or len(args) != 1 or not isinstance(args[0], str):
        raise CelError(f"no such overload: {name}")
    if name == "startsWith":
        return target.startswith(args[0])
    if name == "endsWith":
        return target.endswith(args[0])
    if name == "contains":
        return args[0] in target
    try:
        return re.search(args[0], target) is not None  # matches: RE2, unanchored
    except re.error as exc:
        raise CelError(f"invalid regular expression {args[0]!r}: {exc}") from exc


def _convert(name: str, v: Any) -> Any:
    try:
        if name == "int" and not isinstance(v, bool):
            return int(v) if not isinstance(v, str) else int(v, 10)
        if name == "double" and not isinstance(v, bool):
            return float(v)
        if name == "string":
            return {True: "true", False: "false"}.get(v, str(v)) if isinstance(v, bool) else str(v)
    except (TypeError, ValueError) as exc:
        raise CelError(f"{name}({v!r}): {exc}") from exc
    raise CelError(f"no such overload: {name}({type(v).__name__})")


STRING_FUNCTIONS = frozenset({"startsWith", "endsWith", "contains", "matches"})


def _eval(node: Node, env: Mapping[str, Any]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "ident":
        if node[1] not in env:
            raise CelError(f"undeclared reference to {node[1]!r}")
        return env[node[1]]
    if kind == "list":
        return [_eval(n, env) for n in node[1]]
    if kind in ("select", "has"):
        target = _eval(node[1], env)
        if not isinstance(target, dict):
            raise CelError(f"no such field {node[2]!r} on a {type(target).__name__}")
        if kind == "has":
            return node[2] in target
        if node[2] not in target:
            raise CelError(f"no such key: {node[2]!r}")
        return target[node[2]]
    if kind == "index":
        target, key = _eval(node[1], env), _eval(node[2], env)
        if isinstance(target, list) and isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(target):
                raise CelError(f"index {key} out of range")
            return target[key]
        if isinstance(target, dict):
            if key not in target:
                raise CelError(f"no such key: {key!r}")
            return target[key]
        raise CelError("no such overload: index")
    if kind == "unary":
        v = _eval(node[2], env)
        if node[1] == "!":
            if not isinstance(v, bool):
                raise CelError("no such overload: !")
            return not v
        if not _is_num(v):
            raise CelError("no such overload: -")
        return -v
    if kind == "logic":
        return _logic(node[1], node[2], node[3], env)
    if kind == "cond":
        cond = _eval(node[1], env)
        if not isinstance(cond, bool):
            raise CelError("no such overload: ?:")
        return _eval(node[2] if cond else node[3], env)
    if kind == "binary":
        op, a, b = node[1], _eval(node[2], env), _eval(node[3], env)
        if op == "==":
            return _equal(a, b)
        if op == "!=":
            return not _equal(a, b)
        if op == "in":
            if isinstance(b, list):
                return any(_equal(a, x) for x in b)
            if isinstance(b, dict):
                return a in b
            raise CelError("no such overload: in")
        if op in ("<", "<=", ">", ">="):
            return _compare(op, a, b)
        return _arith(op, a, b)
    if kind == "call":
        name, target_node, arg_nodes = node[1], node[2], node[3]
        args = [_eval(n, env) for n in arg_nodes]
        if target_node is not None:
            target = _eval(target_node, env)
            if name == "size" and not args:
                return _size(target)
            if name in STRING_FUNCTIONS:
                return _string_fn(name, target, args)
        elif len(args) == 1 and name == "size":
            return _size(args[0])
        elif len(args) == 1 and name in ("int", "double", "string"):
            return _convert(name, args[0])
        raise CelError(f"no such function {name}")
    if kind == "macro":
        return _macro(node[1], _eval(node[2], env), node[3], node[4], env)
    raise CelError(f"cannot evaluate {kind}")


def _logic(op: str, left: Node, right: Node, env: Mapping[str, Any]) -> bool:
    """CEL's commutative `&&`/`||`: a deciding value on either side wins over an error on the other."""
    decisive = op == "||"  # the value that decides the result by itself
    error: CelError | None = None
    for side in (left, right):
        try:
            v = _eval(side, env)
        except CelError as exc:
            error = error or exc
            continue
        if not isinstance(v, bool):
            error = error or CelError(f"no such overload: {op}")
        elif v is decisive:
            return decisive
    if error is not None:
        raise error
    return not decisive


def _macro(name: str, target: Any, var: str, body: Node, env: Mapping[str, Any]) -> Any:
    if isinstance(target, dict):
        items = list(target)
    elif isinstance(target, list):
        items = target
    else:
        raise CelError(f"no such overload: {name}")

    def run(item: Any) -> Any:
        return _eval(body, {**env, var: item})

    if name == "map":
        return [run(x) for x in items]
    if name == "filter":
        return [x for x in items if _truth(run(x))]
    if name == "exists_one":
        return sum(_truth(run(x)) for x in items) == 1
    decisive = name == "exists"  # all: one false decides; exists: one true decides
    error: CelError | None = None
    for x in items:
        try:
            v = _truth(run(x))
        except CelError as exc:
            error = error or exc
            continue
        if v is decisive:
            return decisive
    if error is not None:
        raise error
    return not decisive


def _truth(v: Any) -> bool:
    if not isinstance(v, bool):
        raise CelError("a predicate must be a bool")
    return v


class Program:
    """A compiled expression; `evaluate({"self": value})` returns its value or raises CelError."""

    def __init__(self, text: str, tree: Node) -> None:
        self.text = text
        self._tree = tree

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        try:
            return _eval(self._tree, env)
        except RecursionError as exc:
            raise CelError("expression too deep") from exc


@functools.lru_cache(maxsize=256)
def compile_rule(text: str) -> Program:
    """Parse `text` once; raises CelSyntaxError for what is not (supported) CEL."""
    try:
        return Program(text, _Parser(text).parse())
    except IndexError as exc:
        raise CelSyntaxError("unexpected end of the expression") from exc


def holds(text: str, value: Any) -> bool:
    """Whether the rule `text` holds for `self` = `value` (an evaluation error or a non-bool fails it)."""
    try:
        return compile_rule(text).evaluate({"self": value}) is True
    except CelError:
        return False
