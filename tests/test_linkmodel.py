"""The link model (`qlab/scenario/linkmodel.py`) and the profile fields it reads: each jitter
distribution against its definition (netem's table generators, and netem's installed tables where
iproute2 put them), correlation, reordering, loss, clamping at zero, one seed one sequence, the
simulator's old uniform arithmetic kept, every bad field refused with one clear message, and the
rate queue's exact times (serialization back to back, drop-tail at the limit, an idle link starting
afresh).

Statistical checks use a fixed seed and 20,000 draws, with bounds of five standard errors or more:
for these seeds they pass, and a change of the model's meaning moves them far outside."""

from __future__ import annotations

import glob
import math
import random
import statistics

import pytest

from qlab.scenario.linkmodel import JITTER, QUEUE_LIMIT, TABLE_LIMIT, LinkModel, RateQueue
from qlab.scenario.profiles import JITTER_DISTRIBUTIONS, LinkProfile

N = 20000
BASE_MS, SPREAD_MS = 100.0, 10.0  # base far above 4 spreads: no delay is clamped at 0 here


def unit_draws(distribution: str, *, correlation: float = 0.0, seed: int = 1, n: int = N) -> list[float]:
    """n jitter values in units of the spread, as a model with that distribution delays packets."""
    link = LinkProfile(BASE_MS, SPREAD_MS, jitter_distribution=distribution, jitter_correlation=correlation)
    model = LinkModel(link, random.Random(seed))
    return [(model.delay() * 1000 - BASE_MS) / SPREAD_MS for _ in range(n)]


def netem_normal_table(size: int = 16384) -> list[float]:
    """iproute2's normal.c, in Python: scan x in small steps and file each x under round(size * CDF(x))
    (erf, not NormalDist: an independent route to the inverse CDF)."""
    table = [0.0] * (size + 1)
    for k in range(int(20.05 / 0.00005)):  # normal.c's range and step: every slot gets an x
        x = -10.0 + k * 0.00005
        table[round(size * (0.5 + 0.5 * math.erf(x / math.sqrt(2.0))))] = x
    return [max(-TABLE_LIMIT, min(TABLE_LIMIT, v)) for v in table[:size]]


def netem_pareto_value(u: float) -> float:
    """iproute2's pareto.c at u: a Pareto of shape 3, shifted by its mean 1.5, scaled 4/3, capped."""
    return min(4.0 / 3.0 * ((1.0 - u) ** (-1.0 / 3.0) - 1.5), TABLE_LIMIT)


def reference_moments(distribution: str) -> tuple[float, float]:
    """Mean and standard deviation of a distribution by its definition."""
    if distribution == "uniform":
        return 0.0, 1 / math.sqrt(3)
    if distribution == "normal":
        return 0.0, 1.0  # the clip at 4 standard deviations moves neither by 1e-4
    if distribution == "pareto":  # closed form of min(X, c) for X ~ Pareto(1, 3), c = 4.5 (the cap)
        c = 1.5 + TABLE_LIMIT * 3 / 4
        mean_x, mean_x2 = 1.5 - 1 / (2 * c * c), 3 - 2 / c
        return 4 / 3 * (mean_x - 1.5), 4 / 3 * math.sqrt(mean_x2 - mean_x ** 2)
    table = netem_normal_table()  # paretonormal.c: (normal + 3 * pareto) / 4 at the same u
    values = [(nv + 3 * netem_pareto_value(i / len(table))) / 4 for i, nv in enumerate(table)]
    return statistics.fmean(values), statistics.pstdev(values)


@pytest.mark.parametrize("distribution", JITTER_DISTRIBUTIONS)
def test_each_distribution_has_the_mean_and_spread_of_its_definition(distribution: str) -> None:
    draws = unit_draws(distribution)
    mean, sd = reference_moments(distribution)
    se_mean, se_sd = sd / math.sqrt(N), sd / math.sqrt(2 * N) * 2  # x2: pareto's tail is heavier
    assert abs(statistics.fmean(draws) - mean) < 5 * se_mean, (statistics.fmean(draws), mean)
    assert abs(statistics.pstdev(draws) - sd) < 5 * se_sd, (statistics.pstdev(draws), sd)
    assert min(draws) >= -TABLE_LIMIT and max(draws) <= TABLE_LIMIT


