"""Spend budgets: prices per target, a budget per client, enforced before dispatch (429 in each API's
shape, or a `budget: exceeded` rule), usage counted from the answer's `usage` or estimated, reported
by GET /v1/usage and /admin/usage. One real gateway on the embedded store, real fake upstreams;
the decision and the period arithmetic as pure functions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.features import BudgetState, DifficultyFinding, Features, SensitivityFinding
from gateway.policy.evaluate import decide
from gateway.policy.lint import lint
from gateway.policy.load import PolicyError, parse_policy, parse_policy_source
from gateway.store import admission
from gateway.store.admission import Admitted
from gateway.store.base import Admission, Bucket, Hold, Settle, StoreUnavailable
from gateway.store.budgets import Budgets, Charge, Period
from gateway.store.embedded import EmbeddedStore
from tests.support import policies
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, _Handler

ADMIN = {"Authorization": "Bearer admin-secret"}

# 5 prompt + 7 completion tokens a fake answer: 5 * 1000 / 1e6 + 7 * 10000 / 1e6 = $0.075 each.
ANSWER_USD = 0.075

POLICY = """
clients:
  - {name: capped, api_key: sk-capped, budget: {usd: 0.225, period: day, hold_tokens: 7}}
  - {name: thrifty, api_key: sk-thrifty, budget: {usd: 0.05, period: hour, hold_tokens: 4}}
  - {name: streamer, api_key: sk-streamer}
  - {name: claude, api_key: sk-claude, budget: {usd: 0.25}}
limits:
  classify_budget_ms: 20000
privacy:
  analysis_budget_ms: 20000
rules:
  - name: thrifty-over-budget
    when: {client: thrifty, budget: exceeded}
    route: local
  - name: streamer
    when: {client: streamer}
    route: quiet
  - name: cloud
    route: cloud
    fallback: [local]
