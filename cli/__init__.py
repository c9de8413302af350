"""The ``gcf-pipes`` command: one entry point, one subcommand per room, each imported only when chosen, so the
function-side install (no dagster) runs ``build`` and ``worker`` while ``dev`` and ``up`` need the local extra.

    gcf-pipes build SOURCE_DIR OUT_DIR [--entry-point main]
    gcf-pipes worker --subscription S --target module:handler
"""

from __future__ import annotations

import sys

#: subcommand -> (module with a ``main(argv)``, the extra that installs it)
COMMANDS = {
    "build": ("dagster_gcf_pipes.function.build", "function"),
    "worker": ("dagster_gcf_pipes.function.worker", "function"),
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__.strip() + "\n\nsubcommands: " + ", ".join(COMMANDS), file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    module_name, extra = COMMANDS[args[0]]
    try:
        module = __import__(module_name, fromlist=["main"])
    except ImportError as exc:
        print(f"gcf-pipes {args[0]}: {exc}; install it with: pip install 'dagster-gcf-pipes[{extra}]'",
              file=sys.stderr)
        return 2
    return module.main(args[1:], prog=f"gcf-pipes {args[0]}")
