"""The echo probe counts every reply on the path it came back by (docs/results.md)."""

from __future__ import annotations

from qlab.roles.echo import EchoCrossed, EchoProbe, EchoReplied


def test_replies_count_on_the_path_they_arrived_by() -> None:
    now = [0.0]
    probe = EchoProbe(lambda: now[0])
    crossed: list[tuple[str, str, int]] = []
    samples: list[tuple[str, float]] = []
    probe.subscribe(lambda e: isinstance(e, EchoCrossed) and crossed.append((e.sent_on, e.via, e.seq)))
    probe.subscribe(lambda e: isinstance(e, EchoReplied) and samples.append((e.path, e.rtt)))
    d1, d2, r1 = probe.make("direct"), probe.make("direct"), probe.make("relay")
    now[0] = 0.01
    probe.receive(d1, "direct")  # sent direct, back direct: a direct sample
    probe.receive(d2, "relay")  # sent direct, back over the relay: crossed, no sample
    probe.receive(r1, "relay")
    direct, relay = probe.paths["direct"], probe.paths["relay"]
    assert (direct.sent, direct.received, direct.crossed, len(direct.rtts)) == (2, 1, 1, 1)
    assert (relay.sent, relay.received, relay.crossed) == (1, 1, 0)
    assert crossed == [("direct", "relay", 2)] and [p for p, _ in samples] == ["direct", "relay"]
    s = probe.summary()["paths"]["direct"]
    assert s["loss"] == 0.5 and s["received"] == 1 and s["crossed"] == 1 and s["sent"] == s["n"] == 2
    assert direct.bytes_received == len(d1) and direct.first_reply_at == 0.01
