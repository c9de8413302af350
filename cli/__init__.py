"""gcf-pipes: build a Cloud Function for Dagster Pipes, serve it, and run it locally. Each subcommand loads only
what it needs: build and worker run with the function extra alone (no dagster), dev and up need the local
extra (pip install 'dagster-gcf-pipes[local]'). `gcf-pipes SUBCOMMAND --help` describes each one.

    gcf-pipes build SOURCE_DIR OUT_DIR [--entry-point main]          the folder to deploy, Python or Node.js (function extra)
    gcf-pipes worker --subscription S --target module:handler       the pull worker (function extra)
    gcf-pipes dev --function my_function/main.py:main -m my_defs    local stack + dagster dev (local extra)
    gcf-pipes up --function my_function/main.py:main -m my_defs     just the local stack (local extra)
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, its function taking ``(argv, prog)``, the extra that installs what it needs)
COMMANDS = {
    "build": ("dagster_gcf_pipes.cli.build", "main", "function"),
    "worker": ("dagster_gcf_pipes.function.worker", "main", "function"),
    "dev": ("dagster_gcf_pipes.local.dev", "main", "local"),
    "up": ("dagster_gcf_pipes.local.dev", "up", "local"),
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        asked = bool(args) and args[0] in ("-h", "--help")
        print(__doc__.strip() + "\n\nsubcommands: " + ", ".join(COMMANDS), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module_name, function, extra = COMMANDS[args[0]]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"gcf-pipes {args[0]}: {exc}; install it with: pip install 'dagster-gcf-pipes[{extra}]'",
              file=sys.stderr)
        return 2
    return getattr(module, function)(args[1:], prog=f"gcf-pipes {args[0]}")
