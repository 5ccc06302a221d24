"""`python -m vc_model ...`: see vc_model/cli.py."""
from .cli import main

raise SystemExit(main())
