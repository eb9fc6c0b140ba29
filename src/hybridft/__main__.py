from hybridft.cli import main

raise SystemExit(main())
