"""Schemathesis hooks for tests/schemathesis/run.

The document says a generation's model is any model the configuration offers, so generated
bodies mostly name models that do not exist and stop at the gateway's 400. Half of the bodies
that have a model field get one the gateway offers instead (KETCHUP_MODELS, comma-separated),
so they also reach the reservation, the upstream call and the task's settlement.
"""

import os

import schemathesis
from hypothesis import strategies as st

OFFERED = [model for model in os.environ.get("KETCHUP_MODELS", "").split(",") if model]


@schemathesis.hook
def flatmap_body(ctx, body):
    field = next((f for f in ("model", "mv") if isinstance(body, dict) and f in body), None)
    if field is None or not OFFERED:
        return st.just(body)
    offered = st.sampled_from(OFFERED).map(lambda model: {**body, field: model})
    return st.one_of(st.just(body), offered)