"""


class _NoUsageHandler(_Handler):
    """An upstream that never reports usage in a stream (some servers ignore include_usage)."""

    def _stream_events(self, body: dict[str, Any], *args: Any) -> None:
        body.pop("stream_options", None)
        super()._stream_events(body, *args)


class NoUsageUpstream(FakeUpstream):
    handler = _NoUsageHandler


@pytest.fixture(scope="module")
def quiet() -> Iterator[FakeUpstream]:
    with NoUsageUpstream(model="quiet-model", name="quiet") as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream,
       quiet: FakeUpstream) -> Iterator[RunningGateway]:
    path = policies.write_policy(
        tmp_path_factory.mktemp("budgets") / "p.yaml", cloud, local, rest=POLICY,
        cloud_settings={"timeout_s": 5, "retries": 0, "prices": "{input: 1000, output: 10000}"},
        more_targets={"quiet": {"kind": "cloud", "model": "openai/quiet-model", "api_base": quiet.base_url,
                                "api_key": "sk-q", "prices": "{input: 1000, output: 10000}"}})
    with run_gateway(path) as running:
        yield running


def sdk(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def usage(gw: RunningGateway, key: str) -> dict[str, Any]:
    with gw.client() as c:
        r = c.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


HELLO = [{"role": "user", "content": "hello"}]


def test_a_budget_refuses_priced_targets_once_spent_with_429_and_retry_after(gw: RunningGateway) -> None:
    client = sdk(gw, "sk-capped")
    # Each holds $0.071 (1 token of prompt by the estimate, hold_tokens 7) and costs $0.075:
    # $0, 0.075, 0.15 spent before each, and the hold fits under $0.225 each time.
    for _ in range(3):
        r = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO)
        assert r.headers["x-hybrid-route"] == "cloud"
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="auto", messages=HELLO)
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "budget_exceeded"
    assert "capped" in body["message"] and "has spent its budget of $0.225" in body["message"]
    left = (datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp() + 86400
            - datetime.now(UTC).timestamp())
    assert abs(int(err.value.response.headers["retry-after"]) - left) < 5  # when the UTC day ends
    report = usage(gw, "sk-capped")
    assert report["requests"] == 3 and report["prompt_tokens"] == 15 and report["completion_tokens"] == 21
    assert report["spent_usd"] == pytest.approx(3 * ANSWER_USD)
    assert report["status"] == "exceeded" and report["remaining_usd"] == 0 and report["budget_usd"] == 0.225
    assert report["held_usd"] == 0  # every hold settled
    assert report["by_target"] == {"cloud": {"usd": pytest.approx(3 * ANSWER_USD), "tokens": 36}}
    assert report["period"]["name"] == "day" and report["shared"] is False


def test_the_429_comes_in_the_anthropic_shape(gw: RunningGateway) -> None:
    claude = anthropic.Anthropic(base_url=gw.base_url, api_key="sk-claude", max_retries=0)
    msg = claude.messages.create(model="auto", max_tokens=20, messages=HELLO)  # holds $0.201 of $0.25
    assert msg.content[0].text == "echo: hello"
    with pytest.raises(anthropic.RateLimitError) as err:  # $0.075 spent: another $0.201 does not fit
        claude.messages.create(model="auto", max_tokens=20, messages=HELLO)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "rate_limit_error"
    assert "may cost up to $0.2010" in err.value.body["error"]["message"]
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_a_budget_rule_sends_over_budget_traffic_to_the_local_target(gw: RunningGateway) -> None:
    client = sdk(gw, "sk-thrifty")
    first = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    assert first.headers["x-hybrid-route"] == "cloud"  # held $0.041 of $0.05, cost $0.075: spent
    second = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    assert second.headers["x-hybrid-route"] == "local"
    assert second.headers["x-hybrid-rule"] == "thrifty-over-budget"
    with gw.client() as c:
        explained = c.post("/v1/route/explain", json={"model": "auto", "messages": HELLO},
                           headers={"Authorization": "Bearer sk-thrifty"}).json()
    assert explained["features"]["budget"]["status"] == "exceeded"
    assert explained["features"]["budget"]["limit_usd"] == 0.05
    assert explained["features"]["budget"]["period"] == "hour"
    assert explained["decision"]["rule"] == "thrifty-over-budget"
    assert "budget exceeded" in explained["decision"]["matched"]
    report = usage(gw, "sk-thrifty")
    assert report["requests"] == 2 and report["spent_usd"] == pytest.approx(ANSWER_USD)
    assert report["by_target"]["local"] == {"usd": 0, "tokens": 12}  # counted, free


def test_a_stream_that_ends_without_usage_is_charged_by_estimate(gw: RunningGateway) -> None:
    text = "how many tokens is this answer"
    stream = sdk(gw, "sk-streamer").chat.completions.create(
        model="auto", messages=[{"role": "user", "content": text}], stream=True)
    answer = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert answer == "echo: " + text
    report = usage(gw, "sk-streamer")
    assert report["requests"] == 1 and report["estimated_requests"] == 1
    assert report["completion_tokens"] == (len(answer) + 3) // 4
    assert report["prompt_tokens"] == len(text) // 4  # the gateway's estimate of the prompt
    expected = (report["prompt_tokens"] * 1000 + report["completion_tokens"] * 10000) / 1e6
    assert report["spent_usd"] == pytest.approx(expected)
    assert report["budget_usd"] is None and report["status"] is None


def test_usage_needs_a_client_key_and_the_admin_view_lists_every_client(gw: RunningGateway) -> None:
    with gw.client() as c:
        anonymous = c.get("/v1/usage")
        wrong = c.get("/v1/usage", headers={"Authorization": "Bearer nope"})
        not_admin = c.get("/admin/usage", headers={"Authorization": "Bearer sk-capped"})
        everyone = c.get("/admin/usage", headers=ADMIN)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
    assert wrong.status_code == 401 and not_admin.status_code == 401
    assert everyone.status_code == 200
    names = [u["client"] for u in everyone.json()["data"]]
    assert names == ["capped", "thrifty", "streamer", "claude"]
    assert "sk-" not in json.dumps(everyone.json())  # keys are never reported


# -- the decision, pure -------------------------------------------------------------------------

DECIDE = parse_policy("""
version: 1
targets:
  cloud: {kind: cloud, model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k,
          prices: {input: 0.15, output: 0.6}}
  free-cloud: {kind: cloud, model: openai/y, api_base: "http://127.0.0.1:9/v1", api_key: k}
  local: {kind: local, model: openai/l, api_base: "http://127.0.0.1:9/v1"}
