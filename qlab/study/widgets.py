"""The explore notebook's controls: pick a NAT pair, profile and backend, run a few trials live.

`show_static` draws the same table and figure without widgets, which is what the published HTML
keeps (widgets need a JavaScript widget manager that an offline file does not have)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from qlab.backends.base import BACKENDS
from qlab.experiment.record import TrialSpec
from qlab.experiment.trial import run_trial
from qlab.nat.spec import PRESET_NAMES
from qlab.scenario.profiles import PROFILE_NAMES
from qlab.study import params, plots
from qlab.study.analysis import full_reason

COLUMNS = ["agent_nat", "connector_nat", "outcome", "reason", "ttfb_ms", "ttd_ms", "rtt_relay_p50_ms",
           "rtt_direct_p50_ms", "working_pair"]


def run_trials(agent_nat: str, connector_nat: str, profile: str, backend: str, trials: int,
               progress: bool = True) -> pd.DataFrame:
    """`trials` trials of one pair, with a progress bar (tqdm.auto: a widget in JupyterLab)."""
    from tqdm.auto import tqdm

    rows = [run_trial(TrialSpec(backend=backend, agent_nat=agent_nat, connector_nat=connector_nat, profile=profile,
                                seed=i, samples=10)).to_dict()
            for i in tqdm(range(trials), desc=f"{agent_nat} → {connector_nat}", unit="trial", disable=not progress)]
    return pd.DataFrame(rows)


def show_static(df: pd.DataFrame) -> None:
    from IPython.display import display

    table = df[COLUMNS].assign(reason=df["reason"].fillna("").map(full_reason))
    with pd.option_context("display.max_colwidth", None):  # reasons in full
        display(table)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    plots.rtt_cdf(df, axes[0])
    plots.time_to_first_byte_and_direct(df, axes[1])
    plots.show(fig)


def explorer(agent_nat: str = "port_restricted", connector_nat: str = "symmetric_seq", profile: str = "wan-20ms",
             backend: str = "sim", trials: int = 3) -> None:
    """Display the controls (once: returning them too would display them a second time)."""
    import ipywidgets as w
    from IPython.display import display

    a = w.Dropdown(options=PRESET_NAMES, value=agent_nat, description="Agent NAT")
    c = w.Dropdown(options=PRESET_NAMES, value=connector_nat, description="Connector NAT")
    p = w.Dropdown(options=PROFILE_NAMES, value=profile, description="profile")
    b = w.Dropdown(options=BACKENDS, value=backend, description="backend")
    n = w.IntSlider(value=trials, min=1, max=20, description="trials")
    go = w.Button(description="run", button_style="primary")
    out = w.Output()

    def run(_=None) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                params.explore(agent_nat=a.value, connector_nat=c.value, profile=p.value, backend=b.value,
                               trials=n.value)
                show_static(run_trials(a.value, c.value, p.value, b.value, n.value))
            except Exception as exc:  # show the reason in place (e.g. netns without root)
                print(f"{type(exc).__name__}: {exc}")

    go.on_click(run)
    box = w.VBox([w.HBox([a, c]), w.HBox([p, b]), w.HBox([n, go]), out])
    display(box)
