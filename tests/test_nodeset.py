"""Node-set expansion: properties over generated ranges, and plan-only groups."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.nodeset import NodeSetError, expand, fold

prefixes = st.sampled_from(["node", "cn", "gpu", "rack1n", "login-", "x"])


@given(prefixes, st.integers(0, 500), st.integers(0, 60), st.integers(1, 4))
def test_range_expands_to_exactly_the_numbers(prefix, start, length, pad):
    end = start + length
    expr = f"{prefix}[{start:0{pad}d}-{end:0{pad}d}]"
    assert expand(expr) == [f"{prefix}{i:0{pad}d}" for i in range(start, end + 1)]


@given(st.sets(st.tuples(prefixes, st.integers(0, 300)), min_size=1, max_size=40))
def test_fold_then_expand_is_identity_on_sets(pairs):
    names = {f"{p}{i}" for p, i in pairs}
    assert set(expand(fold(names))) == names
    assert len(expand(fold(names))) == len(names)


@given(st.lists(st.integers(1, 99), min_size=1, max_size=20, unique=True))
def test_comma_lists_and_ranges_mix(nums):
    expr = ",".join(f"n[{k}-{k}]" if k % 2 else f"n{k}" for k in nums)
    assert sorted(expand(expr), key=lambda s: int(s[1:])) == [f"n{k}" for k in sorted(nums)]


def test_groups_come_only_from_the_plan():
    assert expand("@svc,node1", {"svc": ["a1", "a2"]}) == ["a1", "a2", "node1"]
    # ClusterShell's pip-installed example groups.conf must not leak in.
    with pytest.raises(NodeSetError, match="unknown group @gpu"):
        expand("@gpu")


@pytest.mark.parametrize("bad", ["", "node[3-1", "node[a-b]", "   "])
def test_bad_expressions_raise_nodeset_error(bad):
    with pytest.raises(NodeSetError):
        expand(bad)


@settings(max_examples=50)
@given(st.integers(1, 3), st.integers(1, 5))
def test_two_dimensional_ranges(racks, per):
    names = expand(f"r[1-{racks}]n[1-{per}]")
    assert names == [f"r{r}n{n}" for r in range(1, racks + 1) for n in range(1, per + 1)]
