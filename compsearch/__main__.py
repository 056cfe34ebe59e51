from compsearch.search.cli import main

raise SystemExit(main())
