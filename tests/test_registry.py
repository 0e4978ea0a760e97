"""``oxbus.registry.isolated``: a test's own view of the event registry (the plugin's
``event_registry`` fixture, automatic in this suite), so test classes need no unique names."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

from oxbus import DomainEvent, register_event
from oxbus.registry import isolated, lookup


@dataclass(frozen=True)
class Invoiced(DomainEvent):
    invoice_id: str


def module(name: str, code: str) -> types.ModuleType:
    """A module made from ``code``, as a test module imported after this one would be."""
    mod = types.ModuleType(name)
    exec(code, mod.__dict__)  # noqa: S102 - the test's own code
    return mod


OTHER = """
from oxbus import DomainEvent, register_event

class Invoiced(DomainEvent):
    pass

@register_event
class Refund:
    event_type = "refund"

class RefundV2(DomainEvent):  # automatic, made later: the explicit registration still wins
    event_type = "refund"
"""


def test_a_module_s_classes_win_over_same_named_classes_of_other_modules() -> None:
    other = module("other_tests", OTHER)
    assert lookup("Invoiced") is other.Invoiced  # the module made last owns the name
    with isolated(sys.modules[__name__]):
        assert lookup("Invoiced") is Invoiced
        with isolated(other):
            assert lookup("Invoiced") is other.Invoiced
            assert lookup("refund") is other.Refund
        assert lookup("Invoiced") is Invoiced
    assert lookup("Invoiced") is other.Invoiced  # as it was before


def test_classes_and_registrations_made_inside_are_forgotten_on_exit() -> None:
    with isolated():

        class MadeInATest(DomainEvent):
            pass

        @register_event
        class Invoiced:  # explicit: wins over every automatic one, until the block ends
            pass

        assert lookup("MadeInATest") is MadeInATest
        assert lookup("Invoiced") is Invoiced
    assert lookup("MadeInATest") is None
    assert lookup("Invoiced") is globals()["Invoiced"]  # this module's, promoted by the fixture


def test_a_module_imported_inside_keeps_its_new_classes() -> None:
    name = "oxbus_test_lazily_imported"
    with isolated():
        code = "from oxbus import DomainEvent\nclass ImportedLazily(DomainEvent):\n    pass\n"
        sys.modules[name] = module(name, code)
    try:
        # The module will not be imported again: its class stays registered.
        assert lookup("ImportedLazily") is sys.modules[name].ImportedLazily
    finally:
        del sys.modules[name]
