"""``gcf-pipes build SOURCE_DIR OUT_DIR``: the folder that ``gcloud functions deploy --source OUT_DIR`` deploys,
for a Python function (``main.py`` at its root: ``dagster_gcf_pipes.function.build``) or a Node.js one (a
package.json and no main.py: ``node_build``). Both print the deploy commands for their runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from dagster_gcf_pipes.cli import node_build
from dagster_gcf_pipes.function import build as python_build


def main(argv: list[str] | None = None, prog: str = "gcf-pipes build") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("source_dir", type=Path,
                        help="your function's folder: main.py at its root, or a Node.js function's package.json")
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--entry-point", default="main",
                        help="the function Cloud Functions calls: the @pipes_function in main.py, or the name the "
                             "Node.js module exports (default: main)")
    parser.add_argument("--runtime", choices=("python", "nodejs"),
                        help="default: nodejs for a folder with a package.json and no main.py, else python")
    args = parser.parse_args(argv)
    if (args.runtime or ("nodejs" if node_build.is_node_function(args.source_dir) else "python")) == "nodejs":
        built = node_build.build(args.source_dir, args.out_dir)
        python_build.report(built, args.source_dir, args.out_dir, args.entry_point, deploy=node_build.DEPLOY)
    else:
        built = python_build.build(args.source_dir, args.out_dir, args.entry_point)
        python_build.report(built, args.source_dir, args.out_dir, args.entry_point)
    return 0
