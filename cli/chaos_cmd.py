"""``raftka chaos list|run``: fault scenarios against a local cluster, judged by the checkers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Kill, pause and restart nodes under load; check nothing was lost.")


@app.command("list")
def chaos_list() -> None:
    """The scenario catalogue."""
    from chaos.scenarios import SCENARIOS

    table = Table(title="chaos scenarios")
    table.add_column("scenario")
    table.add_column("faults")
    for name, (_, what) in SCENARIOS.items():
        table.add_row(name, what)
    Console().print(table)


@app.command("run")
def chaos_run(
    scenario: Annotated[str, typer.Argument(help="A name from `raftka chaos list`.")],
    duration: Annotated[float, typer.Option(min=5, help="Seconds of faults under load.")] = 30,
    seed: Annotated[int, typer.Option(help="The same seed gives the same fault schedule.")] = 0,
    controllers: Annotated[int, typer.Option(min=3, max=5)] = 3,
    brokers: Annotated[int, typer.Option(min=3, max=5)] = 3,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where the run's cluster, history and verdict go.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start a fresh cluster, run SCENARIO for --duration under an acks=all workload, heal,
    and judge the history: exit 1 if an acknowledged record was lost, duplicated, moved or
    read out of order."""
    from chaos.runner import run

    where = directory or Path(tempfile.mkdtemp(prefix=f"raftka-chaos-{scenario}-"))
    try:
        result = run(
            scenario,
            duration_s=duration,
            seed=seed,
            directory=where,
            controllers=controllers,
            brokers=brokers,
        )
    except (ValueError, PermissionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        out = Console()
        verdict = "[green]valid[/]" if result.valid else "[bold red]INVALID[/]"
        out.print(f"{scenario} seed {seed}: {verdict}")
        out.print(
            f"{result.sends} sends, {result.acknowledged} acknowledged; "
            f"converged {result.converged_s} s after healing"
        )
        table = Table(title="faults")
        for column in ("fault", "start s", "end s", "produce unavailable s", "metadata s"):
            table.add_column(column)
        for gap, meta in zip(result.unavailability, result.metadata_unavailability, strict=True):
            table.add_row(
                gap["fault"],
                f"{gap['start_s']:.2f}",
                f"{gap['end_s']:.2f}",
                f"{gap['unavailable_s']:.2f}",
                f"{meta['unavailable_s']:.2f}",
            )
        out.print(table)
        for name, anomaly in result.verdict["anomalies"].items():
            out.print(f"{name}: {anomaly['count']}")
        for part in ("quorum", "metadata", "images"):
            check = result.verdict[part]
            found = ", ".join(f"{k}: {len(v)}" for k, v in check["anomalies"].items())
            state = "valid" if check["valid"] else "[bold red]INVALID[/]"
            out.print(f"{part} checks: {state}" + (f" ({found})" if found else ""))
        for note in result.notes:
            out.print(f"note: {note}")
        out.print(f"history and verdict in {where}")
    if not result.valid:
        raise typer.Exit(1)
