"""Entry-point lookup shared by env suites, policy types and vision backbones."""

from __future__ import annotations

import importlib.metadata as metadata
import json

import pytest

from vlapt.plugins import NOT_DECLARED, declared_names, load_declared

GROUP = "vlapt.test_things"


@pytest.fixture
def declared(monkeypatch):
    points = [metadata.EntryPoint("My-Thing", "json:dumps", GROUP),
              metadata.EntryPoint("broken", "no_such_module_xyz:thing", GROUP),
              metadata.EntryPoint("elsewhere", "json:loads", "vlapt.other_group")]

    def entry_points(group=None, name=None):  # as if installed packages declared these in their metadata
        return metadata.EntryPoints(p for p in points if p.group == group and name in (None, p.name))

    monkeypatch.setattr(metadata, "entry_points", entry_points)


def test_a_declared_name_loads_and_an_undeclared_one_is_told_apart(declared):
    assert declared_names(GROUP) == {"My-Thing", "broken"}
    assert load_declared(GROUP, "My-Thing", what="thing") is json.dumps
    assert load_declared(GROUP, "elsewhere", what="thing") is NOT_DECLARED, "another group's name is not this group's"
    assert load_declared(GROUP, "nothing", what="thing") is NOT_DECLARED


def test_names_match_exactly_unless_case_is_folded(declared):
    assert load_declared(GROUP, "my-thing", what="thing") is NOT_DECLARED
    assert load_declared(GROUP, "my-thing", what="thing", casefold=True) is json.dumps


def test_a_declaration_that_cannot_be_imported_names_itself_in_the_callers_error(declared):
    with pytest.raises(LookupError, match="thing 'broken' is declared by an installed package's vlapt.test_things "
                                          "entry point, which cannot be loaded.*no_such_module_xyz"):
        load_declared(GROUP, "broken", what="thing", error=LookupError)
