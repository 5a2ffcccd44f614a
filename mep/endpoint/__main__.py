from mep.endpoint.main import main

raise SystemExit(main())
