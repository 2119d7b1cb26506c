"""The shared one-line argument checks (methods._checks): one message style for every method."""

import math

import pytest

from methods._checks import check_bool, check_choice, check_float, check_int
from methods.base import MethodConfigError, create_method, get_method_class, list_methods


def test_argument_checks_raise_one_line_errors():
    with pytest.raises(MethodConfigError, match=r"^m: x='c' must be one of 'a', 'b'$"):
        check_choice("m", "x", "c", ("a", "b"))
    with pytest.raises(MethodConfigError, match="True or False"):
        check_bool("m", "x", 1)
    with pytest.raises(MethodConfigError, match="integer >= 1"):
        check_int("m", "x", True, 1)
    with pytest.raises(MethodConfigError, match=r"in \(0, 1\)"):
        check_float("m", "x", 1.0, 0.0, 1.0, open_low=True, open_high=True)
    with pytest.raises(MethodConfigError):
        check_float("m", "x", float("nan"), 0.0)
    check_float("m", "x", 0.5, 0.0, 1.0)
    check_int("m", "x", 3, 1)


def test_float_check_refuses_infinity_and_says_the_interval():
    with pytest.raises(MethodConfigError, match=r"^m: x=inf must be a number in \[0, inf\)$"):
        check_float("m", "x", math.inf, 0.0)
    with pytest.raises(MethodConfigError, match=r"x='1' must be a number in \[0, 1\]"):
        check_float("m", "x", "1", 0.0, 1.0)
    with pytest.raises(MethodConfigError, match=r"^x=2 must be an integer >= 3$"):
        check_int("", "x", 2, 3)  # no method: no prefix


ALLOCATING = [
    n for n in list_methods() if "allocation" in get_method_class(n).hyperparameter_defaults()
]


@pytest.mark.parametrize("name", ALLOCATING)
def test_every_method_words_a_bad_allocation_alike(name):
    with pytest.raises(MethodConfigError) as info:
        create_method(name, allocation="nope")
    assert str(info.value).startswith(f"{name}: allocation='nope' must be one of ")
