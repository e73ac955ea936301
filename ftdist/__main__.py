from ftdist.cli import run

raise SystemExit(run())
