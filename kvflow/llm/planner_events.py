"""The planner's decisions on the event plane (the subject and wire form both sides share),
for the frontends' /fleet page and `kvflow top`.

Each interval's decision is published on `DECISIONS_SUBJECT` in the runtime namespace as
the JSON of `--decisions-file` plus the model it is for; frontends keep the latest one
per model (frontend.planner_feed).
"""

from __future__ import annotations

import json

DECISIONS_SUBJECT = "planner.decisions"


def encode_decision(decision: dict, model: str, apply: bool) -> bytes:
    """One published decision: the decision (as in `--decisions-file`) with the model and
    whether it acts."""
    return json.dumps({**decision, "model": model, "applied": apply}).encode()
