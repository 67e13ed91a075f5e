"""``python -m disagg_operator`` = ``disagg operator`` (the operator image's entry point)."""

from disagg_operator.run import main

raise SystemExit(main())
