"""A saga definition as a Mermaid flowchart: what ``atoll sagas diagram NAME`` prints."""

from __future__ import annotations

import itertools
import re
from typing import Any

from atoll.sagas._definition import Call, Saga, Send
from atoll.sagas._process import ProcessManager


def _label(*lines: str) -> str:
    text = "<br/>".join(line for line in lines if line)
    return '"' + text.replace('"', "#quot;") + '"'


def _node_id(prefix: str, name: str, index: int) -> str:
    return f"{prefix}{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _action_lines(action: Send[Any] | Call[Any]) -> list[str]:
    lines = [action.describe()]
    extra = []
    if action.timeout is not None:
        extra.append(f"timeout {action.timeout:g}s")
    if action.retry.attempts > 1:
        extra.append(f"{action.retry.attempts} attempts")
    if extra:
        lines.append(", ".join(extra))
    return lines


def to_mermaid(definition: Saga[Any] | ProcessManager[Any]) -> str:
    """A Mermaid ``flowchart`` of the saga: steps, replies, compensations, end states."""
    if isinstance(definition, ProcessManager):
        return _process_mermaid(definition)
    out = [
        "flowchart TD",
        f"    start([{_label(f'{definition.name} v{definition.version}')}])",
        f"    done([{_label('COMPLETED')}])",
        f"    compensated([{_label('COMPENSATED')}])",
    ]
    ids = {f.index: _node_id("s", f.step.name, f.index) for f in definition.steps}
    undo = {
        f.index: _node_id("c", f.step.name, f.index)
        for f in definition.steps
        if f.step.compensation is not None
    }
    if undo:
        out.append(f"    failed([{_label('COMPENSATION_FAILED')}])")
    out += _step_nodes(definition, ids)
    out += _forward_edges(definition, ids)
    out += _compensation_edges(definition, ids, undo)
    if definition.timeout is not None:
        out.append(f"    %% the whole saga times out after {definition.timeout:g}s")
    return "\n".join(out) + "\n"


def _step_nodes(definition: Saga[Any], ids: dict[int, str]) -> list[str]:
    out = []
    for g, members in enumerate(definition.groups):
        flats = [definition.steps[i] for i in members]
        parallel = flats[0].parallel
        if parallel is not None:
            out.append(
                f"    subgraph {_node_id('g', parallel, g)} [{_label(f'parallel: {parallel}')}]"
            )
        for flat in flats:
            lines = [flat.step.name, *_action_lines(flat.step.action)]
            if flat.step.when is not None:
                lines.append(f"when {getattr(flat.step.when, '__name__', 'condition')}")
            out.append(f"    {ids[flat.index]}[{_label(*lines)}]")
        if parallel is not None:
            out.append("    end")
    return out


def _forward_edges(definition: Saga[Any], ids: dict[int, str]) -> list[str]:
    """Every member of a group leads to every member of the next."""
    groups = definition.groups
    out = [f"    start --> {ids[i]}" for i in groups[0]]
    for g, members in enumerate(groups):
        nxt = [ids[i] for i in groups[g + 1]] if g + 1 < len(groups) else ["done"]
        for flat_index in members:
            flat = definition.steps[flat_index]
            action = flat.step.action
            success = (
                " / ".join(t.message_type for t in action.success)
                if isinstance(action, Send)
                else "returns"
            )
            skip = " or skipped" if flat.step.when is not None else ""
            out.extend(
                f"    {ids[flat_index]} -->|{_label(success + skip)}| {target}" for target in nxt
            )
    return out


def _compensation_edges(
    definition: Saga[Any], ids: dict[int, str], undo: dict[int, str]
) -> list[str]:
    """Undo nodes in reverse group order to COMPENSATED; failures into that chain."""
    out = []
    chain = [i for members in reversed(definition.groups) for i in members if i in undo]
    for i in chain:
        compensation = definition.steps[i].step.compensation
        assert compensation is not None
        name = definition.steps[i].step.name
        out.append(f"    {undo[i]}[{_label(f'undo {name}', *_action_lines(compensation))}]")
        out.append(f"    {undo[i]} -.->|{_label('keeps failing')}| failed")
    out.extend(f"    {undo[a]} -.-> {undo[b]}" for a, b in itertools.pairwise(chain))
    if chain:
        out.append(f"    {undo[chain[-1]]} -.-> compensated")
    # A failed step: its group's completed siblings are undone first, then earlier groups.
    # A timed-out step may have taken effect, so its own compensation runs first.
    for flat in definition.steps:
        earlier = [
            i
            for i in chain
            if definition.steps[i].group < flat.group
            or (definition.steps[i].group == flat.group and i != flat.index)
        ]
        target = undo[earlier[0]] if earlier else "compensated"
        action = flat.step.action
        failures = (
            [t.message_type for t in action.failure + action.retry_on]
            if isinstance(action, Send)
            else ["raises"]
        )
        timeout = isinstance(action, Send) and action.timeout is not None
        if timeout and flat.index in undo:
            out.append(f"    {ids[flat.index]} -.->|{_label('timeout')}| {undo[flat.index]}")
        elif timeout:
            failures.append("timeout")
        if failures:
            out.append(f"    {ids[flat.index]} -.->|{_label(' / '.join(failures))}| {target}")
    return out


def _process_mermaid(pm: ProcessManager[Any]) -> str:
    out = [
        "flowchart LR",
        f"    instance(({_label(f'{pm.name} v{pm.version}')}))",
        f"    done([{_label('COMPLETED / FAILED')}])",
    ]
    for n, (message_type, route) in enumerate(sorted(pm.routes.items())):
        node = _node_id("e", message_type, n)
        out.append(f"    {node}[/{_label(message_type)}/]")
        verb = "starts" if route.starts else getattr(route.handler, "__name__", "handles")
        out.append(f"    {node} -->|{_label(verb)}| instance")
    for n, timer in enumerate(sorted(pm.timer_handlers)):
        node = _node_id("t", timer, n)
        out.append(f"    {node}{{{{{_label(f'timer {timer}')}}}}}")
        out.append(f"    {node} --> instance")
    if pm.timeout is not None:
        out.append(f"    instance -.->|{_label(f'deadline {pm.timeout:g}s')}| done")
    out.append("    instance --> done")
    return "\n".join(out) + "\n"
