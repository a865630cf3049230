"""`qlab sim calibrate|calibration`: the simulator's processing-cost calibration for this machine."""

from __future__ import annotations

import argparse
import json
import logging

from qlab.cli.table import pairs, table
from qlab.cli.util import example, positive_int


def _show(cal) -> str:
    rows = [(cls, cal.rx_us[cls], cal.tx_us[cls]) for cls in cal.rx_us]
    rows.append(("+ shell, every datagram", cal.shell_rx_us, cal.shell_tx_us))
    head = pairs([("calibration", cal.label), ("measured", f"{cal.measured_at} on {cal.machine or '?'}, "
                                                           f"Python {cal.python or '?'}"), ("method", cal.method)])
    return head + "\n\n" + table(["datagram class", "rx us", "tx us"], rows)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qlab.backends.sim import calibrate

    logging.disable(logging.WARNING)  # the fit's trials would log their roles
    try:
        cal, figures = calibrate.measure(rounds=args.rounds, trials=args.trials, name=args.name, against=args.against)
    finally:
        logging.disable(logging.NOTSET)
    path = calibrate.save(cal, args.out)
    if args.json:
        print(json.dumps({"calibration": cal.to_dict(), "file": str(path), "figures": figures}))
        return 0
    print(_show(cal))
    print()
    rows = [(k, figures["real"][k], figures["sim"][k]) for k in figures["real"]]
    print(table(["fitted figure (ms)", "real", "sim"], rows))
    used = (f"sim trials use it from now on (${calibrate.ENV} overrides)" if path == calibrate.calibration_file()
            else f"use it with {calibrate.ENV}={path}")
    print(f"\nstored in {path}; {used}")
    return 0


def cmd_calibration(args: argparse.Namespace) -> int:
    from qlab.backends.sim import calibrate

    cal = calibrate.active()
    if args.json:
        print(json.dumps(cal.to_dict()))
    else:
        print(_show(cal))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sim", help="the simulator's processing-cost calibration",
                       epilog=example("qlab sim calibrate", "qlab sim calibration"))
    ssub = s.add_subparsers(dest="sim_command", required=True)
    c = ssub.add_parser("calibrate", help="measure what the roles' work costs on this machine (about 30 s) "
                                          "and store it for sim trials",
                        epilog=example("qlab sim calibrate", "qlab sim calibrate --name ci-runner --out cal.json"))
    c.add_argument("--rounds", type=positive_int, default=200, help="handshakes measured without sockets (default: 200)")
    c.add_argument("--trials", type=positive_int, default=7,
                   help="real trials on loopback the costs are fitted to (default: 7)")
    c.add_argument("--against", choices=("netns", "loopback"), default="",
                   help="what the costs are fitted to: the kernel lab (default where it runs: root) or "
                        "real sockets on loopback")
    c.add_argument("--name", default="", help="the calibration's name in records (default: this host's name)")
    c.add_argument("--out", default="", help="where to store it (default: this user's cache, used by every sim trial)")
    c.add_argument("--json", action="store_true", help="print the calibration as JSON")
    c.set_defaults(func=cmd_calibrate)
    a = ssub.add_parser("calibration", help="show the calibration sim trials use now",
                        epilog=example("qlab sim calibration", "QLAB_SIM_CALIBRATION=none qlab sim calibration"))
    a.add_argument("--json", action="store_true", help="print it as JSON")
    a.set_defaults(func=cmd_calibration)
