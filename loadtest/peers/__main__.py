from loadtest.peers.harness import main

raise SystemExit(main())
