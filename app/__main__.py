"""`python -m app [--base PATH_OR_ID] [--runs DIR] [--lora FILE] [--host 127.0.0.1] [--port 7860]`.

Parses arguments, refuses a port in use or a bad LoRA file with one `error:` line and exit
code 2, loads the base model once, then serves the page (local only unless --host says so;
never a public share link).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

DEFAULT_RUNS = Path("outputs")
MAX_UPLOAD = "64mb"  # one instance photo; a camera's largest JPEG is well below


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --lora may be given several times."""
    parser = argparse.ArgumentParser(prog="python -m app", description="Preview Flat-LoRA runs: base vs LoRA.")
    parser.add_argument("--base", default=None,
                        help="SDXL base model folder or hub id (default: the embedded tiny model, built if missing)")
    parser.add_argument("--runs", type=Path, default=None,
                        help=f"folder of training runs (default: {DEFAULT_RUNS}/)")
    parser.add_argument("--lora", type=Path, action="append", default=[],
                        help="an extra LoRA .safetensors file to offer (repeatable)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 127.0.0.1 keeps the app on this machine")
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(argv)


def port_in_use(host: str, port: int) -> bool:
    """True when nothing can listen on (host, port), checked the way the server will bind."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option as uvicorn: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def resolve_inputs(args: argparse.Namespace):
    """(runs folder, extra LoRA files) after checking them; raises AppError for a bad one."""
    from .runs import AppError, check_lora_path

    if args.runs is not None and not args.runs.is_dir():
        raise AppError(f"--runs {args.runs}: no such folder")
    # A hub id is "owner/name"; something that reads as a path must exist, or diffusers answers
    # with a puzzling repo-id message.
    if args.base is not None and args.base.startswith(("/", ".", "~")) and not Path(args.base).is_dir():
        raise AppError(f"--base {args.base}: no such folder")
    runs_dir = args.runs if args.runs is not None else DEFAULT_RUNS
    return runs_dir, tuple(check_lora_path(path) for path in args.lora)


def main(argv: list[str] | None = None) -> int:
    """Run the app until Ctrl-C; returns the exit code."""
    args = parse_args(argv)
    if port_in_use(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is in use; stop the other server or pass --port N",
              file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    from flatlora_diffusion.sdxl.default_model import ensure_default_model

    from .callbacks import Studio
    from .runs import AppError
    from .ui import build_ui

    try:
        runs_dir, lora_files = resolve_inputs(args)
    except AppError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    studio = Studio(args.base or ensure_default_model(), runs_dir, lora_files)
    try:
        demo = build_ui(studio)  # loads the base model, so a wrong --base fails here, once
    except (OSError, ValueError) as error:
        print(f"error: cannot load base model {studio.base!r}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    serve(demo, studio, args.host, args.port)
    return 0


def serve(demo, studio, host: str, port: int, block: bool = True):
    """Launch `demo` on host:port; block=False returns at once (tests), the server in a thread."""
    # share=False always: a public tunnel is never opened by this tool. allowed_paths: the
    # runs folder and --lora files are the only files outside cwd/tmp the server may send.
    from .ui import CSS

    # max_file_size: an upload (the Train tab's instance images) larger than this is refused by the server.
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=not block,
                       allowed_paths=studio.allowed_paths(), footer_links=["api"], css=CSS,
                       prevent_thread_lock=not block, max_file_size=MAX_UPLOAD)


if __name__ == "__main__":
    sys.exit(main())
