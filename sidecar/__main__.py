"""`python -m sidecar` is the same CLI as the `gts-sidecar` console script."""

from sidecar.cli import main

raise SystemExit(main())
