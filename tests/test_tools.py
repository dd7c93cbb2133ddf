"""The tool registry and the calculator: exact values against a reference that never parses text (the
expression's own tree, evaluated with fractions), and every bad call answered with an error line —
never an exception, never Python's eval."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plutao.tools import CALCULATOR, MAX_RESULT, TOOLS, Tool, ToolError, parse_call, run_call, tools_named
from plutao.tools.calculator import DECIMALS, MAX_DEPTH, MAX_INPUT, calculate, evaluate, format_value

numbers = st.one_of(st.integers(0, 10 ** 6).map(lambda n: (str(n), Fraction(n))),
                    st.tuples(st.integers(0, 999), st.integers(0, 999)).map(
                        lambda t: (f"{t[0]}.{t[1]:03d}", Fraction(t[0]) + Fraction(t[1], 1000))))


def trees(depth=3):
    """(text, exact value) of random expressions; the value comes from the tree, not from any parsing."""
    if depth == 0:
        return numbers

    def combine(args):
        (a, x), op, (b, y), space = args
        if op == "/" and y == 0:
            return a, x
        value = {"+": x.__add__, "-": x.__sub__, "*": x.__mul__, "/": x.__truediv__}[op](y)
        return f"({a}{space}{op}{space}{b})", value  # (precedence itself: test_known_values)

    sub = trees(depth - 1)
    return st.one_of(sub, st.tuples(sub, st.sampled_from("+-*/"), sub, st.sampled_from(["", " "])).map(combine),
                     sub.map(lambda t: (f"-({t[0]})", -t[1])))


@settings(max_examples=300, deadline=None)
@given(trees())
def test_the_calculator_equals_the_expression_tree(case):
    text, value = case
    if abs(value.numerator) > 10 ** 30 or value.denominator > 10 ** 30:
        return
    assert evaluate(text) == value
    assert calculate(text) == format_value(value)


@pytest.mark.parametrize("text, want", [
    ("347+589", "936"), ("912-589", "323"), ("2*(3+4)", "14"), ("2+3*4", "14"), ("(2+3)*4", "20"),
    ("10-20.5", "-10.5"), ("1/3", "0.3333333333"), ("2/3", "0.6666666667"), ("-(-3)", "3"), ("+5", "5"),
    ("2×3÷4", "1.5"), ("7 − 10", "-3"), ("  12 +  30 ", "42"), (".5+.25", "0.75"), ("8-4-2", "2"), ("8/4/2", "1"),
    ("123456789*987654321", "121932631112635269"), ("0.1+0.2", "0.3"),
])
def test_known_values(text, want):
    assert calculate(text) == want


@pytest.mark.parametrize("text, said", [
    ("1/0", "division by zero"), ("1/(2-2)", "division by zero"), ("3,5", "comma"), ("2**3", "unexpected '*'"),
    ("1+", "ends too early"), ("", "empty expression"), ("(1+2", "not closed"), ("1+2)", "unexpected ')'"),
    ("__import__('os')", "unknown character"), ("2^3", "unknown character"), ("1e5", "unknown character"),
    ("9" * 41, "more than 40 digits"), ("1" + "*100000000000" * 4, "more than 40 digits"),
    ("(" * (MAX_DEPTH + 2) + "1" + ")" * (MAX_DEPTH + 2), "nested"), ("-" * (MAX_DEPTH + 2) + "1", "nested"),
    ("1+" * MAX_INPUT + "1", f"at most {MAX_INPUT}"),
])
def test_bad_expressions_are_answered_with_one_error_line(text, said):
    out = calculate(text)
    assert out.startswith("error: ") and said in out and "\n" not in out, out


def test_a_rounded_result_rounds_half_even_at_the_last_place():
    assert format_value(Fraction(1, 2 * 10 ** DECIMALS)) == "0"  # (half of the last place: to even)
    assert format_value(Fraction(3, 2 * 10 ** DECIMALS)) == "0.0000000002"
    assert format_value(Fraction(-7, 4)) == "-1.75"


def test_run_call_answers_every_call_and_never_raises():
    assert run_call(TOOLS, "calculator: 347+589") == "936"
    assert run_call(TOOLS, " calculator :  1 + 1  ") == "2"
    assert parse_call("calculator: 1+(2*3)") == ("calculator", "1+(2*3)") == parse_call("calculator:1+(2*3)")
    assert run_call(TOOLS, "calculator 1+1").startswith("error: a call is written NAME: ARGUMENT")
    assert run_call(TOOLS, "search: cats") == "error: unknown tool 'search'; available: calculator"
    assert run_call({}, "calculator: 1") == "error: unknown tool 'calculator'; available: none"
    assert "takes at most" in run_call(TOOLS, f"calculator: {'1+' * MAX_INPUT}1")

    def broken(_):
        raise RuntimeError("disk\non fire")

    def chatty(_):
        return "y" * (10 * MAX_RESULT)

    tools = {"broken": Tool("broken", "", "x", broken), "chatty": Tool("chatty", "", "x", chatty)}
    assert run_call(tools, "broken: 1") == "error: broken failed (RuntimeError: disk on fire)"
    long = run_call(tools, "chatty: 1")
    assert len(long) <= MAX_RESULT and long.endswith("(result cut)")


def test_tools_are_named_and_described_as_openai_lists_them():
    assert tools_named("calculator") == {"calculator": CALCULATOR} == tools_named(["calculator", " "])
    with pytest.raises(ToolError, match="unknown tool 'abacus'; the tools are calculator"):
        tools_named("calculator,abacus")
    fn = CALCULATOR.schema()["function"]
    assert fn["name"] == "calculator" and fn["parameters"]["required"] == ["expression"]
