"""Validated, frozen value objects built from plain data (the config file's parsed YAML): the
small validator the config schemas are written in, on the standard library alone.

Rules: pure (no I/O of its own: a converter a schema names may read a file, config.py's
secrets do); every problem is collected with its key path and none stops the others, so a
config with five mistakes gets five lines; a model's own checks run only once all its fields
are valid (they compare fields, which must then have their types); unknown keys are problems.

Theory of operation: `@model` makes a class a frozen, slotted, keyword-only dataclass whose
`__init__` validates its keyword arguments as it would a mapping read from a file (defaults
are trusted: they are written in code). The annotations are resolved at first use and
compiled into small nodes, one per type: str, int, float, bool, None, Literal, list, dict,
unions, models, any other class by isinstance. `Annotated[...]` metadata adds what a type
alone does not say: converters (`Before`), constraints (`Ge`, `Gt`, `Le`, `Lt`, `Len`,
`Pattern`), checks (`After`), the form `dump` gives (`Dump`) and the key in the data
(`Alias`). Scalars are converted the way a config author expects, no further: "256" is an
int, 5.0 is 5, but a bool is no number and a number is no string.

The small API beside the constructor: `validate(cls, data)`, `dump(obj)` (plain data, what
`Dump` says for each value: secrets redacted, durations as text), `replace(obj, **changes)`
and `construct(cls, **values)` (no validation: values that are ours), `field_names(cls)`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Final, Literal, TypeVar, Union, dataclass_transform

__all__ = [
    "After",
    "Alias",
    "Before",
    "Dump",
    "Ge",
    "Gt",
    "Invalid",
    "Le",
    "Len",
    "Lt",
    "Model",
    "Pattern",
    "check",
    "construct",
    "dump",
    "field_names",
    "model",
    "replace",
    "validate",
]

_M = TypeVar("_M", bound="Model")
_F = TypeVar("_F", bound=Callable[..., Any])


class Invalid(ValueError):
    """The problems found in some data, each one `key.path: what is wrong`, all of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# --- Annotated metadata --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Before:
    """Converts the value as given, before its type is checked (a ValueError is a problem,
    its text the message)."""

    fn: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class After:
    """Checks (or converts) the value once it has its type and constraints; not run on a value
    that has a problem already."""

    fn: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Dump:
    """The plain form `dump` gives of the value (text for a duration, a redaction for a
    secret)."""

    fn: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Alias:
    """The key in the data, when it cannot be the attribute's name (`try`)."""

    key: str


class _Constraint:
    __slots__ = ()

    def violation(self, value: Any) -> str | None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, slots=True)
