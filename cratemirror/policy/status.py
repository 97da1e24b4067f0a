"""The status page's policy panel: the policy in force, the advisory database's date, recent blocks."""

from __future__ import annotations

import html
import time
from typing import Any

from cratemirror.policy.cooldown import format_age
from cratemirror.policy.service import PolicyService

_HEAD = '<section class="panel" aria-labelledby="policy-heading">\n  <h2 id="policy-heading">Policy</h2>'


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _list(values: tuple[str, ...] | frozenset[str]) -> str:
    return ", ".join(_esc(value) for value in sorted(values)) or "—"


def _exposure(policy: PolicyService) -> str:
    """The advisories whose affected versions were already served (from the audit trail)."""
    if not policy.exposed:
        return ""
    rows = "\n".join(
        f'      <tr><td class="mono"><a href="https://rustsec.org/advisories/{_esc(advisory)}">{_esc(advisory)}'
        f'</a></td><td data-value="{count}">{count}</td><td class="mono">cratemirror audit impact '
        f"{_esc(advisory)}</td></tr>"
        for advisory, count in sorted(policy.exposed.items(), key=lambda item: (-item[1], item[0]))
    )
    head = "<tr><th>Advisory</th><th>Clients served an affected version</th><th>Who, when</th></tr>"
    return (
        '  <h3>Advisory exposure <small class="empty">(within audit.retention)</small></h3>\n'
        f'  <div class="wide">\n  <table id="advisory-exposure">\n    <thead>{head}</thead>\n'
        f"    <tbody>\n{rows}\n    </tbody>\n  </table>\n  </div>\n"
    )


def policy_panel(policy: PolicyService, now: float, show_clients: bool = True) -> str:
    """`show_clients`: False for a viewer without a token while auth is required (no addresses)."""
    rules = policy.rules
    if not policy.enabled:
        return (
            f"{_HEAD}\n"
            '  <p class="empty" id="policy-mode" data-value="off">No policy: <code>policy.mode</code> is off.'
            f"</p>\n{_exposure(policy)}</section>"
        )
    db = policy.db
    if policy.root is None:
        database = "none configured"
    elif not db.count:
        database = f"{_esc(policy.root)}: no advisories read"
    else:
        changed = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(db.changed_at or 0))
        database = (
            f'{_esc(policy.root)}: <span id="policy-advisories" data-value="{db.count}">{db.count}</span> '
            f'advisories, newest <span id="policy-db-date">{_esc(db.newest_date)}</span>, '
            f"files changed {changed}"
        )
    if db.errors:
        database += f" ({len(db.errors)} files left out)"
    facts = [
        ("Mode", f'<span id="policy-mode" data-value="{_esc(rules.mode)}">{_esc(rules.mode)}</span>'),
        ("Advisory database", database),
        ("Advisories", _esc(rules.advisories)),
        ("Informational acted on", _list(rules.informational)),
        ("Ignored advisories", _list(rules.ignore)),
        ("Allowed licences", _list(tuple(rules.licenses.ids)) if rules.licenses else "any (no licence rule)"),
        ("Deny", _list(tuple(entry.text for entry in rules.deny))),
        ("Allow", _list(tuple(entry.text for entry in rules.allow))),
        ("Release-age cooldown", _age(rules.min_release_age, rules.cooldown_exempts_fixes)),
        ("Internal names (never asked upstream)", _list(rules.internal_names)),
    ]
    rows = "\n".join(f"      <dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    return (
        f"{_HEAD}\n"
        f'    <dl class="facts">\n{rows}\n    </dl>\n'
        f'  <h3>Recent decisions <small class="empty">(every worker, newest first)</small></h3>\n'
        f'  <div class="wide">\n{_decisions(policy.recent(), now, show_clients)}\n  </div>\n'
        f"{_exposure(policy)}</section>"
    )


def _age(seconds: float, exempt_fixes: bool) -> str:
    if seconds <= 0:
        return "off"
    shown = _esc(format_age(seconds))
    return f"{shown}" + (" (patched releases of advisories exempt)" if exempt_fixes else "")


def _decisions(recent: list[dict[str, Any]], now: float, show_clients: bool) -> str:
    if not recent:
        return '  <p class="empty" id="no-policy-decisions">Nothing blocked or warned about yet.</p>'
    rows = []
    for item in reversed(recent):
        at = item.get("at")
        ago = f"{int(now - at)} s ago" if isinstance(at, int | float) else "—"
        rows.append(
            f"      <tr><td>{_esc(ago)}</td><td>{_esc(item.get('policy_action'))}</td>"
            f'<td class="mono">{_esc(item.get("crate"))} {_esc(item.get("version"))}</td>'
            f'<td class="mono">{_esc(item.get("rule"))}</td>'
            f"<td>{_esc(item.get('client')) if show_clients else 'hidden'}</td>"
            f'<td class="left">{_esc(item.get("reason"))}</td></tr>'
        )
    head = "<tr><th>When</th><th>Action</th><th>Crate</th><th>Rule</th><th>Client</th><th>Reason</th></tr>"
    body = "\n".join(rows)
    return (
        f'  <table id="policy-decisions">\n    <thead>{head}</thead>\n'
        f"    <tbody>\n{body}\n    </tbody>\n  </table>"
    )
