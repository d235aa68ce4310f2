from deepmoe.cli import main

raise SystemExit(main())
