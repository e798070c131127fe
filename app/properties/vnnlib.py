"""A reader of VNN-LIB properties (the VNN-COMP format: an SMT-LIB subset).

A file declares inputs ``X_i`` and outputs ``Y_j`` and asserts constraints whose conjunction
describes a *counterexample*: the property holds when no input satisfies them all. The
assertions are turned into disjunctive normal form, and each conjunction into a
:class:`Case`: an input box and linear output rows ``C y <= d``. Inputs may only be bounded
by constants (as in every VNN-COMP benchmark); outputs may be any linear expressions.
Strict comparisons are read as non-strict, which enlarges the counterexample region: a
proof stays a proof.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from app.errors import InvalidInputError

MAX_CASES = 100_000
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"^([XY])_(\d+)$")

Linear = tuple[dict[str, float], float]  # coefficients by variable name, constant
Atom = tuple[dict[str, float], float]  # sum(coef * var) + const <= 0


@dataclass
class Case:
    """One conjunction of the counterexample region: ``lo <= x <= hi`` and ``rows @ y <= rhs``."""

    lo: np.ndarray  # [n_inputs]
    hi: np.ndarray  # [n_inputs]
    rows: np.ndarray  # [k, n_outputs]
    rhs: np.ndarray  # [k]


@dataclass
class VnnProperty:
    """A VNN-LIB property: violated iff some case has a point meeting all its constraints."""

    n_inputs: int
    n_outputs: int
    cases: list[Case]


def read_vnnlib(source: str | Path) -> VnnProperty:
    """Parse a ``.vnnlib`` file (a path) or its text (a string containing ``(``)."""
    text = source if isinstance(source, str) and "(" in source else Path(source).read_text()
    text = re.sub(r";[^\n]*", "", text)
    exprs = _parse(_TOKEN.findall(text))
    names: dict[str, int] = {"X": 0, "Y": 0}
    formulas = []
    for expr in exprs:
        if not isinstance(expr, list) or not expr:
            raise InvalidInputError(f"vnnlib: unexpected top-level {expr!r}")
        if expr[0] == "declare-const":
            match = _VAR.match(str(expr[1]))
            if match is None:
                raise InvalidInputError(f"vnnlib: variables must be X_i or Y_j, got {expr[1]!r}")
            names[match[1]] = max(names[match[1]], int(match[2]) + 1)
        elif expr[0] == "assert":
            formulas.append(_dnf(expr[1]))
        else:
            raise InvalidInputError(f"vnnlib: unsupported command {expr[0]!r}")
    n_in, n_out = names["X"], names["Y"]
    if n_in == 0 or n_out == 0:
        raise InvalidInputError("vnnlib: no X_i or no Y_j declared")
    size = 1
    for f in formulas:
        size *= len(f)
        if size > MAX_CASES:
            raise InvalidInputError(f"vnnlib: more than {MAX_CASES} cases after expansion")
    cases = []
    for combo in product(*formulas):
        case = _case([atom for conj in combo for atom in conj], n_in, n_out)
        if case is not None:
            cases.append(case)
    return VnnProperty(n_in, n_out, cases)


def _parse(tokens: list[str]) -> list:
    stack: list[list] = [[]]
    for tok in tokens:
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise InvalidInputError("vnnlib: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise InvalidInputError("vnnlib: unbalanced '('")
    return stack[0]


def _dnf(expr) -> list[list[Atom]]:
    """The formula as a list of conjunctions of atoms."""
    if not isinstance(expr, list) or not expr:
        raise InvalidInputError(f"vnnlib: expected a constraint, got {expr!r}")
    op, args = expr[0], expr[1:]
    if op == "and":
        out: list[list[Atom]] = [[]]
        for arg in args:
            out = [a + b for a in out for b in _dnf(arg)]
            if len(out) > MAX_CASES:
                raise InvalidInputError(f"vnnlib: more than {MAX_CASES} cases after expansion")
        return out
    if op == "or":
        return [conj for arg in args for conj in _dnf(arg)]
    if op in ("<=", "<", ">=", ">", "=") and len(args) == 2:
        a, b = _linear(args[0]), _linear(args[1])
        less = _difference(a, b) if op in ("<=", "<", "=") else _difference(b, a)
        if op == "=":
            return [[less, _difference(b, a)]]
        return [[less]]
    raise InvalidInputError(f"vnnlib: unsupported constraint {op!r}")


def _difference(a: Linear, b: Linear) -> Atom:
    coef = dict(a[0])
    for k, v in b[0].items():
        coef[k] = coef.get(k, 0.0) - v
    return coef, a[1] - b[1]


def _linear(expr) -> Linear:
    if isinstance(expr, str):
        if _VAR.match(expr):
            return {expr: 1.0}, 0.0
        try:
            return {}, float(expr)
        except ValueError:
            raise InvalidInputError(f"vnnlib: unknown term {expr!r}") from None
    op, args = expr[0], [_linear(a) for a in expr[1:]]
    if op == "+":
        out: Linear = ({}, 0.0)
        for a in args:
            out = _difference(out, _scale(a, -1.0))
        return out
    if op == "-":
        if len(args) == 1:
            return _scale(args[0], -1.0)
        out = args[0]
        for a in args[1:]:
            out = _difference(out, a)
        return out
    if op == "*":
        out = ({}, 1.0)
        for a in args:
            if out[0] and a[0]:
                raise InvalidInputError("vnnlib: only linear constraints are supported")
            out = _scale(a, out[1]) if not out[0] else _scale(out, a[1])
        return out
    raise InvalidInputError(f"vnnlib: unsupported operator {op!r}")


def _scale(a: Linear, c: float) -> Linear:
    return {k: v * c for k, v in a[0].items()}, a[1] * c


def _case(atoms: list[Atom], n_in: int, n_out: int) -> Case | None:
    """The conjunction as a box and output rows; ``None`` when the box is empty."""
    lo, hi = np.full(n_in, -np.inf), np.full(n_in, np.inf)
    rows, rhs = [], []
    for coef, const in atoms:
        coef = {k: v for k, v in coef.items() if v != 0.0}
        kinds = {k[0] for k in coef}
        if kinds == {"X"}:
            if len(coef) != 1:
                raise InvalidInputError("vnnlib: input constraints must bound one X_i each")
            (name, c), = coef.items()
            i = int(name[2:])
            if c > 0:
                hi[i] = min(hi[i], -const / c)
            else:
                lo[i] = max(lo[i], -const / c)
        elif kinds == {"Y"}:
            row = np.zeros(n_out)
            for name, c in coef.items():
                row[int(name[2:])] += c
            rows.append(row)
            rhs.append(-const)
        elif not kinds:
            if const > 0:  # a false constant constraint: this case is empty
                return None
        else:
            raise InvalidInputError("vnnlib: constraints mixing X_i and Y_j are not supported")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        missing = int(np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))[0])
        raise InvalidInputError(f"vnnlib: input X_{missing} has no finite bounds")
    if (lo > hi).any():
        return None
    # "+ 0.0" turns the -0.0 that negated zero constants leave into 0.0
    return Case(lo + 0.0, hi + 0.0, np.array(rows).reshape(-1, n_out) + 0.0, np.array(rhs) + 0.0)
