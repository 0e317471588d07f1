"""`python -m simulators.erp`: run the ERP API simulator (see the package's docstring)."""

from simulators.erp.app import main

raise SystemExit(main())