clients:
  - {name: a, api_key: ka, budget: {usd: 1, period: month}}
rules:
  - {name: easy, when: {difficulty: easy}, route: local, fallback: [cloud]}
  - {name: medium, when: {difficulty: medium}, route: free-cloud, fallback: [local]}
  - {name: default, route: cloud, fallback: [local]}
""", "decide.yaml")


def features(spent: float, difficulty: str = "hard") -> Features:
    return Features(model="auto", client="a", connectivity={"cloud": "online", "free-cloud": "online"},
                    sensitivity=SensitivityFinding(), difficulty=DifficultyFinding(level=difficulty),
                    prompt_tokens=10, has_tools=False,
                    budget=BudgetState(spent_usd=spent, limit_usd=1.0, period="month", resets_in_s=99.5))


def test_under_budget_the_rule_decides_alone() -> None:
    d = decide(features(0.99), DECIDE)
    assert d.action == "route" and d.chain == ("cloud", "local") and d.retry_after_s is None


@pytest.mark.parametrize("difficulty", ["hard", "easy"])  # a priced fallback is spend too
def test_over_budget_a_chain_with_a_priced_target_is_a_429(difficulty: str) -> None:
    d = decide(features(1.0, difficulty), DECIDE)
    assert (d.action, d.block_status, d.block_code) == ("block", 429, "budget_exceeded")
    assert d.retry_after_s == 99.5 and "cloud" in (d.block_message or "")
    assert any("budget exceeded" in n for n in d.notes)
    assert decide(features(1.0, difficulty), DECIDE) == d  # pure


def test_over_budget_a_free_chain_still_routes() -> None:
    d = decide(features(5.0, "medium"), DECIDE)
    assert d.action == "route" and d.chain == ("free-cloud", "local")


# -- periods ------------------------------------------------------------------------------------

def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("name", "now", "label", "end"), [
    ("hour", "2026-12-04T18:59:59", "2026-12-04T18", "2026-12-04T19:00:00"),
    ("day", "2026-12-04T18:00:00", "2026-12-04", "2026-12-05T00:00:00"),
    ("week", "2026-12-06T23:00:00", "2026-W49", "2026-12-07T00:00:00"),  # a Sunday; weeks start Monday
    ("month", "2024-02-10T00:00:00", "2024-02", "2024-03-01T00:00:00"),  # a leap February
    ("month", "2026-12-31T23:59:00", "2026-12", "2027-01-01T00:00:00"),
])
def test_periods_are_calendar_periods_in_utc(name: str, now: str, label: str, end: str) -> None:
    p = Period.at(name, ts(now))
    assert p.label == label and p.end.timestamp() == ts(end)
    assert p.left_s(ts(now)) == ts(end) - ts(now)


async def admitted(budgets: Budgets, store: EmbeddedStore, client: str, max_tokens: int | None = None) -> Admitted:
    return await admission.admit(store, None, budgets, client, tokens=0, prompt_tokens=10, max_tokens=max_tokens,
                                 pinned=None)


async def test_a_new_period_starts_from_zero_and_cost_follows_each_targets_prices() -> None:
    now = [ts("2026-12-04T23:59:00")]
    store = EmbeddedStore()
    budgets = Budgets(DECIDE, store, clock=lambda: now[0])
    budgets.charge("a", None, [Charge("cloud", 1_000_000, 1_000_000), Charge("local", 50, 50, estimated=True)])
    first = await admitted(budgets, store, "a")
    assert first.budget.spent_usd == pytest.approx(0.75) and first.budget.status == "ok"
    # Held: 10 prompt tokens and hold_tokens (1024) at the dearest prices (0.15, 0.6 per 1M).
    assert first.hold is not None and first.hold.usd == pytest.approx((10 * 0.15 + 1024 * 0.6) / 1e6)
    budgets.charge("a", first.hold, [Charge("cloud", 0, 500_000)])
    assert (await admitted(budgets, store, "a")).budget.status == "exceeded"
    report = await budgets.usage("a")
    assert report["requests"] == 2 and report["estimated_requests"] == 1
    assert report["by_target"]["local"] == {"usd": 0, "tokens": 100}
    now[0] = ts("2027-01-01T00:00:01")  # next month
    assert (await admitted(budgets, store, "a")).budget.spent_usd == 0.0
    assert await admitted(budgets, store, "nobody") == admission.NOTHING  # no budget: never exceeded, no I/O


async def test_a_hold_that_does_not_fit_is_exceeded_until_those_in_flight_settle() -> None:
    store = EmbeddedStore()
    budgets = Budgets(DECIDE, store)
    big = await admitted(budgets, store, "a", max_tokens=1_000_000)  # up to $0.6: fits in $1
    assert big.hold is not None and big.budget.status == "ok" and big.budget.held_usd == pytest.approx(0.6 + 1.5e-6)
    other = await admitted(budgets, store, "a", max_tokens=1_000_000)  # another $0.6 beside it: no
    assert other.hold is None and other.budget.status == "exceeded" and other.budget.spent_usd == 0
    refused = decide(replace(features(0.0), budget=other.budget), DECIDE)
    assert refused.block_code == "budget_exceeded" and refused.retry_after_s == 1.0  # fits once the first settles
    assert "held by requests in flight" in (refused.block_message or "")
    budgets.charge("a", big.hold, [Charge("cloud", 10, 100)])  # it cost far less than it held
    assert (await admitted(budgets, store, "a", max_tokens=1_000_000)).budget.status == "ok"


class _Counting(EmbeddedStore):
    """Counts the store calls that carry settles, and how many each carries."""

    def __init__(self) -> None:
        super().__init__()
        self.carried: list[int] = []  # per admit call: the settles it carried
        self.alone = 0  # settles sent on their own

    async def admit(self, buckets: list[Bucket], hold: Hold | None, settles: Sequence[Settle] = ()) -> Admission:
        self.carried.append(len(settles))
        return await super().admit(buckets, hold, settles)

    async def settle(self, key: str, settle_id: str, amounts: Mapping[str, float], ttl_s: float) -> bool:
        self.alone += 1
        return await super().settle(key, settle_id, amounts, ttl_s)


async def test_an_answers_settle_rides_on_the_next_admit_or_goes_on_its_own_when_traffic_stops() -> None:
    store = _Counting()
    budgets = Budgets(DECIDE, store)
    first = await admitted(budgets, store, "a", max_tokens=1_000_000)  # holds $0.6 of $1
    assert first.hold is not None
    budgets.charge("a", first.hold, [Charge("cloud", 10, 100)])
    assert store.carried == [0] and store.alone == 0  # the answer waited for no store call
    # The next request's one call carries the first's settle, applied before its own hold: the
    # $0.6 is free again, so another $0.6 fits.
    second = await admitted(budgets, store, "a", max_tokens=1_000_000)
    assert store.carried == [0, 1] and second.hold is not None and second.budget.status == "ok"
    assert second.budget.spent_usd == pytest.approx(cost := (10 * 0.15 + 100 * 0.6) / 1e6)
    # Traffic stops: the last settle goes on its own, in one call, a moment later.
    budgets.charge("a", second.hold, [Charge("cloud", 10, 100)])
    for _ in range(1000):
        if len(store.carried) == 3:
            break
        await asyncio.sleep(0.01)
    assert store.carried == [0, 1, 1] and store.alone == 0
    report = await budgets.usage("a")  # nothing left queued: the read sends no settle
    assert store.carried == [0, 1, 1] and store.alone == 0
    assert report["requests"] == 2 and report["held_usd"] == 0 and report["spent_usd"] == pytest.approx(2 * cost)


class _Down(EmbeddedStore):
    """A store whose settles fail until it is back (carried by an admit or replayed alone)."""

    down = True

    async def admit(self, buckets: list[Bucket], hold: Hold | None, settles: Sequence[Settle] = ()) -> Admission:
        if self.down:
            raise StoreUnavailable("store down")
        return await super().admit(buckets, hold, settles)

    async def settle(self, key: str, settle_id: str, amounts: Mapping[str, float], ttl_s: float) -> bool:
        if self.down:
            raise StoreUnavailable("store down")
        return await super().settle(key, settle_id, amounts, ttl_s)


async def test_settles_missed_while_the_store_is_down_survive_a_reload_and_are_replayed_once() -> None:
    store = _Down()
    before = Budgets(DECIDE, store)
    before.charge("a", None, [Charge("cloud", 1000, 1000)])
    await before.drain()  # the store is still down: the settle stays owed
    assert (await before.usage("a"))["shared"] is False
    after = Budgets(DECIDE, store)  # a policy reload on the same store
    after.carry_over(before)
    store.down = False
    report = await after.usage("a")  # the store answers: what was owed is replayed first
    assert report["requests"] == 1 and report["spent_usd"] == pytest.approx(0.00075)
    await after.drain()
    assert (await after.usage("a"))["requests"] == 1  # once


# -- the policy file ----------------------------------------------------------------------------

BASE = """version: 1
targets:
  cloud: {kind: cloud, model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k}
  local: {kind: local, model: openai/l, api_base: "http://127.0.0.1:9/v1"}
