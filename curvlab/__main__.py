from curvlab.cli import main

raise SystemExit(main())
