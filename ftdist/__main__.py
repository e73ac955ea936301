from ftdist.cli import main

raise SystemExit(main())
