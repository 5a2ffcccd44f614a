from mep.endpoint.forker import start_early

start_early()  # before the endpoint's imports: the workers' forker starts in parallel with them
from mep.endpoint.main import main  # noqa: E402

raise SystemExit(main())
