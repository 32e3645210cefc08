"""`sparkvision serve`: the web application, REST API and job tracker under uvicorn."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from sparkvision.cli.common import Conf, Master, Remote, ShipEnv, err_console, fail
from sparkvision.errors import ParamError
from sparkvision.spark.session import parse_conf
from sparkvision.web.security import Settings

# Every default is Settings' own: the flags below only name and document them.
DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING
}
MIB = 1024 * 1024


def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --token.")
    ] = DEFAULTS["host"],
    port: Annotated[int, typer.Option(help="Port.")] = DEFAULTS["port"],
    data_root: Annotated[
        list[str] | None,
        typer.Option(
            "--data-root", help="Directory clients may name paths in (tables, models, outputs); repeatable."
        ),
    ] = None,
    db: Annotated[
        str, typer.Option(help="Job registry: any SQLAlchemy URL (SQLite or PostgreSQL).")
    ] = DEFAULTS["db_url"],
    model: Annotated[str | None, typer.Option(help="Model directory for /api/classify.")] = DEFAULTS[
        "model_dir"
    ],
    index: Annotated[str | None, typer.Option(help="Index directory for /api/search.")] = DEFAULTS[
        "index_dir"
    ],
    token: Annotated[
        str | None,
        typer.Option(
            help="API token for mutating endpoints (default $SPARKVISION_API_TOKEN). Visible to every user of the "
            "machine in ps: prefer --token-file or the variable.",
            show_default=False,
        ),
    ] = DEFAULTS["token"],
    token_file: Annotated[
        str | None,
        typer.Option(help="File holding the API token (e.g. mode 600); not shown by ps.", show_default=False),
    ] = DEFAULTS["token_file"],
    max_upload_mb: Annotated[float, typer.Option(help="Largest uploaded file, MiB.")] = DEFAULTS[
        "max_upload_bytes"
    ]
    / MIB,
    max_pixels: Annotated[int, typer.Option(help="Largest uploaded image, pixels.")] = DEFAULTS["max_pixels"],
    batch_size: Annotated[
        int, typer.Option(help="Micro-batching: most classify requests per model call.")
    ] = DEFAULTS["batch_size"],
    batch_wait_ms: Annotated[
        float, typer.Option(help="Micro-batching: longest wait for a batch to fill.")
    ] = DEFAULTS["batch_wait_ms"],
    torch_threads: Annotated[
        int, typer.Option(help="Torch intra-op threads for classify/search (0: torch's default).")
    ] = DEFAULTS["torch_threads"],
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    master: Master = None,
    remote: Remote = None,
    conf: Conf = None,
    ship_env: ShipEnv = False,
) -> None:
    """Serve the web pages and the REST API (OpenAPI at /docs) with a background job runner."""
    # Imported here: the application (FastAPI, SQLAlchemy, the model runtime) is not needed to start
    # any other command.
    import uvicorn

    from sparkvision.web.app import create_app

    try:
        settings = Settings(
            host=host,
            port=port,
            data_roots=list(data_root or []),
            db_url=db,
            model_dir=model,
            index_dir=index,
            token=token,
            token_file=token_file,
            master=master,
            remote=remote,
            conf=parse_conf(conf or []),
            ship_env=ship_env,
            max_upload_bytes=int(max_upload_mb * MIB),
            max_pixels=max_pixels,
            batch_size=batch_size,
            batch_wait_ms=batch_wait_ms,
            torch_threads=torch_threads,
        )
        app = create_app(settings)
        if (
            settings.model_dir
        ):  # loaded now, so a model that cannot load is one line, not a start-up traceback
            app.state.sv.classifier(settings.model_dir)
    except ParamError as e:
        fail(f"--model {e.message}", False)
        return
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), False)
        return
    if not settings.data_roots:
        err_console.print("[yellow]warning:[/yellow] no --data-root: jobs, models and tables are unavailable")
    # Keep-alive longer than uvicorn's 5 s: a loaded server must not close connections clients are about to reuse.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30, backlog=4096)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
