from cmsod.daemon import main

raise SystemExit(main())
