"""client.triton's canary routing: which version an unpinned call goes to, and which failures go back to stable."""
from __future__ import annotations

import random

import pytest

from bert_recsys.client.errors import InvalidRequest, ModelNotFound, ServingError, ServingTimeout, Unavailable
from bert_recsys.client.triton import CANARY_FALLBACK, AsyncTritonClient, ServingView, canary_version

WITH_CANARY = ServingView(stable=1, versions=(1, 2), exports={1: {}, 2: {}})
STABLE_ONLY = ServingView(stable=1, versions=(1,), exports={1: {}})


def test_a_draw_below_the_share_goes_to_the_canary_while_one_is_loaded():
    assert canary_version(WITH_CANARY, 0.25, 0.10) == 2
    assert canary_version(WITH_CANARY, 0.25, 0.25) is None      # the share is [0, share)
    assert canary_version(WITH_CANARY, 0.25, 0.90) is None
    assert canary_version(STABLE_ONLY, 0.25, 0.10) is None      # no canary loaded
    assert canary_version(None, 0.25, 0.10) is None             # versions unknown
    assert canary_version(WITH_CANARY, 0.0, 0.0) is None         # no share


def test_over_many_draws_the_canary_gets_its_share():
    rng = random.Random(7)
    hits = sum(canary_version(WITH_CANARY, 0.2, rng.random()) == 2 for _ in range(20_000))
    assert abs(hits / 20_000 - 0.2) < 0.01


@pytest.mark.parametrize("error, to_stable", [
    (ServingError("the canary's model raised"), True),
    (Unavailable("down"), True),
    (ServingTimeout("no answer"), True),
    (ModelNotFound("embed_v2 is not loaded"), True),     # promoted or rolled back meanwhile
    (InvalidRequest("a text the canary's tokenizer refuses"), True),  # another export may refuse what stable takes
    (TypeError("a bug of the caller's"), False),
])
def test_whatever_triton_answered_on_the_canary_goes_to_stable_but_a_bug_does_not(error, to_stable):
    assert isinstance(error, CANARY_FALLBACK) is to_stable


def test_the_async_client_refuses_a_share_it_cannot_route():
    with pytest.raises(ValueError, match="canary_share"):
        AsyncTritonClient("127.0.0.1:1", canary_share=1.5, view=lambda: WITH_CANARY)
    with pytest.raises(ValueError, match="view"):
        AsyncTritonClient("127.0.0.1:1", canary_share=0.1)


class FakeTriton:
    """Stands in for Triton behind AsyncTritonClient._infer: records which model each part went to, and fails the
    models listed in `failing` as Triton would (an INTERNAL error from the model)."""

    def __init__(self, failing=()):
        self.calls, self.failing = [], set(failing)

    async def __call__(self, model, texts, timeout_s):
        import numpy as np
        from tritonclient.utils import InferenceServerException

        self.calls.append((model, len(texts), timeout_s))
        if model in self.failing:
            raise InferenceServerException(msg="this canary fails every call", status="StatusCode.INTERNAL")
        return np.full((len(texts), 2), float(model.endswith("_v2")), dtype=np.float32)


def client_with(fake, share=1.0, view=WITH_CANARY):
    client = AsyncTritonClient("127.0.0.1:1", canary_share=share, view=lambda: view, timeout_s=10.0)
    client._infer = fake
    return client


def test_every_part_of_one_request_goes_to_one_version():
    import asyncio

    fake = FakeTriton()
    parts = asyncio.run(client_with(fake, share=1.0).embed_parts([["a"] * 3, ["b"] * 2, ["c"]]))
    assert [p[0, 0] for p in parts] == [1.0, 1.0, 1.0]                     # all from the canary (v2)
    assert {model for model, _, _ in fake.calls} == {"embed_v2"}
    assert all(timeout == 5.0 for _, _, timeout in fake.calls)            # half the timeout on the canary


def test_a_request_the_canary_fails_is_served_whole_by_stable_within_the_timeout():
    import asyncio

    fake = FakeTriton(failing={"embed_v2"})
    parts = asyncio.run(client_with(fake, share=1.0).embed_parts([["a"] * 3, ["b"] * 2]))
    assert [p[0, 0] for p in parts] == [0.0, 0.0]                           # every part from stable
    canary = [c for c in fake.calls if c[0] == "embed_v2"]
    stable = [c for c in fake.calls if c[0] == "embed"]
    assert len(canary) == 2 and len(stable) == 2                            # one attempt each on the canary
    assert sum(t for _, _, t in canary[:1] + stable[:1]) == 10.0            # at most the whole timeout


def test_without_a_canary_or_a_share_every_call_is_stable():
    import asyncio

    for client in (client_with(FakeTriton(), share=1.0, view=STABLE_ONLY), client_with(FakeTriton(), share=0.0, view=None)):
        assert asyncio.run(client.embed_parts([["a"]]))[0][0, 0] == 0.0
