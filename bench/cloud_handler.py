"""``bench/handler.py``'s ``work`` as a Cloud Function entry point, for the Functions Framework."""

from bench.handler import work
from dagster_gcf_pipes.function.entrypoint import pipes_function

main = pipes_function(work)
main_http = main.http  # the earlier design's HTTP trigger
