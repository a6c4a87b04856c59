"""`trieserve` command line: serve, prepare-model, loadtest.

Every `serve` flag is generated from `Settings`, so a flag and its `TRIESERVE_*` env var can
never drift apart; flags given on the command line win over the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from trieserve.server.settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "TRIESERVE_" + name.upper()
        default = field.default
        help_text = f"{field.description or ''} [env {env}; default {default}]".strip()
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        if origin is list:
            parser.add_argument(flag, dest=name, nargs="*", default=None, metavar="ORIGIN", help=help_text)
        elif annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif origin is typing.Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(annotation), default=None, help=help_text)
        else:
            kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
            kind = kinds[0] if kinds[0] in (int, float, Path) else str
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trieserve",
        description="OpenAI-compatible LLM server with lossless lookahead decoding and DefensiveKV eviction.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server", description="Start the OpenAI-compatible server.")
    _add_settings_flags(serve)
    prep = sub.add_parser("prepare-model", help="convert the default model once and print its folder")
    prep.add_argument("--model", default=None, help="a local HF folder to check instead of the default model")
    prep.add_argument(
        "--cache-dir", type=Path, default=None, help="where converted models live [env TRIESERVE_CACHE_DIR]"
    )
    sub.add_parser(
        "loadtest", help="load-test an OpenAI-compatible endpoint (see `trieserve loadtest --help`)", add_help=False
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "loadtest":
        from trieserve.server.loadtest import main as loadtest_main

        return loadtest_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "prepare-model":
        from trieserve.server.model import ModelNotFoundError, resolve_model_path

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        cache_dir = args.cache_dir or Settings().cache_dir
        try:
            print(resolve_model_path(args.model, cache_dir))
        except ModelNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        settings = settings_from_args(args)
        settings.api_keys()  # an unreadable key file is a start-up error, not a 500 later
    except ValueError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: Settings) -> int:
    import uvicorn
    from trieserve.server.api import create_app
    from trieserve.server.state import ServerState

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState(settings)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # the engine's grace starts as the server begins to shut down, not after its own
            # wait for open connections, so those hear how their requests ended
            state.begin_shutdown()
            await super().shutdown(sockets)

    config = uvicorn.Config(
        create_app(state),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
