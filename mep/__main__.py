from mep.cli.main import main

raise SystemExit(main())
