from compsearch.search.cli import entry

raise SystemExit(entry())