class Ge(_Constraint):
    bound: int | float

    def violation(self, value: Any) -> str | None:
        return (
            None
            if value >= self.bound
            else f"Input should be greater than or equal to {self.bound}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Gt(_Constraint):
    bound: int | float

    def violation(self, value: Any) -> str | None:
        return None if value > self.bound else f"Input should be greater than {self.bound}"


@dataclasses.dataclass(frozen=True, slots=True)
class Le(_Constraint):
    bound: int | float

    def violation(self, value: Any) -> str | None:
        return (
            None if value <= self.bound else f"Input should be less than or equal to {self.bound}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Lt(_Constraint):
    bound: int | float

    def violation(self, value: Any) -> str | None:
        return None if value < self.bound else f"Input should be less than {self.bound}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


@dataclasses.dataclass(frozen=True, slots=True)
class Len(_Constraint):
    """Length bounds of a string or a list."""

    min: int = 0
    max: int | None = None

    def violation(self, value: Any) -> str | None:
        kind, unit = ("String", "character") if isinstance(value, str) else ("List", "item")
        if len(value) < self.min:
            return f"{kind} should have at least {_count(self.min, unit)}"
        if self.max is not None and len(value) > self.max:
            return f"{kind} should have at most {_count(self.max, unit)}"
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Pattern(_Constraint):
    """A string the regular expression finds a match in (anchor it to match it whole)."""

    regex: str

    def violation(self, value: Any) -> str | None:
        return (
            None if re.search(self.regex, value) else f"String should match pattern {self.regex!r}"
        )


# --- compiled types ------------------------------------------------------------------------

_BAD: Final = object()  # a value with a problem (recorded already)


def _child(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _add(problems: list[str], path: str, message: str) -> None:
    problems.append(f"{path or '<root>'}: {message}")


class _Node:
    """One type, compiled: validates a value given at `path`, dumps one of its own."""

    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        raise NotImplementedError

    def owns(self, value: Any) -> bool:
        """Whether `value`, already validated, is of this type (dump picks a union's member)."""
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return value


class _AnyNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        return value

    def owns(self, value: Any) -> bool:
        return True


class _NoneNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if value is None:
            return None
        _add(problems, path, "Input should be None")
        return _BAD

    def owns(self, value: Any) -> bool:
        return value is None


class _StrNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, str):
            return value
        _add(problems, path, "Input should be a valid string")
        return _BAD

    def owns(self, value: Any) -> bool:
        return isinstance(value, str)


_INT_RE: Final = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


class _IntNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INT_RE.match(text := value.strip()):
            try:
                return int(text)
            except ValueError:  # longer than int() takes (4300 digits)
                pass
        _add(problems, path, "Input should be a valid integer")
        return _BAD

    def owns(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


class _FloatNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        number: float | None = None
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _FLOAT_RE.match(text := value.strip()):
                number = float(text)
        except OverflowError:
            pass
        if number is None:
            _add(problems, path, "Input should be a valid number")
            return _BAD
        if not math.isfinite(number):
            _add(problems, path, "Input should be a finite number")
            return _BAD
        return number

    def owns(self, value: Any) -> bool:
        return isinstance(value, float)


_TRUE: Final = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE: Final = frozenset({"0", "off", "f", "false", "n", "no"})


class _BoolNode(_Node):
    __slots__ = ()

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        _add(problems, path, "Input should be a valid boolean")
        return _BAD

    def owns(self, value: Any) -> bool:
        return isinstance(value, bool)


class _LiteralNode(_Node):
    __slots__ = ("values",)

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.values = values

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if self.owns(value):
            return value
        *rest, last = [repr(v) for v in self.values]
        allowed = f"{', '.join(rest)} or {last}" if rest else last
        _add(problems, path, f"Input should be {allowed}")
        return _BAD

    def owns(self, value: Any) -> bool:
        # 1 == True: the type must be the same too
        return any(value == v and type(value) is type(v) for v in self.values)


class _ListNode(_Node):
    __slots__ = ("item",)

    def __init__(self, item: _Node) -> None:
        self.item = item

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, list | tuple):
            _add(problems, path, "Input should be a valid list")
            return _BAD
        out = [self.item.validate(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in out) else out

    def owns(self, value: Any) -> bool:
        return isinstance(value, list)

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


class _DictNode(_Node):
    __slots__ = ("key", "value")

    def __init__(self, key: _Node, value: _Node) -> None:
        self.key = key
        self.value = value

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, Mapping):
            _add(problems, path, "Input should be a valid dictionary")
            return _BAD
        out = {}
        bad = False
        for k, v in value.items():
            where = _child(path, k)
            key = self.key.validate(k, where, problems)
            item = self.value.validate(v, where, problems)
            if key is _BAD or item is _BAD:
                bad = True
            else:
                out[key] = item
        return _BAD if bad else out

    def owns(self, value: Any) -> bool:
        return isinstance(value, dict)

    def dump(self, value: Any) -> Any:
        return {self.key.dump(k): self.value.dump(v) for k, v in value.items()}


class _UnionNode(_Node):
    """The first member that takes the value wins. When none does, the problems of each are
    reported (an Optional's are its one type's: None needs no words)."""

    __slots__ = ("members",)

    def __init__(self, members: tuple[_Node, ...]) -> None:
        self.members = members

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if value is None and any(isinstance(m, _NoneNode) for m in self.members):
            return None
        tried: list[str] = []
        for member in self.members:
            if isinstance(member, _NoneNode):
                continue
            found: list[str] = []
            result = member.validate(value, path, found)
            if result is not _BAD:
                return result
            tried.extend(found)
        problems.extend(tried)
        return _BAD

    def owns(self, value: Any) -> bool:
        return any(m.owns(value) for m in self.members)

    def dump(self, value: Any) -> Any:
        for member in self.members:
            if member.owns(value):
                return member.dump(value)
        return value


class _InstanceNode(_Node):
    """Any other class: the value must be an instance already (a `Before` makes it one)."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, self.cls):
            return value
        _add(problems, path, f"Input should be an instance of {self.cls.__name__}")
        return _BAD

    def owns(self, value: Any) -> bool:
        return isinstance(value, self.cls)


class _ModelNode(_Node):
    __slots__ = ("cls",)

    def __init__(self, cls: type[Model]) -> None:
        self.cls = cls

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, self.cls):
            return value
        if not isinstance(value, Mapping):
            _add(
                problems,
                path,
                f"Input should be a valid dictionary or instance of {self.cls.__name__}",
            )
            return _BAD
        obj = object.__new__(self.cls)
        return obj if _fill(obj, value, path, problems) else _BAD

    def owns(self, value: Any) -> bool:
        return isinstance(value, self.cls)

    def dump(self, value: Any) -> Any:
        return dump(value)


class _AnnotatedNode(_Node):
    __slots__ = ("inner", "before", "constraints", "after", "dumper")

    def __init__(self, inner: _Node, metadata: tuple[Any, ...]) -> None:
        self.inner = inner
        self.before = [m.fn for m in metadata if isinstance(m, Before)]
        self.constraints = [m for m in metadata if isinstance(m, _Constraint)]
        self.after = [m.fn for m in metadata if isinstance(m, After)]
        dumpers = [m.fn for m in metadata if isinstance(m, Dump)]
        self.dumper = dumpers[-1] if dumpers else None

    def validate(self, value: Any, path: str, problems: list[str]) -> Any:
        try:
            for fn in self.before:
                value = fn(value)
        except ValueError as exc:
            _add(problems, path, str(exc))
            return _BAD
        value = self.inner.validate(value, path, problems)
        if value is _BAD:
            return _BAD
        for constraint in self.constraints:
            if message := constraint.violation(value):
                _add(problems, path, message)
                return _BAD
        try:
            for fn in self.after:
                value = fn(value)
        except ValueError as exc:
            _add(problems, path, str(exc))
            return _BAD
        return value

    def owns(self, value: Any) -> bool:
        return self.inner.owns(value)

    def dump(self, value: Any) -> Any:
        return self.dumper(value) if self.dumper is not None else self.inner.dump(value)


_SCALARS: Final[dict[Any, _Node]] = {
    str: _StrNode(),
    int: _IntNode(),
    float: _FloatNode(),
    bool: _BoolNode(),
    type(None): _NoneNode(),
    None: _NoneNode(),
    Any: _AnyNode(),
    object: _AnyNode(),
}


def _compile(tp: Any) -> _Node:
    """The node for one (resolved) annotation."""
    node = _SCALARS.get(tp)
    if node is not None:
        return node
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        return _AnnotatedNode(_compile(args[0]), tuple(tp.__metadata__))
    if origin is Literal:
        return _LiteralNode(args)
    if origin is Union or origin is types.UnionType:
        return _UnionNode(tuple(_compile(a) for a in args))
    if origin is list:
        return _ListNode(_compile(args[0]) if args else _AnyNode())
    if origin is dict:
        if not args:
            return _DictNode(_AnyNode(), _AnyNode())
        return _DictNode(_compile(args[0]), _compile(args[1]))
    if isinstance(tp, type) and issubclass(tp, Model):
        return _ModelNode(tp)
    if isinstance(tp, type):
        return _InstanceNode(tp)
    raise TypeError(f"schema: no validator for the type {tp!r}")


# --- models --------------------------------------------------------------------------------

_REQUIRED: Final = object()


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str
    node: _Node
    default: Any  # _REQUIRED when there is none
    factory: Callable[[], Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    fields: tuple[_Field, ...]
    keys: frozenset[str]
    checks: tuple[Callable[[Any], None], ...]


_SPECS: dict[type, _Spec] = {}


def _spec(cls: type[Model]) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        # resolved at first use, not at decoration: annotations may name classes defined
        # further down the module (two threads compiling at once make the same spec)
        spec = _SPECS[cls] = _build_spec(cls)
    return spec


def _build_spec(cls: type[Model]) -> _Spec:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        key = f.name
        if typing.get_origin(tp) is Annotated:
            key = next((m.key for m in tp.__metadata__ if isinstance(m, Alias)), key)
        fields.append(
            _Field(
                f.name,
                key,
                _compile(tp),
                _REQUIRED if f.default is dataclasses.MISSING else f.default,
                None if f.default_factory is dataclasses.MISSING else f.default_factory,
            )
        )
    checks: dict[str, Callable[[Any], None]] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if getattr(attr, "__schema_check__", False):
                checks.pop(name, None)  # an override runs where its class puts it
                checks[name] = attr
    return _Spec(tuple(fields), frozenset(f.key for f in fields), tuple(checks.values()))


def _fill(obj: Model, data: Mapping[Any, Any], path: str, problems: list[str]) -> bool:
    """Validates `data` into the fields of `obj` (a bare instance), recording every problem;
    then runs the model's checks if no field had one. True when `obj` is valid."""
    cls = type(obj)
    spec = _spec(cls)
    data = cls._before(data)
    start = len(problems)
    for key in data:
        if key not in spec.keys:
            _add(problems, _child(path, key), "unknown key")
    for f in spec.fields:
        if f.key in data:
            value = f.node.validate(data[f.key], _child(path, f.key), problems)
            if value is _BAD:
                continue
        elif f.factory is not None:
            value = f.factory()
        elif f.default is _REQUIRED:
            _add(problems, _child(path, f.key), "Field required")
            continue
        else:
            value = f.default
        object.__setattr__(obj, f.name, value)
    if len(problems) > start:
        return False
    for fn in spec.checks:
        try:
            fn(obj)
        except ValueError as exc:
            if path:
                _add(problems, path, str(exc))
            else:
                # the root's checks name their own keys: one problem each
                problems.extend(str(exc).split("; "))
    return len(problems) == start


class Model:
    """The base of every schema (decorate each with `@model`): validates on construction."""

    __slots__ = ()

    def __init__(self, **data: Any) -> None:
        problems: list[str] = []
        if not _fill(self, data, "", problems):
            raise Invalid(problems)

    @classmethod
    def _before(cls, data: Mapping[Any, Any]) -> Mapping[Any, Any]:
        """The data as given, before any field is validated (a model may fill in keys)."""
        return data


@dataclass_transform(
    kw_only_default=True, frozen_default=True, field_specifiers=(dataclasses.field,)
)
def model(cls: type[_M]) -> type[_M]:
    """Makes a `Model` subclass a frozen, slotted, keyword-only dataclass; the `__init__` is
    Model's (it validates)."""
    if "__init__" in vars(cls):
        raise TypeError(f"{cls.__name__}: a schema validates in Model.__init__; use @check")
    return dataclasses.dataclass(frozen=True, slots=True, kw_only=True, init=False)(cls)


def check(fn: _F) -> _F:
    """Marks a method `(self) -> None` as one of its model's checks: run once every field is
    valid, a ValueError is a problem at the model's key path (at the root, its text split on
    "; " into one problem each: those name their own keys)."""
    fn.__schema_check__ = True  # type: ignore[attr-defined]
    return fn


def validate(cls: type[_M], data: Any) -> _M:
    """`cls` built from a mapping, or Invalid with every problem and its key path."""
    problems: list[str] = []
    if isinstance(data, Mapping):
        obj = object.__new__(cls)
        if _fill(obj, data, "", problems):
            return obj
    else:
        _add(problems, "", f"Input should be a valid dictionary or instance of {cls.__name__}")
    raise Invalid(problems)


def dump(obj: Model, *, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """`obj` as plain data, keyed as the data it was made from (aliases), each value in the
    form its `Dump` gives; `exclude`: attribute names left out (at the top only)."""
    return {
        f.key: f.node.dump(getattr(obj, f.name))
        for f in _spec(type(obj)).fields
        if f.name not in exclude
    }


def field_names(cls: type[Model]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def _set_all(obj: Model, values: Iterator[tuple[str, Any]]) -> None:
    for name, value in values:
        object.__setattr__(obj, name, value)


def replace(obj: _M, **changes: Any) -> _M:
    """A copy of `obj` with `changes`, not validated (the values are ours)."""
    names = field_names(type(obj))
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field(s) {sorted(unknown)}")
    new = object.__new__(type(obj))
    _set_all(new, ((n, changes[n] if n in changes else getattr(obj, n)) for n in names))
    return new


def construct(cls: type[_M], **values: Any) -> _M:
    """`cls` from `values` (the rest: defaults), not validated: values the code made itself."""
    obj = object.__new__(cls)
    rest = dict(values)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in rest:
            value = rest.pop(f.name)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            raise TypeError(f"{cls.__name__}: {f.name} is required")
        object.__setattr__(obj, f.name, value)
    if rest:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(rest)}")
    return obj
