"""Unit tests for sidecar/schema.py, the validator the config schemas are written in: scalars,
constraints, converters, containers, unions, models, key paths, every problem at once, frozen
values, and the small API beside the constructor (validate, dump, replace, construct)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any, Literal

import pytest

from sidecar.schema import (
    After,
    Alias,
    Before,
    Dump,
    Ge,
    Gt,
    Invalid,
    Le,
    Len,
    Lt,
    Model,
    Pattern,
    check,
    construct,
    dump,
    field_names,
    model,
    replace,
    validate,
)


def _problems(cls: type[Model], data: Any) -> list[str]:
    with pytest.raises(Invalid) as info:
        validate(cls, data)
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def _problem(cls: type[Model], data: Any) -> str:
    problems = _problems(cls, data)
    assert len(problems) == 1, problems
    return problems[0]


# --- scalars -------------------------------------------------------------------------------


@model
class Scalars(Model):
    s: str = ""
    i: int = 0
    f: float = 0.0
    b: bool = False
    anything: Any = None


@pytest.mark.parametrize(
    ("key", "given", "expected"),
    [
        ("s", "text", "text"),
        ("s", "", ""),
        ("i", 7, 7),
        ("i", -3, -3),
        ("i", "256", 256),
        ("i", " 42 ", 42),
        ("i", "+5", 5),
        ("i", 5.0, 5),
        ("f", 0.5, 0.5),
        ("f", 2, 2.0),
        ("f", "0.25", 0.25),
        ("f", "1e3", 1000.0),
        ("f", ".5", 0.5),
        ("b", True, True),
        ("b", False, False),
        ("b", 1, True),
        ("b", 0, False),
        ("b", "yes", True),
        ("b", "Off", False),
        ("b", "true", True),
        ("anything", [1, {"x": None}], [1, {"x": None}]),
    ],
)
def test_scalars_take_what_a_config_author_means(key: str, given: Any, expected: Any) -> None:
    value = getattr(validate(Scalars, {key: given}), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("key", "given", "message"),
    [
        ("s", 5, "Input should be a valid string"),
        ("s", None, "Input should be a valid string"),
        ("s", ["a"], "Input should be a valid string"),
        ("i", True, "Input should be a valid integer"),  # a bool is no number
        ("i", 5.5, "Input should be a valid integer"),
        ("i", "5.0", "Input should be a valid integer"),
        ("i", "five", "Input should be a valid integer"),
        ("i", "\u0661", "Input should be a valid integer"),  # ARABIC-INDIC DIGIT ONE
        ("i", "9" * 5000, "Input should be a valid integer"),  # past int()'s digit limit
        ("i", None, "Input should be a valid integer"),
        ("f", False, "Input should be a valid number"),
        ("f", "half", "Input should be a valid number"),
        ("f", "nan", "Input should be a valid number"),
        ("f", float("inf"), "Input should be a finite number"),
        ("f", float("nan"), "Input should be a finite number"),
        ("f", 10**400, "Input should be a valid number"),
        ("f", "1e400", "Input should be a finite number"),
        ("b", "perhaps", "Input should be a valid boolean"),
        ("b", 2, "Input should be a valid boolean"),
        ("b", None, "Input should be a valid boolean"),
    ],
)
def test_scalars_refuse_what_they_cannot_mean(key: str, given: Any, message: str) -> None:
    assert _problem(Scalars, {key: given}) == f"{key}: {message}"


# --- constraints ---------------------------------------------------------------------------


@model
class Bounded(Model):
    ge: Annotated[int, Ge(1)] = 1
    gt: Annotated[float, Gt(0.0)] = 1.0
    le: Annotated[int, Le(10)] = 0
    lt: Annotated[float, Lt(1.0)] = 0.0
    both: Annotated[int, Ge(2), Le(4)] = 3
    text: Annotated[str, Len(1, 3)] = "a"
    items: Annotated[list[int], Len(1, 2)] = field(default_factory=lambda: [1])
    one: Annotated[list[int], Len(1)] = field(default_factory=lambda: [1])
    word: Annotated[str, Pattern(r"^[a-z]+$")] = "a"


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        ({"ge": 1}, True),
        ({"ge": 0}, False),
        ({"gt": 0.001}, True),
        ({"gt": 0}, False),
        ({"le": 10}, True),
        ({"le": 11}, False),
        ({"lt": 0.999}, True),
        ({"lt": 1}, False),
        ({"both": 2}, True),
        ({"both": 4}, True),
        ({"both": 1}, False),
        ({"both": 5}, False),
        ({"text": "abc"}, True),
        ({"text": ""}, False),
        ({"text": "abcd"}, False),
        ({"items": [1, 2]}, True),
        ({"items": []}, False),
        ({"items": [1, 2, 3]}, False),
        ({"word": "abc"}, True),
        ({"word": "ab1"}, False),
        ({"word": ""}, False),
    ],
)
def test_each_constraint_holds_at_its_bound(data: dict[str, Any], ok: bool) -> None:
    if ok:
        value = validate(Bounded, data)
        assert getattr(value, next(iter(data))) == next(iter(data.values()))
    else:
        assert _problem(Bounded, data).startswith(f"{next(iter(data))}: ")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ge": 0}, "ge: Input should be greater than or equal to 1"),
        ({"gt": 0}, "gt: Input should be greater than 0.0"),
        ({"le": 11}, "le: Input should be less than or equal to 10"),
        ({"lt": 2}, "lt: Input should be less than 1.0"),
        ({"text": ""}, "text: String should have at least 1 character"),
        ({"text": "abcd"}, "text: String should have at most 3 characters"),
        ({"items": []}, "items: List should have at least 1 item"),
        ({"items": [1, 2, 3]}, "items: List should have at most 2 items"),
        ({"word": "A"}, "word: String should match pattern '^[a-z]+$'"),
    ],
)
def test_constraint_messages(data: dict[str, Any], message: str) -> None:
    assert _problem(Bounded, data) == message


def test_constraints_apply_after_the_type() -> None:
    # "0" becomes the int 0 first, then fails its bound (not its type)
    assert _problem(Bounded, {"ge": "0"}) == "ge: Input should be greater than or equal to 1"
    assert _problem(Bounded, {"ge": "x"}) == "ge: Input should be a valid integer"


# --- converters ----------------------------------------------------------------------------


def _seconds(value: object) -> float:
    if isinstance(value, str) and value.endswith("s") and value[:-1].isdigit():
        return float(value[:-1])
    raise ValueError(f"invalid duration {value!r}")


def _shout(value: str) -> str:
    if value == "forbidden":
        raise ValueError("that word is not allowed")
    return value.upper()


Seconds = Annotated[float, Before(_seconds), Dump(lambda s: f"{s:g}s"), Gt(0)]


@model
class Converted(Model):
    wait: Seconds = 1.0
    name: Annotated[str, After(_shout)] = "A"
    both: Annotated[int, Before(lambda v: v * 2 if isinstance(v, int) else v), Le(10)] = 0
    later: Annotated[str, After(lambda v: v + "!")] | None = None


def test_before_converts_the_given_value() -> None:
    assert validate(Converted, {"wait": "30s"}).wait == 30.0


def test_before_errors_are_the_message() -> None:
    assert _problem(Converted, {"wait": "soon"}) == "wait: invalid duration 'soon'"
    assert _problem(Converted, {"wait": 30}) == "wait: invalid duration 30"


def test_the_type_and_constraints_apply_to_what_before_gives() -> None:
    assert _problem(Converted, {"wait": "0s"}) == "wait: Input should be greater than 0"
    assert validate(Converted, {"both": 5}).both == 10
    assert _problem(Converted, {"both": 6}) == "both: Input should be less than or equal to 10"


def test_after_checks_and_converts_a_typed_value() -> None:
    assert validate(Converted, {"name": "bob"}).name == "BOB"
    assert _problem(Converted, {"name": "forbidden"}) == "name: that word is not allowed"


def test_after_does_not_run_on_a_value_with_a_problem() -> None:
    assert _problem(Converted, {"name": 5}) == "name: Input should be a valid string"


def test_after_inside_an_optional_runs_on_a_value_only() -> None:
    assert validate(Converted, {"later": None}).later is None
    assert validate(Converted, {"later": "x"}).later == "x!"


def test_dump_uses_the_dump_form() -> None:
    assert dump(validate(Converted, {"wait": "30s", "name": "x"})) == {
        "wait": "30s",
        "name": "X",
        "both": 0,
        "later": None,
    }


def test_defaults_are_trusted_not_validated() -> None:
    # the default 1.0 would fail _seconds (it needs a unit): a default is written in code
    assert validate(Converted, {}).wait == 1.0
    assert Converted().wait == 1.0


# --- containers, unions, literals ------------------------------------------------------------


@model
class Leaf(Model):
    n: Annotated[int, Ge(0)]
    tag: Literal["a", "b", "c"] = "a"


@model
class Tree(Model):
    leaves: list[Leaf] = field(default_factory=list)
    named: dict[str, Leaf] = field(default_factory=dict)
    maybe: Leaf | None = None
    either: int | str = 0
    words: list[str] = field(default_factory=list)
    grid: list[list[int]] = field(default_factory=list)
    flag: Literal[1, 2] | None = None


def test_nested_key_paths() -> None:
    problems = _problems(
        Tree,
        {
            "leaves": [{"n": 1}, {"n": -1}, {"n": 2, "tag": "z"}],
            "named": {"x": {"n": 0}, "y.z": {"n": "many"}},
            "maybe": {"n": 1, "extra": True},
            "grid": [[1], [2, "x"]],
        },
    )
    assert problems == [
        "leaves[1].n: Input should be greater than or equal to 0",
        "leaves[2].tag: Input should be 'a', 'b' or 'c'",
        "named.y.z.n: Input should be a valid integer",
        "maybe.extra: unknown key",
        "grid[1][1]: Input should be a valid integer",
    ]


def test_containers_are_built() -> None:
    tree = validate(
        Tree,
        {"leaves": ({"n": 1},), "named": {"k": {"n": 2, "tag": "b"}}, "grid": [[1, "2"]]},
    )
    assert tree.leaves == [Leaf(n=1)]
    assert tree.named == {"k": Leaf(n=2, tag="b")}
    assert tree.grid == [[1, 2]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"leaves": {"n": 1}}, "leaves: Input should be a valid list"),
        ({"leaves": "n"}, "leaves: Input should be a valid list"),
        ({"named": [1]}, "named: Input should be a valid dictionary"),
        ({"named": {1: {"n": 1}}}, "named.1: Input should be a valid string"),
        ({"maybe": 5}, "maybe: Input should be a valid dictionary or instance of Leaf"),
        ({"maybe": {}}, "maybe.n: Field required"),
        ({"words": [1]}, "words[0]: Input should be a valid string"),
    ],
)
def test_container_problems(data: dict[str, Any], message: str) -> None:
    assert _problem(Tree, data) == message


def test_optional_takes_none_or_its_type() -> None:
    assert validate(Tree, {"maybe": None}).maybe is None
    assert validate(Tree, {"maybe": {"n": 3}}).maybe == Leaf(n=3)


def test_a_union_takes_the_first_member_that_fits() -> None:
    assert validate(Tree, {"either": "7"}).either == 7  # int is tried first
    assert validate(Tree, {"either": "seven"}).either == "seven"


def test_a_union_that_nothing_fits_reports_each_member() -> None:
    assert _problems(Tree, {"either": [1]}) == [
        "either: Input should be a valid integer",
        "either: Input should be a valid string",
    ]


def test_a_literal_needs_the_same_type() -> None:
    assert validate(Tree, {"flag": 2}).flag == 2
    assert _problem(Tree, {"flag": True}) == "flag: Input should be 1 or 2"
    assert _problem(Tree, {"flag": "1"}) == "flag: Input should be 1 or 2"


def test_a_model_instance_is_taken_as_it_is() -> None:
    leaf = Leaf(n=4)
    assert validate(Tree, {"maybe": leaf}).maybe is leaf


# --- models: unknown keys, required fields, every problem, checks ----------------------------


@model
class Pair(Model):
    low: int = 0
    high: int = 10
    label: str = "x"

    @check
    def _ordered(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")

    @check
    def _labelled(self) -> None:
        if self.label == "bad":
            raise ValueError("label is bad; label is still bad")


@model
class Outer(Model):
    pair: Pair = Pair()
    pairs: list[Pair] = field(default_factory=list)
    name: str

    @check
    def _named(self) -> None:
        if self.name == self.pair.label:
            raise ValueError("name must differ from pair.label; it names the pair")


def test_unknown_keys_are_problems_at_their_path() -> None:
    assert _problems(Outer, {"name": "n", "nmae": 1, "pair": {"lo": 1}}) == [
        "nmae: unknown key",
        "pair.lo: unknown key",
    ]


def test_a_missing_required_field() -> None:
    assert _problem(Outer, {}) == "name: Field required"


def test_every_problem_is_reported_at_once() -> None:
    problems = _problems(
        Outer,
        {
            "bogus": 1,
            "pair": {"low": "x", "high": None},
            "pairs": [{"low": 5, "high": 1}, {}, {"label": 3}],
        },
    )
    assert problems == [
        "bogus: unknown key",
        "pair.low: Input should be a valid integer",
        "pair.high: Input should be a valid integer",
        "pairs[0]: low must not exceed high",
        "pairs[2].label: Input should be a valid string",
        "name: Field required",
    ]


def test_checks_run_only_when_every_field_is_valid() -> None:
    # low > high, but high has a problem of its own: the check would compare nonsense
    assert _problems(Pair, {"low": 5, "high": "x"}) == ["high: Input should be a valid integer"]


def test_every_check_runs_and_a_nested_message_stays_whole() -> None:
    assert _problems(Outer, {"name": "n", "pair": {"low": 2, "high": 1, "label": "bad"}}) == [
        "pair: low must not exceed high",
        "pair: label is bad; label is still bad",
    ]


def test_a_root_check_names_its_own_keys_one_problem_each() -> None:
    assert _problems(Outer, {"name": "x"}) == [
        "name must differ from pair.label",
        "it names the pair",
    ]


def test_a_parent_check_waits_for_its_children() -> None:
    # the child's check failed: the parent's does not run on it
    assert _problems(Outer, {"name": "x", "pair": {"low": 2, "high": 1}}) == [
        "pair: low must not exceed high"
    ]


def test_the_root_must_be_a_mapping() -> None:
    assert _problem(Pair, [1]) == "<root>: Input should be a valid dictionary or instance of Pair"


def test_an_alias_is_the_key_in_the_data() -> None:
    @model
    class Try(Model):
        try_: Annotated[int, Alias("try")] = 0

    assert validate(Try, {"try": 3}).try_ == 3
    assert _problem(Try, {"try_": 3}) == "try_: unknown key"
    assert _problem(Try, {"try": "x"}) == "try: Input should be a valid integer"
    assert dump(Try(**{"try": 1})) == {"try": 1}
    assert field_names(Try) == ("try_",)


def test_before_hook_sees_the_data_first() -> None:
    @model
    class Filled(Model):
        a: int
        b: int = 0

        @classmethod
        def _before(cls, data: Mapping[Any, Any]) -> Mapping[Any, Any]:
            return {"a": 1, **data} if "b" in data else data

    assert validate(Filled, {"b": 2}).a == 1
    assert _problem(Filled, {}) == "a: Field required"


def test_subclasses_inherit_fields_and_checks() -> None:
    @model
    class Wider(Pair):
        high: int = 100
        extra: bool = False

    assert validate(Wider, {"low": 50}).high == 100
    assert _problem(Wider, {"low": 200}) == "low must not exceed high"
    assert field_names(Wider) == ("low", "high", "label", "extra")


def test_default_factories_give_fresh_values() -> None:
    a, b = Outer(name="a"), Outer(name="b")
    assert a.pairs == [] and a.pairs is not b.pairs


def test_a_schema_may_not_define_its_own_init() -> None:
    with pytest.raises(TypeError, match="validates in Model.__init__"):

        @model
        class Own(Model):
            x: int = 0

            def __init__(self) -> None:
                pass


# --- the constructor, frozen values, the small API ------------------------------------------


def test_the_constructor_validates() -> None:
    assert Pair(low="3").low == 3
    with pytest.raises(Invalid) as info:
        Pair(low=5, high=1, bogus=2)  # type: ignore[call-arg]
    assert info.value.problems == ["bogus: unknown key"]
    with pytest.raises(Invalid) as info:
        Pair(low=5, high=1)
    assert info.value.problems == ["low must not exceed high"]
    assert isinstance(info.value, ValueError)


def test_values_are_frozen_slotted_and_compare_by_value() -> None:
    p = Pair(low=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.low = 2  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        p.other = 1  # type: ignore[attr-defined]
    assert not hasattr(p, "__dict__")
    assert p == Pair(low=1) and p != Pair(low=2)
    assert hash(p) == hash(Pair(low=1))
    assert p != construct(Outer, name="x")
    assert repr(p) == "Pair(low=1, high=10, label='x')"


def test_replace_copies_without_validating() -> None:
    p = Pair(low=1)
    q = replace(p, high=0)  # an invalid pair: replace trusts its caller
    assert (q.low, q.high, q.label) == (1, 0, "x")
    assert (p.low, p.high) == (1, 10)
    with pytest.raises(TypeError, match="no field"):
        replace(p, nope=1)


def test_construct_fills_defaults_without_validating() -> None:
    o = construct(Outer, name=5)
    assert o.name == 5 and o.pair == Pair() and o.pairs == []
    with pytest.raises(TypeError, match="name is required"):
        construct(Outer)
    with pytest.raises(TypeError, match="no field"):
        construct(Outer, name="x", nope=1)


def test_dump_gives_plain_data_and_can_leave_fields_out() -> None:
    o = validate(Outer, {"name": "n", "pairs": [{"low": 1}]})
    assert dump(o) == {
        "pair": {"low": 0, "high": 10, "label": "x"},
        "pairs": [{"low": 1, "high": 10, "label": "x"}],
        "name": "n",
    }
    assert dump(o, exclude={"pair", "pairs"}) == {"name": "n"}
    assert validate(Outer, dump(o)) == o  # the dump is valid data again
