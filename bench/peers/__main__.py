from bench.peers.harness import main

raise SystemExit(main())
