"""Notebook parameters, checked before any work starts.

A wrong type (`trials="three"`), a value out of range (`trials=-2`), an unknown NAT preset, profile
or backend, or a campaign id that does not exist is one `ParameterError` line: in JupyterLab (IPython
shows what `_render_traceback_` returns instead of a traceback), under papermill and in `qlab report`
(report.NotebookFailed carries the same line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlab.backends.base import BACKENDS
from qlab.nat.spec import parse_presets, preset
from qlab.scenario.profiles import PROFILE_NAMES
from qlab.study import campaign, results

_KIND = {int: "a whole number", str: "text", bool: "True or False", float: "a number"}


class ParameterError(ValueError):
    """A notebook parameter is wrong; its message is the whole story."""

    def _render_traceback_(self) -> list[str]:
        """What IPython prints instead of a traceback (InteractiveShell.showtraceback)."""
        return [f"ParameterError: {self}"]


def typed(name: str, value: object, kind: type, *, low: float | None = None, high: float | None = None):
    """`value` if it is a `kind` (an int for a float is fine, a bool for an int is not) within
    [low, high]; else ParameterError."""
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise ParameterError(f"{name} must be {_KIND.get(kind, kind.__name__)}, got {value!r}")
    number = float(value) if isinstance(value, (int, float)) else None
    if number is not None and ((low is not None and number < low) or (high is not None and number > high)):
        span = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ParameterError(f"{name} must be {span}, got {value!r}")
    return value


def one_of(name: str, value: object, choices: tuple[str, ...], *, empty_ok: bool = False) -> str:
    """`value` if it is one of `choices` (or "" when `empty_ok`); else ParameterError listing them."""
    typed(name, value, str)
    if (empty_ok and value == "") or value in choices:
        return str(value)
    raise ParameterError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def existing_campaign(campaign_id: str, root: str = "") -> Path:
    """The folder of a campaign that exists, or one line naming the results folder and close ids."""
    typed("campaign_id", campaign_id, str)
    try:
        return results.find_campaign(campaign_id, root or None)
    except (FileNotFoundError, ValueError) as exc:
        raise ParameterError(str(exc)) from None


def select_campaigns(text: str, root: str = "") -> list[str]:
    """A comma-separated list of existing campaign ids ("" = every campaign in the results folder)."""
    typed("campaign_ids", text, str)
    ids = [c.strip() for c in text.split(",") if c.strip()]
    if not ids:
        ids = [c["id"] for c in results.list_campaigns(root or None)]
        if not ids:
            raise ParameterError(f"no campaign under {results.results_root(root or None)}: run nat_campaign "
                                 "or `qlab campaign run` first, or set results_root")
    for cid in ids:
        existing_campaign(cid, root)
    return ids


@dataclass
class CampaignChoice:
    """What nat_campaign does: show an existing campaign (`folder`), or run `spec` into `root`."""

    root: Path
    folder: Path | None = None
    spec: campaign.CampaignSpec | None = None


def nat_campaign(*, backend: str, agent_nats: str, connector_nats: str, profile: str, trials: int, seed: int,
                 campaign_id: str, new_campaign_id: str, results_root: str) -> CampaignChoice:
    """nat_campaign's parameters: `campaign_id` names an existing campaign to show (never a new
    one); empty runs a new campaign from the other parameters, named `new_campaign_id` (empty = a
    dated id). A new id that exists continues only if its manifest has the same settings."""
    typed("results_root", results_root, str)
    root = results.results_root(results_root or None)
    typed("new_campaign_id", new_campaign_id, str)
    if campaign_id:
        if new_campaign_id:
            raise ParameterError("set campaign_id (show an existing campaign) or new_campaign_id (run a new "
                                 "one), not both")
        return CampaignChoice(root, folder=existing_campaign(campaign_id, results_root))
    one_of("backend", backend, BACKENDS)
    one_of("profile", profile, PROFILE_NAMES)
    for name, value in (("agent_nats", agent_nats), ("connector_nats", connector_nats)):
        typed(name, value, str)
    typed("trials", trials, int, low=1, high=10000)
    typed("seed", seed, int, low=0)
    try:
        spec = campaign.CampaignSpec(backend=backend, agent_nats=parse_presets(agent_nats),
                                     connector_nats=parse_presets(connector_nats),
                                     profile=profile, trials=trials, seed=seed, campaign_id=new_campaign_id)
        folder = results.campaign_dir(spec.campaign_id, root)
        if (folder / "manifest.json").is_file():
            campaign.check_contract(spec, results.CampaignStore(folder).manifest())
    except ValueError as exc:  # CampaignSpec's one-liners, BackendUnavailable, ManifestMismatch
        raise ParameterError(str(exc)) from None
    return CampaignChoice(root, spec=spec)


def explore(*, agent_nat: str, connector_nat: str, profile: str, backend: str, trials: int) -> None:
    """explore's parameters (its slider goes from 1 to 20 trials)."""
    for name, value in (("agent_nat", agent_nat), ("connector_nat", connector_nat)):
        typed(name, value, str)
        try:
            preset(value)
        except ValueError as exc:
            raise ParameterError(f"{name}: {exc}") from None
    one_of("profile", profile, PROFILE_NAMES)
    one_of("backend", backend, BACKENDS)
    typed("trials", trials, int, low=1, high=20)


def matrix_report(*, campaign_ids: str, compare: str, backend: str, profile: str, pool: bool,
                  results_root: str) -> tuple[list[str], list[str]]:
    """matrix_report's parameters: the campaigns to show and the (zero or two) to compare."""
    typed("results_root", results_root, str)
    one_of("backend", backend, BACKENDS, empty_ok=True)
    one_of("profile", profile, PROFILE_NAMES, empty_ok=True)
    typed("pool", pool, bool)
    typed("compare", compare, str)
    pair = [c.strip() for c in compare.split(",") if c.strip()]
    if pair and len(pair) != 2:
        raise ParameterError(f"compare takes two campaign ids separated by a comma, got {compare!r}")
    for cid in pair:
        existing_campaign(cid, results_root)
    return select_campaigns(campaign_ids, results_root), pair


def nonempty(df, what: str):
    """`df` if it holds trials, else one line saying which selection came out empty."""
    if df.empty:
        raise ParameterError(f"no trials in {what}")
    return df


def cloud_campaign(*, region: str, presets: str, agents_per_cell: int, trials: int, samples: int,
                   ttl_hours: float, dry_run: bool, keep: bool, poll_s: float, results_root: str) -> None:
    """cloud_campaign's parameters (AWS-side names are checked by `qlab cloud plan`)."""
    typed("region", region, str)
    typed("results_root", results_root, str)
    typed("presets", presets, str)
    try:
        if presets:  # the relay topology has no NAT cell
            parse_presets(presets)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    typed("agents_per_cell", agents_per_cell, int, low=1, high=10)
    typed("trials", trials, int, low=1, high=10000)
    typed("samples", samples, int, low=1, high=10000)
    typed("ttl_hours", ttl_hours, float, low=0.25, high=24)
    typed("poll_s", poll_s, float, low=0.01)
    typed("dry_run", dry_run, bool)
    typed("keep", keep, bool)