def test_the_shapes_are_netems() -> None:
    """Range and skew as netem's tables have them: uniform within +-1, pareto from -2/3 with its
    median below 0 and a long right tail, paretonormal between the two."""
    uni, par, pn = (sorted(unit_draws(d)) for d in ("uniform", "pareto", "paretonormal"))
    assert uni[0] >= -1 and uni[-1] < 1
    assert par[0] >= -2 / 3 - 1e-9 and par[N // 2] == pytest.approx(4 / 3 * (2 ** (1 / 3) - 1.5), abs=0.02)
    assert par[-1] == pytest.approx(TABLE_LIMIT)  # the cap: about 1.1 % of draws sit on it
    assert par[int(0.95 * N)] - par[N // 2] > 3 * (par[N // 2] - par[int(0.05 * N)])  # right-skewed
    assert par[0] > pn[0] > -TABLE_LIMIT


def _installed_table(name: str) -> list[float] | None:
    for path in sorted(glob.glob(f"/usr/lib*/tc/{name}.dist") + glob.glob(f"/usr/lib/*/tc/{name}.dist")):
        with open(path) as f:
            return [int(x) / 8192 for line in f if not line.startswith("#") for x in line.split()]
    return None


@pytest.mark.parametrize("distribution", ["normal", "pareto", "paretonormal"])
def test_agrees_with_the_tables_iproute2_installed(distribution: str) -> None:
    """Where iproute2's tables are installed (Debian: /usr/lib/<arch>/tc/*.dist), each entry k of
    4096 is the distribution at u = k / 4096: the continuous form agrees to the tables' resolution
    (their first and last entries are where the tables' coarse steps show most)."""
    table = _installed_table(distribution)
    if table is None:
        pytest.skip(f"no {distribution}.dist from iproute2 on this machine")
    ours = [JITTER[distribution](k / len(table), 1.0) for k in range(len(table))]
    inner = list(zip(table, ours, strict=True))[16:-16]
    assert max(abs(a - b) for a, b in inner) < 0.01
    assert statistics.fmean(ours) == pytest.approx(statistics.fmean(table), abs=0.002)
    assert statistics.pstdev(ours) == pytest.approx(statistics.pstdev(table), abs=0.002)


def test_correlation_is_netems_mix_of_uniforms() -> None:
    """With correlation c, u = (1 - c) * fresh + c * previous u: consecutive uniform jitters
    correlate by c, and their spread narrows by sqrt((1 - c) / (1 + c))."""
    for c in (0.0, 0.25, 0.5, 0.75):
        draws = unit_draws("uniform", correlation=c)
        lag1 = statistics.correlation(draws[:-1], draws[1:])
        assert abs(lag1 - c) < 5 / math.sqrt(N), (c, lag1)
        narrowed = 1 / math.sqrt(3) * math.sqrt((1 - c) / (1 + c))
        assert statistics.pstdev(draws) == pytest.approx(narrowed, rel=0.05)
    normal = unit_draws("normal", correlation=0.5)
    assert statistics.correlation(normal[:-1], normal[1:]) > 0.4  # the mapping keeps most of it


def test_reorder_skips_the_delay_with_its_probability() -> None:
    model = LinkModel(LinkProfile(10.0, reorder=0.1), random.Random(2))
    delays = [model.delay() for _ in range(N)]
    skipped = delays.count(0.0)
    assert abs(skipped / N - 0.1) < 5 * math.sqrt(0.1 * 0.9 / N)
    assert set(delays) == {0.0, 0.010}  # skipped or the whole delay, nothing in between


def test_loss_has_its_probability_and_fate_says_so() -> None:
    model = LinkModel(LinkProfile(5.0, loss=0.05), random.Random(3))
    fates = [model.fate() for _ in range(N)]
    assert abs(fates.count(None) / N - 0.05) < 5 * math.sqrt(0.05 * 0.95 / N)
    assert {f for f in fates if f is not None} == {0.005}
    lossless = LinkModel(LinkProfile(5.0), random.Random(3))
    assert not any(lossless.lost() for _ in range(1000))


def test_delay_is_never_negative() -> None:
    model = LinkModel(LinkProfile(1.0, 10.0, jitter_distribution="normal"), random.Random(4))
    delays = [model.delay() for _ in range(N)]
    assert min(delays) == 0.0 and sum(d == 0.0 for d in delays) > N / 3  # clamped, as netem sends at once


def test_one_seed_one_sequence() -> None:
    link = LinkProfile(20.0, 8.0, loss=0.01, jitter_distribution="paretonormal", jitter_correlation=0.25,
                       reorder=0.01)

    def fates(seed: int) -> list[float | None]:
        model = LinkModel(link, random.Random(seed))
        return [model.fate() for _ in range(2000)]

    assert fates(7) == fates(7)
    assert fates(7) != fates(8)


def test_uniform_keeps_the_simulators_old_arithmetic() -> None:
    """A profile as the simulator knew it (uniform jitter, loss) draws the same numbers from the
    same stream as its wires did before the model: max(0, delay + uniform(-j, j)) after a loss draw."""
    link = LinkProfile(5.0, 3.0, 0.05)
    model, old = LinkModel(link, random.Random(9)), random.Random(9)
    for _ in range(N):
        was_lost = old.random() < 0.05
        assert model.lost() == was_lost
        if not was_lost:
            assert model.delay() == max(0.0, 5.0 / 1000.0 + old.uniform(-3.0, 3.0) / 1000.0)


def test_what_a_profile_lacks_draws_nothing() -> None:
    """No loss draw without loss, no correlation state without jitter: adding those fields at their
    defaults leaves every existing seed's stream where it was."""
    rng = random.Random(5)
    model = LinkModel(LinkProfile(5.0, jitter_correlation=0.5), rng)
    state = rng.getstate()
    assert not model.lost() and model.delay() == 0.005 and rng.getstate() == state


def test_every_distribution_a_profile_may_name_has_its_function() -> None:
    assert tuple(JITTER) == JITTER_DISTRIBUTIONS == ("uniform", "normal", "pareto", "paretonormal")


@pytest.mark.parametrize(("fields", "message"), [
    (dict(delay_ms=-1), "delay_ms must be a finite number >= 0, got -1"),
    (dict(delay_ms=math.nan), "delay_ms must be a finite number >= 0, got nan"),
    (dict(jitter_ms=math.inf), "jitter_ms must be a finite number >= 0, got inf"),
    (dict(loss=1.0), r"loss must be in \[0, 1\), got 1.0"),
    (dict(loss=-0.1), r"loss must be in \[0, 1\), got -0.1"),
    (dict(jitter_correlation=1.0), r"jitter_correlation must be in \[0, 1\), got 1.0"),
    (dict(reorder=2.0, delay_ms=5), r"reorder must be in \[0, 1\), got 2.0"),
    (dict(reorder=0.1), "reorder needs a delay_ms > 0"),
    (dict(reorder=0.1, delay_ms=5, in_order=True), "reorder and in_order contradict each other"),
    (dict(rate_mbit=0), "rate_mbit must be a finite number > 0 or None, got 0"),
    (dict(jitter_distribution="gaussian"),
     "jitter_distribution must be one of uniform, normal, pareto, paretonormal, got 'gaussian'"),
])
def test_every_bad_field_is_refused_with_one_clear_message(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^bad link profile: {message}"):
        LinkProfile(**fields)


def test_in_order_jitter_never_lets_a_packet_overtake() -> None:
    """Packets 1 ms apart through 5 +- 3 ms of jitter: without `in_order` many arrive before the one
    sent ahead of them (netem's default); with it none does, and each arrives when its own draw says
    or when the one ahead has arrived, whichever is later (same seed, same draws)."""
    free = LinkProfile(5.0, 3.0, jitter_distribution="normal")
    kept = LinkProfile(5.0, 3.0, jitter_distribution="normal", in_order=True)
    a, b = LinkModel(free, random.Random(4)), LinkModel(kept, random.Random(4))
    loose = [a.arrival(i / 1000) for i in range(2000)]
    ordered = [b.arrival(i / 1000) for i in range(2000)]
    assert sum(y < x for x, y in zip(loose, loose[1:], strict=False)) > 200
    assert all(y >= x for x, y in zip(ordered, ordered[1:], strict=False))
    assert ordered == [max(loose[: i + 1]) for i in range(2000)]


# 8 kbit/s: 125 bytes take 1/8 s, so every time below is exact in binary floating point
SLOW = 0.008


def test_a_burst_leaves_back_to_back_at_the_rate() -> None:
    q = RateQueue(SLOW)
    assert q.limit == QUEUE_LIMIT == 1000  # netem's default
    assert [q.admit(0.0, size) for size in (125, 250, 125)] == [0.125, 0.375, 0.5]
    assert q.admit(0.25, 125) == 0.625  # arrives mid-burst: waits for the ones ahead
    assert q.admit(0.625, 125) == 0.75  # arrives as the last one finishes: starts then
    at_1mbit = RateQueue(1.0)
    assert [at_1mbit.admit(0.0, 1250) for _ in range(3)] == pytest.approx([0.010, 0.020, 0.030], abs=1e-15)


def test_the_queue_drops_the_tail_beyond_its_limit() -> None:
    q = RateQueue(SLOW, limit=3)
    assert [q.admit(0.0, 125) for _ in range(5)] == [0.125, 0.25, 0.375, None, None]
    assert q.admit(0.124, 125) is None  # the first is still being sent: it counts
    assert q.admit(0.125, 125) == 0.5  # it has left: one place
    assert q.admit(0.125, 125) is None
    assert q.admit(0.3, 125) == 0.625 and q.admit(0.3, 125) is None  # the second and third have left


def test_an_idle_link_starts_afresh() -> None:
    """No credit for idle time (a serializer, not a token bucket), and the whole limit again."""
    q = RateQueue(SLOW, limit=2)
    assert [q.admit(0.0, 125) for _ in range(3)] == [0.125, 0.25, None]
    assert [q.admit(10.0, 125) for _ in range(3)] == [10.125, 10.25, None]


def test_a_new_rate_applies_to_the_packets_after_it() -> None:
    q = RateQueue(SLOW)
    assert q.admit(0.0, 125) == 0.125
    q.rate_mbit = SLOW * 2
    assert q.admit(0.0, 125) == 0.1875  # behind the first, at twice the rate
