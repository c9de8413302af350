import sys

from dagster_gcf_pipes.cli import main

sys.exit(main())