"""


@pytest.mark.parametrize(("tail", "line", "words"), [
    ("clients:\n  - {name: a, api_key: k, budget: {usd: -1}}\nrules:\n  - {name: r, route: local}\n", 6,
     "greater than 0"),
    ("clients:\n  - {name: a, api_key: k, budget: {usd: 1, period: fortnight}}\nrules:\n  - {name: r, route: local}\n",
     6, "hour"),
    ("rules:\n  - name: r\n    when: {budget: over}\n    route: local\n", 7, "exceeded"),
    ("rules:\n  - {name: r, route: local}\n", 0, ""),
])
def test_bad_budget_keys_are_reported_with_file_and_line(tail: str, line: int, words: str) -> None:
    if not line:  # the control: the same file without the mistake loads
        parse_policy(BASE + tail, "p.yaml")
        return
    with pytest.raises(PolicyError) as err:
        parse_policy(BASE + tail, "p.yaml")
    assert f"p.yaml:{line}:" in str(err.value) and words in str(err.value), str(err.value)


def test_prices_belong_to_cloud_targets() -> None:
    text = BASE.replace('api_base: "http://127.0.0.1:9/v1"}\n', 'api_base: "http://127.0.0.1:9/v1", '
                        'prices: {input: 1, output: 2}}\n') + "rules:\n  - {name: r, route: local}\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    assert "p.yaml:4:" in str(err.value) and "prices" in str(err.value)
    bad = BASE.replace("api_key: k}", "api_key: k, prices: {input: -1, output: 2}}") + \
        "rules:\n  - {name: r, route: local}\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(bad, "p.yaml")
    assert "p.yaml:3:" in str(err.value)


def test_policy_check_warns_about_budgets_that_cannot_work() -> None:
    unpriced = BASE + ("clients:\n  - {name: a, api_key: k, budget: {usd: 1}}\nrules:\n"
                       "  - {name: r, route: cloud}\n")
    warnings = [str(w) for w in lint(*parse_policy_source(unpriced, "p.yaml"), probe=lambda _: None)]
    assert any(w.startswith("p.yaml:6: warning:") and "no target has `prices`" in w for w in warnings), warnings
    orphan = BASE + "rules:\n  - {name: over, when: {budget: exceeded}, route: local}\n  - {name: r, route: cloud}\n"
    warnings = [str(w) for w in lint(*parse_policy_source(orphan, "p.yaml"), probe=lambda _: None)]
    assert any("p.yaml:6:" in w and "no client has a `budget`" in w for w in warnings), warnings


def test_no_clients_no_usage(tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream) -> None:
    path = policies.write_policy(tmp_path / "p.yaml", cloud, local, rest="rules:\n  - {name: r, route: local}\n")
    with run_gateway(path) as g, httpx.Client(base_url=g.base_url, trust_env=False) as c:
        r = c.get("/v1/usage")
    assert r.status_code == 404 and r.json()["error"]["code"] == "usage_not_counted"
