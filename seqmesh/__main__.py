from seqmesh.launch.cli import main

raise SystemExit(main())
