"""`python -m edge.cli`: the `plantsync` command."""

from edge.cli.main import main

raise SystemExit(main())
