"""sk conflicts, sk blame, sk-state --at and actors (issue 14), through the installed
commands against a real server: what last-writer-wins overwrote is listed alike on
both devices, sk sync counts it, a later informed edit closes it."""

import json

import pytest

from conftest import append, ev, run, state, status, sync

pytestmark = [pytest.mark.slow, pytest.mark.one_backend]


def conflicts(home, *flags):
    return [json.loads(line) for line in
            run("sk", "conflicts", "--json", *flags, home=home).stdout.splitlines()]


def test_a_lost_concurrent_edit_is_listed_alike_counted_and_closed(device):
    a, b = device("a"), device("b")
    run("sk-append", "--type", "spec_created", "--aggregate", "spec:S-1", "--set", "title=Base",
        "--actor", "alice", home=a)
    sync(a)
    sync(b)
    # both edit the title offline
    run("sk-append", "--type", "spec_updated", "--aggregate", "spec:S-1", "--set", "title=From A",
        home=a, env={"SK_ACTOR": "alice"})
    run("sk-append", "--type", "spec_updated", "--aggregate", "spec:S-1", "--set", "title=From B",
        "--set", "owner=bob", "--actor", "ci-agent (model-7)", home=b)
    sync(a)
    told = sync(b)
    assert "1 concurrent edit: sk conflicts" in told.stderr
    sync(a)
    assert status(a)["open_conflicts"] == status(b)["open_conflicts"] == 1
    ca, cb = conflicts(a), conflicts(b)
    assert ca == cb and len(ca) == 1
    c = ca[0]
    assert (c["aggregate_type"], c["aggregate_id"], c["field"], c["open"]) == (
        "spec", "S-1", "title", True)
    assert {c["winner"]["value"], c["lost"][0]["value"]} == {"From A", "From B"}
    actors = {c["winner"]["value"]: c["winner"]["actor"], c["lost"][0]["value"]: c["lost"][0]["actor"]}
    assert actors == {"From A": "alice", "From B": "ci-agent (model-7)"}
    devices = {c["winner"]["value"]: c["winner"]["device"], c["lost"][0]["value"]: c["lost"][0]["device"]}
    assert devices == {"From A": "a", "From B": "b"}
    assert state(a, "spec:S-1")["title"] == c["winner"]["value"]
    # the text form names both values; one aggregate or its type select it
    text = run("sk", "conflicts", home=a).stdout
    assert "spec:S-1 title (open)" in text and "From A" in text and "From B" in text
    assert conflicts(a, "spec:S-1") == ca and conflicts(a, "spec") == ca and conflicts(a, "x") == []
    # blame: each key, its value and who wrote it
    blame = json.loads(run("sk", "blame", "spec:S-1", "--json", home=a).stdout)
    assert blame["title"]["value"] == c["winner"]["value"]
    assert blame["owner"]["value"] == "bob" and blame["owner"]["actor"] == "ci-agent (model-7)"
    assert blame["owner"]["device"] == "b"
    assert "owner = \"bob\"" in run("sk", "blame", "spec:S-1", home=a).stdout
    run("sk", "blame", "spec:S-404", home=a, code=1)
    run("sk", "blame", "no-colon", home=a, code=2)
    # a's next edit has seen the conflict: it closes it on both
    run("sk-append", "--type", "spec_updated", "--aggregate", "spec:S-1", "--set", "title=Merged",
        home=a)
    sync(a)
    sync(b)
    assert conflicts(a) == conflicts(b) == []
    closed = conflicts(b, "--all")
    assert len(closed) == 1 and closed[0]["open"] is False and closed[0]["winner"]["value"] == "Merged"
    assert status(b)["open_conflicts"] == 0
    # the state as of then, by Lamport clock and by display time
    clocks = sorted(e["lamport_clock"] for e in json.loads("[" + ",".join(
        run("sk-log", "--aggregate", "spec:S-1", home=b).stdout.splitlines()) + "]"))
    assert state(b, "spec:S-1", "--at", str(clocks[0])) == {"title": "Base"}
    run("sk-state", "spec:S-1", "--at", "0", home=b, code=1)          # nothing yet
    assert state(b, "spec:S-1", "--at", "2999-01-01T00:00:00+02:00")["title"] == "Merged"
    bad = run("sk-state", "--at", "last week", home=b, code=2)
    assert "RFC 3339" in bad.stderr


def test_sequential_edits_through_the_server_are_never_conflicts(device):
    a, b = device("a"), device("b")
    for i in range(3):
        append(a, [ev("spec_updated", "spec:S-2", {"title": f"a{i}"})])
        sync(a)
        sync(b)
        append(b, [ev("spec_updated", "spec:S-2", {"title": f"b{i}"})])
        told = sync(b)
        assert "concurrent" not in told.stderr
        sync(a)
    assert conflicts(a, "--all") == conflicts(b, "--all") == []
    assert state(a, "spec:S-2") == state(b, "spec:S-2") == {"title": "b2"}
