"""schemathesis hooks for tests/it/api_fuzz.rs: a check that a request the API refused
(any 4xx) changed nothing in skald.dead_letters or skald.operator_actions.

Both tables are read (with psql, from SKALD_FUZZ_DATABASE_URL) before every request
and again after each one answered with a 4xx. A refused request must leave every
existing dead letter as it was and add no operator action. New dead letters are not
counted: a replay accepted earlier re-publishes its message, which may come back as
a new dead letter at any time.
"""

import os
import subprocess

import schemathesis

DATABASE_URL = os.environ["SKALD_FUZZ_DATABASE_URL"]
SNAPSHOT = """
SELECT 'dead_letter ' || id || ' ' || status || ' ' || md5(t::text) FROM skald.dead_letters t
UNION ALL
SELECT 'operator_action ' || id || ' ' || action || ' ' || md5(t::text) FROM skald.operator_actions t
"""

_before = None


def snapshot():
    out = subprocess.run(
        ["psql", DATABASE_URL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", SNAPSHOT],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = {}
    for line in out.splitlines():
        kind, key, row = line.split(" ", 2)
        rows[(kind, key)] = row
    return rows


@schemathesis.hook
def before_call(context, case, kwargs):
    global _before
    _before = snapshot()


@schemathesis.check
def refused_requests_change_nothing(ctx, response, case):
    if not 400 <= response.status_code < 500 or _before is None:
        return None
    after = snapshot()
    changed = [
        f"{kind} {key}: {row!r} -> {after.get((kind, key))!r}"
        for (kind, key), row in _before.items()
        if after.get((kind, key)) != row
    ]
    changed += [
        f"{kind} {key} added: {row!r}"
        for (kind, key), row in after.items()
        if kind == "operator_action" and (kind, key) not in _before
    ]
    if changed:
        raise AssertionError(
            f"answered {response.status_code}, yet changed: " + "; ".join(changed)
        )
    return None
